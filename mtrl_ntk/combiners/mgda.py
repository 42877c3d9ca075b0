"""MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018): the min-norm convex combination."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl_ntk.combiners.base import (
    CombinerOutput,
    register_combiner,
)
from mtrl_ntk.combiners.solvers import (
    GramianCombiner,
    SolverError,
    fallback_output,
    scale_gramian,
    simplex_qp,
)


def min_norm_weights(gramian: Tensor) -> tuple[Tensor, dict[str, object]]:
    """w = argmin_{w in simplex} wᵀ(GGᵀ)w for a finite Gramian with a nonzero task.

    Solved as ``simplex_qp`` in u_i = ‖g_i‖ w_i on the cosine matrix plus the
    1e-10 ridge; returns the weights [T] and the solver's diagnostics.
    """
    scaled = scale_gramian(gramian)
    solution = simplex_qp(
        scaled.regularised_cosines(),
        torch.zeros_like(scaled.scale),
        1.0 / scaled.scale,
    )
    weights = solution.point / scaled.scale
    status = "converged" if solution.converged else (
        f"inexact: iteration limit {solution.iterations}; last feasible iterate"
    )
    return weights, {"solver_status": status, "solver_iterations": solution.iterations}


@register_combiner("mgda")
class MGDA(GramianCombiner):
    """MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018, Sec. 3; Désidéri 2012).

    The update is the min-norm element of the convex hull of the task gradients,
    d = Σ_i w_i g_i with w = argmin_{w >= 0, Σw = 1} ‖Σ_i w_i g_i‖² = wᵀ(GGᵀ)w.
    It is 0 exactly when the current point is Pareto-stationary. We solve the QP
    on the Gramian exactly (a primal active-set method in float64 on the cosine
    matrix, ``solvers.simplex_qp``) to its KKT conditions: (GGᵀw)_i equal to the
    multiplier on the support of w and >= it elsewhere.

    Scale convention: a convex combination (weights sum to 1), so identical tasks
    give their gradient and one task gives g.

    Departures from the authors' code (isl-org/MultiObjectiveOptimization): they
    run Frank-Wolfe (at most 250 steps, stop at 1e-5 change) whose two-task line
    search clamps the weight to [0.001, 0.999]; here the solution is exact and
    reaches the vertices. Their ``loss+`` gradient normalisation (g_i / (ℓ_i ‖g_i‖))
    is not applied: we combine the raw task gradients, as the paper's problem. The
    QP is solved on GGᵀ + 1e-10·diag(GGᵀ), unique even for duplicate tasks
    (which then share their weight equally), with a relative effect ~1e-10. A
    zero gradient makes d = 0 (it is the min-norm element). A failed linear
    solve falls back to LS weights 1/T, reported in ``solver_status``.
    """


    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)

    def weigh(self, gramian: Tensor) -> CombinerOutput:
        try:
            weights, diagnostics = min_norm_weights(gramian)
        except SolverError as error:
            return fallback_output(self.num_tasks, str(error))
        return CombinerOutput(weights=weights, diagnostics={"weights": weights, **diagnostics})
