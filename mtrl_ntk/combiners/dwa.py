"""DWA: dynamic weight average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners._tools import is_real, load_into, positive_losses
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
        # The last two loss vectors, oldest first, [2, T]; rows not yet filled hold ones.
        self.loss_history = torch.ones(2, num_tasks, dtype=torch.float64)
        # How many loss vectors the history holds (0, 1 or 2), a 0-d tensor.
        self.history_count = torch.zeros((), dtype=torch.int64)

    def to(self, device: torch.device | str) -> DynamicWeightAverage:
        self.loss_history = self.loss_history.to(device)
        self.history_count = self.history_count.to(device)
        return self

    def state_tensors(self) -> list[Tensor]:
        return [self.loss_history, self.history_count]

    def combine(self, stats: TaskStats) -> CombinerOutput:
        if stats.losses is None:
            raise ValueError("dwa needs the per-task losses (Need.LOSSES)")
        losses, nonpositive = positive_losses(stats.losses)  # [T] float64
        if self.loss_history.device != losses.device:  # eager convenience; after to(), never
            self.to(losses.device)
        history = self.loss_history
        # Weights 1 until two loss vectors are known (a select, not a Python branch).
        ratio_weights = dwa_weights(history[1], history[0], self.temperature)
        weights = torch.where(self.history_count >= 2, ratio_weights, torch.ones_like(losses))
        history[0].copy_(history[1])
        history[1].copy_(losses)
        self.history_count.copy_((self.history_count + 1).clamp(max=2))
        return CombinerOutput(
            weights=weights, diagnostics={"weights": weights, "nonpositive_losses": nonpositive}
        )

    def state_dict(self) -> dict[str, Any]:
        # The filled rows only ([k, T], k = 0, 1, 2; oldest first), as before the fixed buffer.
        count = int(self.history_count)
        return {"loss_history": self.loss_history[2 - count:].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copies into the existing buffer (on its device); unfilled rows are set to ones."""
        saved = torch.as_tensor(state["loss_history"]).to(device="cpu", dtype=torch.float64)
        if saved.dim() != 2 or saved.shape[0] > 2 or saved.shape[1] != self.num_tasks:
            raise ValueError(
                f"dwa: loss_history must be [k, {self.num_tasks}] with k <= 2, "
                f"got {tuple(saved.shape)}"
            )
        count = saved.shape[0]
        filled = torch.cat([torch.ones(2 - count, self.num_tasks, dtype=torch.float64), saved])
        load_into(self.loss_history, filled, "loss_history")
        self.history_count.fill_(count)

    def __repr__(self) -> str:
        return f"DynamicWeightAverage(num_tasks={self.num_tasks}, temperature={self.temperature})"
