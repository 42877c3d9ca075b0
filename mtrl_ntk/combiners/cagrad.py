"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners._tools import is_real
from mtrl_ntk.combiners.base import check_param, register_combiner
from mtrl_ntk.combiners.inner_sgd import cagrad_sgd, check_sgd_settings
from mtrl_ntk.combiners.solvers import (
    KKT_TOLERANCE,
    GramianCombiner,
    WarmStart,
    scale_gramian,
    simplex_problem,
)


@dataclass(frozen=True)
class CAGradDual:
    dual_weights: Tensor  # [T] w in the simplex
    step: Tensor  # 0-d λ = sqrt(φ) / ‖g_w‖: the update is g_0 + λ g_w
    solved: Tensor  # 0-d bool: c‖g_0‖ > 0, so the dual was solved (else d = g_0)
    failed: Tensor  # 0-d bool: no face gave a usable point (never observed)
    kkt_violation: Tensor  # 0-d max relative KKT violation


def cagrad_dual(gramian: Tensor, c: float, start: Tensor | None = None) -> CAGradDual:
    """Solve CAGrad's dual min_{w in simplex} g_wᵀg_0 + sqrt(φ) ‖g_w‖, φ = c²‖g_0‖².

    In u_i = ‖g_i‖ w_i with H = C + 1e-10 I (cosines plus ridge) and
    q_i = g_iᵀg_0 / ‖g_i‖ it is min qᵀu + ρ sqrt(uᵀHu), ρ = c‖g_0‖, over
    {u >= 0, Σ u_i/‖g_i‖ = 1}: ``solvers.simplex_problem`` with a radius. On each
    face the stationary point has a closed form (``solvers.face_points``: the
    quadratic for the multiplier), so for T <= 12 all faces are solved in one batch
    and the best feasible one is the optimum; for T > 12 a fixed budget of
    primal active-set steps from ``start`` (previous dual weights).
    """
    scaled = scale_gramian(gramian)
    hessian = scaled.regularised_cosines()
    constraint = 1.0 / scaled.scale
    num_tasks = gramian.shape[0]
    mean_point = scaled.scale / num_tasks  # g_0 in the u-coordinates
    linear = scaled.cosines @ mean_point  # q_i = g_iᵀ g_0 / ‖g_i‖
    radius = c * (mean_point @ scaled.cosines @ mean_point).clamp_min(0.0).sqrt()
    solved = radius > 0
    solution = simplex_problem(
        hessian, linear, constraint, radius=torch.where(solved, radius, 1.0),
        start=None if start is None else start * scaled.scale,
    )
    weights = solution.point / scaled.scale
    return CAGradDual(
        dual_weights=weights / weights.sum(),
        step=torch.where(solved, solution.step, 0.0),
        solved=solved,
        failed=solved & solution.failed,
        kkt_violation=torch.where(solved, solution.kkt_violation, 0.0),
    )


