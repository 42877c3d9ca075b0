"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk import foreach
from mtrl_ntk.combiners._tools import ReproducibleGenerator, task_gradients
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    register_combiner,
)


def sign_dropout(grads: Tensor, uniform: Tensor) -> Tensor:
    """GradDrop's direction for task gradients [T, d] and one uniform draw U [d] in [0, 1).

    P = ½ (1 + Σ_i g_i / Σ_i |g_i|) per coordinate (the positive-sign purity,
    Eq. 1); the positive components of a coordinate are kept if U < P, else its
    negative components. A coordinate where all tasks agree in sign has P = 1
    (or 0) and is always kept. Returns Σ_i (mask_i ⊙ g_i), [d].
    """
    # Sums of the positive and of the negative components per coordinate: the two
    # candidate outputs, and (as their sum and difference) Σ_i g_i and Σ_i |g_i|.
    # Selecting between the two sums is the masked sum without forming the [T, d] mask.
    buffer = torch.clamp(grads, min=0)  # [T, d], reused for the negative parts
    positive = buffer.sum(dim=0)  # [d]
    if foreach.in_seed_axis():  # under vmap: no out= argument
        negative = torch.clamp(grads, max=0).sum(dim=0)
    else:
        negative = torch.clamp(grads, max=0, out=buffer).sum(dim=0)  # [d]
    total, total_abs = positive + negative, positive - negative
    signed_fraction = total / total_abs.clamp_min(torch.finfo(grads.dtype).tiny)
    # A coordinate where every g_i is 0 gets P = ½; it contributes 0 either way.
    purity = 0.5 * (1.0 + torch.where(total_abs > 0, signed_fraction, 0.0))  # P, [d]
    return torch.where(uniform < purity, positive, negative)


@register_combiner("graddrop")
class GradDrop(GradientCombiner):
    """GradDrop (Chen et al., "Just pick a sign: optimizing deep multitask models with
    gradient sign dropout", NeurIPS 2020, Eq. 1-2), applied to the task gradients
    of the shared parameters.

    Each call draws U ~ Uniform[0, 1) per coordinate and keeps, at every
    coordinate, either only the positive or only the negative task-gradient
    components (positive with probability P = ½ (1 + Σ_i g_i / Σ_i |g_i|)); the
    direction is Σ_i of the kept components. U (float32, [d]) comes from the
    combiner's own ``torch.Generator`` on the gradients' device, seeded from
    torch's global RNG when the combiner is built and saved in ``state_dict``.

    Capture: ``draw_random(d, device)`` draws U eagerly, before the compiled
    update, and ``combine`` reads it from ``stats.random``; without it (the pure
    function path) ``combine`` draws U itself, the same numbers for the same
    generator state. ``state_tensors()`` is empty (the generator state is not a
    tensor, and a draw is not undone by restoring them).

    Scale convention: a sum over tasks (where all tasks agree the coordinate is
    Σ_i g_i, T times the LS update), as the authors' sum of the masked gradients.
    Departures: the authors (and LibMTL, which requires ``rep_grad=True``) apply
    GradDrop to the gradients at the shared activations, multiplied by the sign
    of the inputs there, with an optional ``leak``; here, as in the MoCo authors'
    port (heshandevaka/MoCo, ``CAGrad/utils.py``), it acts on the per-task
    gradients of all shared parameters, with no leak. Ties U = P keep the
    negative components (LibMTL drops both). A coordinate where every task
    agrees in sign is always kept (P is computed without LibMTL's 1e-7 in the
    denominator, which can drop tiny unanimous coordinates).
    ``diagnostics["weights"]`` is 1 for every task (the nominal sum weights,
    e.g. for task-specific parameters).
    """

    need = Need.JACOBIAN

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.random = ReproducibleGenerator()

    def draw_random(self, shared_dim: int, device: torch.device) -> Tensor:
        """U ~ Uniform[0, 1) [d] float32 on ``device``, from the combiner's generator."""
        generator = self.random.get(device)
        return torch.rand(shared_dim, generator=generator, dtype=torch.float32, device=device)

    def combine(self, stats: TaskStats) -> CombinerOutput:
        grads = task_gradients(stats).detach()  # [T, d]
        uniform = stats.random
        if uniform is None:
            uniform = self.draw_random(grads.shape[1], grads.device)
        elif uniform.shape != grads.shape[1:]:
            raise ValueError(f"graddrop: stats.random must have shape [{grads.shape[1]}]")
        direction = sign_dropout(grads, uniform)
        weights = torch.ones(self.num_tasks, dtype=torch.float64, device=grads.device)
        return CombinerOutput(direction=direction, diagnostics={"weights": weights})

    def state_dict(self) -> dict[str, Any]:
        return {"random": self.random.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.random.load_state_dict(state["random"])
