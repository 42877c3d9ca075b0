"""FAMO: Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners._tools import adam_step, is_real, load_into, positive_losses
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    check_param,
    register_combiner,
)


def famo_weights(logits: Tensor, losses: Tensor) -> Tensor:
    """FAMO's loss-space weights w_i = c · z_i / ℓ_i, z = softmax(logits), c = 1 / Σ_j z_j / ℓ_j.

    These are the coefficients of the g_i in the gradient of the authors'
    surrogate c · Σ_i z_i log ℓ_i (``FAMO.get_weighted_loss``, c detached); they
    sum to 1. ``losses`` must be positive.
    """
    logit_weights = torch.softmax(logits, dim=0)  # [T]
    scaled = logit_weights / losses  # [T]
    return scaled / scaled.sum()


def famo_logit_gradient(logits: Tensor, losses_before: Tensor, losses_after: Tensor) -> Tensor:
    """The gradient FAMO feeds its logit optimiser (``FAMO.update``): J_softmax(z)ᵀ δ.

    δ_i = log ℓ_i(before the step) - log ℓ_i(after the step), the decrease of task
    i's log-loss. Descending this gradient lowers the weight of the tasks whose
    log-loss decreased most, so the task that improved least gains weight.
    """
    delta = losses_before.log() - losses_after.log()  # [T]
    logit_weights = torch.softmax(logits, dim=0)  # [T]
    # Jacobian of the softmax is diag(s) - s sᵀ (symmetric), so Jᵀδ = s ⊙ (δ - sᵀδ).
    return logit_weights * (delta - logit_weights @ delta)


@register_combiner("famo")
class FAMO(GradientCombiner):
    """FAMO (Liu et al., NeurIPS 2023, Algorithm 1), after the authors' ``famo.py``.

    The update is Σ_i w_i g_i with w_i = c · z_i / ℓ_i, z = softmax(logits),
    c = (Σ_j z_j / ℓ_j)⁻¹: the gradient of c · Σ_i z_i log ℓ_i, which decreases
    every task's log-loss at a rate set by z. After the parameter step the
    engine recomputes the losses on the same batch (``Need.LOSSES_AFTER_STEP``)
    and the logits take one Adam step (learning rate ``w_lr``, L2 weight decay
    ``gamma``, torch's default betas and eps) on the gradient
    J_softmaxᵀ (log ℓ(before) - log ℓ(after)).

    Defaults are the authors' MT10 configuration (Cranial-XIX/FAMO,
    ``mtrl_files/famo_state_sac.yaml``: ``gamma: 0.001``, ``w_lr: 0.01``); their
    generic ``famo.py`` defaults are gamma = 0.01, w_lr = 0.025. The logits start
    at 0 (uniform z) and the minimum losses ℓ*_i are 0, as in both.

    Scale convention: the weights sum to 1, so with equal losses and uniform z
    this is the LS update (mean of the task gradients), as the authors'
    ``/ c`` surrogate gives. Departures: (1) the authors' MTRL port multiplies by
    c instead of dividing (weights summing to c², not 1); we follow the paper and
    ``famo.py``. (2) The authors use ℓ_i + 1e-8; we use max(ℓ_i, 0) + 1e-8, the same
    for non-negative losses; a negative loss (FAMO's log is undefined there; a
    SAC actor loss can be negative) counts as 0 and is reported in
    ``diagnostics["nonpositive_losses"]``.
    (3) The logits, their Adam moments and the step count are float64 tensors
    in ``state_dict``. (4) The MTRL port applies FAMO to the critic only; here
    the caller decides which losses a FAMO instance balances.

    Capture: the state (logits, Adam moments, the Adam step count as a 0-d
    tensor, the losses of the last ``combine`` in a preallocated [T] buffer) is
    updated in place, and ``combine``/``update_after_step`` do not synchronise.
    Call ``to(device)`` before the first compiled update; ``load_state_dict``
    copies into the existing tensors.
    """

    need = Need.LOSSES | Need.LOSSES_AFTER_STEP
    needs_positive_losses = True

    def __init__(self, num_tasks: int, *, gamma: float = 0.001, w_lr: float = 0.01) -> None:
        super().__init__(num_tasks)
        check_param(
            is_real(gamma) and gamma >= 0,
            "gamma", gamma, "a real number >= 0 (weight decay of the logits; 0.001 for MT10)",
        )
        check_param(
            is_real(w_lr) and w_lr > 0,
            "w_lr", w_lr, "a real number > 0 (learning rate of the logits; 0.01 for MT10)",
        )
        self.gamma = float(gamma)
        self.w_lr = float(w_lr)
        self.logits = torch.zeros(num_tasks, dtype=torch.float64)  # [T]
        self.exp_avg = torch.zeros(num_tasks, dtype=torch.float64)  # [T] Adam first moment
        self.exp_avg_sq = torch.zeros(num_tasks, dtype=torch.float64)  # [T] Adam second moment
        # int64: a 0-d float64 tensor updated in place inside a compiled graph loses the update
        # (torch 2.13, AOTAutograd; tests/agent/test_captured_update.py pins it).
        self.adam_steps = torch.zeros((), dtype=torch.int64)  # Adam's step count
        # Floored losses of the last combine, [T]; read by update_after_step.
        self.losses_before = torch.ones(num_tasks, dtype=torch.float64)
        # Whether losses_before holds a combine's losses (a Python flag, checked in eager mode).
        self._combined = False

    def to(self, device: torch.device | str) -> FAMO:
        device = torch.device(device)
        for name in ("logits", "exp_avg", "exp_avg_sq", "adam_steps", "losses_before"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def state_tensors(self) -> list[Tensor]:
        return [self.logits, self.exp_avg, self.exp_avg_sq, self.adam_steps, self.losses_before]

    def combine(self, stats: TaskStats) -> CombinerOutput:
        if stats.losses is None:
            raise ValueError("famo needs the per-task losses (Need.LOSSES)")
        losses, nonpositive = positive_losses(stats.losses, shift=True)  # [T] float64, ℓ + 1e-8
        if self.logits.device != losses.device:  # eager convenience; after to(), never taken
            self.to(losses.device)
        self.losses_before.copy_(losses)
        self._combined = True
        weights = famo_weights(self.logits, losses)
        return CombinerOutput(
            weights=weights,
            diagnostics={
                "weights": weights,
                "logit_weights": torch.softmax(self.logits, dim=0),
                "nonpositive_losses": nonpositive,
            },
        )

    def update_after_step(self, losses_after: Tensor) -> None:
        if not torch.compiler.is_compiling() and not self._combined:
            raise ValueError("famo: update_after_step called before combine")
        losses_after, _ = positive_losses(losses_after, shift=True)
        gradient = famo_logit_gradient(self.logits, self.losses_before, losses_after)
        self.adam_steps.add_(1)
        adam_step(
            self.logits, gradient, self.exp_avg, self.exp_avg_sq, self.adam_steps,
            lr=self.w_lr, weight_decay=self.gamma,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "adam_steps": self.adam_steps.clone(),
            # Always the tensor (initially ones), not None before the first combine: in a seed
            # group (mtrl_ntk.agent.seeds) only the template's Python flag sees the combines.
            "losses_before": self.losses_before.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copies into the existing state tensors (their device); ``adam_steps`` may be an int."""
        for name in ("logits", "exp_avg", "exp_avg_sq", "adam_steps"):
            load_into(getattr(self, name), state[name], name)
        before = state["losses_before"]
        self._combined = before is not None
        if before is not None:
            load_into(self.losses_before, before, "losses_before")

    def __repr__(self) -> str:
        return f"FAMO(num_tasks={self.num_tasks}, gamma={self.gamma}, w_lr={self.w_lr})"
