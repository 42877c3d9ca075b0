"""PCGrad (Yu et al., NeurIPS 2020): project away the conflicting components."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners._tools import ReproducibleGenerator
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    register_combiner,
)
from mtrl_ntk.combiners.solvers import gramian_of, ls_weights


def projection_coefficients(gramian: Tensor, orders: Tensor) -> Tensor:
    """Coefficients [T, T]: row i expresses the projected gradient g_i^PC = Σ_k c_ik g_k.

    ``orders`` [T, T]: row i is the order in which task i visits the tasks
    (a permutation; j = i is skipped). At each visited j, if g_i^PC · g_j < 0
    the component along g_j is removed: g_i^PC -= (g_i^PC · g_j / ‖g_j‖²) g_j
    (Algorithm 1 of the paper). Inner products come from the Gramian:
    g_i^PC · g_j = (c_i GGᵀ)_j. All T rows advance one visit per round: T rounds,
    a fixed count, each a handful of [T, T] ops with the decision as torch.where.
    """
    num_tasks = gramian.shape[0]
    device = gramian.device
    orders = orders.to(device)
    coefficients = torch.eye(num_tasks, dtype=torch.float64, device=device)
    rows = torch.arange(num_tasks, device=device)
    squared_norms = gramian.diagonal()
    for visit in range(num_tasks):
        other = orders[:, visit]  # [T] the task each row projects against now
        inner = (coefficients * gramian.index_select(1, other).T).sum(dim=1)  # g_i^PC · g_other
        other_norm = squared_norms.index_select(0, other)
        conflicting = (inner < 0) & (other != rows) & (other_norm > 0)
        shift = torch.where(conflicting, inner / other_norm.clamp_min(1e-300), 0.0)
        coefficients = coefficients.index_put((rows, other), -shift, accumulate=True)
    return coefficients


@register_combiner("pcgrad")
class PCGrad(GradientCombiner):
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1).

    Each task gradient g_i visits the other tasks in a random order and, whenever
    it conflicts with g_j (g_i^PC · g_j < 0), is projected onto the normal plane
    of g_j; the update is Σ_i g_i^PC. Since every projection is a linear
    combination of the task gradients, we run it on the Gramian in float64 on its
    device (``projection_coefficients``, no host synchronisation) and return the
    weights w_k = Σ_i c_ik, so d = Σ_k w_k g_k: no Jacobian is needed.

    The random orders (one permutation per task row, the argsort of a uniform
    [T, T] draw) come from ``draw_random``, drawn eagerly from the combiner's own
    generator on the data's device (seeded from torch's global RNG when it is built
    and saved in ``state_dict``) and passed in ``TaskStats.random``; ``combine``
    draws them itself when ``stats.random`` is None. A restored combiner draws the
    same orders.

    Scale convention: the sum of the projected gradients, as the paper and the
    authors' TensorFlow code (for non-conflicting gradients, Σ_i g_i = T times
    the LS update). The PyTorch port (WeiChengTseng/Pytorch-PCGrad) averages
    by default; Nash-MTL's port sums.

    Departures: the authors' TF code shuffles the task list once per step for
    all rows; we draw an independent order per row, as the paper's algorithm
    (and the PyTorch port, which reshuffles per row). A zero-norm g_j is never
    projected onto. A non-finite Gramian falls back to LS weights 1/T with
    ``solver_fallback`` = 1.
    """

    need = Need.GRAMIAN

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.random = ReproducibleGenerator()

    def draw_random(self, shared_dim: int, device: torch.device) -> Tensor:
        generator = self.random.get(device)
        return torch.rand(self.num_tasks, self.num_tasks, generator=generator, device=device)

    def combine(self, stats: TaskStats) -> CombinerOutput:
        gramian = gramian_of(stats, self.name)
        device = gramian.device
        bad = ~torch.isfinite(gramian).all()
        eye = torch.eye(self.num_tasks, dtype=torch.float64, device=device)
        clean = torch.where(bad, eye, torch.nan_to_num(gramian, nan=0.0, posinf=0.0, neginf=0.0))
        noise = stats.random if stats.random is not None else self.draw_random(0, device)
        orders = torch.argsort(noise, dim=1)  # [T, T]: one random permutation per row
        coefficients = projection_coefficients(clean, orders)
        weights = coefficients.sum(dim=0)  # Σ_i g_i^PC = Σ_k (Σ_i c_ik) g_k
        weights = torch.where(bad, ls_weights(self.num_tasks, device), weights)
        conflicts = ((clean - torch.diag(clean.diagonal())) < 0).sum() // 2
        return CombinerOutput(
            weights=weights,
            diagnostics={
                "weights": weights,
                "conflicting_pairs": conflicts,
                "solver_fallback": bad.double(),
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {"random": self.random.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.random.load_state_dict(state["random"])
