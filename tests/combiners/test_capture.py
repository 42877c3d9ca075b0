"""The capture contract of the Gramian combiners (MGDA, CAGrad, Nash-MTL, FairGrad,
Aligned-MTL, IMTL-G, PCGrad): ``combine`` performs no host synchronisation on generic,
degenerate and one-task inputs, traces as one graph (``torch.compile(fullgraph=True)``)
with the eager weights, updates its state in place, and the fixed-budget solvers for
T > 12 (MT50) still reach their optimality conditions.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mtrl_ntk.combiners import make_combiner, stats_from_gradients
from mtrl_ntk.combiners.base import GradientCombiner, TaskStats
from mtrl_ntk.opcount import count_ops
from tests.combiners.samplers import log_spaced_norms, sample_task_gradients

METHODS = {
    "mgda": {},
    "cagrad": {"c": 0.4},
    "nashmtl": {},
    "fairgrad": {"alpha": 2.0},
    "aligned_mtl": {},
    "imtlg": {},
    "pcgrad": {},
}


def _with_nan() -> Tensor:
    grads = sample_task_gradients(tasks=4, dim=12, seed=40)
    grads[1, 2] = float("nan")
    return grads


CASES = {
    "generic": sample_task_gradients(tasks=5, dim=20, seed=41, norms=log_spaced_norms(5)),
    "all_zero": torch.zeros(4, 12, dtype=torch.float64),
    "non_finite": _with_nan(),
    "one_task": sample_task_gradients(tasks=1, dim=12, seed=42),
    "zero_task": torch.cat([sample_task_gradients(tasks=3, dim=12, seed=43),
                            torch.zeros(1, 12, dtype=torch.float64)]),
    "identical": sample_task_gradients(tasks=1, dim=12, seed=44).repeat(3, 1),
    "fifty_tasks": sample_task_gradients(tasks=50, dim=60, seed=47),  # the T > 12 paths
}


def build(name: str, num_tasks: int) -> GradientCombiner:
    torch.manual_seed(0)  # PCGrad seeds its generator from the global RNG
    return make_combiner(name, num_tasks=num_tasks, **METHODS[name])


def stats_for(combiner: GradientCombiner, grads: Tensor) -> TaskStats:
    stats = stats_from_gradients(grads, combiner.need)
    stats.random = combiner.draw_random(grads.shape[1], grads.device)
    return stats


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(METHODS))
def test_combine_performs_no_host_sync(name: str, case: str) -> None:
    grads = CASES[case]
    combiner = build(name, grads.shape[0])
    output, counter = count_ops(combiner.combine, stats_for(combiner, grads))
    assert counter.syncs == 0, dict(counter.sync_names)
    assert output.weights is not None and torch.isfinite(output.weights).all()
    fallback = output.diagnostics["solver_fallback"]
    assert isinstance(fallback, Tensor) and fallback.shape == () and fallback.is_floating_point()
    # PCGrad falls back only for a non-finite Gramian (zero gradients just sum to 0).
    degenerate = case == "non_finite" or (case == "all_zero" and name != "pcgrad")
    assert float(fallback) == float(degenerate)
    if degenerate:
        expected = torch.full_like(output.weights, 1.0 / grads.shape[0])
        torch.testing.assert_close(output.weights, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(METHODS))
def test_combine_without_drawn_random_numbers_has_no_sync_either(name: str) -> None:
    # PCGrad then draws its own orders (on the data's device) inside combine.
    combiner = build(name, 5)
    _, counter = count_ops(combiner.combine, stats_from_gradients(CASES["generic"], combiner.need))
    assert counter.syncs == 0, dict(counter.sync_names)


@pytest.mark.parametrize("name", list(METHODS))
def test_combine_compiles_as_one_graph_with_the_eager_weights(name: str) -> None:
    torch._dynamo.reset()
    grads = CASES["generic"]
    eager, traced = build(name, grads.shape[0]), build(name, grads.shape[0])
    compiled = torch.compile(traced.combine, fullgraph=True, backend="eager")
    for case in ("generic", "non_finite"):  # the fallback is a torch.where in the same graph
        inputs = CASES[case] if case == "generic" else torch.cat([_with_nan(), grads[:1, :12]])
        inputs = inputs[:, :12]
        stats = stats_for(eager, inputs)
        expected = eager.combine(stats)
        got = compiled(stats)
        torch.testing.assert_close(got.weights, expected.weights, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(
            got.diagnostics["solver_fallback"], expected.diagnostics["solver_fallback"]
        )
    for mine, theirs in zip(traced.state_tensors(), eager.state_tensors(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["mgda", "cagrad", "nashmtl", "fairgrad"])
def test_state_is_updated_in_place_and_listed(name: str) -> None:
    combiner = build(name, 4)
    (state,) = combiner.state_tensors()
    address = state.data_ptr()
    output = combiner.combine(stats_for(combiner, sample_task_gradients(4, 12, seed=45)))
    assert combiner.state_tensors()[0].data_ptr() == address
    key = "dual_weights" if name == "cagrad" else "weights"
    assert torch.equal(state, output.diagnostics[key])
    assert combiner.to("cpu") is combiner


def test_pcgrad_uses_the_random_numbers_of_its_stats() -> None:
    from mtrl_ntk.combiners.pcgrad import projection_coefficients

    grads = sample_task_gradients(tasks=4, dim=10, seed=46)
    combiner = build("pcgrad", 4)
    stats = stats_for(combiner, grads)
    orders = torch.argsort(stats.random, dim=1)
    expected = projection_coefficients(grads @ grads.T, orders).sum(0)
    torch.testing.assert_close(combiner.combine(stats).weights, expected, rtol=0, atol=0)


# --- T = 50 (MT50): the fixed-budget paths --------------------------------------------------


def min_norm_kkt_gap(grads: Tensor, weights: Tensor) -> Tensor:
    """Largest violation of MGDA's KKT conditions, relative to ‖g_i‖ ‖d‖ (see test_gramian)."""
    direction = weights @ grads
    projections, multiplier = grads @ direction, direction @ direction
    scale = grads.norm(dim=1) * direction.norm()
    on_support = torch.where(weights > 0, (projections - multiplier).abs(), 0.0)
    below = (multiplier - projections).clamp_min(0.0)
    return (torch.maximum(on_support, below) / scale).max()


