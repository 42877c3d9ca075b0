"""Faults a long run must survive: non-finite updates, stop signals, and how a run stops.

DESIGN.md, "Reliability": a non-finite loss or gradient is detected at the update
where it appears, reported with the step and the task, the update is skipped, and
the run stops after ``train.max_consecutive_skips`` skipped updates in a row.
SIGTERM (a scheduler's preemption), SIGUSR2 (SLURM's warning before the time limit,
as submitit configures it) and SIGINT (Ctrl-C) finish the current step, write a
checkpoint at the next episode end and stop with a message that says how to resume.
Every deliberate stop is a :class:`RunStopped` carrying the exit status the entry
point uses.

Cost of the non-finite check (``train.check_finite``): each update first copies
the agent's state (networks, target critic, temperature, Adam moments and step
counts, combiner states, noise generator) into preallocated buffers with one
``torch._foreach_copy_``, and afterwards reads the update's ``finite`` flag on the
host (``.item()``). The training loop synchronises with the device at every step
anyway (the next action goes to the environments through ``.cpu()``), so the
read waits only for work that would be waited for a moment later.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.agent import MultiTaskSAC
from mtrl_ntk.replay import Batch

EXIT_FAILED = 1


class RunStopped(RuntimeError):
    """The run stopped before its last step, with a message for a person (no traceback)."""

    exit_code = EXIT_FAILED


class RunInterrupted(RunStopped):
    """SIGTERM or SIGINT: a checkpoint was written, then the run stopped."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number  # the shell's convention for "killed by signal"


class NonFiniteUpdates(RunStopped):
    """Too many consecutive updates had a non-finite loss or gradient."""


# -- non-finite updates ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a tensor sat in a flattened state (index into the tensor list)."""

    index: int


def _flatten(tree: Any, tensors: list[Tensor]) -> Any:
    """``tree`` with every tensor replaced by a ``_Slot``; the tensors are appended to
    ``tensors`` in a fixed order (dict insertion order, then list order)."""
    if isinstance(tree, Tensor):
        tensors.append(tree)
        return _Slot(len(tensors) - 1)
    if isinstance(tree, dict):
        return {key: _flatten(value, tensors) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_flatten(value, tensors) for value in tree)
    return tree  # numbers, strings, None: immutable


def _unflatten(skeleton: Any, tensors: Sequence[Tensor]) -> Any:
    if isinstance(skeleton, _Slot):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return {key: _unflatten(value, tensors) for key, value in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_unflatten(value, tensors) for value in skeleton)
    return skeleton


def _signature(tensors: Sequence[Tensor]) -> tuple[tuple[Any, ...], ...]:
    return tuple((tensor.shape, tensor.dtype, tensor.device) for tensor in tensors)


def describe_non_finite(metrics: dict[str, Tensor], task_names: Sequence[str]) -> str:
    """Which loss of which task was not finite, stage by stage in update order.

    The stages run in order (critic, actor, temperature), and a non-finite stage
    poisons the later ones, so the first non-finite stage is the cause.
    """
    for role in ("critic", "actor"):
        losses = metrics.get(f"{role}_task_losses")  # [T]
        if losses is None:
            continue
        losses = losses.detach().cpu()
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if bad:
            tasks = ", ".join(f"{task_names[i]} ({losses[i].item()})" for i in bad)
            return f"{role} loss of task{'s' if len(bad) > 1 else ''} {tasks}"
    alpha_loss = metrics.get("alpha_loss")
    if alpha_loss is not None and not torch.isfinite(alpha_loss).all():
        return f"temperature loss ({alpha_loss.item()})"
    return "a gradient (every loss was finite)"


