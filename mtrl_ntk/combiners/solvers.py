"""Float64 solvers on the [T, T] Gramian K = G Gᵀ shared by the Gramian-based combiners.

Capture contract. Everything here is static-shape tensor code on the Gramian's
own device with no host synchronisation: no ``.item()``/``float(t)``/``bool(t)``,
no data-dependent Python branch or loop length, no boolean-mask indexing, and no
``torch.linalg`` call that checks its ``info`` on the host (``cholesky_ex``
instead of ``cholesky``; Jacobi rotations instead of ``eigh``/``svd``). Every
iteration count is fixed by T alone, decisions are masks and ``torch.where``,
and diagnostics are tensors (``solver_fallback`` is a 0-d float, 1.0 when the
documented fallback was taken). A whole update can then be compiled as one
graph (``torch.compile(fullgraph=True)``) and captured as one CUDA graph.

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
  i.e. C + ``RIDGE`` · I (1e-10): positive definite, so every face system has a
  Cholesky factor and duplicate tasks get a unique (equal) share. This moves a
  well-posed answer by a relative O(1e-10). Nash-MTL and FairGrad use no ridge
  unless the convex hull of the gradients (nearly) contains 0, where their
  equations have no solution (``BALANCE_RIDGE``, reported in the diagnostics).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mtrl_ntk.combiners.base import CombinerOutput, GradientCombiner, Need, TaskStats

# A gradient whose norm is below this fraction of the largest task norm is treated as
# exactly zero: in any sum with the other tasks' gradients it is below float64 rounding,
# and methods that weight tasks by ~1/‖g_i‖ would give it weights of 1e12 and more.
ZERO_GRADIENT_RATIO = 1e-12
# Relative ridge added to the cosine matrix C (i.e. RIDGE · ‖g_i‖² on K's diagonal).
RIDGE = 1e-10
# Relative tolerance of the Karush-Kuhn-Tucker conditions behind ``solver_converged``
# (MGDA, CAGrad), and the (tighter) one below which the active set frees a bound.
KKT_TOLERANCE = 1e-8
_JOIN_TOLERANCE = 1e-12
# Up to this many tasks the simplex problems enumerate all 2^T - 1 faces in one batched
# solve (4095 Cholesky factorisations of 12 x 12 at T = 12: ~40 ms on one CPU core, a
# handful of batched kernels on a GPU; 2^T grows too fast beyond);
# beyond it (MT50) a fixed budget of primal active-set steps, warm-started.
MAX_ENUMERATED_TASKS = 12
# Primal active-set steps for T > MAX_ENUMERATED_TASKS: T + ACTIVE_SET_EXTRA_STEPS (each
# step adds or drops one task; from the uniform start the T - |support| drops dominate,
# and a warm start is usually a few steps from the optimum).
ACTIVE_SET_EXTRA_STEPS = 10
# CAGrad's active-set steps also try the majorisers at t = 4^k ‖u‖_H for these k.
MAJORISER_SCALES = tuple(4.0**k for k in range(-3, 7))
_EPS = torch.finfo(torch.float64).eps


# --- the preamble: the Gramian, degenerate inputs and the fallback ------------------------


def gramian_of(stats: TaskStats, method: str) -> Tensor:
    """The Gramian of ``stats`` as a symmetric float64 tensor [T, T] on its own device."""
    if stats.gramian is None:
        raise ValueError(f"{method} needs the Gramian of the task gradients (Need.GRAMIAN)")
    gramian = stats.gramian.detach().to(dtype=torch.float64)
    return 0.5 * (gramian + gramian.T)


def degenerate(gramian: Tensor) -> Tensor:
    """0-d bool: no method can weight these tasks (non-finite or all-zero Gramian)."""
    return ~torch.isfinite(gramian).all() | ~(gramian.diagonal().amax() > 0)


def sanitised(gramian: Tensor, bad: Tensor) -> Tensor:
    """The Gramian where it is usable, the identity where ``bad``: the solvers then run on
    a harmless matrix and their answer is replaced by the fallback (no branch on data)."""
    eye = torch.eye(gramian.shape[0], dtype=torch.float64, device=gramian.device)
    return torch.where(bad, eye, torch.nan_to_num(gramian, nan=0.0, posinf=0.0, neginf=0.0))


def ls_weights(num_tasks: int, device: torch.device) -> Tensor:
    """The documented safe answer of every solver-based combiner: LS weights 1/T."""
    return torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64, device=device)


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
        return self.cosines + RIDGE * torch.eye(
            size, dtype=torch.float64, device=self.cosines.device
        )


def scale_gramian(gramian: Tensor) -> ScaledGramian:
    """Task norms and the cosine matrix of a finite Gramian with at least one nonzero task."""
    norms = gramian.diagonal().clamp_min(0.0).sqrt()  # [T]
    floor = ZERO_GRADIENT_RATIO * norms.amax()
    zero = norms <= floor
    scale = torch.where(zero, floor, norms)
    live = (~zero).double()
    cosines = (gramian / torch.outer(scale, scale)).clamp(-1.0, 1.0) * torch.outer(live, live)
    eye = torch.eye(gramian.shape[0], dtype=torch.bool, device=gramian.device)
    cosines = torch.where(eye, live, cosines)  # exactly 1 on the diagonal of live tasks
    return ScaledGramian(norms=norms, scale=scale, zero=zero, cosines=cosines)


# --- simplex problems: face enumeration (T <= 12) or primal active set (T > 12) ----------

_FACES: dict[tuple[int, str], Tensor] = {}


def all_faces(size: int, device: torch.device) -> Tensor:
    """The 2^size - 1 nonempty supports as 0/1 float64 masks [2^size - 1, size] (cached)."""
    key = (size, str(device))
    if key not in _FACES:
        codes = torch.arange(1, 2**size, device=device).unsqueeze(1)
        bits = torch.arange(size, device=device)
        _FACES[key] = ((codes >> bits) & 1).to(torch.float64)
    return _FACES[key]


@dataclass(frozen=True)
class FacePoints:
    """Stationary points of a simplex problem on a batch of faces (supports)."""

    point: Tensor  # [F, T] u, zero off the face
    multiplier: Tensor  # [F] ν of the constraint cᵀu = 1
    step: Tensor  # [F] λ: the gradient is q + λ H u (1 for the QP)
    ok: Tensor  # [F] bool: the face system was solved and has a stationary point


def face_points(
    hessian: Tensor, linear: Tensor, constraint: Tensor, masks: Tensor, radius: Tensor | None
) -> FacePoints:
    """On each face F (mask M), the stationary point of the problem restricted to
    {u_j = 0 off F, cᵀu = 1}, in one batched Cholesky solve of M H M + (I - M).

    QP (``radius`` None), min ½uᵀHu + qᵀu: H_FF u = ν c - q, so with x = H_FF⁻¹c,
    y = H_FF⁻¹q: u = ν x - y, ν = (1 + cᵀy)/(cᵀx).
    CAGrad's dual (radius ρ), min qᵀu + ρ sqrt(uᵀHu): q + λ H u = ν c with
    λ = ρ/‖u‖_H gives u = (ν x - y)/λ and a quadratic for ν whose root with λ > 0
    is λ = sqrt(cᵀy² - cᵀx qᵀy + cᵀx ρ²), ν = (cᵀy + λ)/cᵀx (no point if negative).
    """
    systems = hessian * (masks.unsqueeze(2) * masks.unsqueeze(1)) + torch.diag_embed(1.0 - masks)
    factor, info = torch.linalg.cholesky_ex(systems)
    masked_c, masked_q = masks * constraint, masks * linear
    solved = torch.cholesky_solve(torch.stack([masked_c, masked_q], dim=2), factor)
    x, y = solved[..., 0], solved[..., 1]
    cc, cq = (masked_c * x).sum(1), (masked_c * y).sum(1)
    ok = (info == 0) & (cc > 0)
    cc = torch.where(ok, cc, 1.0)
    if radius is None:
        multiplier = (1.0 + cq) / cc
        step = torch.ones_like(cc)
        point = multiplier.unsqueeze(1) * x - y
    else:
        qq = (masked_q * y).sum(1)
        discriminant = cq**2 - cc * qq + cc * radius**2
        ok = ok & (discriminant > 0)
        step = torch.where(ok, discriminant, 1.0).sqrt()
        multiplier = (cq + step) / cc
        point = (multiplier.unsqueeze(1) * x - y) / step.unsqueeze(1)
    point = point * masks  # exactly zero off the face
    return FacePoints(point=point, multiplier=multiplier, step=step, ok=ok)


def _objective(hessian: Tensor, linear: Tensor, point: Tensor, radius: Tensor | None) -> Tensor:
    quadratic = ((point @ hessian) * point).sum(-1)
    if radius is None:
        return 0.5 * quadratic + point @ linear
    return point @ linear + radius * quadratic.clamp_min(0.0).sqrt()


def _kkt_violation(
    hessian: Tensor, linear: Tensor, constraint: Tensor, point: Tensor, radius: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(max relative KKT violation, multiplier ν, step λ) at a feasible point u."""
    relative, multiplier, step = _bound_multipliers(hessian, linear, constraint, point, radius)
    support = point > 0
    violation = torch.where(support, relative.abs(), (-relative).clamp_min(0.0)).amax()
    return violation, multiplier, step


