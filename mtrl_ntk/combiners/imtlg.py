"""IMTL-G (Liu et al., ICLR 2021): equal projections onto every unit task gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl_ntk.combiners.base import (
    CombinerOutput,
    register_combiner,
)
from mtrl_ntk.combiners.solvers import (
    GramianCombiner,
    fallback_output,
    relative_rank_mask,
    scale_gramian,
)


def equal_projection_weights(gramian: Tensor) -> tuple[Tensor | None, str]:
    """α [T] with Σα = 1 and u_iᵀ(Σ_j α_j g_j) equal for all nonzero tasks (zero tasks: α = 0).

    With u_i = g_i/‖g_i‖ the conditions read C S α = κ 1 (C the cosine matrix,
    S = diag(‖g_i‖), κ the common projection), so α ∝ S⁻¹C⁻¹1: the paper's
    closed form, written symmetrically in the tasks. C may be singular
    (duplicate tasks, T > d): if 1 is in the range of C, we take the
    pseudo-inverse (duplicates share their weight equally); if not, κ must be
    0 and α is the minimum-norm solution of C S α = 0, Σα = 1 (then d = 0: no
    nonzero direction has equal projections, e.g. T > d generic gradients).
    Returns (None, reason) if neither exists.
    """
    scaled = scale_gramian(gramian)
    live = ~scaled.zero
    cosines = scaled.cosines[live][:, live]
    inverse_norms = 1.0 / scaled.norms[live]  # Σ α_i = Σ (S α)_i / ‖g_i‖
    eigenvalues, eigenvectors = torch.linalg.eigh(cosines)
    kept = relative_rank_mask(eigenvalues)
    ones = torch.ones_like(inverse_norms)
    range_basis = eigenvectors[:, kept]
    coordinates = range_basis.T @ ones
    outside_range = ones - range_basis @ coordinates
    if float(outside_range.norm()) <= 1e-8 * float(ones.norm()):
        scaled_alpha = range_basis @ (coordinates / eigenvalues[kept])  # S α / κ = C⁺ 1
        status = "closed form"
    else:
        null_basis = eigenvectors[:, ~kept]
        scaled_alpha = null_basis @ (null_basis.T @ inverse_norms)  # S α ∈ null(C), κ = 0
        status = "closed form: 1 is outside the range of the cosine matrix, so d = 0"
    total = float(inverse_norms @ scaled_alpha)
    if not abs(total) > 1e-12 * float((inverse_norms * scaled_alpha).abs().sum()):
        return None, "Σα = 1 cannot be met (singular system)"
    weights = torch.zeros(gramian.shape[0], dtype=torch.float64)
    weights[live] = inverse_norms * scaled_alpha / total
    return weights, status


@register_combiner("imtlg")
class IMTLG(GramianCombiner):
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2).

    The update d = Σ_i α_i g_i with Σ_i α_i = 1 has equal projections onto every
    unit task gradient u_i = g_i/‖g_i‖: dᵀu_i = dᵀu_j. The paper's closed form
    α_{2:T} = g_1 Uᵀ(D Uᵀ)⁻¹, α_1 = 1 - Σ_{i>=2} α_i (D rows g_1 - g_i, U rows
    u_1 - u_i) is computed from the Gramian in an equivalent, task-symmetric
    form α ∝ S⁻¹C⁻¹1 (``equal_projection_weights``), in float64.

    Scale convention: Σ_i α_i = 1 (an affine combination; identical tasks give
    their gradient). α_i may be negative, as in the paper.

    Departures from the paper / LibMTL's IMTL: a singular system (duplicate
    tasks, collinear gradients, T > d) is solved with a pseudo-inverse instead
    of ``torch.inverse`` (see ``equal_projection_weights``; for T > d generic
    gradients only d = 0 has equal projections). A zero task gradient has no
    unit vector: it is left out of the conditions and gets α_i = 0. Where no α
    exists, the LS weights 1/T are used and ``solver_status`` says so.
    IMTL-L's loss scaling is not part of this method.
    """


    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)

    def weigh(self, gramian: Tensor) -> CombinerOutput:
        weights, status = equal_projection_weights(gramian)
        if weights is None:
            return fallback_output(self.num_tasks, status)
        zero_tasks = scale_gramian(gramian).zero_tasks()
        return CombinerOutput(
            weights=weights,
            diagnostics={
                "weights": weights,
                "solver_status": status,
                "zero_gradient_tasks": zero_tasks,
            },
        )