@pytest.mark.parametrize("dim", [300, 30])  # 30 < T: the hull of the gradients contains 0
@pytest.mark.parametrize("spread", [False, True])
def test_mgda_and_cagrad_reach_their_optimum_for_fifty_tasks(dim: int, spread: bool) -> None:
    norms = log_spaced_norms(50) if spread else None
    mgda, cagrad = build("mgda", 50), build("cagrad", 50)
    for seed in (50, 51):  # the second call starts warm from the first's solution
        grads = sample_task_gradients(tasks=50, dim=dim, seed=seed, norms=norms)
        out = mgda.combine(stats_for(mgda, grads))
        assert float(out.diagnostics["solver_converged"]) == 1.0
        assert float(out.diagnostics["kkt_violation"]) <= 1e-8
        if (out.weights @ grads).norm() > 1e-6 * grads.norm(dim=1).max():
            assert min_norm_kkt_gap(grads, out.weights) <= 1e-8
        out = cagrad.combine(stats_for(cagrad, grads))
        assert float(out.diagnostics["solver_converged"]) == 1.0
        dual = out.diagnostics["dual_weights"]
        assert (dual >= 0).all()
        torch.testing.assert_close(dual.sum(), torch.tensor(1.0, dtype=torch.float64))
        # Zero duality gap: F(w) equals min_i g_iᵀd for the returned (feasible) primal d.
        gramian, mean = grads @ grads.T, grads.mean(0)
        value = dual @ (grads @ mean) + 0.4 * mean.norm() * (dual @ gramian @ dual).sqrt()
        primal = 1.16 * (out.weights @ grads)
        scale = grads.norm(dim=1).max() * mean.norm()
        assert value - (grads @ primal).min() <= 1e-8 * scale


@pytest.mark.parametrize("name", ["nashmtl", "fairgrad"])
def test_balance_equations_for_fifty_tasks(name: str) -> None:
    grads = sample_task_gradients(tasks=50, dim=300, seed=52, norms=log_spaced_norms(50, 1e-2, 1e2))
    combiner = build(name, 50)
    output = combiner.combine(stats_for(combiner, grads))
    assert float(output.diagnostics["solver_fallback"]) == 0.0
    assert float(output.diagnostics["ridge"]) == 0.0
    power = 1.0 / METHODS[name].get("alpha", 1.0)
    weights, gramian = output.weights, grads @ grads.T
    relative = weights**power * (gramian @ weights)
    rounding = 1e-14 * weights**power * (gramian.abs() @ weights)
    assert ((relative - 1).abs() <= 1e-9 + rounding).all()


def test_aligned_and_imtlg_for_fifty_tasks() -> None:
    grads = sample_task_gradients(tasks=50, dim=300, seed=53, norms=log_spaced_norms(50))
    aligned = build("aligned_mtl", 50).combine(stats_for(build("aligned_mtl", 50), grads))
    scale = aligned.diagnostics["scale"]
    from mtrl_ntk.combiners.aligned_mtl import alignment_of

    balance = alignment_of(grads @ grads.T, "min").balance
    rows = balance @ grads
    eye = torch.eye(50, dtype=torch.float64)
    torch.testing.assert_close(rows @ rows.T, scale * eye, rtol=0, atol=1e-7 * float(scale))
    torch.testing.assert_close(aligned.weights @ grads, rows.sum(0))
    imtlg = build("imtlg", 50).combine(stats_for(build("imtlg", 50), grads))
    direction = imtlg.weights @ grads
    projections = (grads / grads.norm(dim=1, keepdim=True)) @ direction
    torch.testing.assert_close(
        projections, projections.mean().expand_as(projections), rtol=0, atol=1e-8 * direction.norm()
    )


@pytest.mark.parametrize("name", ["mgda", "cagrad", "nashmtl", "fairgrad"])
def test_warm_start_state_round_trips_through_a_checkpoint(name: str) -> None:
    combiner = build(name, 4)
    combiner.combine(stats_for(combiner, sample_task_gradients(4, 12, seed=48)))
    state = combiner.state_dict()
    restored = build(name, 4)
    restored.load_state_dict(state)
    grads = sample_task_gradients(4, 12, seed=49)
    expected = combiner.combine(stats_for(combiner, grads)).weights
    assert torch.equal(restored.combine(stats_for(restored, grads)).weights, expected)
    with pytest.raises(ValueError, match="warm_start"):
        restored.load_state_dict({"warm_start": torch.ones(3, dtype=torch.float64)})