class UpdateGuard:
    """Runs ``agent.update`` and undoes it when a loss or gradient was not finite.

    A skipped update leaves the networks, target critic, temperature, optimiser
    states (Adam step counts included), combiner states and noise generator exactly
    as before it; only the replay sample drawn for it is consumed. Each skip is
    reported on stderr with the step and the task; ``max_consecutive_skips`` skips
    in a row stop the run (:class:`NonFiniteUpdates`).
    """

    def __init__(
        self, agent: MultiTaskSAC, task_names: Sequence[str], max_consecutive_skips: int
    ) -> None:
        self.agent = agent
        self.task_names = list(task_names)
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.skips_since_eval = 0
        self.total_skips = 0
        self._skeleton: Any = None
        self._saved: list[Tensor] = []
        self._saved_signature: tuple[tuple[Any, ...], ...] = ()

    def _save(self) -> None:
        live: list[Tensor] = []
        self._skeleton = _flatten(self.agent.state_dict(), live)
        signature = _signature(live)
        if signature != self._saved_signature:  # first update, or the state grew (Adam's)
            self._saved = [tensor.detach().clone() for tensor in live]
            self._saved_signature = signature
        else:
            with torch.no_grad():
                torch._foreach_copy_(self._saved, live)

    def _restore(self) -> None:
        # Clones: the optimisers may keep the tensors they are given.
        state = _unflatten(self._skeleton, [tensor.clone() for tensor in self._saved])
        self.agent.load_state_dict(state)

    def update(self, batch: Batch, step: int) -> dict[str, Tensor] | None:
        """The update's metrics, or None when it was skipped."""
        self._save()
        metrics = self.agent.update(batch)
        if bool(metrics["finite"].item()):
            self.consecutive_skips = 0
            return metrics
        self._restore()
        self.consecutive_skips += 1
        self.skips_since_eval += 1
        self.total_skips += 1
        cause = describe_non_finite(metrics, self.task_names)
        print(
            f"mtrl_ntk: non-finite {cause} at step {step}: update skipped "
            f"({self.consecutive_skips} in a row, {self.total_skips} in this run)",
            file=sys.stderr,
        )
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteUpdates(
                f"stopped at step {step}: {self.consecutive_skips} consecutive updates had a "
                f"non-finite loss or gradient (last: {cause}); no checkpoint holds a "
                "non-finite state. Lower the learning rates, or raise "
                "train.max_consecutive_skips"
            )
        return None

    def state_dict(self) -> dict[str, int]:
        return {
            "consecutive_skips": self.consecutive_skips,
            "skips_since_eval": self.skips_since_eval,
            "total_skips": self.total_skips,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive_skips = int(state["consecutive_skips"])
        self.skips_since_eval = int(state["skips_since_eval"])
        self.total_skips = int(state["total_skips"])


def poison_batch(batch: Batch, task: int) -> Batch:
    """Test hook (``debug.nan_at_step``): task ``task``'s rewards become NaN, so its TD
    targets and critic loss are NaN and the update must be skipped."""
    reward = batch.reward.clone()  # [T, B_t]
    reward[task] = float("nan")
    return dataclasses.replace(batch, reward=reward)


# -- stop signals ---------------------------------------------------------------------------


class StopSignals:
    """While active, SIGTERM, SIGINT and SIGUSR2 only record a stop request (``requested``).

    The loop then finishes its step, checkpoints at the next episode end and stops.
    SIGTERM is a scheduler's preemption (SLURM sends SIGKILL ``KillWait``, by default
    30 s, later), SIGUSR2 the warning submitit asks SLURM to send ``signal_delay_s``
    before the time limit. A second SIGINT (Ctrl-C twice) stops at once with
    KeyboardInterrupt. Handlers can only be installed from the main thread; elsewhere
    (a launcher's worker thread) signals keep their default behaviour.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        if signal_number == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal_number
        print(
            f"\nmtrl_ntk: {signal.Signals(signal_number).name} received: finishing the step, "
            "checkpointing at the next episode end, then stopping (Ctrl-C again: stop now)",
            file=sys.stderr,
        )

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signal_number in self.SIGNALS:
                self._previous[signal_number] = signal.signal(signal_number, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers that were installed before."""
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()
