"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl_ntk.combiners._tools import is_real
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    check_param,
    register_combiner,
)
from mtrl_ntk.combiners.solvers import (
    KKT_TOLERANCE,
    GramianCombiner,
    SolverError,
    fallback_output,
    scale_gramian,
    simplex_qp,
)


@dataclass(frozen=True)
class CAGradDual:
    dual_weights: Tensor  # [T] w in the simplex
    step: float  # λ = sqrt(φ) / ‖g_w‖: the update is g_0 + λ g_w
    iterations: int
    status: str  # "converged", or how the answer was reached otherwise


def _support_optimum(
    hessian: Tensor, linear: Tensor, constraint: Tensor, radius: float, free: Tensor
) -> tuple[Tensor, float, float] | None:
    """The stationary point of qᵀu + ρ sqrt(uᵀHu) on the face {u_j = 0 off ``free``}, cᵀu = 1.

    Stationarity q + λ H u = ν c with λ = ρ / sqrt(uᵀHu) gives, with A = H_FF⁻¹,
    u_F = A(ν c - q)/λ and a quadratic for ν whose root makes λ > 0. Returns
    (u, λ, ν), or None if the face has no such point.
    """
    index = free.nonzero().flatten()
    factor = torch.linalg.cholesky(hessian[index][:, index])
    c, q = constraint[index], linear[index]
    solved = torch.cholesky_solve(torch.stack([c, q], dim=1), factor)
    cc, cq, qq = float(c @ solved[:, 0]), float(c @ solved[:, 1]), float(q @ solved[:, 1])
    discriminant = cq**2 - cc * qq + cc * radius**2
    if discriminant <= 0:
        return None
    step = math.sqrt(discriminant)  # λ
    multiplier = (cq + step) / cc  # ν
    point = torch.zeros_like(constraint)
    point[index] = (multiplier * solved[:, 0] - solved[:, 1]) / step
    return point, step, multiplier


def _is_optimal(
    hessian: Tensor, linear: Tensor, constraint: Tensor, point: Tensor, step: float,
    multiplier: float,
) -> bool:
    """KKT of min qᵀu + ρ‖u‖_H over {u >= 0, cᵀu = 1} at a face's stationary point."""
    if bool((point < -KKT_TOLERANCE * point.abs().max()).any()):
        return False
    gradient = linear + step * (hessian @ point)
    magnitude = (linear.abs() + step * (hessian.abs() @ point.abs())) / constraint + abs(multiplier)
    bound_multipliers = (gradient - multiplier * constraint) / constraint
    return not bool((bound_multipliers < -1e-10 * magnitude).any())


def cagrad_dual(gramian: Tensor, c: float, max_iterations: int = 100) -> CAGradDual:
    """Solve CAGrad's dual min_{w in simplex} g_wᵀg_0 + sqrt(φ) ‖g_w‖, φ = c²‖g_0‖².

    In u_i = ‖g_i‖ w_i with H = C + 1e-10 I (cosines plus ridge) and
    q_i = g_iᵀg_0 / ‖g_i‖ it is min qᵀu + ρ sqrt(uᵀHu), ρ = sqrt(φ). By
    sqrt(x) = min_t (x/t + t)/2 it is the minimum over t > 0 of the QPs
    min_u t/ρ qᵀu + ½ uᵀHu, and ‖g_w(t)‖/t decreases in t, so the optimal t
    (= ‖g_w‖) is bracketed between the min-norm value and the largest norm.
    Each round solves the QP at t (exact active set, warm-started), then the
    stationary point of the original problem on that QP's support in closed
    form: if it satisfies the KKT conditions it is the optimum; otherwise its t
    (or the bracket's geometric midpoint) is the next trial.
    """
    scaled = scale_gramian(gramian)
    num_tasks = gramian.shape[0]
    hessian = scaled.regularised_cosines()
    constraint = 1.0 / scaled.scale
    mean_point = scaled.scale / num_tasks  # g_0 in the u-coordinates
    linear = scaled.cosines @ mean_point  # q_i = g_iᵀ g_0 / ‖g_i‖
    radius = c * float(mean_point @ scaled.cosines @ mean_point) ** 0.5  # ρ = c ‖g_0‖

    def regularised_norm(point: Tensor) -> float:
        return float(point @ hessian @ point) ** 0.5

    zero_linear = torch.zeros_like(linear)
    min_norm = simplex_qp(hessian, zero_linear, constraint)
    low = regularised_norm(min_norm.point)
    high = float((hessian.diagonal().sqrt() * scaled.scale).max())
    point, trial, iterations = min_norm.point, math.sqrt(low * high), 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 - reported below
        qp = simplex_qp(hessian, (trial / radius) * linear, constraint, start=point)
        point = qp.point
        if regularised_norm(point) > trial:
            low = max(low, trial)
        else:
            high = min(high, trial)
        candidate = _support_optimum(hessian, linear, constraint, radius, point > 0)
        if candidate is not None:
            exact, step, multiplier = candidate
            if _is_optimal(hessian, linear, constraint, exact, step, multiplier):
                weights = exact.clamp_min(0.0) / scaled.scale
                return CAGradDual(weights / weights.sum(), step, iterations, "converged")
            proposal = radius / step
        else:
            proposal = -1.0
        if high <= low * (1 + 1e-13):
            # No face passed the KKT check, but t = ‖g_w‖ is pinned to 1e-13 and the QP
            # at that t is exact: the dual optimum to that precision.
            status = "converged: bracket on ‖g_w‖ closed to 1e-13"
            break
        trial = proposal if low < proposal < high else math.sqrt(low * high)
    else:
        status = f"inexact: iteration limit {max_iterations}; last QP solution"
    weights = point / scaled.scale
    return CAGradDual(weights, radius / regularised_norm(point), iterations, status)


