"""PCGrad, CAGrad, Nash-MTL, FairGrad, Aligned-MTL, MGDA and IMTL-G: each method's defining
equations, on badly scaled (norms 1e-4..1e4), conflicting and nearly collinear gradients.

Optimality is checked with certificates that do not trust the solver (KKT conditions and
duality gaps) and, where scipy is reliable (well-scaled problems), against scipy.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import least_squares, minimize
from torch import Tensor

from mtrl_ntk.combiners import CombinerOutput, combine, make_combiner, stats_from_gradients
from mtrl_ntk.combiners.aligned_mtl import align_gradients
from mtrl_ntk.combiners.pcgrad import projection_coefficients
from mtrl_ntk.combiners.solvers import BALANCE_RIDGE
from tests.combiners.samplers import log_spaced_norms, sample_task_gradients

SOLVER_METHODS = ["cagrad", "nashmtl", "fairgrad", "aligned_mtl", "mgda", "imtlg"]
ALL_METHODS = ["pcgrad", *SOLVER_METHODS]


def conflicting_gradients() -> Tensor:
    """4 tasks whose gradients conflict pairwise (cosines about -0.33), scaled by 0.5..10."""
    basis = torch.eye(4, dtype=torch.float64) - 0.3 * (1 - torch.eye(4, dtype=torch.float64))
    noise = 0.05 * sample_task_gradients(tasks=4, dim=6, seed=11)
    grads = torch.cat([basis, noise], dim=1)  # [4, 10]
    return grads * torch.tensor([1.0, 3.0, 0.5, 10.0], dtype=torch.float64).unsqueeze(1)


def nearly_collinear_gradients() -> Tensor:
    """5 positive multiples of one direction, each perturbed by 1e-4 relative noise."""
    direction = sample_task_gradients(tasks=1, dim=30, seed=12)[0]
    noise = 1e-4 * sample_task_gradients(tasks=5, dim=30, seed=13)
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64).unsqueeze(1)
    return scales * (direction + noise)


MATRICES = {
    "random": sample_task_gradients(tasks=5, dim=20, seed=0),
    "badly_scaled": sample_task_gradients(tasks=5, dim=20, seed=1, norms=log_spaced_norms(5)),
    "conflicting": conflicting_gradients(),
    "nearly_collinear": nearly_collinear_gradients(),
}


def f64(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def output_of(name: str, grads: Tensor, **params) -> CombinerOutput:
    combiner = make_combiner(name, num_tasks=grads.shape[0], **params)
    return combiner.combine(stats_from_gradients(grads, combiner.need))


def assert_converged(output: CombinerOutput) -> None:
    # Tensor diagnostics (no host sync inside combine): no fallback, and where the solver
    # reports its KKT check (MGDA, CAGrad), met to 1e-8 relative.
    assert float(output.diagnostics["solver_fallback"]) == 0.0
    if "solver_converged" in output.diagnostics:
        assert float(output.diagnostics["solver_converged"]) == 1.0, output.diagnostics


# --- Nash-MTL and FairGrad ----------------------------------------------------------------------


@pytest.mark.parametrize("matrix", list(MATRICES))
def test_nash_weights_solve_the_bargaining_equations(matrix: str) -> None:
    grads = MATRICES[matrix]
    output = output_of("nashmtl", grads)
    assert_converged(output)
    assert output.diagnostics["ridge"] == 0.0
    weights = output.weights
    assert (weights > 0).all()
    # a_i (GGᵀa)_i = 1: every task's directional derivative g_iᵀd equals 1/a_i.
    products = weights * (grads @ (grads.T @ weights))
    torch.testing.assert_close(products, torch.ones_like(products), rtol=0, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("matrix", ["random", "badly_scaled", "conflicting"])
def test_fairgrad_weights_solve_the_alpha_fair_equations(matrix: str, alpha: float) -> None:
    grads = MATRICES[matrix]
    output = output_of("fairgrad", grads, alpha=alpha)
    assert_converged(output)
    weights = output.weights
    assert (weights > 0).all()
    # (GGᵀw)_i = w_i^(-1/α), written relative: w_i^(1/α) (GGᵀw)_i = 1, up to 1e-9 plus the
    # rounding error of (GGᵀw)_i where its terms cancel (for α = 0.25 on the badly scaled
    # matrix a tiny task's g_iᵀd must be ~1e-12 of its terms).
    gramian = grads @ grads.T
    relative = weights ** (1 / alpha) * (gramian @ weights)
    rounding = 1e-14 * weights ** (1 / alpha) * (gramian.abs() @ weights)
    assert ((relative - 1).abs() <= 1e-9 + rounding).all()


@pytest.mark.parametrize("matrix", list(MATRICES))
def test_fairgrad_with_alpha_one_is_nash(matrix: str) -> None:
    grads = MATRICES[matrix]
    nash = output_of("nashmtl", grads).weights
    fair = output_of("fairgrad", grads, alpha=1.0).weights
    torch.testing.assert_close(fair, nash, rtol=1e-10, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_fairgrad_matches_scipy_least_squares_on_a_well_scaled_problem(alpha: float) -> None:
    # The authors' own solver (scipy least_squares on GGᵀw - w^(-1/α)), tight tolerances.
    grads = MATRICES["random"]
    gramian = (grads @ grads.T).numpy()
    reference = least_squares(
        lambda w: gramian @ w - w ** (-1 / alpha), np.ones(5), bounds=(1e-12, np.inf),
        xtol=1e-15, ftol=1e-15, gtol=1e-15,
    ).x
    ours = output_of("fairgrad", grads, alpha=alpha).weights.numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-7)


def test_one_task_nash_and_fairgrad_weights_are_powers_of_its_norm() -> None:
    grads = sample_task_gradients(tasks=1, dim=10, seed=5, norms=[7.0])
    nash = output_of("nashmtl", grads).weights  # a = 1/‖g‖
    torch.testing.assert_close(nash, f64(1 / 7.0))
    fair = output_of("fairgrad", grads, alpha=3.0).weights  # w = ‖g‖^(-2α/(1+α))
    torch.testing.assert_close(fair, f64(7.0 ** (-1.5)))


@pytest.mark.parametrize("name", ["nashmtl", "fairgrad"])
def test_balance_uses_a_reported_ridge_when_the_gradients_are_opposite(name: str) -> None:
    # g_1 = -g_0: no d improves both, the exact equations have no solution.
    base = sample_task_gradients(tasks=2, dim=8, seed=6)
    grads = torch.stack([base[0], -base[0], base[1]])
    output = output_of(name, grads)
    assert torch.isfinite(output.weights).all() and (output.weights > 0).all()
    assert output.diagnostics["ridge"] == BALANCE_RIDGE
    assert output.diagnostics["hull_distance"] < 1e-6
    assert float(output.diagnostics["solver_fallback"]) == 0.0
    assert output.diagnostics["equation_residual"] > 0.1


def test_nash_warm_start_is_restored_from_a_checkpoint() -> None:
    nash = make_combiner("nashmtl", num_tasks=4)
    for seed in range(3):
        grads = sample_task_gradients(tasks=4, dim=12, seed=20 + seed)
        weights = nash.combine(stats_from_gradients(grads, nash.need)).weights
    state = nash.state_dict()
    torch.testing.assert_close(state["warm_start"], weights, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = make_combiner("nashmtl", num_tasks=4)
    restored.load_state_dict(torch.load(buffer))
    grads = sample_task_gradients(tasks=4, dim=12, seed=30)
    expected = nash.combine(stats_from_gradients(grads, nash.need)).weights
    got = restored.combine(stats_from_gradients(grads, restored.need)).weights
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="warm_start"):
        restored.load_state_dict({"warm_start": torch.ones(3, dtype=torch.float64)})


def test_nash_warm_start_reaches_the_same_solution() -> None:
    grads = MATRICES["badly_scaled"]
    cold = output_of("nashmtl", grads)
    nash = make_combiner("nashmtl", num_tasks=5)
    nash.load_state_dict({"warm_start": f64(3.0, 1e-3, 50.0, 1.0, 1e4)})
    warm = nash.combine(stats_from_gradients(grads, nash.need))
    assert_converged(warm)
    torch.testing.assert_close(warm.weights, cold.weights, rtol=1e-9, atol=0)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_fairgrad_rejects_invalid_alpha(alpha) -> None:
    with pytest.raises(ValueError, match="'alpha'"):
        make_combiner("fairgrad", num_tasks=3, alpha=alpha)


# --- MGDA ---------------------------------------------------------------------------------------


def scipy_min_norm_weights(gramian: np.ndarray) -> np.ndarray:
    tasks = gramian.shape[0]
    result = minimize(
        lambda w: w @ gramian @ w, np.ones(tasks) / tasks, jac=lambda w: 2 * gramian @ w,
        method="SLSQP", bounds=[(0, 1)] * tasks,
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return result.x


@pytest.mark.parametrize("matrix", list(MATRICES))
def test_mgda_weights_satisfy_the_kkt_conditions_of_the_min_norm_problem(matrix: str) -> None:
    grads = MATRICES[matrix]
    output = output_of("mgda", grads)
    assert_converged(output)
    weights = output.weights
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    direction = weights @ grads
    # The gradient of ½‖Σ w_i g_i‖² is (g_iᵀd)_i; its multiplier is ‖d‖² = Σ_i w_i g_iᵀd.
    # KKT: g_iᵀd = ‖d‖² on the support, >= ‖d‖² off it (so d is the min-norm element).
    projections = grads @ direction
    multiplier = direction @ direction
    tolerance = 1e-8 * grads.norm(dim=1) * direction.norm()
    support = weights > 0
    assert ((projections - multiplier).abs() <= tolerance)[support].all()
    assert (projections >= multiplier - tolerance).all()


@pytest.mark.parametrize("matrix", ["random", "conflicting"])
def test_mgda_matches_scipy_on_well_scaled_problems(matrix: str) -> None:
    grads = MATRICES[matrix]
    ours = output_of("mgda", grads).weights.numpy()
    gramian = (grads @ grads.T).numpy()
    reference = scipy_min_norm_weights(gramian)
    assert ours @ gramian @ ours <= reference @ gramian @ reference * (1 + 1e-9)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_mgda_two_tasks_reaches_the_vertex_and_the_closed_form() -> None:
    # g_0ᵀg_1 >= ‖g_0‖²: the min-norm element is g_0 itself, weight exactly (1, 0)
    # (the authors' two-task rule would stop at 0.999).
    grads = torch.tensor([[1.0, 0.0], [2.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(output_of("mgda", grads).weights, f64(1.0, 0.0))
    # Otherwise w_0 = (g_1 - g_0)ᵀg_1 / ‖g_1 - g_0‖².
    grads = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=torch.float64)
    difference = grads[1] - grads[0]
    first = float(difference @ grads[1] / (difference @ difference))
    expected = torch.tensor([first, 1 - first], dtype=torch.float64)
    # rtol: the 1e-10 relative ridge the QP is solved with.
    torch.testing.assert_close(output_of("mgda", grads).weights, expected, rtol=1e-9, atol=0)


def test_mgda_direction_vanishes_when_the_hull_contains_zero() -> None:
    base = sample_task_gradients(tasks=2, dim=8, seed=7)
    grads = torch.stack([base[0], -2.0 * base[0], base[1]])
    direction = combine("mgda", grads)
    assert direction.norm() <= 1e-8 * grads.norm(dim=1).max()


# --- CAGrad -------------------------------------------------------------------------------------


def cagrad_dual_objective(gramian: Tensor, weights: Tensor, c: float) -> Tensor:
    """g_wᵀg_0 + c‖g_0‖‖g_w‖ from the Gramian, for weights [..., T]."""
    mean = torch.full((gramian.shape[0],), 1.0 / gramian.shape[0], dtype=torch.float64)
    radius = c * (mean @ gramian @ mean).sqrt()
    quadratic = ((weights @ gramian) * weights).sum(-1).clamp_min(0)
    return weights @ (gramian @ mean) + radius * quadratic.sqrt()


@pytest.mark.parametrize("c", [0.4, 0.9])
@pytest.mark.parametrize("matrix", list(MATRICES))
def test_cagrad_dual_weights_are_optimal(matrix: str, c: float) -> None:
    grads = MATRICES[matrix]
    gramian = grads @ grads.T
    output = output_of("cagrad", grads, c=c)
    assert_converged(output)
    dual = output.diagnostics["dual_weights"]
    assert (dual >= 0).all()
    torch.testing.assert_close(dual.sum(), torch.tensor(1.0, dtype=torch.float64))
    value = cagrad_dual_objective(gramian, dual, c)
    scale = grads.norm(dim=1).max() * grads.mean(0).norm()
    # No worse than the uniform start and any vertex ...
    tasks = grads.shape[0]
    uniform = torch.full((1, tasks), 1 / tasks, dtype=torch.float64)
    starts = torch.cat([uniform, torch.eye(tasks, dtype=torch.float64)])
    assert (value <= cagrad_dual_objective(gramian, starts, c) + 1e-12 * scale).all()
    # ... and a zero duality gap: the returned d (times 1 + c²) is primal feasible,
    # ‖d - g_0‖ <= c‖g_0‖, and min_i g_iᵀd <= max (primal) = min (dual) <= F(w), so
    # equality certifies that both are optimal.
    primal = (1 + c**2) * (output.weights @ grads)
    g_0 = grads.mean(0)
    assert (primal - g_0).norm() <= c * g_0.norm() * (1 + 1e-12)
    assert value - (grads @ primal).min() <= 1e-9 * scale


@pytest.mark.parametrize("c", [0.4, 0.9])
@pytest.mark.parametrize("matrix", ["random", "conflicting"])
def test_cagrad_dual_is_no_worse_than_scipy_from_several_starts(matrix: str, c: float) -> None:
    grads = MATRICES[matrix]
    gramian = grads @ grads.T
    tasks = grads.shape[0]
    gramian_np = gramian.numpy()

    def objective(w: np.ndarray) -> float:
        return float(cagrad_dual_objective(gramian, torch.from_numpy(w), c))

    best = min(
        minimize(
            objective, start, method="SLSQP", bounds=[(0, 1)] * tasks,
            constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
            options={"ftol": 1e-15, "maxiter": 1000},
        ).fun
        for start in [np.ones(tasks) / tasks, *np.eye(tasks) * 0.9 + 0.1 / tasks]
    )
    ours = cagrad_dual_objective(gramian, output_of("cagrad", grads, c=c).diagnostics[
        "dual_weights"], c)
    assert float(ours) <= best + 1e-10 * abs(gramian_np).max()


@pytest.mark.parametrize("matrix", list(MATRICES))
def test_cagrad_direction_is_the_primal_solution_divided_by_one_plus_c_squared(matrix: str) -> None:
    grads, c = MATRICES[matrix], 0.4
    output = output_of("cagrad", grads, c=c)
    dual = output.diagnostics["dual_weights"]
    g_w, g_0 = dual @ grads, grads.mean(0)
    paper = g_0 + c * g_0.norm() * g_w / g_w.norm()
    direction = output.weights @ grads
    torch.testing.assert_close(direction * (1 + c**2), paper, rtol=1e-8, atol=1e-10 * paper.norm())


def test_cagrad_with_c_zero_is_the_mean_gradient() -> None:
    grads = MATRICES["conflicting"]
    torch.testing.assert_close(combine("cagrad", grads, c=0.0), grads.mean(0))


@pytest.mark.parametrize("c", [-0.1, float("nan"), "0.4", None])
def test_cagrad_rejects_invalid_c(c) -> None:
    with pytest.raises(ValueError, match="'c'"):
        make_combiner("cagrad", num_tasks=3, c=c)


# --- Aligned-MTL --------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("matrix", list(MATRICES))
def test_aligned_gradients_are_orthogonal_with_equal_norms(matrix: str, scale_mode: str) -> None:
    grads = MATRICES[matrix]
    alignment = align_gradients(grads @ grads.T, scale_mode)
    aligned = alignment.balance @ grads  # Ĝ = B G, [T, d]
    expected = alignment.scale * torch.eye(grads.shape[0], dtype=torch.float64)
    torch.testing.assert_close(aligned @ aligned.T, expected, rtol=0, atol=1e-7 * alignment.scale)
    output = output_of("aligned_mtl", grads, scale_mode=scale_mode)
    # The update is the sum of the aligned gradients (all task preferences 1).
    torch.testing.assert_close(output.weights @ grads, aligned.sum(0))


def test_aligned_scale_modes_pick_the_min_median_or_mean_eigenvalue() -> None:
    grads = MATRICES["random"]
    eigenvalues = torch.linalg.eigvalsh(grads @ grads.T)  # ascending, well conditioned
    for mode, expected in [
        ("min", eigenvalues[0]), ("median", eigenvalues[2]), ("rmse", eigenvalues.mean())
    ]:
        scale = align_gradients(grads @ grads.T, mode).scale
        torch.testing.assert_close(torch.tensor(scale, dtype=torch.float64), expected,
                                   rtol=1e-10, atol=0)
    # An even count: torch.median's lower middle value, as the authors' code.
    four = sample_task_gradients(tasks=4, dim=20, seed=8)
    four_eigenvalues = torch.linalg.eigvalsh(four @ four.T)
    scale = align_gradients(four @ four.T, "median").scale
    torch.testing.assert_close(torch.tensor(scale, dtype=torch.float64), four_eigenvalues[1],
                               rtol=1e-10, atol=0)


def test_aligned_eigenvalues_are_accurate_for_norms_spanning_1e8() -> None:
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    grads = MATRICES["badly_scaled"]
    gramian = grads @ grads.T
    reference, _ = mpmath.eigsy(mpmath.matrix(gramian.tolist()))
    reference = torch.tensor(sorted((float(x) for x in reference), reverse=True),
                             dtype=torch.float64)
    ours = align_gradients(gramian, "min").eigenvalues
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)


def test_aligned_rank_deficient_gradients_keep_only_the_nonzero_directions() -> None:
    grads = sample_task_gradients(tasks=5, dim=20, seed=9, rank=3)
    alignment = align_gradients(grads @ grads.T, "min")
    assert alignment.eigenvalues.shape == (3,)
    aligned = alignment.balance @ grads
    # Ĝ Ĝᵀ = λ_scale P with P the projector on the 3-dimensional range of GGᵀ.
    projector = aligned @ aligned.T / alignment.scale
    torch.testing.assert_close(projector @ projector, projector, rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.trace(projector), f64(3.0)[0])
    singular_values = torch.linalg.svdvals(aligned)
    torch.testing.assert_close(singular_values[:3], f64(*[alignment.scale**0.5] * 3))


def test_aligned_rejects_an_unknown_scale_mode() -> None:
    with pytest.raises(ValueError, match="'scale_mode'"):
        make_combiner("aligned_mtl", num_tasks=3, scale_mode="mean")


# --- IMTL-G -------------------------------------------------------------------------------------


@pytest.mark.parametrize("matrix", list(MATRICES))
def test_imtlg_direction_has_equal_projections_on_the_unit_gradients(matrix: str) -> None:
    grads = MATRICES[matrix]
    output = output_of("imtlg", grads)
    assert_converged(output)
    torch.testing.assert_close(output.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    direction = output.weights @ grads
    projections = (grads / grads.norm(dim=1, keepdim=True)) @ direction
    torch.testing.assert_close(
        projections, projections.mean().expand_as(projections), rtol=0, atol=1e-8 * direction.norm()
    )


def test_imtlg_matches_the_papers_closed_form() -> None:
    grads = MATRICES["conflicting"]
    units = grads / grads.norm(dim=1, keepdim=True)
    differences = grads[:1] - grads[1:]  # D: rows g_1 - g_i
    unit_differences = units[:1] - units[1:]  # U: rows u_1 - u_i
    tail = grads[0] @ unit_differences.T @ torch.linalg.inv(differences @ unit_differences.T)
    expected = torch.cat([1 - tail.sum().unsqueeze(0), tail])
    torch.testing.assert_close(output_of("imtlg", grads).weights, expected, rtol=1e-10, atol=1e-12)


def test_imtlg_direction_is_zero_for_more_tasks_than_dimensions() -> None:
    # T > d generic unit vectors: only d = 0 has equal projections on all of them.
    grads = sample_task_gradients(tasks=6, dim=3, seed=10)
    output = output_of("imtlg", grads)
    torch.testing.assert_close(output.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (output.weights @ grads).norm() <= 1e-10 * grads.norm(dim=1).max()


# --- PCGrad -------------------------------------------------------------------------------------


def pcgrad_by_hand(grads: Tensor, orders: Tensor) -> Tensor:
    """Algorithm 1 of the paper on the gradient vectors themselves: projected g_i^PC, [T, d]."""
    projected = grads.clone()
    for i in range(grads.shape[0]):
        for j in orders[i].tolist():
            inner = projected[i] @ grads[j]
            if j != i and inner < 0:
                projected[i] = projected[i] - inner / (grads[j] @ grads[j]) * grads[j]
    return projected


@pytest.mark.parametrize("matrix", list(MATRICES))
def test_pcgrad_coefficients_reproduce_the_algorithm_on_the_gradients(matrix: str) -> None:
    grads = MATRICES[matrix]
    tasks = grads.shape[0]
    generator = torch.Generator().manual_seed(3)
    orders = torch.stack([torch.randperm(tasks, generator=generator) for _ in range(tasks)])
    coefficients = projection_coefficients(grads @ grads.T, orders)
    expected = pcgrad_by_hand(grads, orders)
    atol = 1e-12 * grads.norm(dim=1).max()
    torch.testing.assert_close(coefficients @ grads, expected, rtol=1e-10, atol=atol)


@pytest.mark.parametrize("norms", [[1.0, 1.0], [1e-4, 1e4], [1e4, 1e-4]])
def test_pcgrad_leaves_no_conflict_between_two_tasks(norms: list[float]) -> None:
    base = sample_task_gradients(tasks=2, dim=10, seed=14)
    grads = torch.stack([base[0], -base[0] + 0.3 * base[1]])  # conflicting
    grads = grads / grads.norm(dim=1, keepdim=True) * f64(*norms).unsqueeze(1)
    assert grads[0] @ grads[1] < 0
    coefficients = projection_coefficients(grads @ grads.T, torch.tensor([[1, 0], [0, 1]]))
    projected = coefficients @ grads
    # g_0^PC ⊥ g_1 and g_1^PC ⊥ g_0: no remaining conflict (up to rounding).
    assert projected[0] @ grads[1] >= -1e-12 * grads[0].norm() * grads[1].norm()
    assert projected[1] @ grads[0] >= -1e-12 * grads[0].norm() * grads[1].norm()
    torch.testing.assert_close(projected[0] @ grads[1], f64(0.0)[0],
                               rtol=0, atol=1e-12 * grads[0].norm() * grads[1].norm())
    output = output_of("pcgrad", grads)
    torch.testing.assert_close(output.weights @ grads, projected.sum(0))


def test_pcgrad_without_conflict_is_the_sum_of_the_gradients() -> None:
    grads = MATRICES["nearly_collinear"]
    assert ((grads @ grads.T) > 0).all()
    output = output_of("pcgrad", grads)
    torch.testing.assert_close(output.weights, torch.ones(5, dtype=torch.float64), rtol=0, atol=0)


def test_pcgrad_draws_its_orders_from_its_saved_generator() -> None:
    grads = MATRICES["conflicting"]
    torch.manual_seed(0)
    pcgrad = make_combiner("pcgrad", num_tasks=4)
    state = pcgrad.state_dict()
    first = [pcgrad.combine(stats_from_gradients(grads, pcgrad.need)).weights for _ in range(6)]
    assert any(not torch.equal(first[0], w) for w in first[1:])  # the orders change per call
    torch.manual_seed(1)
    restored = make_combiner("pcgrad", num_tasks=4)
    restored.load_state_dict(state)
    again = [restored.combine(stats_from_gradients(grads, restored.need)).weights for _ in range(6)]
    for got, want in zip(again, first, strict=True):
        assert torch.equal(got, want)


# --- all methods --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tasks=st.integers(2, 8),
    dim=st.sampled_from([3, 10, 40]),
    decades=st.floats(0.0, 8.0),
)
def test_optimality_certificates_on_random_problems(
    seed: int, tasks: int, dim: int, decades: float
) -> None:
    """Nash's equations, MGDA's KKT conditions and CAGrad's duality gap on random shapes and
    scales (norms spanning up to 1e8), wherever the hull of the gradients does not contain 0."""
    norms = 10 ** (decades * (torch.rand(tasks, generator=torch.Generator().manual_seed(seed),
                                         dtype=torch.float64) - 0.5))
    grads = sample_task_gradients(tasks=tasks, dim=dim, seed=seed, norms=norms)
    gramian = grads @ grads.T
    scale = grads.norm(dim=1)

    mgda = output_of("mgda", grads)
    assert_converged(mgda)
    direction = mgda.weights @ grads
    if direction.norm() <= 1e-6 * scale.max():
        return  # Pareto-stationary: Nash has no solution, CAGrad's g_w has no direction
    projections, multiplier = grads @ direction, direction @ direction
    assert (projections >= multiplier - 1e-8 * scale * direction.norm()).all()

    nash = output_of("nashmtl", grads)
    if nash.diagnostics["ridge"] == 0.0:
        products = nash.weights * (gramian @ nash.weights)
        rounding = 1e-14 * nash.weights * (gramian.abs() @ nash.weights)
        assert ((products - 1).abs() <= 1e-9 + rounding).all()

    cagrad = output_of("cagrad", grads, c=0.4)
    assert_converged(cagrad)
    value = cagrad_dual_objective(gramian, cagrad.diagnostics["dual_weights"], 0.4)
    primal = 1.16 * (cagrad.weights @ grads)
    assert value - (grads @ primal).min() <= 1e-9 * scale.max() * grads.mean(0).norm()




@pytest.mark.parametrize("name", SOLVER_METHODS)
@pytest.mark.parametrize("matrix", ["badly_scaled", "conflicting", "nearly_collinear"])
def test_weights_follow_a_permutation_of_the_tasks(name: str, matrix: str) -> None:
    grads = MATRICES[matrix]
    permutation = torch.roll(torch.arange(grads.shape[0]), 2).flip(0)
    weights = output_of(name, grads).weights
    permuted = output_of(name, grads[permutation]).weights
    # The nearly collinear cosine matrix has condition number ~1e9: rounding alone moves
    # weights computed through its inverse (IMTL-G, Aligned-MTL) by ~1e-7.
    rtol = 1e-5 if matrix == "nearly_collinear" else 1e-8
    torch.testing.assert_close(permuted, weights[permutation], rtol=rtol, atol=0)


def test_pcgrad_two_tasks_are_permutation_equivariant() -> None:
    grads = MATRICES["badly_scaled"][[0, 4]]
    weights = output_of("pcgrad", grads).weights
    swapped = output_of("pcgrad", grads.flip(0)).weights
    torch.testing.assert_close(swapped, weights.flip(0), rtol=1e-12, atol=0)


EDGE_CASES = {
    "zero_gradient": torch.cat([MATRICES["random"][:2], torch.zeros(1, 20).double(),
                                MATRICES["random"][3:]]),
    "identical_tasks": MATRICES["random"][1].repeat(3, 1),
    "one_task": MATRICES["random"][:1],
    "more_tasks_than_dimensions": sample_task_gradients(tasks=8, dim=3, seed=15),
    "opposite_tasks": torch.stack([MATRICES["random"][0], -MATRICES["random"][0]]),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("name", ALL_METHODS)
def test_edge_cases_give_finite_reported_weights(name: str, case: str) -> None:
    grads = EDGE_CASES[case]
    torch.manual_seed(0)
    output = output_of(name, grads)
    assert output.weights.shape == (grads.shape[0],)
    assert torch.isfinite(output.weights).all()
    assert torch.equal(output.diagnostics["weights"], output.weights)
    if name != "pcgrad" and name != "aligned_mtl":
        assert float(output.diagnostics["solver_fallback"]) == 0.0


@pytest.mark.parametrize("name", ["nashmtl", "fairgrad", "imtlg", "aligned_mtl"])
def test_a_zero_gradient_task_gets_weight_zero_and_the_others_are_unchanged(name: str) -> None:
    grads = MATRICES["random"][:4]
    with_zero = torch.cat([grads[:2], torch.zeros(1, 20).double(), grads[2:]])
    weights = output_of(name, with_zero).weights
    assert weights[2] == 0
    torch.testing.assert_close(weights[[0, 1, 3, 4]], output_of(name, grads).weights)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_a_non_finite_gramian_falls_back_to_ls_weights_and_says_so(name: str) -> None:
    grads = MATRICES["random"].clone()
    grads[1, 3] = float("nan")
    output = output_of(name, grads)
    assert float(output.diagnostics["solver_fallback"]) == 1.0
    if name != "pcgrad":
        assert float(output.diagnostics["degenerate_gramian"]) == 1.0
    torch.testing.assert_close(output.weights, torch.full((5,), 0.2, dtype=torch.float64))


# Weights on one fixed matrix, pinned after the property tests above passed: a change in any
# method's numbers (scale convention, solver, tie-breaking) shows up here.
PINNED_GRADIENTS = torch.tensor(
    [[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0], [0.2, -0.3, 2.0]], dtype=torch.float64
)
PINNED_WEIGHTS = {
    "nashmtl": [1.3106291118875217, 1.3050890859667488, 0.5245389586694716],
    "fairgrad": [1.3106291118875217, 1.3050890859667488, 0.5245389586694716],  # α = 1
    "mgda": [0.4763948497853033, 0.4377682403402942, 0.08583690987440258],
    # Task 2 is off the dual support: (1/3) / (1 + 0.4²).
    "cagrad": [0.49944525561201436, 0.5266181008644405, 0.28735632183908044],
    "imtlg": [0.42879078798627446, 0.43163600552332676, 0.13957320649039864],
    "aligned_mtl": [1.025567883840577, 0.9928045970321956, 0.4163740305383456],
}


@pytest.mark.parametrize("name", list(PINNED_WEIGHTS))
def test_pinned_weights_on_a_fixed_matrix(name: str) -> None:
    weights = output_of(name, PINNED_GRADIENTS).weights
    expected = torch.tensor(PINNED_WEIGHTS[name], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)


def test_pinned_pcgrad_weights_for_a_given_order() -> None:
    # By hand (GGᵀ = [[1, -.5, .2], [-.5, 1.25, -.4], [.2, -.4, 4.13]]):
    # g_0 meets g_2 (no conflict), then g_1: c_0 = (1, .5/1.25, 0).
    # g_1 meets g_0: c_1 = (.5, 1, 0); then g_2, c_1 GGᵀ e_2 = -.3: c_1 += (0, 0, .3/4.13).
    # g_2 meets g_1: c_2 = (0, .4/1.25, 1); then g_0, c_2 GGᵀ e_0 = .04 >= 0: done.
    orders = torch.tensor([[2, 1, 0], [0, 2, 1], [1, 0, 2]])
    coefficients = projection_coefficients(PINNED_GRADIENTS @ PINNED_GRADIENTS.T, orders)
    expected = torch.tensor([[1, 0.4, 0], [0.5, 1, 0.3 / 4.13], [0, 0.32, 1]], dtype=torch.float64)
    torch.testing.assert_close(coefficients, expected, rtol=1e-12, atol=1e-15)
