"""Faults a long run must survive: non-finite updates, stop signals, and how a run stops.

Reliability: a non-finite loss or gradient is detected at the update where it
appears and the update is skipped on the device (``MultiTaskSAC.update_graph``);
the host reports it with the step and the task at the next check, and the run
stops after ``train.max_consecutive_skips`` skipped updates in a row.
SIGTERM (a scheduler's preemption), SIGUSR2 (SLURM's warning before the time limit,
as submitit configures it) and SIGINT (Ctrl-C) finish the current step, write a
checkpoint at the next episode end and stop with a message that says how to resume.
Every deliberate stop is a :class:`RunStopped` carrying the exit status the entry
point uses (the error classes live on the ground floor, mtrl_ntk/errors.py).

Cost of the non-finite check (``train.check_finite``): nothing per update. The
agent's update skips a non-finite stage with ``torch.where`` and counts skips in
device tensors (``UpdateHealth``); ``UpdateGuard.check`` reads them once (one host
synchronisation) when the trainer logs, evaluates, checkpoints and finishes.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, Protocol

import torch
from torch import Tensor

from mtrl_ntk.errors import EXIT_FAILED, NonFiniteUpdates, RunInterrupted, RunStopped
from mtrl_ntk.replay import Batch

__all__ = [
    "EXIT_FAILED", "NonFiniteUpdates", "RunInterrupted", "RunStopped", "StopSignals",
    "UpdateGuard", "describe_non_finite", "poison_batch",
]


class AgentHealth(Protocol):
    """What the guard reads of an agent: its device-side ``UpdateHealth`` (``MultiTaskSAC``)."""

    @property
    def health(self) -> Any: ...


# -- non-finite updates ---------------------------------------------------------------------


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
    """Reports the updates the agent's device-side guard skipped; stops a run that keeps skipping.

    ``update`` runs ``agent.update`` and remembers the step of each update (host
    only: no synchronisation). ``check`` reads the agent's ``UpdateHealth`` once:
    it reports the skips since the last check on stderr, with the step and the
    task of the last one, and raises :class:`NonFiniteUpdates` when
    ``max_consecutive_skips`` updates in a row were skipped. A skipped update left
    the networks, target critic, temperature, optimiser states and combiner states
    as they were (see ``MultiTaskSAC``); its replay sample and policy noise are consumed.
    """

    def __init__(
        self, agent: AgentHealth, task_names: Sequence[str], max_consecutive_skips: int,
        label: str = "",
    ) -> None:
        self.agent = agent
        self.task_names = list(task_names)
        self.max_consecutive_skips = max_consecutive_skips
        self.label = label  # "seed <k>: " in a seed group, so that a report names its run
        self.skips_since_eval = 0
        self.total_skips = 0
        self._steps: dict[int, int] = {}  # update index -> step, since the last check
        self._next_update: int | None = None  # the index of the next update (host mirror)

    def update(self, batch: Batch, step: int) -> dict[str, Tensor]:
        """The update's metrics (skipped or not: ``metrics["finite"]`` says, on the device)."""
        self.note_update(step)
        return self.agent.update(batch)

    def note_update(self, step: int) -> None:
        """Remember that the agent's next update is made at ``step`` (a seed group updates
        its agents itself and tells each agent's guard)."""
        if self._next_update is None:
            self._next_update = int(self.agent.health.updates)  # once per run (or resume)
        self._steps[self._next_update] = step
        self._next_update += 1

    def check(self, step: int) -> None:
        """Report the skips since the last check; stop the run after too many in a row."""
        health = self.agent.health.read()
        new = health["skipped"] - self.total_skips
        steps, self._steps = self._steps, {}
        self._next_update = health["updates"]
        if new <= 0:
            return
        self.total_skips += new
        self.skips_since_eval += new
        losses = health["last_losses"]
        cause = describe_non_finite(
            {"critic_task_losses": losses[0], "actor_task_losses": losses[1],
             "alpha_loss": losses[2, 0]},
            self.task_names,
        )
        at = steps.get(health["last_skip"])
        where = f"at step {at}" if at is not None else f"before step {step}"
        print(
            f"mtrl_ntk: {self.label}non-finite {cause} {where}: update skipped "
            f"({new} since the last check, {health['consecutive']} in a row, "
            f"{self.total_skips} in this run)",
            file=sys.stderr,
        )
        if health["max_consecutive"] >= self.max_consecutive_skips:
            raise NonFiniteUpdates(
                f"{self.label}stopped at step {step}: {health['max_consecutive']} consecutive "
                "updates had a "
                f"non-finite loss or gradient (last: {cause}); no checkpoint holds a "
                "non-finite state. Lower the learning rates, or raise "
                "train.max_consecutive_skips"
            )

    def state_dict(self) -> dict[str, int]:
        return {"skips_since_eval": self.skips_since_eval, "total_skips": self.total_skips}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skips_since_eval = int(state["skips_since_eval"])
        self.total_skips = int(state["total_skips"])
        self._steps, self._next_update = {}, None


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
