"""Multi-tensor ops that also run inside ``torch.func.vmap`` over the seed axis.

The update of one agent uses ``torch._foreach_*`` kernels (one launch for all the
parameters of a network). ``torch.func.vmap`` has no batching rule for them, so a
seed group (``mtrl_ntk.agent.seeds``), which runs the single-seed update under
``vmap`` over a leading seed axis, switches them to one op per tensor with
``seed_axis()``. Under vmap each of those ops already covers every seed, so the
number of ops still does not grow with the number of seeds.

The same switch selects the ``torch.func`` form of the few gradients the single-seed
update takes with ``torch.autograd.grad``, which does not run under vmap
(``in_seed_axis``).

The switch is a module flag read in Python, not a tensor: ``torch.compile`` guards on
it, so a compiled single-seed update and a compiled seed group keep separate graphs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

_SEED_AXIS = False


@contextmanager
def seed_axis() -> Iterator[None]:
    """Within: the code runs under ``vmap`` over seeds (per-tensor ops, ``torch.func`` grads)."""
    global _SEED_AXIS
    previous, _SEED_AXIS = _SEED_AXIS, True
    try:
        yield
    finally:
        _SEED_AXIS = previous


def in_seed_axis() -> bool:
    """True inside ``seed_axis()``."""
    return _SEED_AXIS


def mul_(tensors: Sequence[Tensor], factor: Tensor | float) -> None:
    if _SEED_AXIS:
        for tensor in tensors:
            tensor.mul_(factor)
    else:
        torch._foreach_mul_(list(tensors), factor)


def add_(tensors: Sequence[Tensor], others: Sequence[Tensor], alpha: float = 1.0) -> None:
    if _SEED_AXIS:
        for tensor, other in zip(tensors, others, strict=True):
            tensor.add_(other, alpha=alpha)
    else:
        torch._foreach_add_(list(tensors), list(others), alpha=alpha)


def addcmul_(
    tensors: Sequence[Tensor], first: Sequence[Tensor], second: Sequence[Tensor], value: float
) -> None:
    if _SEED_AXIS:
        for tensor, a, b in zip(tensors, first, second, strict=True):
            tensor.add_(a * b, alpha=value)  # addcmul_ has no batching rule
    else:
        torch._foreach_addcmul_(list(tensors), list(first), list(second), value=value)


def sub(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> list[Tensor]:
    if _SEED_AXIS:
        return [tensor - other for tensor, other in zip(tensors, others, strict=True)]
    return list(torch._foreach_sub(list(tensors), list(others)))


def adam_directions(
    exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor], correction2_sqrt: Tensor, eps: float
) -> list[Tensor]:
    """m / (sqrt(v) / c₂ + ε) for every tensor (Adam's direction before the step size)."""
    if _SEED_AXIS:
        return [m / (v.sqrt() / correction2_sqrt + eps) for m, v in zip(exp_avg, exp_avg_sq)]
    denominators = torch._foreach_sqrt(list(exp_avg_sq))
    torch._foreach_div_(denominators, correction2_sqrt)
    torch._foreach_add_(denominators, eps)
    return list(torch._foreach_div(list(exp_avg), denominators))


def max_norms(tensors: Sequence[Tensor]) -> Tensor:
    """The max-norm of every tensor, stacked: [len(tensors)] (NaN propagates)."""
    if _SEED_AXIS:
        return torch.stack([torch.linalg.vector_norm(t, ord=math.inf) for t in tensors])
    return torch.stack(torch._foreach_norm(list(tensors), ord=math.inf))