@register_combiner("cagrad")
class CAGrad(GramianCombiner):
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, Sec. 3 and Algorithm 1).

    The update maximises the worst task's improvement min_i g_iᵀd within the ball
    ‖d - g_0‖ <= c‖g_0‖ around the mean gradient g_0. With w the solution of the
    dual min_{w in simplex} g_wᵀg_0 + sqrt(φ)‖g_w‖ (g_w = Σ_i w_i g_i,
    φ = c²‖g_0‖²), the primal solution is d = g_0 + (sqrt(φ)/‖g_w‖) g_w. c = 0 is
    LS. We solve the dual exactly on the Gramian in float64 (``cagrad_dual``:
    exact QPs along the variational form of the norm, finished in closed form on
    the optimal support and verified by its KKT conditions).

    Scale convention: d / (1 + c²), i.e. weights (1/T + λ w_i)/(1 + c²),
    λ = sqrt(φ)/‖g_w‖, as the authors' code (``rescale=1`` in the NYUv2 code, the
    same division in their MT10 code); the paper's d is (1 + c²) times ours.

    Departures from the authors' code (Cranial-XIX/CAGrad): their MT10 code runs
    20 SGD steps on softmax-parameterised weights of a Gramian divided by its
    mean squared norm, with 1e-4 added inside and outside the square root of
    ‖g_w‖²; their NYUv2 code calls SLSQP from the uniform weights, which stops
    at its start on badly scaled problems. Our dual is exact (KKT to 1e-10); the
    only smoothing is the 1e-10·diag(GGᵀ) ridge inside ‖g_w‖, which matters
    only when the hull of the gradients (nearly) contains 0: there g_w -> 0,
    its direction is undetermined, and the ridge keeps λ finite (at most about
    ρ / (1e-5 ‖g_i‖)) and the returned d optimal to ~1e-5 relative.
    If c‖g_0‖ = 0 the update is g_0 (weights 1/T for c = 0, or mean-zero
    gradients). A failed solve falls back to LS weights 1/T, reported in
    ``solver_status``.
    """


    def __init__(self, num_tasks: int, *, c: float = 0.4) -> None:
        super().__init__(num_tasks)
        check_param(is_real(c) and c >= 0, "c", c, "a finite real number >= 0 (0.4 in the paper)")
        self.c = float(c)

    def weigh(self, gramian: Tensor) -> CombinerOutput:
        rescale = 1.0 / (1.0 + self.c**2)
        mean_weights = torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64)
        mean_norm_squared = float(mean_weights @ gramian @ mean_weights)
        if self.c == 0 or not mean_norm_squared > 0:
            weights = rescale * mean_weights
            return CombinerOutput(
                weights=weights,
                diagnostics={"weights": weights, "solver_status": "converged: c‖g_0‖ = 0, d = g_0"},
            )
        try:
            dual = cagrad_dual(gramian, self.c)
        except (SolverError, torch.linalg.LinAlgError) as error:
            return fallback_output(self.num_tasks, str(error))
        weights = rescale * (mean_weights + dual.step * dual.dual_weights)
        return CombinerOutput(
            weights=weights,
            diagnostics={
                "weights": weights,
                "dual_weights": dual.dual_weights,
                "dual_step": dual.step,
                "solver_status": dual.status,
                "solver_iterations": dual.iterations,
            },
        )

    def __repr__(self) -> str:
        return f"CAGrad(num_tasks={self.num_tasks}, c={self.c})"
