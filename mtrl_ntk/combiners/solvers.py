"""Float64 solvers on the [T, T] Gramian K = G Gᵀ shared by the Gramian-based combiners.

The task gradients of multi-task RL can differ in norm by many orders of
magnitude, so every solver here first splits the Gramian into the task norms
and the matrix of cosines (Jacobi scaling, ``scale_gramian``):

    K = S C S,   S = diag(‖g_i‖),   C_ij = cos(g_i, g_j)   (unit diagonal).

C does not depend on the norms, and the problems below are rewritten in the
variables u_i = ‖g_i‖ w_i, whose Hessians are built from C. Newton and
active-set steps are invariant to such a rescaling of the variables; the
linear algebra is not, and on C it stays accurate for norms spanning 1e-4..1e4
and beyond.

Two conventions hold for every combiner that uses this module:

- A *zero task* is one with ‖g_i‖ <= ``ZERO_GRADIENT_RATIO`` · max_j ‖g_j‖.
  Its row of C is 0 and its scale is floored at that ratio, so it behaves as an
  (exactly) zero gradient; each combiner documents which weight it gives it.
- The quadratic programs (MGDA, CAGrad) are solved on K + ``RIDGE`` · diag(K),
  i.e. C + ``RIDGE`` · I (1e-10): positive definite, so every active-set step
  is a Cholesky solve and duplicate tasks get a unique (equal) share. This
  moves a well-posed answer by a relative O(1e-10). Nash-MTL and FairGrad use
  no ridge unless the convex hull of the gradients (nearly) contains 0, where
  their equations have no solution (``BALANCE_RIDGE``, reported in the
  diagnostics).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl_ntk.combiners.base import CombinerOutput, GradientCombiner, Need, TaskStats

# A gradient whose norm is below this fraction of the largest task norm is treated as
# exactly zero: in any sum with the other tasks' gradients it is below float64 rounding,
# and methods that weight tasks by ~1/‖g_i‖ would give it weights of 1e12 and more.
ZERO_GRADIENT_RATIO = 1e-12
# Relative ridge added to the cosine matrix C (i.e. RIDGE · ‖g_i‖² on K's diagonal).
RIDGE = 1e-10
# Relative tolerance of the Karush-Kuhn-Tucker conditions in ``simplex_qp``.
KKT_TOLERANCE = 1e-12
_EPS = torch.finfo(torch.float64).eps


class SolverError(RuntimeError):
    """A linear solve inside a solver failed (a non-positive-definite system)."""


def gramian_of(stats: TaskStats, method: str) -> Tensor:
    """The Gramian of ``stats`` as a symmetric float64 CPU tensor [T, T].

    The solvers run a few dozen tiny sequential steps: on the CPU they cost
    microseconds each, on a GPU each would be a kernel launch and a sync.
    """
    if stats.gramian is None:
        raise ValueError(f"{method} needs the Gramian of the task gradients (Need.GRAMIAN)")
    gramian = stats.gramian.detach().to(device="cpu", dtype=torch.float64)
    return 0.5 * (gramian + gramian.T)


def degenerate_reason(gramian: Tensor) -> str | None:
    """Why no method can weight these tasks (non-finite or all-zero Gramian), or None."""
    if not bool(torch.isfinite(gramian).all()):
        return "non-finite Gramian"
    if not bool(gramian.diagonal().max() > 0):
        return "all task gradients are zero"
    return None


def fallback_output(num_tasks: int, reason: str, **diagnostics: object) -> CombinerOutput:
    """The documented safe answer of every solver-based combiner: LS weights 1/T, reported."""
    weights = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
    status = f"fallback: {reason}; LS weights 1/T"
    return CombinerOutput(
        weights=weights, diagnostics={"weights": weights, "solver_status": status, **diagnostics}
    )


@dataclass(frozen=True)
class ScaledGramian:
    """K = S C S split into task norms and cosines (see the module docstring)."""

    norms: Tensor  # [T] ‖g_i‖
    scale: Tensor  # [T] ‖g_i‖ floored at ZERO_GRADIENT_RATIO · max_j ‖g_j‖ (all > 0)
    zero: Tensor  # [T] bool: zero tasks
    cosines: Tensor  # [T, T] C; the rows and columns of zero tasks are 0 (diagonal too)

    def regularised_cosines(self) -> Tensor:
        """C + RIDGE · I [T, T]: positive definite, so every subsystem has a Cholesky factor."""
        size = self.cosines.shape[0]
        return self.cosines + RIDGE * torch.eye(size, dtype=torch.float64)

    def zero_tasks(self) -> list[int]:
        return self.zero.nonzero().flatten().tolist()


def scale_gramian(gramian: Tensor) -> ScaledGramian:
    """Task norms and the cosine matrix of a finite Gramian with at least one nonzero task."""
    norms = gramian.diagonal().clamp_min(0.0).sqrt()  # [T]
    floor = ZERO_GRADIENT_RATIO * norms.max()
    zero = norms <= floor
    scale = torch.where(zero, floor, norms)
    cosines = (gramian / torch.outer(scale, scale)).clamp(-1.0, 1.0)
    live = (~zero).double()
    cosines = cosines * torch.outer(live, live)
    cosines.diagonal().copy_(live)
    return ScaledGramian(norms=norms, scale=scale, zero=zero, cosines=cosines)


def _cholesky(matrix: Tensor) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise SolverError("a linear system of the solver is not positive definite")
    return factor


@dataclass(frozen=True)
class QPSolution:
    point: Tensor  # [n] the minimiser u
    multiplier: float  # ν, the multiplier of the constraint cᵀu = 1
    iterations: int
    converged: bool  # False: the last feasible iterate after the iteration limit


def simplex_qp(
    hessian: Tensor, linear: Tensor, constraint: Tensor, start: Tensor | None = None
) -> QPSolution:
    """argmin_u ½ uᵀHu + qᵀu subject to u >= 0 and cᵀu = 1 (H positive definite, c > 0).

    A primal active-set method (Nocedal & Wright, Numerical Optimization, Alg.
    16.3): on the current free set it solves the equality-constrained problem
    exactly (one Cholesky factorisation), walks towards that minimiser until a
    coordinate hits zero, and frees the bound with the most negative multiplier
    until all multipliers are >= 0. It ends at the exact KKT point (up to
    ``KKT_TOLERANCE``), typically in fewer than 2n steps, with no step size to
    tune; after 4n + 20 steps it returns its last feasible iterate, flagged.

    With u_i = ‖g_i‖ w_i, H = C (+ ridge) and c_i = 1/‖g_i‖ this is a problem
    over the simplex Σ_i w_i = 1, w >= 0, of the task weights w. ``start`` is a
    feasible point to start from (a warm start); the default is the best vertex.
    """
    size = hessian.shape[0]
    if start is None:
        vertex_values = 0.5 * hessian.diagonal() / constraint**2 + linear / constraint
        best = int(torch.argmin(vertex_values))
        point = torch.zeros(size, dtype=torch.float64)
        point[best] = 1.0 / constraint[best]
    else:
        point = start.clamp_min(0.0)
        point = point / (constraint @ point)
    free = point > 0
    multiplier = 0.0
    max_iterations = 4 * size + 20
    for iteration in range(1, max_iterations + 1):
        index = free.nonzero().flatten()
        sub_constraint, sub_linear = constraint[index], linear[index]
        factor = _cholesky(hessian[index][:, index])
        solved = torch.cholesky_solve(torch.stack([sub_constraint, sub_linear], dim=1), factor)
        along_constraint, along_linear = solved[:, 0], solved[:, 1]
        # Stationarity H u + q = ν c on the free set, with cᵀu = 1.
        multiplier_t = (1.0 + sub_constraint @ along_linear) / (sub_constraint @ along_constraint)
        target = multiplier_t * along_constraint - along_linear  # minimiser on this face
        if bool((target > 0).all()):
            point = torch.zeros(size, dtype=torch.float64)
            point[index] = target
            multiplier = float(multiplier_t)
            gradient = hessian @ point + linear
            # Multipliers of the bounds u_j >= 0, divided by c_j: in the units of ∂/∂w_j.
            bound_multipliers = (gradient - multiplier * constraint) / constraint
            magnitude = (hessian.abs() @ point + linear.abs()) / constraint + abs(multiplier)
            violation = torch.where(free, 0.0, bound_multipliers / magnitude.clamp_min(1e-300))
            if not bool(violation.min() < -KKT_TOLERANCE):
                return QPSolution(point, multiplier, iteration, True)
            free[int(torch.argmin(violation))] = True
        else:
            current = point[index]
            blocking = target <= 0
            gap = current - target  # > 0 where target <= 0 < current
            ratios = torch.where(blocking & (gap > 0), current / gap.clamp_min(1e-300), 0.0)
            ratios = torch.where(blocking, ratios, math.inf)
            leaving = int(torch.argmin(ratios))
            step = float(ratios[leaving])
            moved = (current + step * (target - current)).clamp_min(0.0)
            moved[leaving] = 0.0
            point = torch.zeros(size, dtype=torch.float64)
            point[index] = moved
            point = point / (constraint @ point)
            free = point > 0
    return QPSolution(point, multiplier, max_iterations, False)


@dataclass(frozen=True)
class BalanceSolution:
    weights: Tensor  # [n] w > 0
    iterations: int
    residual: float  # max_i |w_i^p (K w)_i - 1| for the K the solver was given
    converged: bool  # residual within tolerance, or Newton steps at float64 resolution


def _balance_penalty(values: Tensor, power: float) -> Tensor:
    """h(v) with h'(v) = -v^(-p): -log v for p = 1, v^(1-p)/(p-1) otherwise."""
    if power == 1.0:
        return -torch.log(values)
    return values ** (1.0 - power) / (power - 1.0)


