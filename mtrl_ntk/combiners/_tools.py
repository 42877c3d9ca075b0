"""Small helpers shared by the stateful and loss-based combiners (not a combiner module).

- ``task_gradients``: g_i [T, d] without a copy when there is one mini-batch per task.
- ``positive_losses``: the loss-based methods (FAMO, UW, DWA, SI, MoCo's loss
  scaling) are defined for positive losses only; a SAC actor loss can be negative.
- ``adam_step``: the Adam update of ``torch.optim.Adam`` written out on plain
  tensors, so that a combiner's optimiser state is a few tensors in its
  ``state_dict`` (FAMO's task logits, UW's log-variances).
- ``ReproducibleGenerator``: a ``torch.Generator`` on the device of the data,
  seeded from the global torch RNG when the combiner is built, whose state goes
  into the combiner's ``state_dict`` (RLW, GradDrop, PCGrad).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

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
    step: int,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One in-place Adam step, identical to ``torch.optim.Adam`` (L2 ``weight_decay``, no amsgrad).

    ``step`` is the 1-based index of this step (for the bias corrections).
    """
    beta1, beta2 = betas
    if weight_decay != 0.0:
        grad = grad + weight_decay * param
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


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
