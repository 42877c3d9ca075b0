"""Machine-independent measures of an update: ATen ops (GPU kernel launches) and host syncs.

On a GPU an eager update costs about one kernel launch per ATen op, and every
read of a device value on the host (``.item()``, ``bool(t)``, ``nonzero``, a
boolean-mask index, a ``torch.linalg`` call that checks its ``info``) stalls the
host until the GPU's queue drains, and makes CUDA-graph capture impossible.
``OpCounter`` counts both on any device, the CPU included, with a
``TorchDispatchMode`` that sees every ATen op the update dispatches (inside
``torch.func`` transforms too, after their batching rules).

    with OpCounter() as counter:
        agent.update(batch)
    counter.total, counter.syncs      # ATen ops, and the ones that synchronise

Compiled, the update is no longer a sequence of ATen ops but of the kernels that
inductor generated (fused loops: ``cpp_fused_*`` on the CPU, ``triton_*`` on CUDA),
extern calls (``extern_kernels.mm``...) and library ops it left as they are
(``torch.ops.aten.linalg_cholesky_ex``...); on a GPU each is at least one launch
of a CUDA-graph replay. ``CompiledKernels`` counts them in the output code that
inductor writes (or loads from its cache) inside the ``with`` block:

    with CompiledKernels() as kernels:
        compiled_update(batch)        # the first call compiles
    kernels.total, kernels.by_kind    # LS, T = 10: 139, {"generated": 58, "extern": 79, ...}
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Ops that read a device value on the host (or whose output shape depends on values).
# The torch.linalg kernels listed check their LAPACK/cuSOLVER ``info`` on the host on
# CUDA (``_linalg_check_errors`` is the explicit form of that check); their ``*_ex``
# variants (cholesky_ex, solve_ex, inv_ex) return ``info`` as a tensor instead.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.nonzero_static",  # static shape, but CUDA's kernel still reads the count
    "aten.is_nonzero",
    "aten.equal",
    "aten.masked_select",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",  # with a tensor of repeats: the output size is data
    "aten._linalg_check_errors",
    "aten._linalg_eigh",
    "aten.linalg_eig",
    "aten._linalg_svd",
    "aten.linalg_lstsq",
    "aten._assert_async",
    "aten._pin_memory",
})


def _packet_name(func: Any) -> str:
    name = str(func.overloadpacket)  # e.g. "aten.add_"
    return name if name.startswith("aten.") else f"aten.{name}"


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    name = _packet_name(func)
    if name in SYNC_OPS:
        if name == "aten.repeat_interleave":
            return isinstance(args[0], torch.Tensor) and len(args) >= 1 and (
                len(args) < 2 or isinstance(args[1], torch.Tensor)
            ) and not isinstance(kwargs.get("output_size"), int)
        return True
    if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
            for index in indices or ()
        )
    if name in ("aten._to_copy", "aten.copy_", "aten.to"):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        target = kwargs.get("device")
        if target is not None:
            devices.add(torch.device(target).type)
        return len(devices) > 1  # a copy between the host and a device
    return False


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the ``with`` block, and the host syncs among them.

    ``total``: number of ops; ``by_name``: ops per name; ``syncs``: number of ops
    that synchronise with the host; ``sync_names``: those ops per name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()
        self.sync_names: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_names.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        name = _packet_name(func)
        self.by_name[name] += 1
        if _is_sync(func, args, kwargs):
            self.sync_names[name] += 1
        return func(*args, **kwargs)


def count_ops(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, OpCounter]:
    """Run ``fn(*args, **kwargs)`` under an ``OpCounter``; return its result and the counter."""
    with OpCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter


# One statement of inductor's wrapper code that runs a kernel: a generated kernel
# (``cpp_fused_3(buf0, ...)``, ``triton_poi_fused_0.run(...)``), an extern call
# (``extern_kernels.mm(...)``) or a library op inductor did not lower
# (``torch.ops.aten.linalg_cholesky_ex.default(...)``), possibly assigned.
_KERNEL_CALL = re.compile(
    r"^[ \t]*(?:[\w\[\], ]+ = )?"
    r"(?P<name>(?:cpp_fused|triton_)\w*|extern_kernels\.\w+|torch\.ops\.\w+\.\w+)"
    r"(?:\.\w+)?\(",  # a Triton kernel's .run, an op's overload (.default)
    re.MULTILINE,
)


def kernel_kind(name: str) -> str:
    """``generated``, ``extern`` or ``library`` (an ATen op run as it is) for a kernel call's
    name (or ``generated``, the name ``count_kernel_calls`` gives generated kernels)."""
    if name == "generated" or name.startswith(("cpp_fused", "triton_")):
        return "generated"
    return "extern" if name.startswith("extern_kernels.") else "library"


def count_kernel_calls(source: str) -> Counter[str]:
    """Kernel calls per name (generated kernels counted under ``generated``) in one module of
    inductor's output code: in its wrapper (``class Runner``, or from the first ``def call``
    in an older layout), after the kernels' own definitions and sources."""
    start = source.find("\nclass Runner")
    wrapper = source[start:] if start >= 0 else source[max(source.find("def call("), 0) :]
    calls: Counter[str] = Counter()
    for match in _KERNEL_CALL.finditer(wrapper):
        name = match.group("name")
        calls["generated" if kernel_kind(name) == "generated" else name] += 1
    return calls