@register_combiner("cagrad")
class CAGrad(WarmStart, GramianCombiner):
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, Sec. 3 and Algorithm 1).

    The update maximises the worst task's improvement min_i g_iᵀd within the ball
    ‖d - g_0‖ <= c‖g_0‖ around the mean gradient g_0. With w the solution of the
    dual min_{w in simplex} g_wᵀg_0 + sqrt(φ)‖g_w‖ (g_w = Σ_i w_i g_i,
    φ = c²‖g_0‖²), the primal solution is d = g_0 + (sqrt(φ)/‖g_w‖) g_w. c = 0 is
    LS. We solve the dual on the Gramian in float64 on its device with no host
    synchronisation (``cagrad_dual``): for T <= 12 exactly, as the best feasible
    closed-form stationary point over all 2^T - 1 faces (one batched Cholesky
    solve); for T > 12 by T + 10 primal active-set steps warm-started from the
    previous dual weights (``state_dict``), exact once the support is found but
    not guaranteed within the budget (``kkt_violation``, ``solver_converged``).

    Scale convention: d / (1 + c²), i.e. weights (1/T + λ w_i)/(1 + c²),
    λ = sqrt(φ)/‖g_w‖, as the authors' code (``rescale=1`` in the NYUv2 code, the
    same division in their MT10 code); the paper's d is (1 + c²) times ours.

    Two solvers (``solver``). ``"exact"`` (the default) is the solve above.
    ``"sgd"`` is the authors' MT10 solver (Cranial-XIX/CAGrad, ``mtrl/mtrl_files/
    cagrad.py``, ``cagrad_method=cagrad``, the method of their MT10 command
    ``mtrl/mtrl_files/run.sh``): the Gramian divided by the squared mean gradient
    norm, softmax-parametrised weights, ``sgd_steps`` = 20 momentum-SGD steps
    (``sgd_lr`` = 25, ``sgd_momentum`` = 0.5) from zero logits, the best of the
    21 evaluated iterates, the result divided by 1 + c², with the authors' 1e-4
    constants (``inner_sgd.cagrad_sgd`` spells it out). It is far from the dual's
    optimum when the steps cannot reach it; it starts cold at every step, as
    theirs (the warm-start state is kept but unused), and runs in float64
    (theirs in float32). Their code takes lr 50 when there are exactly 50 tasks
    (MT50): set ``sgd_lr=50`` for that.

    Departures of the exact solver from the authors' code: their MT10 code is the
    SGD solver above; their NYUv2 code calls SLSQP from the uniform weights, which
    stops at its start on badly scaled problems. Our dual is exact (T <= 12); the
    only smoothing is the 1e-10·diag(GGᵀ) ridge inside ‖g_w‖, which matters
    only when the hull of the gradients (nearly) contains 0: there g_w -> 0,
    its direction is undetermined, and the ridge keeps λ finite (at most about
    ρ / (1e-5 ‖g_i‖)) and the returned d optimal to ~1e-5 relative.
    If c‖g_0‖ = 0 the update is g_0 (weights 1/T for c = 0, or mean-zero
    gradients). A failed solve (never observed) or a non-finite or all-zero
    Gramian gives LS weights 1/T with ``solver_fallback`` = 1.
    """

    warm_start_key = "dual_weights"

    def __init__(
        self,
        num_tasks: int,
        *,
        c: float = 0.4,
        solver: str = "exact",
        sgd_steps: int = 20,
        sgd_lr: float = 25.0,
        sgd_momentum: float = 0.5,
    ) -> None:
        super().__init__(num_tasks)
        check_param(is_real(c) and c >= 0, "c", c, "a finite real number >= 0 (0.4 in the paper)")
        check_param(solver in ("exact", "sgd"), "solver", solver, "'exact' or 'sgd'")
        check_sgd_settings(sgd_steps, sgd_lr, sgd_momentum)
        self.c = float(c)
        self.solver = solver
        self.sgd_steps = int(sgd_steps)
        self.sgd_lr = float(sgd_lr)
        self.sgd_momentum = float(sgd_momentum)
        self._init_warm_start()


    def weigh(self, gramian: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        rescale = 1.0 / (1.0 + self.c**2)
        mean_weights = torch.full(
            (self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64, device=gramian.device
        )
        if self.c == 0:  # a hyperparameter, not data: d = g_0
            zero = torch.zeros((), dtype=torch.float64, device=gramian.device)
            diagnostics = {"dual_weights": mean_weights, "dual_step": zero,
                           "kkt_violation": zero, "solver_converged": zero + 1.0}
            return rescale * mean_weights, zero > 0, diagnostics
        if self.solver == "sgd":
            found = cagrad_sgd(gramian, self.c, self.sgd_steps, self.sgd_lr, self.sgd_momentum)
            diagnostics = {"dual_weights": found.dual_weights, "dual_step": found.step,
                           "sgd_objective": found.objective}
            return found.weights, torch.zeros_like(found.step, dtype=torch.bool), diagnostics
        dual = cagrad_dual(gramian, self.c, self.warm_start_on(gramian.device))
        dual_weights = torch.where(dual.solved, dual.dual_weights, mean_weights)
        weights = rescale * (mean_weights + dual.step * dual_weights)
        diagnostics = {
            "dual_weights": dual_weights,
            "dual_step": dual.step,
            "kkt_violation": dual.kkt_violation,
            "solver_converged": (dual.kkt_violation <= KKT_TOLERANCE).double(),
        }
        return weights, dual.failed, diagnostics

    def __repr__(self) -> str:
        solver = "" if self.solver == "exact" else f", solver={self.solver!r}"
        return f"CAGrad(num_tasks={self.num_tasks}, c={self.c}{solver})"

