"""NTKMTL and NTKMTL-SR (Qin et al., NeurIPS 2025): the defining equations, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtrl_ntk.combiners import combine, make_combiner, stats_from_gradients
from tests.combiners.samplers import log_spaced_norms, sample_task_gradients


def ntkmtl_output(name: str, rows: torch.Tensor, **params):
    combiner = make_combiner(name, num_tasks=rows.shape[0], num_minibatches=rows.shape[1], **params)
    return combiner.combine(stats_from_gradients(rows, combiner.need))


def numpy_top_block_eigenvalues(rows: torch.Tensor) -> np.ndarray:
    """λ_i = largest eigenvalue of J_i J_iᵀ, by numpy, one task at a time."""
    jacobians = rows.double().numpy()  # [T, n, d]
    return np.array([np.linalg.eigvalsh(j @ j.T)[-1] for j in jacobians])


@pytest.mark.parametrize("name", ["ntkmtl", "ntkmtl_sr"])
def test_exponent_one_half_equalises_weighted_eigenvalues(name: str) -> None:
    norms = log_spaced_norms(5, 1e-2, 1e2)
    rows = sample_task_gradients(tasks=5, dim=40, seed=0, minibatches=4, norms=norms)
    output = ntkmtl_output(name, rows, exponent=0.5)
    eigenvalues = output.diagnostics["ntk_eigenvalues"]
    balanced = output.weights**2 * eigenvalues  # w_i² λ_i
    torch.testing.assert_close(balanced, torch.full_like(balanced, float(eigenvalues.mean())))


@pytest.mark.parametrize("name", ["ntkmtl", "ntkmtl_sr"])
def test_eigenvalues_are_the_top_eigenvalues_of_each_task_block(name: str) -> None:
    rows = sample_task_gradients(tasks=4, dim=30, seed=1, minibatches=4)
    output = ntkmtl_output(name, rows)
    expected = numpy_top_block_eigenvalues(rows)
    np.testing.assert_allclose(output.diagnostics["ntk_eigenvalues"].numpy(), expected, rtol=1e-10)


def test_one_minibatch_eigenvalue_is_the_squared_gradient_norm() -> None:
    grads = sample_task_gradients(tasks=4, dim=30, seed=2)
    combiner = make_combiner("ntkmtl", num_tasks=4)
    output = combiner.combine(stats_from_gradients(grads, combiner.need))
    torch.testing.assert_close(output.diagnostics["ntk_eigenvalues"], grads.norm(dim=1) ** 2)


def test_exponent_zero_is_the_sum_of_the_task_gradients() -> None:
    grads = sample_task_gradients(tasks=4, dim=30, seed=3, norms=[0.1, 1.0, 10.0, 100.0])
    direction = combine("ntkmtl", grads, exponent=0.0)
    torch.testing.assert_close(direction, grads.sum(dim=0))
    torch.testing.assert_close(direction, 4 * combine("ls", grads))


def test_pinned_direction_on_a_two_task_example() -> None:
    # λ = (25, 1), mean 13: w = (sqrt(13/25), sqrt(13)); direction = w_1 (3, 4) + w_2 (1, 0).
    grads = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    direction = combine("ntkmtl", grads)
    expected = torch.tensor([5.768882040742383, 2.8844410203711917], dtype=torch.float64)
    torch.testing.assert_close(direction, expected, rtol=1e-12, atol=0.0)


def test_ntkmtl_sr_direction_is_the_weighted_sum_of_the_representation_rows() -> None:
    rows = sample_task_gradients(tasks=3, dim=20, seed=4, minibatches=4, norms=[0.5, 2.0, 8.0])
    output = ntkmtl_output("ntkmtl_sr", rows)
    direction = combine("ntkmtl_sr", rows)
    torch.testing.assert_close(direction, output.weights @ rows.mean(dim=1))
    # The task with the largest representation NTK eigenvalue gets the smallest weight.
    assert output.weights.argmin() == output.diagnostics["ntk_eigenvalues"].argmax()
