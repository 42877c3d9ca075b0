"""``torch.compile`` of the agent's update as one graph, with an eager fallback.

``MultiTaskSAC(..., compile=True)`` (the trainer's ``train.compile``) compiles
its ``update_graph`` (TD target, both engine passes with their combiners, the
optimiser steps, the temperature and Polyak steps, the non-finite guard and the
metrics) with ``fullgraph=True``: one graph, no graph break, no host
synchronisation. On CUDA it uses ``mode="reduce-overhead"``, which captures the
graph as a CUDA graph and replays it at every update (one launch instead of one
per kernel). The tensors the update changes in place (parameters, optimiser
and combiner state, the guard's counters) are marked as static addresses, so
that the CUDA graph updates them where they are instead of copying them. The
policy (``act_with_noise``, called at every environment and evaluation step) is
compiled the same way, one graph with noise and one without. A seed group
(``mtrl_ntk.agent.seeds``) compiles its vmapped update and policy likewise.

``torch.autograd.grad`` (the loss-based engine path, NTKMTL-SR's gradient to the
representation, the temperature) is traced into the graph with dynamo's
``trace_autograd_ops``; the vmapped per-task Jacobian is a ``torch.func`` transform.

A compiled function falls back to eager execution, with one warning, the first
time the compiled call raises and the eager call of the same arguments does not
(an unsupported Python or platform, no C++ compiler for the CPU backend, an
operator the compiler does not know, a graph break under ``fullgraph``):
training never stops because of compilation. Compilation errors are raised while
tracing, before the compiled code runs, so an update that failed to compile
changed nothing. An error that the eager function raises as well (a wrong
shape, say) is raised as usual, and compilation stays on.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import torch

R = TypeVar("R")


class MaybeCompiled(Generic[R]):
    """``fn``, run through ``torch.compile`` when ``enabled``, eagerly after any compile failure.

    ``compiled`` says whether the compiled version is still in use; ``failure`` is
    the error that ended it. ``backend`` is ``torch.compile``'s (inductor by default).
    """

    def __init__(
        self,
        fn: Callable[..., R],
        name: str,
        enabled: bool,
        backend: str | Callable = "inductor",
        *,
        fullgraph: bool = False,
        mode: str | None = None,
        static_tensors: Iterable[torch.Tensor] = (),
    ) -> None:
        self.fn = fn
        self.name = name
        self.failure: str | None = None
        self._compiled: Callable[..., R] | None = None
        if enabled:
            try:
                for tensor in static_tensors:
                    torch._dynamo.mark_static_address(tensor)
                compiled = torch.compile(
                    _own_code(fn), dynamic=False, backend=backend, fullgraph=fullgraph, mode=mode
                )
                self._compiled = _tracing_autograd(compiled)
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


def capture_mode(device: torch.device, backend: str | Callable) -> str | None:
    """``torch.compile``'s mode for the agent's graphs: a CUDA graph on CUDA with inductor."""
    return "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None


def begin_captured_step(fn: MaybeCompiled, device: torch.device) -> None:
    """Before a call of ``fn`` captured as a CUDA graph: a new step begins, so the outputs
    of the previous replays (already consumed: copied to the host or added into sums) may
    be overwritten."""
    if fn.compiled and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def _own_code(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` behind a trampoline with a code object of its own.

    Dynamo keeps its compiled entries per code object and allows only a few (its
    recompile limit) before giving up. Two agents compile the same method
    (``MultiTaskSAC.update_graph``) with different guards, so without this a
    process with many agents (a benchmark, a test session) would exhaust the limit
    and each agent's cache would hold the others' entries.
    """

    def trampoline(*args: Any, **kwargs: Any) -> R:
        return fn(*args, **kwargs)

    code = trampoline.__code__.replace(co_name=f"compiled_{getattr(fn, '__name__', 'fn')}")
    return types.FunctionType(
        code, trampoline.__globals__, code.co_name, None, trampoline.__closure__
    )


def _tracing_autograd(compiled: Callable[..., R]) -> Callable[..., R]:
    """``compiled`` with ``torch.autograd.grad`` traced into its graph (dynamo's
    ``trace_autograd_ops``) where this torch has the option; a graph break otherwise."""
    config = torch._dynamo.config
    if not hasattr(config, "trace_autograd_ops"):
        return compiled

    def call(*args: Any, **kwargs: Any) -> R:
        with config.patch(trace_autograd_ops=True):
            return compiled(*args, **kwargs)

    return call


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
