"""UW: uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners._tools import adam_step, load_into, positive_losses
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    register_combiner,
)

# Adam learning rate of the log-variances: the FAMO authors' MT10 UW baseline
# (Cranial-XIX/FAMO, mtrl_files/uw_state_sac.yaml, ``w_lr: 0.01``).
LOG_VARIANCE_LR = 0.01


@register_combiner("uw")
class UncertaintyWeighting(GradientCombiner):
    """UW (Kendall et al., CVPR 2018, Eq. 5 and 7, regression form).

    With learned log-variances s_i = log σ_i², the objective is
    Σ_i ½ exp(-s_i) ℓ_i + ½ s_i, so the task weights are w_i = ½ exp(-s_i) =
    1 / (2σ_i²). Each call returns the weights of the current s, then takes one
    Adam step on s (learning rate 0.01, torch's default betas and eps) along
    ∂/∂s_i = ½ (1 - exp(-s_i) ℓ_i), whose zero is s_i = log ℓ_i: on constant
    losses s_i → log ℓ_i and w_i → 1 / (2 ℓ_i).

    This is the form and the step size of the FAMO authors' MT10 UW baseline
    (Cranial-XIX/FAMO, ``mtrl_files/uw.py`` and ``uw_state_sac.yaml``: s = 0 at
    start, Adam with ``w_lr: 0.01``); the method has no hyperparameter here, so
    the learning rate is fixed. LibMTL's UW uses the same objective with s = -0.5
    at start.

    Scale convention: w_i = ½ exp(-s_i), so the first update is ½ Σ_i g_i
    (T/2 times the LS update). Departures: s is a float64 tensor updated by a
    hand-written Adam step (identical to ``torch.optim.Adam``) so that its state
    is in ``state_dict``; losses are floored at 1e-8 before the s update (the
    authors use raw losses, with which a negative loss, e.g. a SAC actor loss,
    drives s to -∞), counted in ``diagnostics["nonpositive_losses"]``.
    """

    need = Need.LOSSES
    needs_positive_losses = True

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.log_variances = torch.zeros(num_tasks, dtype=torch.float64)  # s, [T]
        self.exp_avg = torch.zeros(num_tasks, dtype=torch.float64)  # [T] Adam first moment
        self.exp_avg_sq = torch.zeros(num_tasks, dtype=torch.float64)  # [T] Adam second moment
        # int64: a 0-d float64 tensor updated in place inside a compiled graph loses the update
        # (torch 2.13, AOTAutograd; tests/agent/test_captured_update.py pins it).
        self.adam_steps = torch.zeros((), dtype=torch.int64)  # Adam's step count

    def to(self, device: torch.device | str) -> UncertaintyWeighting:
        device = torch.device(device)
        for name in ("log_variances", "exp_avg", "exp_avg_sq", "adam_steps"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def state_tensors(self) -> list[Tensor]:
        return [self.log_variances, self.exp_avg, self.exp_avg_sq, self.adam_steps]

    def combine(self, stats: TaskStats) -> CombinerOutput:
        if stats.losses is None:
            raise ValueError("uw needs the per-task losses (Need.LOSSES)")
        losses, nonpositive = positive_losses(stats.losses)  # [T] float64
        if self.log_variances.device != losses.device:  # eager convenience; after to(), never
            self.to(losses.device)
        weights = 0.5 * torch.exp(-self.log_variances)  # [T]
        gradient = 0.5 * (1.0 - torch.exp(-self.log_variances) * losses)  # ∂/∂s of the objective
        self.adam_steps.add_(1)
        adam_step(
            self.log_variances, gradient, self.exp_avg, self.exp_avg_sq, self.adam_steps,
            lr=LOG_VARIANCE_LR,
        )
        return CombinerOutput(
            weights=weights,
            diagnostics={
                "weights": weights,
                "log_variances": self.log_variances.clone(),
                "nonpositive_losses": nonpositive,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_variances": self.log_variances.clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "adam_steps": self.adam_steps.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copies into the existing state tensors (their device); ``adam_steps`` may be an int."""
        for name in ("log_variances", "exp_avg", "exp_avg_sq", "adam_steps"):
            load_into(getattr(self, name), state[name], name)
