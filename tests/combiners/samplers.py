"""Seeded samplers of per-task gradient matrices with controlled rank and scale."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_task_gradients(
    tasks: int,
    dim: int,
    seed: int,
    *,
    rank: int | None = None,
    norms: Tensor | list[float] | None = None,
    minibatches: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """A [T, d] (or [T, n, d] with ``minibatches``) matrix of task gradients.

    ``rank`` < min(T, d) makes the rows linearly dependent (collinear for rank 1);
    ``norms`` [T] sets each task's gradient norm (e.g. spanning 1e-4..1e4).
    """
    generator = torch.Generator().manual_seed(seed)
    rows = tasks * (minibatches or 1)
    if rank is None:
        grads = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    else:
        basis = torch.randn(rank, dim, generator=generator, dtype=torch.float64)
        mixing = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
        grads = mixing @ basis
    if minibatches is not None:
        grads = grads.view(tasks, minibatches, dim)
    if norms is not None:
        norms = torch.as_tensor(norms, dtype=torch.float64)
        task_norm = grads.reshape(tasks, -1).norm(dim=1) / (minibatches or 1) ** 0.5
        scale = norms / task_norm.clamp_min(1e-300)
        grads = grads * scale.view(-1, *([1] * (grads.dim() - 1)))
    return grads.to(dtype)


def log_spaced_norms(tasks: int, low: float = 1e-4, high: float = 1e4) -> Tensor:
    """Task norms spread log-uniformly from ``low`` to ``high``."""
    return torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), tasks)
