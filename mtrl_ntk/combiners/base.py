"""The combiner interface: what a combiner needs, what it returns, and the registry.

Every method in this package is a *weighting*: it maps task statistics (per-task
losses, the Gramian of the per-task gradients, i.e. the paper's extended NTK, the
NTK of the shared representation) to task weights ``w`` [T], and the update is
``Jᵀw = Σ_i w_i g_i``. The two methods that act on gradient coordinates
(GradDrop, MoCo) return a direction [d] instead. A combiner declares what it
needs in ``need`` and the engine (``mtrl_ntk.engine``) computes exactly that; the
caller never branches on a combiner's name.

The capture contract. ``combine`` and ``update_after_step`` run inside the
agent's update, which is compiled as one graph (``torch.compile(fullgraph=True)``)
and on a GPU captured as one CUDA graph. So they are tensor code with static
shapes that never reads a value on the host: no ``.item()``, ``float(t)``,
``bool(t)``, ``.tolist()``, ``.cpu()``, ``nonzero`` or boolean-mask indexing, no
Python ``if``/``while`` on a tensor's value (``torch.where`` and fixed iteration
counts instead), no ``torch.linalg`` call that checks its ``info`` on the host
(``cholesky``, ``solve``, ``inv``, ``eigh``, ``svd``; the ``*_ex`` variants return
``info`` as a tensor). Every tensor they make is on the device of the statistics
they are given. Diagnostics are tensors (a solver's status is the 0-d float
``solver_fallback``: 1.0 when it fell back to its documented safe answer) or
Python values that do not depend on the data. State lives in tensors updated in
place (``copy_``), never rebound or grown, listed by ``state_tensors`` so that the
agent can undo a skipped (non-finite) update with ``torch.where``. A
``torch.Generator`` cannot be used inside a captured graph: a combiner that needs
random numbers draws them in ``draw_random`` (called eagerly before each update)
and reads them from ``TaskStats.random``, drawing them itself when that is None
(the pure function ``combine``). ``mtrl_ntk.opcount.OpCounter`` counts the host
synchronisations of a call.
"""

from __future__ import annotations

import difflib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Flag, auto
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor


class Need(Flag):
    """Task statistics a combiner consumes. The engine computes only what is asked."""

    NOTHING = 0
    LOSSES = auto()  # per-task mean losses [T]
    GRAMIAN = auto()  # Gramian of the per-task gradients g_i, [T, T] float64
    JACOBIAN = auto()  # the per-task (per-mini-batch) Jacobian itself, [T, n, d]
    NTK_BLOCKS = auto()  # each task's NTK block K_ii = J_i J_iᵀ over its n mini-batches, [T, n, n]
    REPRESENTATION_NTK = auto()  # gradients w.r.t. the shared representation z, [T, n, h]
    LOSSES_AFTER_STEP = auto()  # per-task losses on the same batch after the update (FAMO)


@dataclass
class TaskStats:
    """What the engine hands a combiner for one update (T tasks, n mini-batches each).

    Every field the combiner did not declare in ``need`` may be ``None``. The
    Gramian G Gᵀ of the task gradients is the task-level extended NTK (paper Eq. 9
    with the mini-batch rows of each task averaged); ``ntk_blocks`` are its
    per-task diagonal blocks at mini-batch resolution (Eq. 8).
    """

    num_tasks: int
    num_minibatches: int = 1
    losses: Tensor | None = None  # [T]
    jacobian: Tensor | None = None  # [T, n, d]: row (i, m) = grad of task i's loss on mini-batch m
    gramian: Tensor | None = None  # [T, T] float64, G Gᵀ with G = jacobian.mean(1)
    ntk_blocks: Tensor | None = None  # [T, n, n] float64, diagonal blocks K_ii of the extended NTK
    representation_jacobian: Tensor | None = None  # [T, n, h], gradients w.r.t. z (Eq. 17)
    # The combiner's random numbers for this update, from its ``draw_random`` (or None).
    random: Tensor | None = None

    @property
    def task_gradients(self) -> Tensor:
        """g_i, the gradient of task i's loss on its whole batch: [T, d]."""
        if self.jacobian is None:
            raise ValueError("task_gradients needs the Jacobian (Need.JACOBIAN)")
        if self.jacobian.shape[1] == 1:
            return self.jacobian[:, 0]  # a view: no copy of the [T, d] matrix
        return self.jacobian.mean(dim=1)