def solve_power_balance(
    cosines: Tensor,
    norms: Tensor,
    power: float,
    start: Tensor | None = None,
    *,
    tolerance: float = 1e-10,
    max_iterations: int = 100,
    stop_at_resolution: bool = True,
) -> BalanceSolution:
    """w > 0 with (K w)_i = w_i^(-p) for K = S C S (Nash-MTL: p = 1; FairGrad: p = 1/α).

    The equations are the stationarity conditions of the convex
    f(w) = ½ wᵀKw + Σ_i h(w_i), h'(w) = -w^(-p) (strictly convex in w > 0), so
    a solution is unique, and Newton's method with a backtracking line search
    reaches it from any positive start. It exists unless the convex hull of the
    gradients contains 0 (then f has no minimiser: it decreases along a null
    direction of K); pass C + ridge there. We iterate in u = S w,
    scaled so that orthogonal gradients give v_i = 1 (v = u / m,
    m_i = ‖g_i‖^((p-1)/(p+1))): the Newton system C + diag(p v^(-p-1)) is then
    free of the task norms.

    Converged: every |w_i^p (Kw)_i - 1| <= tolerance, or the full Newton step
    changes no weight by more than 1e-7 relative (or by its own rounding error,
    10 eps times the condition number of the Newton system): in the quadratic
    phase of Newton's method the step taken then leaves an error far below
    that. This second test only decides where the terms of (Kw)_i nearly cancel
    (weights spanning many decades), so that the residual cannot fall below
    their rounding error; ``stop_at_resolution=False`` disables it. ``start``
    (weights w, e.g. the previous solution) is
    used after the best rescaling along its ray; the default start is the
    solution for orthogonal gradients, w_i = ‖g_i‖^(-2/(1+p)).
    """
    power = float(power)
    m = norms ** ((power - 1.0) / (power + 1.0))  # [n]
    start_v = torch.ones_like(norms)
    if start is not None and bool(torch.isfinite(start).all()) and bool((start > 0).all()):
        start_v = start * norms ** (2.0 / (1.0 + power))
    ray = m * start_v
    # Best multiple τ of the start: d/dτ f(τ ray) = 0.
    tau = ((m**2 * start_v ** (1.0 - power)).sum() / (ray @ cosines @ ray)) ** (1.0 / (1.0 + power))
    u = tau * ray

    def objective(point: Tensor) -> Tensor:
        return 0.5 * point @ cosines @ point + (m**2 * _balance_penalty(point / m, power)).sum()

    def max_residual(point: Tensor) -> float:
        v = point / m
        return float((v**power * (cosines @ point) / m - 1.0).abs().max())

    residual = max_residual(u)
    iteration, converged = 0, False
    for iteration in range(1, max_iterations + 1):  # noqa: B007 - reported below
        if residual <= tolerance:
            converged = True
            break
        v = u / m
        gradient = cosines @ u - m * v ** (-power)
        hessian = cosines + torch.diag(power * v ** (-power - 1.0))
        # Symmetric Jacobi equilibration keeps the Cholesky solve accurate when v spans decades.
        equilibrate = hessian.diagonal().rsqrt()
        factor = _cholesky(hessian * torch.outer(equilibrate, equilibrate))
        step = -equilibrate * torch.cholesky_solve(
            (equilibrate * gradient).unsqueeze(1), factor
        ).squeeze(1)
        relative_step = float((step / u).abs().max())
        # Relative accuracy of that step: ~ condition number · eps (from the Cholesky factor).
        pivots = factor.diagonal()
        resolution = max(1e-7, 10 * _EPS * float(pivots.max() / pivots.min()) ** 2)
        # Stay positive: no coordinate may lose more than half its value in one step.
        shrinking = step < 0
        limit = float((-0.5 * u[shrinking] / step[shrinking]).min()) if shrinking.any() else 1.0
        step_size = min(1.0, limit)
        value, slope = objective(u), float(gradient @ step)
        for _ in range(60):
            trial = u + step_size * step
            trial_residual = max_residual(trial)
            # Armijo on f; near the solution f stops resolving progress, the residual still does.
            if objective(trial) <= value + 1e-4 * step_size * slope or trial_residual < residual:
                break
            step_size *= 0.5
        else:
            # No progress possible at float64 resolution.
            converged = stop_at_resolution and relative_step <= 1e-6
            break
        u, residual = trial, trial_residual
        if stop_at_resolution and relative_step <= resolution:
            converged = True
            break
    else:
        converged = residual <= tolerance
    return BalanceSolution(
        weights=u / norms,
        iterations=iteration,
        residual=residual,
        converged=converged,
    )


