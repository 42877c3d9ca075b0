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


# Squarings of the trace-normalised block in ``largest_eigenvalues`` (n >= 3), and how
# many of them run between two renormalisations.
_SQUARINGS = 52
_SQUARINGS_PER_NORMALISATION = 4


def largest_eigenvalues(blocks: Tensor) -> Tensor:
    """λ_max of each symmetric PSD block [T, n, n], in float64, without a host sync.

    ``torch.linalg.eigvalsh`` checks its convergence on the host (a sync on a GPU
    that also rules out CUDA-graph capture), so: n = 1 gives the entry, n = 2 the
    closed form (a + c)/2 + hypot((a - c)/2, b), and n >= 3 the ratio of power
    sums λ ≈ tr(K A) / tr(A), A = K^(2^s), s = 52 squarings of K / tr(K)
    (renormalised by the trace every 4 squarings: at trace 1 every eigenvalue is
    <= 1 and the largest >= 1/n, so 4 squarings neither overflow nor underflow
    the dominant part for n < 10^4; the others may underflow to 0, as they
    should). With r_k = λ_k/λ_1 the relative error is
    Σ_k (1 - r_k) r_k^(2^s) / Σ_k r_k^(2^s) <= (n - 1) / (e 2^s) ≈ 8e-17 (n - 1),
    i.e. float64 rounding, whatever the gap: repeated top eigenvalues are exact
    (A is then a multiple of the projector on their eigenspace), well-separated ones
    converge after a few squarings. A zero block gives 0; negative values
    (rounding of a PSD block) are clamped to 0.
    """
    blocks = blocks.double()
    size, batch_shape = blocks.shape[-1], blocks.shape[:-2]
    if size == 1:
        return blocks[..., 0, 0].clamp_min(0.0)
    if size == 2:
        a, b, c = blocks[..., 0, 0], blocks[..., 0, 1], blocks[..., 1, 1]
        return (0.5 * (a + c) + torch.hypot(0.5 * (a - c), b)).clamp_min(0.0)
    blocks = blocks.reshape(-1, size, size)  # [B, n, n], for torch.bmm
    tiny = torch.finfo(torch.float64).tiny

    def trace_of(matrix: Tensor) -> Tensor:  # [B, 1, 1]
        return matrix.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(tiny).reshape(-1, 1, 1)

    trace = blocks.diagonal(dim1=-2, dim2=-1).sum(-1)  # [B]
    kernel = blocks / trace_of(blocks)  # tr = 1 (0 for a zero block)
    power = kernel
    for index in range(_SQUARINGS):
        power = torch.bmm(power, power)
        if (index + 1) % _SQUARINGS_PER_NORMALISATION == 0:
            power = power / trace_of(power)
    # tr(K A) / tr(A), with tr(A) = 1 after the last renormalisation (52 % 4 == 0).
    rayleigh = (kernel * power).sum((-2, -1))
    eigenvalues = torch.where(trace > 0, trace * rayleigh, 0.0).clamp_min(0.0)
    return eigenvalues.reshape(batch_shape)


def top_block_eigenvalues(rows: Tensor) -> Tensor:
    """λ_i = largest eigenvalue of K_ii = J_i J_iᵀ for rows [T, n, d] (any d), in float64.

    K_ii is n x n, so this costs T*n² dot products and a few tiny batched matmuls.
    """
    rows = rows.double()
    return largest_eigenvalues(rows @ rows.transpose(1, 2))  # [T, n, n]


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
    a large finite weight instead of an infinite one. λ_i of an n x n block
    (n >= 3) comes from repeated squaring instead of an eigendecomposition
    (``largest_eigenvalues``: the same value to float64 rounding, no host sync).
    """

    need = Need.NTK_BLOCKS

    def __init__(self, num_tasks: int, *, exponent: float = 0.5, num_minibatches: int = 1) -> None:
        super().__init__(num_tasks)
        _validate(exponent, num_minibatches)
        self.exponent = float(exponent)
        self.num_minibatches = num_minibatches

    def combine(self, stats: TaskStats) -> CombinerOutput:
        # λ_i from the n x n block when the engine formed it, else from the rows.
        if stats.ntk_blocks is not None:
            eigenvalues = largest_eigenvalues(stats.ntk_blocks)  # n = 1: λ_i = ‖g_i‖²
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

    Scale convention: sum Σ_i w_i ℓ_i (Eq. 12). Departures: the same λ floor and
    the same sync-free λ_max as NTKMTL.
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
