"""SI: scale-invariant linear scalarisation, the sum of the log task losses."""

from __future__ import annotations

from mtrl_ntk.combiners._tools import positive_losses
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    register_combiner,
)


@register_combiner("si")
class ScaleInvariant(GradientCombiner):
    """SI: minimise Σ_i log ℓ_i, the scale-invariant baseline of Navon et al.
    (Nash-MTL, ICML 2022, Sec. 6; ``ScaleInvariantLinearScalarization`` in their
    and FAMO's code), also a baseline of the NTKMTL paper.

    Its gradient is Σ_i g_i / ℓ_i, i.e. weights w_i = 1 / ℓ_i: multiplying one
    task's loss by a constant leaves the update unchanged.

    Scale convention: the sum Σ_i g_i / ℓ_i (no 1/T), as the gradient of the
    authors' Σ_i log ℓ_i. Departure: log ℓ_i is undefined for ℓ_i <= 0 (a SAC
    actor loss can be negative); losses are floored at 1e-8, which gives such a
    task a weight of 1e8, and ``diagnostics["nonpositive_losses"]`` counts them.
    The authors' code takes the log of the raw loss (NaN for a negative loss).
    """

    need = Need.LOSSES
    needs_positive_losses = True

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)

    def combine(self, stats: TaskStats) -> CombinerOutput:
        if stats.losses is None:
            raise ValueError("si needs the per-task losses (Need.LOSSES)")
        losses, nonpositive = positive_losses(stats.losses)  # [T] float64
        weights = 1.0 / losses
        return CombinerOutput(
            weights=weights, diagnostics={"weights": weights, "nonpositive_losses": nonpositive}
        )
