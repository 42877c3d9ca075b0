"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution of the tasks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners.base import register_combiner
from mtrl_ntk.combiners.solvers import GramianCombiner, WarmStart, power_balance_weights


@register_combiner("nashmtl")
class NashMTL(WarmStart, GramianCombiner):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Sec. 3).

    The update d = Σ_i a_i g_i maximises Σ_i log(g_iᵀd) over the ball ‖d‖ <= ε;
    its weights a > 0 solve (GGᵀa)_i = 1/a_i, i.e. a_i (GGᵀa)_i = 1 for every
    task: each task's directional derivative g_iᵀd = 1/a_i. We solve these
    equations as the minimum of the strictly convex ½ aᵀ(GGᵀ)a - Σ_i log a_i by
    damped Newton in float64, in variables scaled by the task norms
    (``solvers.solve_power_balance``): a fixed budget of 12 steps, each with 17
    candidate step sizes evaluated at once (no host synchronisation, so it can be
    captured in a CUDA graph), started from the better of the previous solution
    (``state_dict``) and the solution for orthogonal gradients. ``solver_residual``
    reports max_i |a_i (GGᵀa)_i - 1| divided by the size of the terms of a_i (GGᵀa)_i
    (at least 1: where they cancel float64 resolves no better), for the ridged Gramian
    (see below); our tests reach 1e-9 (float64 resolution) with norms spanning
    1e-4..1e4.

    Scale convention: the sum Σ_i a_i g_i with the paper's a, as the authors'
    weighted loss Σ_i a_i ℓ_i: a scales as 1/‖g‖ (one task: a = 1/‖g‖, so
    d = g/‖g‖).

    Departures from the authors' code (AvivNavon/nash-mtl): they divide GGᵀ by
    its Frobenius norm and run up to 20 rounds of a sequential convex
    approximation with cvxpy/ECOS, stopping once ‖GGᵀa - 1/a‖ < 1e-3 on the
    normalised Gramian (and keeping the previous a when ECOS fails). When the convex
    hull of the gradients contains 0 (opposite gradients, T > d, ...) the
    equations have no solution (a Pareto-stationary point: no d improves every
    task); we always compute the distance of the hull of the unit gradients from 0
    (MGDA's problem on the cosines) and, if it is within 1e-3, solve the equations
    on GGᵀ + 1e-6·diag(GGᵀ) instead, which has a finite solution, and report it
    (``ridge``, ``hull_distance``, and ``equation_residual``, the distance to the
    exact equations). A zero task gradient (‖g_i‖ <= 1e-12 max_j ‖g_j‖) cannot
    satisfy g_iᵀd = 1/a_i: it is left out and gets a_i = 0 (the authors' cvxpy
    problem is then infeasible and they keep the previous weights). The authors'
    ``max_norm`` gradient clipping and ``update_weights_every`` are not part of
    this weighting (clipping belongs to the trainer); weights are recomputed at
    every update. If Newton leaves a residual above 1e-3 (never observed), the
    weights of orthogonal gradients a_i = 1/‖g_i‖ are used and ``solver_fallback``
    = 1; a non-finite or all-zero Gramian gives LS weights 1/T, also reported.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self._init_warm_start()


    def weigh(self, gramian: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        weights, diagnostics = power_balance_weights(
            gramian, power=1.0, start=self.warm_start_on(gramian.device)
        )
        return weights, torch.zeros((), dtype=torch.bool, device=gramian.device), diagnostics
