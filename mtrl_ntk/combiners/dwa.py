"""DWA: dynamic weight average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners._tools import is_real, positive_losses
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    check_param,
    register_combiner,
)


def dwa_weights(previous: Tensor, before_previous: Tensor, temperature: float) -> Tensor:
    """Eq. 1 of Liu et al. 2019: w_i = T · softmax_i(r / temperature), r_i = ℓ_i(t-1) / ℓ_i(t-2)."""
    ratios = previous / before_previous  # [T]
    return ratios.numel() * torch.softmax(ratios / temperature, dim=0)


@register_combiner("dwa")
class DynamicWeightAverage(GradientCombiner):
    """DWA (Liu et al., "End-to-end multi-task learning with attention", CVPR 2019, Eq. 1).

    w_i(t) = T · exp(r_i(t-1) / temperature) / Σ_j exp(r_j(t-1) / temperature),
    r_i(t-1) = ℓ_i(t-1) / ℓ_i(t-2): a task whose loss fell more slowly gets more
    weight. The weights of the first two calls are 1 (the authors' w = 1 for
    their first two epochs). Default temperature 2, as the authors
    (lorenmt/mtan) and LibMTL.

    Scale convention: the weights sum to T, so equal loss ratios give the *sum*
    Σ_i g_i (T times the LS update), as in the authors' code. Departures: the
    authors average each task's loss over an epoch and update the weights once
    per epoch; an RL run has no epochs, so ℓ_i(t) here is the per-task loss of
    update t (the losses the engine passes to ``combine``), which makes the
    ratios noisier. The current call's losses enter the weights of the next
    call. Losses are floored at 1e-8 (the ratio of non-positive losses is not
    meaningful), counted in ``diagnostics["nonpositive_losses"]``.
    """

    need = Need.LOSSES
    needs_positive_losses = True

    def __init__(self, num_tasks: int, *, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        check_param(
            is_real(temperature) and temperature > 0, "temperature", temperature,
            "a real number > 0 (softmax temperature; 2.0 in the paper)",
        )
        self.temperature = float(temperature)
        # The last (up to) two loss vectors, oldest first: [k, T] with k in 0..2.
        self.loss_history = torch.zeros(0, num_tasks, dtype=torch.float64)

    def combine(self, stats: TaskStats) -> CombinerOutput:
        if stats.losses is None:
            raise ValueError("dwa needs the per-task losses (Need.LOSSES)")
        losses, nonpositive = positive_losses(stats.losses)  # [T] float64
        history = self.loss_history.to(losses.device)
        if history.shape[0] < 2:
            weights = torch.ones(self.num_tasks, dtype=torch.float64, device=losses.device)
        else:
            weights = dwa_weights(history[1], history[0], self.temperature)
        self.loss_history = torch.cat([history, losses.unsqueeze(0)])[-2:]
        return CombinerOutput(
            weights=weights, diagnostics={"weights": weights, "nonpositive_losses": nonpositive}
        )

    def state_dict(self) -> dict[str, Any]:
        return {"loss_history": self.loss_history.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_history = state["loss_history"].clone().double()

    def __repr__(self) -> str:
        return f"DynamicWeightAverage(num_tasks={self.num_tasks}, temperature={self.temperature})"
