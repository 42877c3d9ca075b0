"""MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018): the min-norm convex combination."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners.base import register_combiner
from mtrl_ntk.combiners.solvers import (
    KKT_TOLERANCE,
    GramianCombiner,
    WarmStart,
    scale_gramian,
    simplex_problem,
)


def min_norm_weights(
    gramian: Tensor, start: Tensor | None = None
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """w = argmin_{w in simplex} wᵀ(GGᵀ)w for a finite Gramian with a nonzero task.

    Solved as ``simplex_problem`` in u_i = ‖g_i‖ w_i on the cosine matrix plus the
    1e-10 ridge (``start``: previous weights, used for T > 12 only); returns the
    weights [T], the failure flag and the tensor diagnostics.
    """
    scaled = scale_gramian(gramian)
    solution = simplex_problem(
        scaled.regularised_cosines(),
        torch.zeros_like(scaled.scale),
        1.0 / scaled.scale,
        start=None if start is None else start * scaled.scale,
    )
    weights = solution.point / scaled.scale
    diagnostics = {
        "kkt_violation": solution.kkt_violation,
        "solver_converged": (solution.kkt_violation <= KKT_TOLERANCE).double(),
    }
    return weights, solution.failed, diagnostics


@register_combiner("mgda")
class MGDA(WarmStart, GramianCombiner):
    """MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018, Sec. 3; Désidéri 2012).

    The update is the min-norm element of the convex hull of the task gradients,
    d = Σ_i w_i g_i with w = argmin_{w >= 0, Σw = 1} ‖Σ_i w_i g_i‖² = wᵀ(GGᵀ)w.
    It is 0 exactly when the current point is Pareto-stationary. We solve the QP
    on the Gramian in float64 on the cosine matrix (``solvers.simplex_problem``),
    on the Gramian's device with no host synchronisation: for T <= 12 exactly, by
    solving all 2^T - 1 faces in one batched Cholesky solve and keeping the best
    feasible face point (KKT: (GGᵀw)_i equal to the multiplier on the support of w
    and >= it elsewhere); for T > 12 (MT50) by T + 10 primal active-set steps
    warm-started from the previous weights (``state_dict``), which is exact once the
    support is found but not guaranteed within that budget: ``kkt_violation`` and
    ``solver_converged`` (violation <= 1e-8) report it.

    Scale convention: a convex combination (weights sum to 1), so identical tasks
    give their gradient and one task gives g.

    Departures from the authors' code (isl-org/MultiObjectiveOptimization): they
    run Frank-Wolfe (at most 250 steps, stop at 1e-5 change) whose two-task line
    search clamps the weight to [0.001, 0.999]; here the solution is exact and
    reaches the vertices. Their ``loss+`` gradient normalisation (g_i / (ℓ_i ‖g_i‖))
    is not applied: we combine the raw task gradients, as the paper's problem. The
    QP is solved on GGᵀ + 1e-10·diag(GGᵀ), unique even for duplicate tasks
    (which then share their weight equally), with a relative effect ~1e-10. A
    zero gradient makes d = 0 (it is the min-norm element). A non-finite or
    all-zero Gramian (or a failed solve, never observed) gives LS weights 1/T with
    ``solver_fallback`` = 1.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self._init_warm_start()


    def weigh(self, gramian: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        return min_norm_weights(gramian, self.warm_start_on(gramian.device))
