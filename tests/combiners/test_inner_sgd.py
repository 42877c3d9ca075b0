"""The authors' MT10 solvers of CAGrad and FairGrad (``solver="sgd"``).

Each is checked against a plain NumPy transcription written here from the algorithm as
their code runs it (Cranial-XIX/CAGrad ``mtrl/mtrl_files/cagrad.py`` ``cagrad``;
OptMN-Lab/fairgrad ``mtrl_files/fairgrad.py`` ``fairgrad``, the SGD branch), with the
gradients through explicit Jacobians (the softmax's diag(w) - w wᵀ; the residual's
A + diag(p (w + ε)^(-p-1))) rather than the element-wise forms of ``inner_sgd``, and
torch.optim.SGD's momentum rule (v ← μ v + ∇, x ← x - lr v, v from 0). Then the
capture contract (no host sync, one graph, vmap over seeds) and zero and huge gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from mtrl_ntk.combiners import make_combiner, stats_from_gradients
from mtrl_ntk.combiners.inner_sgd import cagrad_sgd, fairgrad_sgd
from mtrl_ntk.opcount import count_ops
from tests.combiners.samplers import log_spaced_norms, sample_task_gradients


def numpy_cagrad(
    gramian: np.ndarray, c: float, steps: int = 20, lr: float = 25.0, momentum: float = 0.5
) -> np.ndarray:
    """The task weights of the update: Σ_i weights_i g_i."""
    t = gramian.shape[0]
    mean_norm = np.mean(np.sqrt(np.diag(gramian) + 1e-4))
    a = gramian / mean_norm**2
    b = a.mean(axis=1)  # A 1/T
    rho = np.sqrt(b.mean() + 1e-4) * c

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max())
        return e / e.sum()

    def objective(z: np.ndarray) -> float:
        w = softmax(z)
        return float(w @ b + rho * np.sqrt(w @ a @ w + 1e-4))

    def gradient(z: np.ndarray) -> np.ndarray:
        w = softmax(z)
        d_w = b + rho * (a @ w) / np.sqrt(w @ a @ w + 1e-4)
        softmax_jacobian = np.diag(w) - np.outer(w, w)
        return softmax_jacobian.T @ d_w

    z, v = np.zeros(t), np.zeros(t)
    best, best_z = np.inf, None
    for i in range(steps + 1):
        f = objective(z)
        if f < best:
            best, best_z = f, z.copy()
        if i < steps:
            v = momentum * v + gradient(z)
            z = z - lr * v
    w = softmax(best_z)
    lam = rho / (np.sqrt(w @ a @ w + 1e-4) + 1e-4)
    return (1.0 / t + lam * w) / (1.0 + c**2)


def numpy_fairgrad(
    gramian: np.ndarray,
    alpha: float,
    steps: int = 20,
    lr: float = 0.1,
    momentum: float = 0.5,
    max_norm: float = 1.0,
) -> np.ndarray:
    t = gramian.shape[0]
    p = 1.0 / alpha
    w, v = np.full(t, 1.0 / t), np.zeros(t)
    best, best_w = np.inf, None
    for _ in range(steps):
        residual = gramian @ w - (1.0 / (w + 1e-8)) ** p
        f = float(np.linalg.norm(residual) ** 2)
        if f < best:
            best, best_w = f, w.copy()
        jacobian = gramian + np.diag(p * (w + 1e-8) ** (-p - 1.0))
        grad = 2.0 * jacobian.T @ residual
        coefficient = max_norm / (np.linalg.norm(grad) + 1e-6)
        if coefficient < 1.0:
            grad = grad * coefficient
        v = momentum * v + grad
        w = np.maximum(w - lr * v, 1e-8)
    return best_w


def gramian_of(grads: Tensor) -> Tensor:
    return grads.double() @ grads.double().T


# Fixed Gramians: MT10-sized with norms from 1e-3 to 1e1 (where the authors' 1e-4 constants
# matter), conflicting pairs, three tasks with one conflict, and small norms everywhere.
GRAMIANS = {
    "mt10_spread": gramian_of(
        sample_task_gradients(10, 40, seed=1, norms=log_spaced_norms(10, 1e-3, 1e1))
    ),
    "mt10_unit": gramian_of(sample_task_gradients(10, 40, seed=2)),
    "three_conflicting": torch.tensor(
        [[4.0, -1.5, 0.3], [-1.5, 1.0, 0.2], [0.3, 0.2, 0.25]], dtype=torch.float64
    ),
    "small_norms": gramian_of(1e-3 * sample_task_gradients(5, 20, seed=3)),
}


@pytest.mark.parametrize("c", [0.4, 0.9])
@pytest.mark.parametrize("case", list(GRAMIANS))
def test_cagrad_sgd_is_the_authors_algorithm(case: str, c: float) -> None:
    gramian = GRAMIANS[case]
    expected = numpy_cagrad(gramian.numpy(), c)
    got = cagrad_sgd(gramian, c).weights
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    # The combiner returns the same weights.
    combiner = make_combiner("cagrad", gramian.shape[0], c=c, solver="sgd")
    output = combiner.combine(stats_from_gradients_of(gramian))
    np.testing.assert_allclose(output.weights.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert float(output.diagnostics["solver_fallback"]) == 0.0


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("case", list(GRAMIANS))
def test_fairgrad_sgd_is_the_authors_algorithm(case: str, alpha: float) -> None:
    gramian = GRAMIANS[case]
    expected = numpy_fairgrad(gramian.numpy(), alpha)
    got = fairgrad_sgd(gramian, alpha).weights
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    combiner = make_combiner("fairgrad", gramian.shape[0], alpha=alpha, solver="sgd")
    output = combiner.combine(stats_from_gradients_of(gramian))
    np.testing.assert_allclose(output.weights.numpy(), expected, rtol=1e-9, atol=1e-12)


def stats_from_gradients_of(gramian: Tensor):
    """Gradients whose Gramian is ``gramian`` (its Cholesky-like square root), as stats."""
    eigenvalues, vectors = torch.linalg.eigh(gramian)
    root = vectors * eigenvalues.clamp_min(0).sqrt()  # root @ root.T == gramian
    stats = stats_from_gradients(root, make_combiner("cagrad", gramian.shape[0]).need)
    stats.gramian = gramian  # exactly the fixed matrix, not its rounding through root
    return stats


def test_the_solvers_parameters_change_the_answer_as_theirs_do() -> None:
    gramian = GRAMIANS["mt10_spread"]
    for steps, lr, momentum in [(5, 25.0, 0.5), (20, 50.0, 0.5), (20, 25.0, 0.0)]:
        np.testing.assert_allclose(
            cagrad_sgd(gramian, 0.9, steps, lr, momentum).weights.numpy(),
            numpy_cagrad(gramian.numpy(), 0.9, steps, lr, momentum),
            rtol=1e-9,
            atol=1e-12,
        )
    for steps, lr, max_norm in [(5, 0.1, 1.0), (20, 0.5, 1.0), (20, 0.1, 10.0)]:
        np.testing.assert_allclose(
            fairgrad_sgd(gramian, 2.0, steps, lr, 0.5, max_norm).weights.numpy(),
            numpy_fairgrad(gramian.numpy(), 2.0, steps, lr, 0.5, max_norm),
            rtol=1e-9,
            atol=1e-12,
        )


def test_invalid_solver_settings_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="'solver'.*'exact' or 'sgd'"):
        make_combiner("cagrad", 3, solver="adam")
    with pytest.raises(ValueError, match="'sgd_steps'"):
        make_combiner("fairgrad", 3, solver="sgd", sgd_steps=0)
    with pytest.raises(ValueError, match="'sgd_momentum'"):
        make_combiner("cagrad", 3, sgd_momentum=1.0)
    with pytest.raises(ValueError, match="'sgd_max_grad_norm'"):
        make_combiner("fairgrad", 3, sgd_max_grad_norm=0.0)


# -- capture and stability -------------------------------------------------------------------

SGD = {"cagrad": {"c": 0.9, "solver": "sgd"}, "fairgrad": {"alpha": 2.0, "solver": "sgd"}}
HARD = {
    "generic": sample_task_gradients(5, 20, seed=41, norms=log_spaced_norms(5)),
    "all_zero": torch.zeros(4, 12, dtype=torch.float64),
    "zero_task": torch.cat(
        [sample_task_gradients(3, 12, seed=43), torch.zeros(1, 12, dtype=torch.float64)]
    ),
    "huge": 1e8 * sample_task_gradients(4, 12, seed=44),
    "huge_ratio": sample_task_gradients(4, 12, seed=45, norms=torch.tensor([1e-6, 1.0, 1e3, 1e6])),
    "one_task": sample_task_gradients(1, 12, seed=42),
}


@pytest.mark.parametrize("case", list(HARD))
@pytest.mark.parametrize("name", list(SGD))
def test_sgd_solvers_make_no_host_sync_and_stay_finite(name: str, case: str) -> None:
    grads = HARD[case]
    combiner = make_combiner(name, grads.shape[0], **SGD[name])
    output, counter = count_ops(combiner.combine, stats_from_gradients(grads, combiner.need))
    assert counter.syncs == 0, dict(counter.sync_names)
    assert torch.isfinite(output.weights).all() and (output.weights >= 0).all()
    # Only an all-zero Gramian falls back (LS weights: the update is 0 anyway).
    assert float(output.diagnostics["solver_fallback"]) == float(case == "all_zero")
    if case not in ("all_zero", "one_task"):
        update = output.weights.double() @ grads.double()
        assert torch.isfinite(update).all() and update.norm() > 0


@pytest.mark.parametrize("name", list(SGD))
def test_sgd_solvers_compile_as_one_graph_with_the_eager_weights(name: str) -> None:
    torch._dynamo.reset()
    grads = HARD["generic"]
    eager = make_combiner(name, grads.shape[0], **SGD[name])
    compiled = make_combiner(name, grads.shape[0], **SGD[name])
    stats = stats_from_gradients(grads, eager.need)
    expected = eager.combine(stats).weights
    function = torch.compile(compiled.combine, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(function(stats).weights, expected, rtol=1e-12, atol=0)


def test_sgd_solvers_vmap_over_seeds() -> None:
    gramians = torch.stack([GRAMIANS["mt10_spread"], GRAMIANS["mt10_unit"]])
    batched = torch.func.vmap(lambda g: cagrad_sgd(g, 0.9).weights)(gramians)
    for index, gramian in enumerate(gramians):
        torch.testing.assert_close(batched[index], cagrad_sgd(gramian, 0.9).weights)
    batched = torch.func.vmap(lambda g: fairgrad_sgd(g, 2.0).weights)(gramians)
    for index, gramian in enumerate(gramians):
        torch.testing.assert_close(batched[index], fairgrad_sgd(gramian, 2.0).weights)
