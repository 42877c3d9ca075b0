"""Optional ``torch.compile`` of the update's pure tensor functions, with an eager fallback.

What is compiled (``MultiTaskSAC(..., compile=True)``, the trainer's ``train.compile``):
the engine's per-task Jacobian (``vmap`` of ``grad`` over the loss function: the
functorch transforms are traced once instead of re-dispatched in Python at every
update), the engine's forward of a loss function (its backward comes from
AOTAutograd), and the SAC TD target. The combiners, their solvers and the
optimiser steps stay eager: they are small, and the solvers synchronise with the
host by design.

Every compiled function falls back to eager execution, with one warning, the
first time the compiled call raises and the eager call of the same arguments
does not (an unsupported Python or platform, no C++ compiler for the CPU
backend, an operator the compiler does not know): training never stops because
of compilation. An error that the eager function raises as well (a wrong shape,
say) is raised as usual, and compilation stays on.

The functions passed in must be pure: no in-place update of their inputs (so a
failed compiled call can be repeated eagerly) and no Python state that changes
between calls without being an argument (dynamo would keep the first value).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

R = TypeVar("R")


class MaybeCompiled(Generic[R]):
    """``fn``, run through ``torch.compile`` when ``enabled``, eagerly after any compile failure.

    ``compiled`` says whether the compiled version is still in use; ``failure`` is
    the error that ended it. ``backend`` is ``torch.compile``'s (inductor by default).
    """

    def __init__(
        self, fn: Callable[..., R], name: str, enabled: bool, backend: str | Callable = "inductor"
    ) -> None:
        self.fn = fn
        self.name = name
        self.failure: str | None = None
        self._compiled: Callable[..., R] | None = None
        if enabled:
            try:
                self._compiled = torch.compile(fn, dynamic=False, backend=backend)
            except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
                self._fall_back(error)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - retried eagerly below
                # An error of the inputs raises here again, and compilation stays on;
                # if the eager call succeeds, the compiler was at fault.
                result = self.fn(*args, **kwargs)
                self._fall_back(error)
                return result
        return self.fn(*args, **kwargs)

    def _fall_back(self, error: Exception) -> None:
        self._compiled = None
        self.failure = _describe(error)
        warnings.warn(
            f"torch.compile of {self.name} failed ({self.failure}); running it eagerly",
            RuntimeWarning,
            stacklevel=3,
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _describe(error: BaseException) -> str:
    """The error's first line and that of its root cause (dynamo wraps the compiler's error)."""
    root, seen = error, {id(error)}
    while True:
        cause = root.__cause__ or getattr(root, "inner_exception", None)
        if not isinstance(cause, BaseException) or id(cause) in seen:
            break
        root = cause
        seen.add(id(root))
    if root is error:
        return _first_line(error)
    return f"{_first_line(error)} (caused by {_first_line(root)})"
