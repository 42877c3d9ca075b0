"""Linear scalarisation: the mean of the task losses ("MTL SAC")."""

from __future__ import annotations

import torch

from mtrl_ntk.combiners._tools import stats_device
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    register_combiner,
)


@register_combiner("ls")
class LinearScalarization(GradientCombiner):
    """LS: w_i = 1/T, the gradient of the mean task loss (the plain multi-task SAC update).

    Scale convention: mean of the task gradients, as mtrl's MT-SAC (one loss
    averaged over all T*B_t samples). The weights are on the device of the
    statistics, or, when they hold no tensor, on the device given to ``to``.
    """

    need = Need.NOTHING

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> LinearScalarization:
        self.device = torch.device(device)
        return self

    def combine(self, stats: TaskStats) -> CombinerOutput:
        device = stats_device(stats, self.device)
        weights = torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64,
                             device=device)
        return CombinerOutput(weights=weights, diagnostics={"weights": weights})
