"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution of the tasks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners.base import (
    CombinerOutput,
    register_combiner,
)
from mtrl_ntk.combiners.solvers import (
    GramianCombiner,
    power_balance_weights,
)


@register_combiner("nashmtl")
class NashMTL(GramianCombiner):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Sec. 3).

    The update d = Σ_i a_i g_i maximises Σ_i log(g_iᵀd) over the ball ‖d‖ <= ε;
    its weights a > 0 solve (GGᵀa)_i = 1/a_i, i.e. a_i (GGᵀa)_i = 1 for every
    task: each task's directional derivative g_iᵀd = 1/a_i. We solve these
    equations exactly as the minimum of the strictly convex
    ½ aᵀ(GGᵀ)a - Σ_i log a_i by Newton's method with a line search, in float64,
    in variables scaled by the task norms (``solvers.solve_power_balance``),
    warm-started from the previous solution (kept in ``state_dict``).

    Scale convention: the sum Σ_i a_i g_i with the paper's a, as the authors'
    weighted loss Σ_i a_i ℓ_i: a scales as 1/‖g‖ (one task: a = 1/‖g‖, so
    d = g/‖g‖).

    Departures from the authors' code (AvivNavon/nash-mtl): they divide GGᵀ by
    its Frobenius norm and run up to 20 rounds of a sequential convex
    approximation with cvxpy/ECOS, stopping once ‖GGᵀa - 1/a‖ < 1e-3 on the
    normalised Gramian (and keeping the previous a when ECOS fails); we reach
    max_i |a_i (GGᵀa)_i - 1| <= 1e-10 (or float64 resolution). When the convex
    hull of the gradients contains 0 (opposite gradients, T > d, ...) the
    equations have no solution (a Pareto-stationary point: no d improves every
    task); if the hull of the unit gradients comes within 1e-3 of 0 we solve
    them on GGᵀ + 1e-6·diag(GGᵀ) instead, which has a finite solution, and
    report it (``solver_status``, ``ridge``, ``hull_distance``, and
    ``equation_residual``, the distance to the exact equations). A zero task
    gradient (‖g_i‖ <= 1e-12 max_j ‖g_j‖) cannot satisfy g_iᵀd = 1/a_i: it is
    left out and gets a_i = 0 (the authors' cvxpy problem is then infeasible and
    they keep the previous weights). The authors'
    ``max_norm`` gradient clipping and ``update_weights_every`` are not part of
    this weighting (clipping belongs to the trainer); weights are recomputed at
    every update. If the solver fails, the weights of orthogonal gradients
    a_i = 1/‖g_i‖ are used and ``solver_status`` says so.
    """


    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.warm_start: Tensor | None = None  # [T] the previous solution a

    def weigh(self, gramian: Tensor) -> CombinerOutput:
        weights, diagnostics = power_balance_weights(gramian, power=1.0, start=self.warm_start)
        if not diagnostics["solver_status"].startswith("fallback"):  # type: ignore[union-attr]
            self.warm_start = weights.clone()
        return CombinerOutput(weights=weights, diagnostics={"weights": weights, **diagnostics})

    def state_dict(self) -> dict[str, Any]:
        return {"warm_start": None if self.warm_start is None else self.warm_start.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"warm_start"}
        if unknown:
            raise ValueError(f"nashmtl got unknown state keys {sorted(unknown)}")
        warm_start = state.get("warm_start")
        if warm_start is not None:
            warm_start = torch.as_tensor(warm_start, dtype=torch.float64).clone()
            if warm_start.shape != (self.num_tasks,):
                raise ValueError(
                    f"nashmtl warm_start must have shape [{self.num_tasks}], "
                    f"got {tuple(warm_start.shape)}"
                )
        self.warm_start = warm_start
