"""IMTL-G (Liu et al., ICLR 2021): equal projections onto every unit task gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners.base import register_combiner
from mtrl_ntk.combiners.solvers import (
    GramianCombiner,
    jacobi_eigh,
    jacobi_sweeps,
    relative_rank_mask,
    scale_gramian,
)


def equal_projection_weights(gramian: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """α [T] with Σα = 1 and u_iᵀ(Σ_j α_j g_j) equal for all nonzero tasks (zero tasks: α = 0);
    the failure flag (0-d bool) and tensor diagnostics.

    With u_i = g_i/‖g_i‖ the conditions read C S α = κ 1 (C the cosine matrix,
    S = diag(‖g_i‖), κ the common projection), so α ∝ S⁻¹C⁻¹1: the paper's
    closed form, written symmetrically in the tasks. C may be singular
    (duplicate tasks, T > d): if 1 is in the range of C, we take the
    pseudo-inverse (duplicates share their weight equally); if not, κ must be
    0 and α is the minimum-norm solution of C S α = 0, Σα = 1 (then d = 0: no
    nonzero direction has equal projections, e.g. T > d generic gradients).
    Both are computed (eigenpairs of C by cyclic Jacobi, ``solvers.jacobi_eigh``,
    ``jacobi_sweeps``: no eigh, which synchronises on CUDA) and chosen by a mask
    (``direction_is_zero`` reports the second case). Fails if neither exists.
    """
    scaled = scale_gramian(gramian)
    live = ~scaled.zero
    inverse_norms = torch.where(live, 1.0 / scaled.scale, 0.0)  # Σ α_i = Σ (S α)_i / ‖g_i‖
    eigenvalues, eigenvectors = jacobi_eigh(scaled.cosines, jacobi_sweeps(gramian.shape[0]))
    # Zero tasks' rows of C are 0: their eigenvectors are their unit vectors, eigenvalue 0,
    # so they are outside ``kept`` and receive nothing below.
    kept = relative_rank_mask(eigenvalues)
    ones = live.double()
    coordinates = eigenvectors.T @ ones
    outside_range = ones - eigenvectors @ torch.where(kept, coordinates, 0.0)
    in_range = outside_range.norm() <= 1e-8 * ones.norm()
    # S α / κ = C⁺ 1 (1 in the range of C), or S α ∈ null(C) with κ = 0.
    safe_eigenvalues = torch.where(kept, eigenvalues, 1.0)
    pseudo = eigenvectors @ torch.where(kept, coordinates / safe_eigenvalues, 0.0)
    null_coordinates = torch.where(kept, 0.0, eigenvectors.T @ inverse_norms)
    null = eigenvectors @ null_coordinates
    scaled_alpha = torch.where(in_range, pseudo, null)
    total = inverse_norms @ scaled_alpha
    ok = total.abs() > 1e-12 * (inverse_norms * scaled_alpha).abs().sum()
    weights = inverse_norms * scaled_alpha / torch.where(ok, total, 1.0)
    diagnostics = {"direction_is_zero": (~in_range).double(), "zero_gradient_tasks": scaled.zero}
    return weights, ~ok, diagnostics


@register_combiner("imtlg")
class IMTLG(GramianCombiner):
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2).

    The update d = Σ_i α_i g_i with Σ_i α_i = 1 has equal projections onto every
    unit task gradient u_i = g_i/‖g_i‖: dᵀu_i = dᵀu_j. The paper's closed form
    α_{2:T} = g_1 Uᵀ(D Uᵀ)⁻¹, α_1 = 1 - Σ_{i>=2} α_i (D rows g_1 - g_i, U rows
    u_1 - u_i) is computed from the Gramian in an equivalent, task-symmetric
    form α ∝ S⁻¹C⁻¹1 (``equal_projection_weights``), in float64 on the Gramian's
    device with no host synchronisation.

    Scale convention: Σ_i α_i = 1 (an affine combination; identical tasks give
    their gradient). α_i may be negative, as in the paper.

    Departures from the paper / LibMTL's IMTL: a singular system (duplicate
    tasks, collinear gradients, T > d) is solved with a pseudo-inverse instead
    of ``torch.inverse`` (see ``equal_projection_weights``; for T > d generic
    gradients only d = 0 has equal projections). The eigenpairs of the cosine
    matrix come from 5-8 sweeps of cyclic Jacobi (as accurate as eigh). A zero task
    gradient has no unit vector: it is left out of the conditions and gets α_i = 0.
    Where no α exists, or for a non-finite or all-zero Gramian, the LS weights 1/T
    are used with ``solver_fallback`` = 1. IMTL-L's loss scaling is not part of
    this method.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)

    def weigh(self, gramian: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        return equal_projection_weights(gramian)