@dataclass(frozen=True)
class SimplexSolution:
    point: Tensor  # [T] the minimiser u (u >= 0, cᵀu = 1)
    step: Tensor  # 0-d λ (CAGrad: ρ/‖u‖_H; QP: 1)
    kkt_violation: Tensor  # 0-d max relative violation of the KKT conditions
    failed: Tensor  # 0-d bool: no face gave a usable point (never observed)


def simplex_problem(
    hessian: Tensor,
    linear: Tensor,
    constraint: Tensor,
    radius: Tensor | None = None,
    start: Tensor | None = None,
) -> SimplexSolution:
    """argmin over {u >= 0, cᵀu = 1} of ½uᵀHu + qᵀu (``radius`` None; H positive definite,
    c > 0) or of qᵀu + ρ sqrt(uᵀHu) (CAGrad's dual, ``radius`` = ρ).

    T <= ``MAX_ENUMERATED_TASKS``: every face at once. Both objectives are convex
    (the QP strictly), so the stationary point of a face, where it exists, is the
    minimiser over that face's affine hull; the optimum is the stationary point of
    its own support, and any feasible stationary point of a larger face has the same
    value. Hence the best objective among the feasible (u >= -1e-10 max u) face
    points is the optimum: exact, with no dual check, in one batched solve.

    T > ``MAX_ENUMERATED_TASKS``: T + 10 primal active-set steps (``_active_set``)
    from ``start`` (the previous solution) or the uniform weights. Each step decreases
    the objective and the iterate is exact once the support is found (cold starts at
    T = 50 in our tests need 20-40 steps, warm starts a few), but there is no
    guarantee within the budget: ``kkt_violation`` says how far the answer is from
    optimal.
    """
    size = hessian.shape[0]
    device = hessian.device
    if size <= MAX_ENUMERATED_TASKS:
        faces = face_points(hessian, linear, constraint, all_faces(size, device), radius)
        tolerance = 1e-10 * faces.point.abs().amax(1, keepdim=True)
        feasible = faces.ok & (faces.point >= -tolerance).all(1)
        values = torch.where(feasible, _objective(hessian, linear, faces.point, radius), torch.inf)
        best = values.argmin()
        point = faces.point.index_select(0, best.unsqueeze(0)).squeeze(0)
        failed = ~feasible.any()
    else:
        point, failed = _active_set(hessian, linear, constraint, radius, start)
    point = point.clamp_min(0.0)
    total = constraint @ point
    failed = failed | ~(total > 0)
    point = torch.where(failed, 1.0 / (size * constraint), point / torch.where(failed, 1.0, total))
    violation, _, step = _kkt_violation(hessian, linear, constraint, point, radius)
    return SimplexSolution(point=point, step=step, kkt_violation=violation, failed=failed)