@dataclass
class CombinerOutput:
    """Task weights (update = Σ_i w_i g_i) or, for coordinate-wise methods, a direction [d]."""

    weights: Tensor | None = None  # [T]
    direction: Tensor | None = None  # [d]
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.weights is None) == (self.direction is None):
            raise ValueError("a CombinerOutput holds exactly one of weights or direction")


class GradientCombiner(ABC):
    """Base class of all combiners.

    Subclasses set ``name`` (through ``@register_combiner``) and ``need``, take
    their hyperparameters as keyword arguments of ``__init__`` (validated there,
    with ``check_param``), and implement ``combine``. Stateful combiners keep
    their state in tensors listed by ``state_dict`` so a checkpoint restores them
    exactly.
    """

    name: ClassVar[str] = ""
    need: ClassVar[Need] = Need.NOTHING
    # Mini-batches per task the engine splits each task's batch into (NTKMTL's n).
    num_minibatches: int = 1
    # True for methods defined only for positive losses (log-losses, loss ratios): the
    # agent then keeps them off losses that can be negative, such as the SAC actor loss.
    needs_positive_losses: ClassVar[bool] = False

    def __init__(self, num_tasks: int) -> None:
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        self.num_tasks = num_tasks

    @abstractmethod
    def combine(self, stats: TaskStats) -> CombinerOutput:
        """Weights (or a direction) for one update from this step's task statistics."""

    def update_after_step(self, losses_after: Tensor) -> None:  # noqa: B027 - optional hook
        """Per-task losses [T] recomputed after the update (only with Need.LOSSES_AFTER_STEP)."""

    def prepare(self, shared_dim: int, device: torch.device) -> None:  # noqa: B027 - optional
        """Allocate the state whose shape depends on d (``shared_dim``) on ``device``, before
        the first update (draws nothing): ``state_tensors`` is complete afterwards."""

    def draw_random(self, shared_dim: int, device: torch.device) -> Tensor | None:
        """Random numbers for the next ``combine``, drawn eagerly from the combiner's own
        generator (``shared_dim`` = d, the number of shared parameters); None if it needs none.
        """
        return None

    def to(self, device: torch.device | str) -> GradientCombiner:
        """Move the state tensors to ``device`` (before the first update); returns self."""
        return self

    def state_tensors(self) -> list[Tensor]:
        """The state tensors ``combine``/``update_after_step`` update in place (for the guard)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """State a checkpoint must keep (empty for stateless combiners)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"combiner {self.name!r} is stateless; got state keys {list(state)}")

    def hyperparameters(self) -> dict[str, Any]:
        """The keyword arguments ``__init__`` was given (or defaulted), by name: each
        combiner keeps them as attributes of the same names."""
        return {name: getattr(self, name) for name in combiner_params(self.name)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tasks={self.num_tasks})"


def check_param(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a ValueError naming the parameter and what is allowed, unless ``ok``."""
    if not ok:
        raise ValueError(f"invalid value {value!r} for parameter {name!r}: expected {allowed}")


_REGISTRY: dict[str, type[GradientCombiner]] = {}
C = TypeVar("C", bound=type[GradientCombiner])


def register_combiner(name: str) -> Callable[[C], C]:
    """Class decorator: make a combiner available under ``name``."""

    def decorate(cls: C) -> C:
        if name in _REGISTRY:
            raise ValueError(f"combiner {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_combiners() -> list[str]:
    """Names of all registered combiners, sorted."""
    return sorted(_REGISTRY)


def combiner_class(name: str) -> type[GradientCombiner]:
    """The class registered under ``name``; a ValueError lists the valid names otherwise."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown combiner {name!r}.{hint} Valid combiners: {', '.join(available_combiners())}"
        )
    return _REGISTRY[name]