class OutputCodeWritten(Exception):
    """Raised by ``CompiledKernels(stop=True)`` once inductor has written its output code."""


class CompiledKernels:
    """The kernels of the graphs inductor compiles (or loads from its cache) inside the
    ``with`` block, counted in their output code (``count_kernel_calls``).

    ``total``: kernel calls per run of all those graphs; ``by_name``: per extern or
    library op (generated kernels under ``generated``); ``by_kind``: generated,
    extern and library; ``sources``: the output code, one module per graph.

    With ``stop=True`` the compilation stops (``OutputCodeWritten``) as soon as the
    output code of a graph is written, before its kernels are compiled (the C++ or
    Triton compiler's share of a compile): what ``count_compiled_kernels`` does.
    """

    def __init__(self, stop: bool = False) -> None:
        self.sources: list[str] = []
        self.stop = stop
        self._patch: Any = None

    def _record(self, source: str) -> None:
        self.sources.append(source)
        if self.stop:
            raise OutputCodeWritten

    def __enter__(self) -> CompiledKernels:
        from torch._inductor.graph import GraphLowering

        self._patch = mock.patch.object(GraphLowering, "save_output_code", self._record)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.__exit__(*exc)

    @property
    def by_name(self) -> Counter[str]:
        calls: Counter[str] = Counter()
        for source in self.sources:
            calls.update(count_kernel_calls(source))
        return calls

    @property
    def by_kind(self) -> dict[str, int]:
        kinds: Counter[str] = Counter()
        for name, count in self.by_name.items():
            kinds[kernel_kind(name)] += count
        return {kind: kinds[kind] for kind in ("generated", "extern", "library")}

    @property
    def total(self) -> int:
        return sum(self.by_name.values())


def count_compiled_kernels(fn: Any, *args: Any) -> CompiledKernels:
    """The kernels of ``fn(*args)`` compiled by inductor as one graph (``fullgraph=True``,
    static shapes), counted in its output code without compiling the kernels themselves
    (``CompiledKernels(stop=True)``); ``fn`` does not run. ``torch.autograd.grad`` is
    traced into the graph as in ``mtrl_ntk.compilation``."""
    compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False)
    config = torch._dynamo.config
    patch = {"trace_autograd_ops": True} if hasattr(config, "trace_autograd_ops") else {}
    # A cache hit would skip the code generation that is measured here.
    with (
        CompiledKernels(stop=True) as kernels,
        config.patch(**patch),
        torch._inductor.config.patch(fx_graph_cache=False),
    ):
        try:
            compiled(*args)
        except Exception as error:  # noqa: BLE001 - dynamo wraps the backend's exception
            if not _caused_by(error, OutputCodeWritten):
                raise
    if not kernels.sources:
        raise RuntimeError("inductor wrote no output code (was the graph empty?)")
    return kernels


def _caused_by(error: BaseException, kind: type) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        inner = getattr(current, "inner_exception", None)
        current = current.__cause__ or current.__context__ or inner
    return False

