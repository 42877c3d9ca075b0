"""Small helpers shared by the stateful and loss-based combiners (not a combiner module).

- ``task_gradients``: g_i [T, d] without a copy when there is one mini-batch per task.
- ``positive_losses``: the loss-based methods (FAMO, UW, DWA, SI, MoCo's loss
  scaling) are defined for positive losses only; a SAC actor loss can be negative.
- ``adam_step``: the Adam update of ``torch.optim.Adam`` written out on plain
  tensors, so that a combiner's optimiser state is a few tensors in its
  ``state_dict`` (FAMO's task logits, UW's log-variances). Its step count is a
  0-d tensor, so a compiled update does not see a Python number change per call.
- ``stats_device``: the device of the statistics a combiner was handed.
- ``ReproducibleGenerator``: a ``torch.Generator`` on the device of the data,
  seeded from the global torch RNG when the combiner is built, whose state goes
  into the combiner's ``state_dict`` (RLW, GradDrop, PCGrad).

Capture rules the combiners of this package follow (so that the agent can compile
its whole update as one graph and capture it as one CUDA graph): ``combine`` and
``update_after_step`` are static-shape tensor code with no host synchronisation
and no Python branch on a tensor value; every tensor they create is on the device
of the statistics; their state lives in tensors that they update in place
(``copy_``, ``add_``, ...), never rebind or grow, listed by ``state_tensors()``.
``to(device)`` and ``load_state_dict`` run eagerly, before the first compiled
call; ``load_state_dict`` copies into the existing state tensors (any device to
any device), so tensors a compiled graph holds stay valid. Random numbers are
drawn eagerly by ``draw_random`` and reach ``combine`` through ``TaskStats.random``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtrl_ntk import foreach
from mtrl_ntk.combiners.base import TaskStats

# Floor on per-task losses for the methods that divide by a loss or take its
# logarithm. 1e-8 is the epsilon FAMO's authors add to every loss
# (Cranial-XIX/FAMO, famo.py), so for positive losses the floor only matters
# where the authors' code would itself be dominated by its epsilon.
LOSS_FLOOR = 1e-8


def task_gradients(stats: TaskStats) -> Tensor:
    """g_i [T, d] from the Jacobian [T, n, d]: a view when n = 1, the mean over n otherwise.

    ``TaskStats.task_gradients`` always takes the mean, which for n = 1 still reads and
    writes the whole [T, d] matrix (a noticeable part of a coordinate-wise update).
    """
    if stats.jacobian is None:
        raise ValueError("task_gradients needs the Jacobian (Need.JACOBIAN)")
    if stats.jacobian.shape[1] == 1:
        return stats.jacobian[:, 0]
    return stats.jacobian.mean(dim=1)


def is_real(value: Any) -> bool:
    """A finite int or float (not a bool), for hyperparameter validation."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    )


def positive_losses(losses: Tensor, *, shift: bool = False) -> tuple[Tensor, Tensor]:
    """Losses [T] as positive float64, and how many were <= 0 (a tensor, so no host sync).

    By default the losses are floored at ``LOSS_FLOOR``; with ``shift`` they
    become max(ℓ, 0) + ``LOSS_FLOOR``, which is exactly FAMO's ℓ - ℓ* + 1e-8
    (ℓ* = 0) for non-negative losses.
    """
    losses = losses.detach().double()
    nonpositive = (losses <= 0).sum()
    if shift:
        return losses.clamp_min(0.0) + LOSS_FLOOR, nonpositive
    return losses.clamp_min(LOSS_FLOOR), nonpositive


def adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One in-place Adam step, identical to ``torch.optim.Adam`` (L2 ``weight_decay``, no amsgrad).

    ``step`` is the 1-based index of this step (for the bias corrections), a 0-d
    float64 tensor on the device of ``param`` that the caller increments in place:
    the bias corrections are then tensor ops (as ``torch.optim.Adam`` with
    ``capturable=True``), with no Python number that changes from call to call.
    """
    beta1, beta2 = betas
    if weight_decay != 0.0:
        grad = grad + weight_decay * param
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    if foreach.in_seed_axis():  # under vmap: addcmul_ and addcdiv_ have no batching rule
        exp_avg_sq.mul_(beta2).add_(grad * grad, alpha=1.0 - beta2)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    step = step.to(torch.float64)  # float ** int-tensor would give the default dtype
    bias_correction1 = 1.0 - torch.pow(beta1, step)
    bias_correction2 = 1.0 - torch.pow(beta2, step)
    denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()).add_(eps)
    if foreach.in_seed_axis():
        param.add_(exp_avg * (-lr / bias_correction1) / denom)
    else:
        param.addcdiv_(exp_avg * (-lr / bias_correction1), denom)


def stats_device(stats: TaskStats, default: torch.device | None = None) -> torch.device:
    """The device of the first tensor in ``stats`` (``default``, else the CPU, if none)."""
    for value in (
        stats.losses, stats.jacobian, stats.gramian, stats.ntk_blocks,
        stats.representation_jacobian, stats.random,
    ):
        if value is not None:
            return value.device
    return default if default is not None else torch.device("cpu")


def _seed_from_global_rng() -> int:
    # Drawn from torch's global RNG, which the trainer seeds with the run seed:
    # two runs with the same seed draw the same random weights, different seeds differ.
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


class ReproducibleGenerator:
    """A torch.Generator created lazily on the device of the data, with a restorable state.

    ``state_dict`` stores ``generator.get_state()`` (with the device type it
    belongs to) so a restored combiner draws exactly the same numbers. A state
    saved on one device type (e.g. CUDA) cannot drive a generator of another
    (CPU): the generator is then re-seeded from ``(seed, draws)``, which is
    reproducible but not the continuation of the saved sequence.
    """

    def __init__(self) -> None:
        self.seed = _seed_from_global_rng()
        self.draws = 0  # number of calls to ``get``
        self._generator: torch.Generator | None = None
        self._saved_state: tuple[str, Tensor] | None = None

    def get(self, device: torch.device | str) -> torch.Generator:
        """The generator for ``device``, counting one draw."""
        device = torch.device(device)
        if self._generator is None or self._generator.device.type != device.type:
            generator = torch.Generator(device=device)
            if self._saved_state is not None and self._saved_state[0] == device.type:
                generator.set_state(self._saved_state[1])
            else:
                generator.manual_seed(self.seed + self.draws)
            self._generator = generator
            self._saved_state = None
        self.draws += 1
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        if self._generator is not None:
            saved: tuple[str, Tensor] | None = (
                self._generator.device.type,
                self._generator.get_state().clone(),
            )
        else:
            saved = self._saved_state
        return {
            "seed": self.seed,
            "draws": self.draws,
            "generator_device": None if saved is None else saved[0],
            "generator_state": None if saved is None else saved[1].clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self._generator = None
        if state["generator_state"] is None:
            self._saved_state = None
        else:
            self._saved_state = (str(state["generator_device"]), state["generator_state"].clone())


def load_into(target: Tensor, value: Any, name: str) -> None:
    """Copy a saved state entry into the existing state tensor ``target`` (any device).

    The copy keeps ``target`` (its storage, device and dtype): a compiled graph that
    holds it stays valid. A shape mismatch raises instead of broadcasting.
    """
    value = torch.as_tensor(value)
    if value.shape != target.shape:
        raise ValueError(
            f"state entry {name!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
        )
    target.copy_(value.to(dtype=target.dtype))