def _active_set(
    hessian: Tensor, linear: Tensor, constraint: Tensor, radius: Tensor | None,
    start: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """A fixed budget of primal active-set steps (Nocedal & Wright, Alg. 16.3) from a
    feasible start; every step is one masked Cholesky solve and decreases the objective.

    On the current free set F the face minimiser is solved exactly; if it is positive
    it becomes the iterate and the bound with the most negative multiplier (if below
    -1e-12, relative) joins F, else the iterate walks towards it until the
    first coordinate hits 0, which leaves F. For CAGrad's objective the face step is
    the closed-form stationary point of the face (the objective is convex on it, so
    the walk descends); where the face has none, the face minimiser of the majoriser
    qᵀu + ρ(uᵀHu/t + t)/2, t = ‖u_k‖_H (equal at u_k, so the objective decreases).
    Once the support is right the answer is exact. All branches are ``torch.where``
    on [T] tensors; a step that would not decrease the objective is not taken.
    """
    size = hessian.shape[0]
    uniform = 1.0 / (size * constraint)
    if start is None:
        point = uniform
    else:
        start = torch.nan_to_num(start, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
        total = constraint @ start
        usable = total > 0
        point = torch.where(usable, start / torch.where(usable, total, 1.0), uniform)
    free = point > 0
    value = _objective(hessian, linear, point, radius)
    tasks = torch.arange(size, device=hessian.device)
    for _ in range(size + ACTIVE_SET_EXTRA_STEPS):
        mask = free.double()
        system = hessian * torch.outer(mask, mask) + torch.diag(1.0 - mask)
        factor, info = torch.linalg.cholesky_ex(system)
        masked_c, masked_q = mask * constraint, mask * linear
        solved = torch.cholesky_solve(torch.stack([masked_c, masked_q], dim=1), factor)
        x, y = solved[:, 0], solved[:, 1]
        cc, cq = masked_c @ x, masked_c @ y
        ok = (info == 0) & (cc > 0)
        cc = torch.where(ok, cc, 1.0)
        if radius is None:
            targets = (((1.0 + cq) / cc) * x - y).unsqueeze(0)  # [1, T] the face minimiser
            exact_row = ok.unsqueeze(0)
        else:
            # The exact stationary point of the face, when it exists (the objective is
            # convex on the face, so walking towards it descends) ...
            qq = masked_q @ y
            discriminant = cq**2 - cc * qq + cc * radius**2
            exists = ok & (discriminant > 0)
            lam = torch.where(exists, discriminant, 1.0).sqrt()
            exact = (((cq + lam) / cc) * x - y) / lam
            # ... and the face minimisers of the majorisers qᵀu + ρ(uᵀHu/t + t)/2 at
            # t = 4^k ‖u_k‖_H: k = 0 is the MM step (descent guaranteed), the others let t
            # move by decades per step where the plain MM step would crawl.
            norm = (point @ hessian @ point).clamp_min(1e-300).sqrt()
            scales = torch.tensor(MAJORISER_SCALES, dtype=torch.float64, device=point.device)
            ratios_t = (norm / radius) * scales  # [k] t/ρ
            offsets = ((1.0 + ratios_t * cq) / cc).unsqueeze(1)
            majorisers = offsets * x - ratios_t.unsqueeze(1) * y
            targets = torch.cat([torch.where(exists, exact, point).unsqueeze(0), majorisers])
            no = torch.zeros_like(ratios_t, dtype=torch.bool)
            exact_row = torch.cat([exists.unsqueeze(0), no])
        targets = targets * mask
        interior = ok & ((targets > 0) | ~free).all(1)  # [k]
        # Walk towards each target until the first free coordinate reaches 0.
        gap = point - targets
        blocking = free & (targets <= 0) & (gap > 0)
        ratios = torch.where(blocking, point / torch.where(blocking, gap, 1.0), torch.inf)
        alpha = ratios.amin(1).clamp(0.0, 1.0)
        walked = (point + alpha.unsqueeze(1) * (targets - point)).clamp_min(0.0)
        walked = walked.scatter(1, ratios.argmin(1, keepdim=True), 0.0)
        moved = torch.where(interior.unsqueeze(1), targets, walked)
        moved = moved / (moved @ constraint).clamp_min(1e-300).unsqueeze(1)
        values = torch.where(ok, _objective(hessian, linear, moved, radius), torch.inf)
        values = torch.nan_to_num(values, nan=torch.inf)
        best = values.argmin()
        moved_value = values.index_select(0, best.unsqueeze(0)).squeeze(0)
        moved = moved.index_select(0, best.unsqueeze(0)).squeeze(0)
        # At a face's stationary point the bound multipliers are meaningful.
        stationary = (interior & exact_row).index_select(0, best.unsqueeze(0)).squeeze(0)
        improved = moved_value <= value + 1e-14 * value.abs()  # rounding must not stall it
        point = torch.where(improved, moved, point)
        value = torch.where(improved, moved_value, value)
        # Free set: the support, plus the bound with the most negative multiplier.
        violation_by_task, _, _ = _bound_multipliers(hessian, linear, constraint, point, radius)
        support = point > 0
        entering = torch.where(support, torch.inf, violation_by_task)
        joins = tasks == entering.argmin()  # (one_hot would check its input on the host)
        # (Only at a face's stationary point: elsewhere the multipliers mean nothing.)
        free = support | (joins & (entering.amin() < -_JOIN_TOLERANCE) & stationary & improved)
    return point, ~torch.isfinite(value)


def _bound_multipliers(
    hessian: Tensor, linear: Tensor, constraint: Tensor, point: Tensor, radius: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Relative multipliers of the bounds u_j >= 0 at a feasible point u (negative: the
    objective decreases by moving weight onto task j), the multiplier ν of cᵀu = 1, and
    the step λ (CAGrad: ρ/‖u‖_H; the QP: 1)."""
    hu = hessian @ point
    if radius is None:
        step = torch.ones((), dtype=torch.float64, device=point.device)
    else:
        step = radius / (point @ hu).clamp_min(1e-300).sqrt()
    gradient = linear + step * hu
    # ν from the support: the weighted mean of gradient / c over it (exact at the optimum).
    weights = point * constraint
    multiplier = (weights * gradient / constraint).sum() / weights.sum().clamp_min(1e-300)
    # Multipliers of the bounds u_j >= 0, divided by c_j: in the units of ∂/∂w_j.
    bound = (gradient - multiplier * constraint) / constraint
    magnitude = (linear.abs() + step * (hessian.abs() @ point)) / constraint + multiplier.abs()
    return bound / magnitude.clamp_min(1e-300), multiplier, step


# --- Nash-MTL / FairGrad: damped Newton with a fixed budget -------------------------------

# Nash-MTL / FairGrad: when the convex hull of the unit task gradients comes this close
# (squared distance) to 0, the exact solution is huge or does not exist, and the equations
# are solved on C + BALANCE_RIDGE · I. The answer is then set by the ridge; 1e-6 keeps the
# weights within ~1e3-1e5 of those of orthogonal gradients, where Newton's method still
# resolves them in float64 (with 1e-10 they reach 1e11 for α = 3 and stall).
BALANCE_RIDGE = 1e-6
# Newton steps of ``solve_power_balance`` (each: one linear solve and one batched
# evaluation of the candidate step sizes), and the candidate step sizes 2^-k, k < 16
# (and 0). Every step is unrolled in the compiled update (a few kernels each: the
# solve and fused code), so each budget is the smallest with which every
# property test still reaches its tolerance from a cold start: 12 for p >= 1/2 (Nash-MTL,
# FairGrad α <= 2), 20 below (FairGrad α = 5 on the badly scaled gradients needs 17-20;
# 16 leaves it short). Warm-started training solves need far fewer
# (scripts/solver_convergence.py, README "Speed").
NEWTON_STEPS = 12
NEWTON_STEPS_SMALL_POWER = 20
LINE_SEARCH_CANDIDATES = 16
# A balance solution with a larger relative residual falls back to orthogonal weights.
BALANCE_FALLBACK_RESIDUAL = 1e-3
POSITIVITY_FRACTION = 0.99


def newton_steps(power: float) -> int:
    """The fixed Newton budget of ``solve_power_balance`` for the power p (a constant of
    the graph: p is the combiner's parameter, not data)."""
    return NEWTON_STEPS if power >= 0.5 else NEWTON_STEPS_SMALL_POWER


def _balance_penalty(values: Tensor, power: float) -> Tensor:
    """h(v) with h'(v) = -v^(-p): -log v for p = 1, v^(1-p)/(p-1) otherwise."""
    if power == 1.0:
        return -torch.log(values)
    return values ** (1.0 - power) / (power - 1.0)


@dataclass(frozen=True)
class BalanceSolution:
    weights: Tensor  # [n] w > 0
    residual: Tensor  # 0-d max_i |w_i^p (K w)_i - 1| for the K the solver was given
    failed: Tensor  # 0-d bool: a non-finite answer
    # [steps + 1] the residual at the start and after each step (for measurements,
    # e.g. scripts/solver_convergence.py; the compiler drops it when unused).
    history: Tensor


def solve_power_balance(
    cosines: Tensor, norms: Tensor, power: float, start: Tensor | None = None
) -> BalanceSolution:
    """w > 0 with (K w)_i = w_i^(-p) for K = S C S (Nash-MTL: p = 1; FairGrad: p = 1/α).

    The equations are the stationarity conditions of the convex
    f(w) = ½ wᵀKw + Σ_i h(w_i), h'(w) = -w^(-p) (strictly convex in w > 0), so
    a solution is unique, and damped Newton reaches it from any positive start.
    It exists unless the convex hull of the gradients contains 0 (then f has no
    minimiser); pass C + ridge there. We iterate in u = S w, scaled so that
    orthogonal gradients give v_i = 1 (v = u / m, m_i = ‖g_i‖^((p-1)/(p+1))): the
    Newton system C + diag(p v^(-p-1)) is then free of the task norms.

    Fixed budget: ``newton_steps(p)`` steps (12 for p >= 1/2, 20 below). Each step is
    limited so that no coordinate loses more than 99% of its value (positivity; a
    coordinate may need to fall by decades), and instead of a backtracking loop the step
    sizes α_max 2^-k (k < 16) and 0 are evaluated at once (one batched evaluation); the
    largest that satisfies Armijo on f, or lowers the residual (near the solution f no
    longer resolves progress, the residual does), is taken. Once converged, steps become
    rounding-level moves, so spare steps are harmless. In our tests the hardest case
    (FairGrad α = 5, gradients with norms spanning decades) needs 17-20 steps from a
    cold start, the others at most 12; warm starts on training Gramians need a few
    (README, "Speed"). The start is the better (in f, after the optimal rescaling
    along its ray) of ``start`` (e.g. the previous solution) and the solution for
    orthogonal gradients w_i = ‖g_i‖^(-2/(1+p)).
    """
    power = float(power)
    device = cosines.device
    m = norms ** ((power - 1.0) / (power + 1.0))  # [n]

    squared_m = m * m
    absolute = cosines.abs()

    def evaluate(points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """f, the residual and C u for positive points [k, n]. The [n, n] products are
        broadcast sums, which the compiler fuses with the rest (a matmul would be a
        kernel of its own)."""
        products = (points.unsqueeze(-1) * cosines).sum(-2)  # [k, n] C u
        scaled = points / m
        value = 0.5 * (products * points).sum(-1) + (
            squared_m * _balance_penalty(scaled, power)
        ).sum(-1)
        # |v_i^p (C u)_i / m_i - 1| relative to the size of the terms of (C u)_i (at least
        # 1): where they cancel (weights spanning decades) float64 cannot resolve better.
        factor = (scaled if power == 1.0 else scaled**power) / m
        terms = (factor * (points.unsqueeze(-1) * absolute).sum(-2)).clamp_min(1.0)
        residual = ((factor * products - 1.0).abs() / terms).amax(-1)
        return value, residual, products

    def pick(index: Tensor, *rows: Tensor) -> list[Tensor]:
        return [row.index_select(0, index.unsqueeze(0)).squeeze(0) for row in rows]

    ones = torch.ones_like(norms)
    candidates = ones.unsqueeze(0)
    if start is not None:
        start_v = start * norms ** (2.0 / (1.0 + power))
        usable = torch.isfinite(start_v).all() & (start_v > 0).all()
        candidates = torch.stack([ones, torch.where(usable, start_v, ones)])
    rays = m * candidates  # [s, n]
    # Best multiple τ of each start: d/dτ f(τ ray) = 0.
    curvature = ((rays.unsqueeze(-1) * cosines).sum(-2) * rays).sum(-1).clamp_min(1e-300)
    tau = ((squared_m * candidates ** (1.0 - power)).sum(-1) / curvature) ** (1.0 / (1.0 + power))
    starts = tau.unsqueeze(1) * rays
    values, residuals, products = evaluate(starts)
    u, value, current, cu = pick(
        torch.nan_to_num(values, nan=torch.inf).argmin(), starts, values, residuals, products
    )

    # Step sizes α_max 2^-k, and 0 last: "no step" is always acceptable.
    sizes = torch.cat([
        0.5 ** torch.arange(LINE_SEARCH_CANDIDATES, dtype=torch.float64, device=device),
        torch.zeros(1, dtype=torch.float64, device=device),
    ])
    history = [current]
    for _ in range(newton_steps(power)):
        v = u / m
        power_v = v ** (-power)
        gradient = cu - m * power_v
        hessian = cosines + torch.diag(power * power_v / v)
        # Symmetric Jacobi equilibration keeps the solve accurate when v spans decades. One
        # library call (LU with partial pivoting, backward stable on this positive definite
        # system) instead of a Cholesky factorisation and a solve: a kernel less per step.
        equilibrate = hessian.diagonal().rsqrt()
        equilibrated = hessian * torch.outer(equilibrate, equilibrate)
        solved, info = torch.linalg.solve_ex(equilibrated, (equilibrate * gradient).unsqueeze(1))
        step = -equilibrate * solved.squeeze(1)
        step = torch.where((info == 0) & torch.isfinite(step).all(), step, 0.0)
        # Stay positive: no coordinate may lose more than a fraction of its value in one step.
        limit = torch.where(
            step < 0, -POSITIVITY_FRACTION * u / step.clamp_max(-1e-300), torch.inf
        ).amin()
        alphas = sizes * limit.clamp_max(1.0)  # [k + 1]
        trials = u + alphas.unsqueeze(1) * step  # [k + 1, n]
        values, residuals, products = evaluate(trials)
        # Armijo on f; near the solution f stops resolving progress, the residual still does.
        slope = (gradient * step).sum()
        accept = (values <= value + 1e-4 * alphas * slope) | (residuals < current)
        first = accept.double().argmax()  # the largest accepted step size (the last: 0)
        u, value, current, cu = pick(first, trials, values, residuals, products)
        history.append(current)
    weights = u / norms
    failed = ~torch.isfinite(weights).all() | ~torch.isfinite(current)
    return BalanceSolution(
        weights=weights, residual=current, failed=failed, history=torch.stack(history)
    )


def power_balance_weights(
    gramian: Tensor, power: float, start: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weights [T] solving (GGᵀ w)_i = w_i^(-p), zero tasks weighted 0, and tensor
    diagnostics (``solver_fallback``: 0-d bool, the orthogonal-gradient answer was used).

    A solution exists iff 0 is not in the convex hull of the gradients. We always
    measure the distance δ of 0 from the hull of the unit gradients
    (min_{θ in simplex} θᵀCθ = δ², an exact ``simplex_problem``; ``hull_distance``)
    and choose with ``torch.where``: if δ² > BALANCE_RIDGE (1e-6) the equations are
    solved exactly; otherwise (opposite gradients, T > d, ...) on
    GGᵀ + BALANCE_RIDGE·diag(GGᵀ), which has a finite solution (``ridge`` says so,
    ``equation_residual`` gives the distance to the exact equations). If Newton
    leaves a residual above 1e-3 or a non-finite answer (never observed in our
    tests), the answer is w_i = ‖g_i‖^(-2/(1+p)) (exact for orthogonal gradients),
    with ``solver_fallback`` = 1.
    """
    size = gramian.shape[0]
    device = gramian.device
    eye = torch.eye(size, dtype=torch.float64, device=device)
    scaled = scale_gramian(gramian)
    live = ~scaled.zero
    # Zero tasks are decoupled: an orthogonal unit dummy of norm 1 for Newton (weight
    # discarded), and a far-away one (C_ii = 1e6) for the hull distance, which it then
    # barely moves (δ² -> δ²/(1 + δ²/1e6)).
    norms = torch.where(live, scaled.norms, 1.0)
    dummy = torch.diag((~live).double())
    hull_cosines = scaled.cosines + 1e6 * dummy + RIDGE * eye
    ones = torch.ones(size, dtype=torch.float64, device=device)
    closest = simplex_problem(hull_cosines, torch.zeros_like(ones), ones).point
    # Products of [T] vectors and [T, T] matrices as broadcast sums here: they fuse with
    # the element-wise code around them (a matmul is a kernel of its own).
    unridged = scaled.cosines + 1e6 * dummy
    hull_distance_squared = (closest.unsqueeze(1) * unridged * closest).sum().clamp_min(0.0)
    use_ridge = hull_distance_squared <= BALANCE_RIDGE
    ridge = torch.where(use_ridge, BALANCE_RIDGE, 0.0)
    cosines = scaled.cosines + dummy + ridge * eye
    warm = None if start is None else torch.where(live, start, 1.0 / norms)
    solution = solve_power_balance(cosines, norms, power, warm)
    failed = solution.failed | ~(solution.residual <= BALANCE_FALLBACK_RESIDUAL)
    orthogonal = norms ** (-2.0 / (1.0 + power))
    weights = torch.where(failed, orthogonal, torch.nan_to_num(solution.weights))
    weights = torch.where(live, weights, 0.0)
    exact = torch.where(live, weights**power * (gramian * weights).sum(1) - 1.0, 0.0)
    diagnostics = {
        "zero_gradient_tasks": scaled.zero,
        "ridge": ridge,
        "hull_distance": hull_distance_squared.sqrt(),
        "solver_residual": solution.residual,
        "equation_residual": exact.abs().amax(),
        "solver_fallback": failed,
    }
    return weights, diagnostics


# --- Jacobi eigenvalue methods (instead of eigh/svd, which check info on the host) --------

@dataclass(frozen=True)
class JacobiRound:
    """One round of disjoint pairs (p, q), p < q, as per-index [size] int64 tensors, so that
    a round's rotations are gathers and pointwise products (no rotation matrix, no matmul):
    index i is paired with ``partner[i]`` (itself if unpaired: odd size), ``low[i]`` and
    ``high[i]`` are its pair's p and q, and ``sign[i]`` is -1 for p, +1 for q, 0 unpaired."""

    partner: Tensor  # [size]
    low: Tensor  # [size]
    high: Tensor  # [size]
    sign: Tensor  # [size] float64


_ROUNDS: dict[tuple[int, str], list[JacobiRound]] = {}


def jacobi_rounds(size: int, device: torch.device) -> list[JacobiRound]:
    """One cyclic sweep as size - 1 (even size) or size (odd) rounds of disjoint pairs
    (p, q) (round-robin / circle method). Cached per size and device (constants of the
    graph: they depend on T only)."""
    key = (size, str(device))
    if key not in _ROUNDS:
        players = list(range(size + size % 2))  # a dummy player (= size) for odd size
        count = len(players)
        rounds = []
        for _ in range(count - 1):
            pairs = [(players[i], players[count - 1 - i]) for i in range(count // 2)]
            pairs = [(min(a, b), max(a, b)) for a, b in pairs if size not in (a, b)]
            partner, low, high = list(range(size)), list(range(size)), list(range(size))
            sign = [0.0] * size
            for p, q in pairs:
                partner[p], partner[q] = q, p
                low[p] = low[q] = p
                high[p] = high[q] = q
                sign[p], sign[q] = -1.0, 1.0
            if pairs:
                rounds.append(JacobiRound(
                    partner=torch.tensor(partner, device=device),
                    low=torch.tensor(low, device=device),
                    high=torch.tensor(high, device=device),
                    sign=torch.tensor(sign, dtype=torch.float64, device=device),
                ))
            players = [players[0], players[-1], *players[1:-1]]
        _ROUNDS[key] = rounds
    return _ROUNDS[key]


def _rotation_coefficients(
    app: Tensor, aqq: Tensor, apq: Tensor, round_: JacobiRound
) -> tuple[Tensor, Tensor]:
    """The round's rotation J (Golub & Van Loan, Alg. 8.5.1: JᵀAJ has (JᵀAJ)_pq = 0) as
    per-index coefficients [size]: column j of A J is cos_j A[:, j] + sin_j A[:, partner j].
    ``app``, ``aqq``, ``apq`` [size] are a_pp, a_qq, a_pq of each index's pair.

    tan 2θ = 2 a_pq / (a_qq - a_pp), with the inner angle |θ| <= π/4 (as sym.schur2's
    smaller root t = tan θ): θ = ½ atan2(2 a_pq sign(d), |d|), d = a_qq - a_pp; θ = 0
    (no rotation) when a_pq = 0. J_pp = J_qq = cos θ, J_pq = sin θ, J_qp = -sin θ."""
    difference = aqq - app
    twice = 2.0 * apq
    angle = 0.5 * torch.atan2(torch.where(difference >= 0, twice, -twice), difference.abs())
    paired = round_.sign != 0
    cosine = torch.where(paired, torch.cos(angle), 1.0)
    sine = torch.where(paired, round_.sign * torch.sin(angle), 0.0)
    return cosine, sine


def _rotate_columns(matrix: Tensor, cosine: Tensor, sine: Tensor, partner: Tensor) -> Tensor:
    """matrix [m, size] times a round's rotation J, by gathers: (M J)[:, j] =
    cos_j M[:, j] + sin_j M[:, partner j]."""
    return cosine * matrix + sine * matrix.index_select(1, partner)


def _diagonal_entries(matrix: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    size = matrix.shape[1]
    return matrix.flatten().index_select(0, rows * size + columns)


def jacobi_sweeps(size: int) -> int:
    """Cyclic Jacobi sweeps for a [size, size] problem: enough to reach float64 resolution
    on cosine matrices and graded factors in our tests (norms 1e-4..1e4), where one sweep
    fewer leaves errors of 1e-9..1e-4 (convergence is quadratic, so the step is sharp)."""
    if size <= 5:
        return 5
    return 7 if size <= 20 else 8


def jacobi_eigh(matrix: Tensor, sweeps: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues [n] (unsorted) and eigenvectors [n, n] (columns) of a symmetric matrix by
    ``sweeps`` cyclic Jacobi sweeps in parallel (round-robin) order: each round applies
    its disjoint rotations JᵀAJ and V J by gathers and products (``_rotate_columns``;
    one fused kernel per round when compiled, no matmul). Cyclic Jacobi converges
    quadratically (``jacobi_sweeps`` gives a budget that reaches float64 resolution in
    our tests). Absolute accuracy ~eps ‖A‖, as eigh."""
    size = matrix.shape[0]
    vectors = torch.eye(size, dtype=torch.float64, device=matrix.device)
    for _ in range(sweeps):
        for round_ in jacobi_rounds(size, matrix.device):
            cosine, sine = _rotation_coefficients(
                _diagonal_entries(matrix, round_.low, round_.low),
                _diagonal_entries(matrix, round_.high, round_.high),
                _diagonal_entries(matrix, round_.low, round_.high),
                round_,
            )
            columns = _rotate_columns(matrix, cosine, sine, round_.partner)  # A J
            # Jᵀ (A J): the same combination of rows.
            matrix = cosine.unsqueeze(1) * columns + sine.unsqueeze(1) * columns.index_select(
                0, round_.partner
            )
            vectors = _rotate_columns(vectors, cosine, sine, round_.partner)
    return matrix.diagonal(), vectors


def jacobi_column_orthogonalise(factor: Tensor, sweeps: int) -> tuple[Tensor, Tensor]:
    """One-sided Jacobi (Hestenes; Demmel & Veselić 1992): (X J, J) with J orthogonal and
    the columns of X J mutually orthogonal, i.e. J = the eigenvectors and the squared
    column norms = the eigenvalues of XᵀX, found without forming XᵀX. Each rotation is
    computed from the current columns' inner products; for a column-graded X = Y S
    (columns ‖g_i‖ apart) this is two-sided Jacobi on XᵀX = S YᵀY S done implicitly,
    which keeps every eigenvalue to relative accuracy ~κ(YᵀY)·eps however graded S is,
    and converges fast (rotations between columns of very different norms are small)."""
    size = factor.shape[1]
    rotations = torch.eye(size, dtype=torch.float64, device=factor.device)
    for _ in range(sweeps):
        for round_ in jacobi_rounds(size, factor.device):
            # The round's column inner products x_pᵀx_p, x_qᵀx_q, x_pᵀx_q, per index.
            low = factor.index_select(1, round_.low)
            high = factor.index_select(1, round_.high)
            cosine, sine = _rotation_coefficients(
                (low * low).sum(0), (high * high).sum(0), (low * high).sum(0), round_
            )
            factor = _rotate_columns(factor, cosine, sine, round_.partner)
            rotations = _rotate_columns(rotations, cosine, sine, round_.partner)
    return factor, rotations


def relative_rank_mask(eigenvalues: Tensor) -> Tensor:
    """Eigenvalues of a cosine matrix that are nonzero at float64 resolution (n · eps · max)."""
    size = eigenvalues.shape[0]
    return eigenvalues > size * _EPS * eigenvalues.amax().clamp_min(0.0)


# --- the combiner base --------------------------------------------------------------------


class GramianCombiner(GradientCombiner):
    """A weighting of the task Gramian GGᵀ, solved in float64 on the Gramian's device.

    The shared part of the solver-based methods: a non-finite or all-zero Gramian
    is replaced by the identity before ``weigh`` (so the solvers never see NaN) and
    the answer by the documented fallback, LS weights 1/T, with ``solver_fallback``
    = 1; the same happens when ``weigh`` raises its fallback flag or returns
    non-finite weights (a method with its own fallback answer reports it as a 0-d bool
    ``solver_fallback`` in its diagnostics instead). All of it
    by ``torch.where``: no host synchronisation.
    """

    need = Need.GRAMIAN

    def combine(self, stats: TaskStats) -> CombinerOutput:
        gramian = gramian_of(stats, self.name)
        bad = degenerate(gramian)
        weights, failed, diagnostics = self.weigh(sanitised(gramian, bad))
        to_ls = bad | failed | ~torch.isfinite(weights).all()
        weights = torch.where(
            to_ls, ls_weights(self.num_tasks, gramian.device), torch.nan_to_num(weights)
        )
        # A method's own documented fallback (e.g. Nash's orthogonal weights) counts too.
        own = diagnostics.pop("solver_fallback", None)
        fallback = to_ls if own is None else to_ls | own
        diagnostics = {
            "weights": weights, **diagnostics, "solver_fallback": fallback.double(),
            "degenerate_gramian": bad.double(),
        }
        return CombinerOutput(weights=weights, diagnostics=diagnostics)

    @abstractmethod
    def weigh(self, gramian: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(weights [T], 0-d bool: fall back to LS weights, diagnostics) from a finite
        Gramian [T, T] (float64) with a positive diagonal."""


class WarmStart:
    """Mixin: the previous weights [T] as a state tensor, updated in place after each
    ``combine`` (kept unchanged when it fell back) and saved in ``state_dict``. All
    zeros means "no warm start" (the solvers then start cold)."""

    num_tasks: int
    name: str
    warm_start: Tensor
    # The diagnostic whose value warm-starts the next solve.
    warm_start_key: ClassVar[str] = "weights"

    def combine(self, stats: TaskStats) -> CombinerOutput:
        output = super().combine(stats)  # type: ignore[misc]
        self._keep_warm_start(output, self.warm_start_key)
        return output

    def _init_warm_start(self) -> None:
        self.warm_start = torch.zeros(self.num_tasks, dtype=torch.float64)

    def warm_start_on(self, device: torch.device) -> Tensor:
        """The state, moved to ``device`` first if the caller never called ``to(device)``
        (a one-time copy; a Python check of the device, not of data)."""
        if self.warm_start.device != device:
            self.warm_start = self.warm_start.to(device)
        return self.warm_start

    def _keep_warm_start(self, output: CombinerOutput, key: str = "weights") -> None:
        keep = output.diagnostics["solver_fallback"] > 0
        self.warm_start.copy_(torch.where(keep, self.warm_start, output.diagnostics[key]))

    def to(self, device: torch.device | str) -> WarmStart:
        self.warm_start = self.warm_start.to(device)
        return self

    def state_tensors(self) -> list[Tensor]:
        return [self.warm_start]

    def state_dict(self) -> dict[str, object]:
        return {"warm_start": self.warm_start.clone()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        unknown = set(state) - {"warm_start"}
        if unknown:
            raise ValueError(f"{self.name} got unknown state keys {sorted(unknown)}")
        warm_start = state.get("warm_start")
        if warm_start is None:
            self.warm_start.zero_()
            return
        warm_start = torch.as_tensor(warm_start, dtype=torch.float64)
        if warm_start.shape != (self.num_tasks,):
            raise ValueError(
                f"{self.name} warm_start must have shape [{self.num_tasks}], "
                f"got {tuple(warm_start.shape)}"
            )
        self.warm_start.copy_(warm_start)
