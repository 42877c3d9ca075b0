"""FairGrad (Ban & Ji, ICML 2024): α-fair task weighting."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners._tools import is_real
from mtrl_ntk.combiners.base import check_param, register_combiner
from mtrl_ntk.combiners.inner_sgd import check_sgd_settings, fairgrad_sgd
from mtrl_ntk.combiners.solvers import GramianCombiner, WarmStart, power_balance_weights


@register_combiner("fairgrad")
class FairGrad(WarmStart, GramianCombiner):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

    The update d = Σ_i w_i g_i maximises the α-fair utility Σ_i (g_iᵀd)^(1-α)/(1-α)
    over a ball; its weights w > 0 solve (GGᵀw)_i = w_i^(-1/α) for every task.
    α = 1 is proportional fairness, i.e. Nash-MTL's equations; large α tends to
    max-min fairness. We solve the equations as the minimum of the strictly convex
    ½ wᵀ(GGᵀ)w + Σ_i h(w_i), h'(w) = -w^(-1/α), by damped Newton in float64
    (``solvers.solve_power_balance``: a fixed budget of 12 steps for α <= 2, 20 above,
    with 17 candidate step sizes evaluated at once, no host synchronisation), started
    from the better of the previous solution (``state_dict``) and the solution for
    orthogonal gradients; ``solver_residual`` reports max_i |w_i^(1/α) (GGᵀw)_i - 1| relative to
    the size of its terms (our tests reach 1e-9 up to the rounding of (GGᵀw)_i).

    Scale convention: the sum Σ_i w_i g_i, as the authors' code; w scales as
    ‖g‖^(-2α/(1+α)) (one task: w = ‖g‖^(-2α/(1+α))).

    Two solvers (``solver``). ``"exact"`` (the default for new work) is the Newton
    solve above. ``"sgd"`` is the authors' MT10 solver (OptMN-Lab/fairgrad,
    ``mtrl_files/fairgrad.py``, the active ``fairgrad``, "FairGrad with SGD"; the
    ``least_squares`` variant is commented out there): ``sgd_steps`` = 20 momentum-SGD
    steps (``sgd_lr`` = 0.1, ``sgd_momentum`` = 0.5, gradient norm clipped to
    ``sgd_max_grad_norm`` = 1.0) on ‖GGᵀw - (1/(w + 1e-8))^(1/α)‖² from w = 1/T,
    w clamped to >= 1e-8, the best evaluated iterate used as it is
    (``inner_sgd.fairgrad_sgd`` spells it out). It is far from converged: the
    clipped steps move w by at most ~0.1 each, so on small gradient norms it
    returns about the uniform start, elsewhere weights damped towards it. It
    starts cold at every step, as theirs (the warm-start state is kept but
    unused), in float64 (theirs in float32).

    Departures of the exact solver from the authors' code: their MT10 code is the SGD
    solver above; their ``least_squares`` variant (OptMLGroup/FairGrad's other
    experiments) solves the equations with ``scipy.optimize.least_squares`` from
    w = 1/T each step, with default tolerances (it can stop far from the solution
    when the gradient norms differ by orders of magnitude); we use the convex
    formulation above.
    The same rules as Nash-MTL apply: when the convex hull of the unit gradients
    comes within 1e-3 of 0 the equations have no solution and are solved on
    GGᵀ + 1e-6·diag(GGᵀ), reported in ``ridge`` and ``hull_distance``; a zero
    gradient gets w_i = 0; a residual above 1e-3 falls back to
    w_i = ‖g_i‖^(-2α/(1+α)) with ``solver_fallback`` = 1 (a non-finite or all-zero
    Gramian: LS weights 1/T, reported).
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        alpha: float = 1.0,
        solver: str = "exact",
        sgd_steps: int = 20,
        sgd_lr: float = 0.1,
        sgd_momentum: float = 0.5,
        sgd_max_grad_norm: float = 1.0,
    ) -> None:
        super().__init__(num_tasks)
        check_param(
            is_real(alpha) and alpha > 0 and math.isfinite(1.0 / alpha),
            "alpha", alpha, "a finite real number > 0",
        )
        check_param(solver in ("exact", "sgd"), "solver", solver, "'exact' or 'sgd'")
        check_sgd_settings(sgd_steps, sgd_lr, sgd_momentum)
        check_param(is_real(sgd_max_grad_norm) and sgd_max_grad_norm > 0,
                    "sgd_max_grad_norm", sgd_max_grad_norm, "a finite real number > 0")
        self.alpha = float(alpha)
        self.solver = solver
        self.sgd_steps = int(sgd_steps)
        self.sgd_lr = float(sgd_lr)
        self.sgd_momentum = float(sgd_momentum)
        self.sgd_max_grad_norm = float(sgd_max_grad_norm)
        self._init_warm_start()


    def weigh(self, gramian: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        if self.solver == "sgd":
            found = fairgrad_sgd(gramian, self.alpha, self.sgd_steps, self.sgd_lr,
                                 self.sgd_momentum, self.sgd_max_grad_norm)
            failed = torch.zeros((), dtype=torch.bool, device=gramian.device)
            return found.weights, failed, {"sgd_objective": found.objective}
        weights, diagnostics = power_balance_weights(
            gramian, power=1.0 / self.alpha, start=self.warm_start_on(gramian.device)
        )
        return weights, torch.zeros((), dtype=torch.bool, device=gramian.device), diagnostics

    def __repr__(self) -> str:
        solver = "" if self.solver == "exact" else f", solver={self.solver!r}"
        return f"FairGrad(num_tasks={self.num_tasks}, alpha={self.alpha}{solver})"
