"""The engine's small kernels: chunked row products, the finiteness check, weight transfers."""

from __future__ import annotations

import pytest
import torch

from mtrl_ntk.engine.task_gradients import (
    _CHUNK_ELEMENTS,
    TaskJacobian,
    _add_row_products,
    all_finite,
    weights_like,
)


@pytest.mark.parametrize("rows", [1, 10, 16, 17, 40])
def test_row_products_equal_one_matrix_product_for_any_width(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    # Wider than one chunk and not a multiple of the chunk width.
    width = 3 * _CHUNK_ELEMENTS // rows + 7
    block = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    total = torch.full((rows, rows), 2.0, dtype=torch.float64)
    _add_row_products(total, block)
    torch.testing.assert_close(total, 2.0 + block @ block.T)


def test_extended_ntk_sums_the_row_products_of_every_parameter_block() -> None:
    generator = torch.Generator().manual_seed(0)
    tasks, minibatches = 3, 2
    blocks = {
        "weight": torch.randn(tasks, minibatches, 70_000, 3, generator=generator),
        "bias": torch.randn(tasks, minibatches, 5, generator=generator),
    }
    jacobian = TaskJacobian(blocks, tasks, minibatches)
    rows = jacobian.full().reshape(tasks * minibatches, -1).double()
    torch.testing.assert_close(jacobian.extended_ntk(), rows @ rows.T, rtol=1e-5, atol=1e-3)


def test_all_finite_finds_every_nan_and_infinity_and_accepts_huge_finite_values() -> None:
    tensors = [torch.randn(400, 53), torch.randn(400), torch.randn(1)]
    assert bool(all_finite(tensors))
    assert bool(all_finite([torch.full((10_000,), 3e38)]))  # a sum or a norm would overflow
    for bad in (float("nan"), float("inf"), float("-inf")):
        for which in range(len(tensors)):
            poisoned = [tensor.clone() for tensor in tensors]
            poisoned[which].view(-1)[-1] = bad
            assert not bool(all_finite(poisoned)), (bad, which)


def test_weights_like_takes_the_dtype_and_device_of_the_reference() -> None:
    weights = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    moved = weights_like(weights, torch.zeros(2, dtype=torch.float32))
    assert moved.dtype == torch.float32 and moved.device == weights.device
    torch.testing.assert_close(moved, weights.float())
