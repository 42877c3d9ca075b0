"""NTKMTL and NTKMTL-SR (Qin et al., NeurIPS 2025): balance the tasks' NTK eigenvalues."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    check_param,
    register_combiner,
)

# Relative floor on λ_i: a task whose gradient vanishes (λ_i = 0) would get an
# infinite weight on a zero gradient; flooring λ_i at this fraction of the mean
# keeps its weight finite (and large) without changing any other task's weight.
_EIGENVALUE_FLOOR = 1e-12


def ntk_weights(eigenvalues: Tensor, exponent: float) -> Tensor:
    """Eq. 15: w_i = (mean_j λ_j / λ_i)^p, in float64. All-zero λ gives w = 1."""
    eigenvalues = eigenvalues.double().clamp_min(0.0)
    mean = eigenvalues.mean()
    floored = eigenvalues.clamp_min(_EIGENVALUE_FLOOR * mean)
    # No `if mean > 0` (a host sync on a GPU): all-zero λ gives 0/0 = NaN here, replaced by 1.
    return torch.where(mean > 0, (mean / floored) ** exponent, torch.ones_like(eigenvalues))


def top_block_eigenvalues(rows: Tensor) -> Tensor:
    """λ_i = largest eigenvalue of K_ii = J_i J_iᵀ for rows [T, n, d] (any d), in float64.

    K_ii is n x n, so this costs T tiny eigen-decompositions after T*n² dot products.
    """
    rows = rows.double()
    blocks = rows @ rows.transpose(1, 2)  # [T, n, n]
    return torch.linalg.eigvalsh(blocks)[:, -1].clamp_min(0.0)


def _validate(exponent: float, num_minibatches: int) -> None:
    check_param(
        isinstance(exponent, (int, float)) and not isinstance(exponent, bool) and exponent >= 0,
        "exponent", exponent, "a real number >= 0 (0.5 in the paper)",
    )
    check_param(
        isinstance(num_minibatches, int) and not isinstance(num_minibatches, bool)
        and num_minibatches >= 1,
        "num_minibatches", num_minibatches, "an integer >= 1",
    )


@register_combiner("ntkmtl")
class NTKMTL(GradientCombiner):
    """NTKMTL (Qin et al., NeurIPS 2025, Eq. 14-15, Algorithm 1).

    λ_i is the largest eigenvalue of task i's NTK block K_ii = J_i J_iᵀ, where
    J_i [n, d] stacks the gradients of task i's loss on n mini-batches w.r.t. the
    shared parameters; with n = 1, λ_i = ‖g_i‖². The weights are
    w_i = (mean_j λ_j / λ_i)^p; with p = 0.5 every w_i² λ_i equals mean_j λ_j.

    Scale convention: the update is the *sum* Σ_i w_i g_i (Eq. 12), g_i the
    gradient on the task's whole batch (the mean of its n mini-batch rows).
    Departure: λ_i is floored at 1e-12 · mean_j λ_j so a zero-gradient task gets
    a large finite weight instead of an infinite one.
    """

    need = Need.NTK_BLOCKS

    def __init__(self, num_tasks: int, *, exponent: float = 0.5, num_minibatches: int = 1) -> None:
        super().__init__(num_tasks)
        _validate(exponent, num_minibatches)
        self.exponent = float(exponent)
        self.num_minibatches = num_minibatches

    def combine(self, stats: TaskStats) -> CombinerOutput:
        # λ_i from the n x n block when the engine formed it, else from the rows.
        if stats.ntk_blocks is not None and stats.ntk_blocks.shape[1] == 1:
            eigenvalues = stats.ntk_blocks[:, 0, 0].double().clamp_min(0.0)  # λ_i = ‖g_i‖²
        elif stats.ntk_blocks is not None:
            # eigvalsh checks its convergence on the host (a sync on a GPU); n = 1 needs none.
            eigenvalues = torch.linalg.eigvalsh(stats.ntk_blocks.double())[:, -1].clamp_min(0.0)
        else:
            if stats.jacobian is None:
                raise ValueError("ntkmtl needs the extended NTK or the Jacobian")
            eigenvalues = top_block_eigenvalues(stats.jacobian)
        weights = ntk_weights(eigenvalues, self.exponent)
        return CombinerOutput(
            weights=weights, diagnostics={"weights": weights, "ntk_eigenvalues": eigenvalues}
        )


@register_combiner("ntkmtl_sr")
class NTKMTLSR(GradientCombiner):
    """NTKMTL-SR (Qin et al., NeurIPS 2025, Eq. 17-18, Algorithm 2).

    The same weights as NTKMTL, w_i = (mean_j λ_j(z) / λ_i(z))^p, from the NTK of
    the shared representation z: row m of J_i(z) is the gradient of task i's loss
    on its m-th mini-batch w.r.t. z, summed over the samples of that mini-batch
    (the per-sample gradients ∂f_i(x_u)/∂z_u all live in the same space R^h, so
    their inner products are Eq. 17's kernel entries and the sum is the kernel of
    the mini-batch loss). The update is then one backward pass of Σ_i w_i ℓ_i.

    Scale convention: sum Σ_i w_i ℓ_i (Eq. 12). Departure: the same λ floor as NTKMTL.
    """

    need = Need.REPRESENTATION_NTK

    def __init__(self, num_tasks: int, *, exponent: float = 0.5, num_minibatches: int = 4) -> None:
        super().__init__(num_tasks)
        _validate(exponent, num_minibatches)
        self.exponent = float(exponent)
        self.num_minibatches = num_minibatches

    def combine(self, stats: TaskStats) -> CombinerOutput:
        if stats.representation_jacobian is None:
            raise ValueError("ntkmtl_sr needs the representation Jacobian (REPRESENTATION_NTK)")
        eigenvalues = top_block_eigenvalues(stats.representation_jacobian)
        weights = ntk_weights(eigenvalues, self.exponent)
        return CombinerOutput(
            weights=weights, diagnostics={"weights": weights, "ntk_eigenvalues": eigenvalues}
        )
