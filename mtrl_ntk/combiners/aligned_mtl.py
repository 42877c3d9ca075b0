"""Aligned-MTL (Senushkin et al., CVPR 2023): align the principal components of the gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners.base import check_param, register_combiner
from mtrl_ntk.combiners.solvers import (
    GramianCombiner,
    jacobi_column_orthogonalise,
    jacobi_eigh,
    jacobi_sweeps,
    relative_rank_mask,
    scale_gramian,
)

SCALE_MODES = ("min", "median", "rmse")


@dataclass(frozen=True)
class Alignment:
    balance: Tensor  # [T, T] B: the aligned gradients are the rows of B G
    eigenvalues: Tensor  # [T] eigenvalues of GGᵀ in the kept directions, descending, then 0
    kept: Tensor  # [T] bool: which of ``eigenvalues`` are the r nonzero ones (a prefix)
    rank: Tensor  # 0-d int64 r
    scale: Tensor  # 0-d λ_scale: every aligned gradient has squared norm λ_scale


def alignment_of(gramian: Tensor, scale_mode: str) -> Alignment:
    """B = sqrt(λ_scale) V Λ^(-1/2) Vᵀ over the r nonzero eigenpairs (Λ, V) of GGᵀ, as
    static-shape tensors with no host synchronisation.

    The aligned gradient matrix Ĝ = B G has Ĝ Ĝᵀ = λ_scale V Vᵀ: for
    independent gradients (r = T) its rows are orthogonal with norm
    sqrt(λ_scale) (the Procrustes solution of the paper). λ_scale is the
    smallest nonzero eigenvalue (``min``), their median (``median``, the lower
    middle value for an even count, as ``torch.median`` in the authors' code) or
    their mean (``rmse``: the RMS of the singular values of G).

    The eigenpairs come from the graded factor X = Θ^(1/2) V_Cᵀ S (C = V_C Θ V_Cᵀ the
    cosine matrix by cyclic Jacobi, S = diag(‖g_i‖), XᵀX = GGᵀ), whose columns are
    then made orthogonal by one-sided Jacobi (``jacobi_column_orthogonalise``): the
    accumulated rotations are the eigenvectors of GGᵀ and the squared column norms its
    eigenvalues. This is Jacobi on GGᵀ done implicitly, which keeps the small
    eigenvalues to ~1e-12 relative accuracy where eigh of GGᵀ itself is off by
    factors when the task norms span 1e-4..1e4 (Demmel & Veselić 1992); and, unlike
    eigh/svd, it checks no ``info`` on the host. The rank r is that of C at float64
    resolution; the r largest eigenvalues of GGᵀ are kept, by a mask. Both Jacobi
    methods run a fixed number of sweeps (``jacobi_sweeps``: 5 for T <= 5, 7 up to 20,
    8 beyond; cyclic Jacobi converges quadratically and these reach float64 resolution
    in our tests up to T = 50).
    """
    scaled = scale_gramian(gramian)
    sweeps = jacobi_sweeps(gramian.shape[0])
    cosine_eigenvalues, cosine_eigenvectors = jacobi_eigh(scaled.cosines, sweeps)
    rank = relative_rank_mask(cosine_eigenvalues).sum()  # r, the rank of C
    root = torch.where(
        relative_rank_mask(cosine_eigenvalues), cosine_eigenvalues, 0.0
    ).clamp_min(0.0).sqrt()
    # X = Θ^(1/2) V_Cᵀ S: XᵀX = S C S = GGᵀ, columns graded by the task norms.
    factor = root.unsqueeze(1) * cosine_eigenvectors.T * scaled.norms
    factor, vectors = jacobi_column_orthogonalise(factor, sweeps)
    squared = (factor * factor).sum(0)  # [T] eigenvalues of GGᵀ, ~0 in the T - r null ones
    # The r largest are the nonzero ones: the null ones are at rounding level,
    # ~(eps max‖g‖)², far below (min‖g‖)² · θ_min(C) for norms spanning 1e-4..1e4.
    order = squared.argsort(descending=True)
    kept = order.argsort() < rank  # the inverse permutation: each task's place in the order
    singular = squared.sqrt()
    ascending = torch.where(kept, squared, torch.inf).sort().values
    if scale_mode == "min":
        scale = ascending[0]
    elif scale_mode == "median":
        scale = ascending.gather(0, ((rank - 1) // 2).clamp_min(0).unsqueeze(0)).squeeze(0)
    else:
        scale = torch.where(kept, squared, 0.0).sum() / rank.clamp_min(1)
    inverse_roots = torch.where(kept, scale.sqrt() / torch.where(kept, singular, 1.0), 0.0)
    balance = (vectors * inverse_roots) @ vectors.T
    descending = torch.where(kept, squared, -torch.inf).sort(descending=True).values
    return Alignment(
        balance=balance,
        eigenvalues=torch.where(torch.isfinite(descending), descending, 0.0),
        kept=torch.arange(gramian.shape[0], device=gramian.device) < rank,
        rank=rank,
        scale=scale,
    )


@dataclass(frozen=True)
class HostAlignment:
    balance: Tensor  # [T, T]
    eigenvalues: Tensor  # [r] the nonzero eigenvalues of GGᵀ, descending
    scale: float


def align_gradients(gramian: Tensor, scale_mode: str) -> HostAlignment:
    """``alignment_of`` with the r nonzero eigenvalues sliced out and λ_scale as a float:
    for inspection and tests only (it synchronises; ``combine`` does not use it)."""
    alignment = alignment_of(gramian.to(torch.float64), scale_mode)
    return HostAlignment(
        balance=alignment.balance,
        eigenvalues=alignment.eigenvalues[: int(alignment.rank)],
        scale=float(alignment.scale),
    )


@register_combiner("aligned_mtl")
class AlignedMTL(GramianCombiner):
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023).

    The task gradients G [T, d] are replaced by Ĝ = B G, the closest matrix
    (Procrustes) whose rows are orthogonal with equal norms sqrt(λ_scale): with
    GGᵀ = V Λ Vᵀ, B = sqrt(λ_scale) V Λ^(-1/2) Vᵀ (``alignment_of``). This
    makes the condition number of the gradient system 1. The update is the sum
    of the aligned gradients weighted by the task preferences (all 1 here), so
    the task weights are w = B 1.

    Scale convention: the sum Σ_i Ĝ_i, as the authors' code (``grads.sum(-1)``
    and weights ``weights.sum(-1)``): each aligned gradient has norm
    sqrt(λ_scale) (``min``: the smallest singular value of G), so for T
    orthogonal gradients of equal norm the update is their sum.

    Departures from the authors' code (SamsungLabs/MTL, ProcrustesSolver): they
    drop eigenvalues of GGᵀ below λ_max · T · eps(float32) and take ``symeig`` of
    GGᵀ directly, so with task norms spanning more than ~1e3 the weak tasks'
    directions are dropped or inaccurate; we take the rank of the cosine matrix
    at float64 resolution and compute the eigenpairs from a graded factor by
    Jacobi methods with a fixed budget of 5-8 sweeps each (see ``alignment_of``;
    no eigh/svd, which synchronise with the host on CUDA), so every task
    direction is kept and aligned. A zero task gradient contributes no
    eigen-direction and gets weight 0 (as in the authors' code). Non-finite
    weights, or a non-finite or all-zero Gramian, give LS weights 1/T with
    ``solver_fallback`` = 1.
    """

    def __init__(self, num_tasks: int, *, scale_mode: str = "min") -> None:
        super().__init__(num_tasks)
        check_param(scale_mode in SCALE_MODES, "scale_mode", scale_mode, f"one of {SCALE_MODES}")
        self.scale_mode = scale_mode

    def weigh(self, gramian: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        alignment = alignment_of(gramian, self.scale_mode)
        weights = alignment.balance.sum(dim=1)  # B 1 (B is symmetric)
        diagnostics = {
            "gramian_eigenvalues": alignment.eigenvalues,
            "rank": alignment.rank,
            "scale": alignment.scale,
        }
        return weights, ~torch.isfinite(weights).all(), diagnostics

    def __repr__(self) -> str:
        return f"AlignedMTL(num_tasks={self.num_tasks}, scale_mode={self.scale_mode!r})"