# Nash-MTL / FairGrad: when the convex hull of the unit task gradients comes this close
# (squared distance) to 0, the exact solution is huge or does not exist, and the equations
# are solved on C + BALANCE_RIDGE · I. The answer is then set by the ridge; 1e-6 keeps the
# weights within ~1e3-1e5 of those of orthogonal gradients, where Newton's method still
# resolves them in float64 (with 1e-10 they reach 1e11 for α = 3 and stall).
BALANCE_RIDGE = 1e-6


def power_balance_weights(
    gramian: Tensor, power: float, start: Tensor | None = None
) -> tuple[Tensor, dict[str, object]]:
    """Weights [T] solving (GGᵀ w)_i = w_i^(-p), zero tasks weighted 0, and diagnostics.

    A solution exists iff 0 is not in the convex hull of the gradients. Newton's
    method (``solve_power_balance``) first runs without a ridge for at most 30
    steps, accepting only a residual <= 1e-10 (which also proves existence);
    that settles the usual case. Otherwise we measure the distance δ of 0 from
    the hull of the unit gradients (min_{θ in simplex} θᵀCθ = δ², an exact
    ``simplex_qp``; reported as ``hull_distance``): if δ² > BALANCE_RIDGE
    (1e-6) the equations are solved exactly (to float64 resolution); otherwise
    (opposite gradients, T > d, ...) on GGᵀ + BALANCE_RIDGE·diag(GGᵀ), which
    has a finite solution: ``solver_status`` and ``ridge`` say so, and
    ``equation_residual`` gives the distance to the exact equations. If Newton
    fails (never observed in our tests), the answer is the fallback
    w_i = ‖g_i‖^(-2/(1+p)) (exact for orthogonal gradients), reported.
    """
    scaled = scale_gramian(gramian)
    live = ~scaled.zero
    norms = scaled.norms[live]
    cosines = scaled.cosines[live][:, live]
    identity = torch.eye(norms.shape[0], dtype=torch.float64)
    warm = None if start is None else start[live]
    diagnostics: dict[str, object] = {"zero_gradient_tasks": scaled.zero_tasks(), "ridge": 0.0}
    status = "converged"
    try:
        try:
            solution = solve_power_balance(
                cosines, norms, power, warm, max_iterations=30, stop_at_resolution=False
            )
        except SolverError:  # the Newton system became singular: weights diverging
            solution = None
        if solution is None or not solution.converged:
            closest = simplex_qp(
                cosines + RIDGE * identity, torch.zeros_like(norms), torch.ones_like(norms)
            ).point
            hull_distance_squared = max(float(closest @ cosines @ closest), 0.0)
            diagnostics["hull_distance"] = hull_distance_squared**0.5
            if hull_distance_squared <= BALANCE_RIDGE:
                cosines = cosines + BALANCE_RIDGE * identity
                diagnostics["ridge"] = BALANCE_RIDGE
                status = (
                    f"converged with ridge {BALANCE_RIDGE:.0e}·diag(GGᵀ): the convex hull of "
                    "the task gradients (nearly) contains 0, so the exact equations have no "
                    "solution"
                )
            solution = solve_power_balance(cosines, norms, power, warm)
        live_weights = solution.weights
        diagnostics["solver_iterations"] = solution.iterations
        diagnostics["solver_residual"] = solution.residual
        if not solution.converged:
            raise SolverError(f"residual {solution.residual:.1e} after the iteration limit")
    except SolverError as error:
        live_weights = norms ** (-2.0 / (1.0 + power))
        status = f"fallback: {error}; weights ‖g_i‖^(-2/(1+p)) of orthogonal gradients"
    weights = torch.zeros(gramian.shape[0], dtype=torch.float64)
    weights[live] = live_weights
    exact = weights[live] ** power * (gramian[live][:, live] @ weights[live]) - 1.0
    diagnostics["equation_residual"] = float(exact.abs().max())
    diagnostics["solver_status"] = status
    return weights, diagnostics


def relative_rank_mask(eigenvalues: Tensor) -> Tensor:
    """Eigenvalues of a cosine matrix that are nonzero at float64 resolution (n · eps · max)."""
    size = eigenvalues.shape[0]
    return eigenvalues > size * _EPS * eigenvalues.max().clamp_min(0.0)


class GramianCombiner(GradientCombiner):
    """A weighting of the task Gramian GGᵀ, solved in float64 on the CPU.

    The shared part of the solver-based methods: a non-finite or all-zero
    Gramian gets the documented fallback (LS weights, reported in
    ``solver_status``); otherwise ``weigh`` maps the symmetric Gramian to weights.
    """

    need = Need.GRAMIAN

    def combine(self, stats: TaskStats) -> CombinerOutput:
        gramian = gramian_of(stats, self.name)
        reason = degenerate_reason(gramian)
        if reason is not None:
            return fallback_output(self.num_tasks, reason)
        return self.weigh(gramian)

    @abstractmethod
    def weigh(self, gramian: Tensor) -> CombinerOutput:
        """Weights from a finite Gramian [T, T] (float64, CPU) with a positive diagonal."""