def combiner_params(name: str) -> dict[str, Any]:
    """The hyperparameters of combiner ``name`` with their defaults."""
    signature = inspect.signature(combiner_class(name).__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name not in ("self", "num_tasks") and p.kind is p.KEYWORD_ONLY
    }


def make_combiner(name: str, num_tasks: int, **params: Any) -> GradientCombiner:
    """Build combiner ``name`` for ``num_tasks`` tasks; unknown or invalid parameters raise."""
    cls = combiner_class(name)
    allowed = combiner_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) if allowed else "none"
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for combiner {name!r}; "
            f"its parameters are: {listed}"
        )
    return cls(num_tasks, **params)


def stats_from_gradients(
    grads: Tensor, need: Need, losses: Tensor | None = None
) -> TaskStats:
    """TaskStats for the pure function ``combine``: from a [T, d] or [T, n, d] gradient matrix."""
    if grads.dim() == 2:
        grads = grads.unsqueeze(1)
    if grads.dim() != 3:
        raise ValueError(f"grads must be [T, d] or [T, n, d], got shape {tuple(grads.shape)}")
    if not grads.is_floating_point():
        raise ValueError(f"grads must be a floating-point tensor, got {grads.dtype}")
    num_tasks, num_minibatches, _ = grads.shape
    if losses is None:
        losses = torch.ones(num_tasks, dtype=grads.dtype, device=grads.device)
    elif losses.shape != (num_tasks,):
        raise ValueError(f"losses must have shape [{num_tasks}], got {tuple(losses.shape)}")
    rows = grads.double()
    mean = rows.mean(dim=1)
    return TaskStats(
        num_tasks=num_tasks,
        num_minibatches=num_minibatches,
        losses=losses,
        jacobian=grads,
        gramian=mean @ mean.T,
        ntk_blocks=rows @ rows.transpose(1, 2) if Need.NTK_BLOCKS in need else None,
        representation_jacobian=grads if Need.REPRESENTATION_NTK in need else None,
    )


def direction_from_output(output: CombinerOutput, task_gradients: Tensor) -> Tensor:
    """The update direction [d] of a combiner's output: Σ_i w_i g_i, or its direction."""
    if output.direction is not None:
        return output.direction
    assert output.weights is not None
    weights = output.weights.to(dtype=task_gradients.dtype, device=task_gradients.device)
    return weights @ task_gradients


def combine(name: str, grads: Tensor, *, losses: Tensor | None = None, **params: Any) -> Tensor:
    """The update direction [d] that method ``name`` computes from per-task gradients.

    ``grads`` is the [T, d] matrix of per-task gradients (rows = tasks), or
    [T, n, d] with n mini-batch gradients per task (NTKMTL, NTKMTL-SR); the task
    gradient g_i is then the mean over its n rows. For ``ntkmtl_sr`` the rows are
    read as gradients w.r.t. the shared representation and the output is
    Σ_i w_i g_i of those rows. ``losses`` [T] feeds the loss-based methods
    (FAMO, UW, DWA, SI); without it they see losses of 1 for every task, i.e.
    their first step.

    Scale convention: the direction is the *sum* Σ_i w_i g_i with the weights of
    the method's paper (e.g. ``ls`` has w_i = 1/T, the gradient of the mean
    loss; ``ntkmtl`` has w_i = (mean_j λ_j / λ_i)^p, so identical tasks get
    w_i = 1 and the direction is T times the LS one). Each method's docstring
    states its own convention and any departure from the authors' code.

    A fresh combiner is built for each call: stateful methods give their first step.
    """
    combiner = make_combiner(name, int(grads.shape[0]), **params)
    stats = stats_from_gradients(grads, combiner.need, losses)
    output = combiner.combine(stats)
    return direction_from_output(output, stats.task_gradients)
