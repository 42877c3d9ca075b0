"""MoCo: multi-objective gradient correction (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk import foreach
from mtrl_ntk.combiners._tools import is_real, load_into, positive_losses, task_gradients
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    check_param,
    register_combiner,
)

_NORM_EPS = 1e-8  # the authors' epsilon in g_i / (‖g_i‖ + eps)


@register_combiner("moco")
class MoCo(GradientCombiner):
    """MoCo (Fernando et al., "Mitigating gradient bias in multi-objective learning:
    a provably convergent approach", ICLR 2023, Algorithm 1), after the authors'
    code as shared in LibMTL (``LibMTL/weighting/MoCo.py``).

    Each call, with h_i = ℓ_i · g_i / (‖g_i‖ + 1e-8) (the authors' code rescales
    each task gradient to the norm of its loss):

        y_i ← y_i - β (y_i - h_i)                       (tracking, y_i ∈ R^d, y = 0 at start)
        λ   ← softmax(λ - γ (Y Yᵀ + ρ I) λ)             (λ = 1/T at start)
        direction = Yᵀ λ = Σ_i λ_i y_i

    Defaults are LibMTL's (β = 0.5, γ = 0.1, ρ = 0), which record the authors'
    shared code; the paper does not give MT10 hyperparameters.

    Scale convention: λ is on the simplex, so the direction is a convex
    combination of the tracked, loss-scaled gradients (not the mean of the raw
    task gradients). Departures: (1) constant step sizes β and γ; the authors'
    code decays them as β/t^0.5 and γ/t^0.5 (LibMTL's ``MoCo_beta_sigma`` and
    ``MoCo_gamma_sigma``), which over the ~10⁶ updates of an MT10 run would all
    but freeze y and λ. (2) λ is mapped back to the simplex with a softmax, as in
    the authors' code; the paper's Algorithm 1 uses the Euclidean projection.
    (3) The loss scaling assumes positive losses: losses are floored at 1e-8
    (a non-positive loss would flip or cancel its task's gradient), counted in
    ``diagnostics["nonpositive_losses"]``. (4) Y Yᵀ and λ are computed in
    float64; y keeps the dtype of the gradients. ``diagnostics["weights"]`` is λ
    (the weights of the tracked gradients, not of the raw g_i).

    Capture: y is a [T, d] buffer of zeros (y = 0 at start, so the first update
    is the same formula as every other) and λ a [T] tensor, both updated in
    place. d is not known when the combiner is built: ``draw_random(d, device)``,
    which the agent calls eagerly before every update, allocates y once (in
    torch's default dtype, that of the parameters) and returns None; the pure
    function path allocates it on the first ``combine``. A compiled update must
    therefore follow a ``draw_random`` (or an eager update, or a
    ``load_state_dict``); then no call rebinds y. A y whose dtype or device
    differs from the gradients' is cast once, eagerly (as before).
    """

    need = Need.JACOBIAN | Need.LOSSES
    needs_positive_losses = True

    def __init__(
        self, num_tasks: int, *, beta: float = 0.5, gamma: float = 0.1, rho: float = 0.0
    ) -> None:
        super().__init__(num_tasks)
        check_param(is_real(beta) and 0 < beta <= 1, "beta", beta,
                    "a real number in (0, 1] (tracking rate of y; 0.5 in LibMTL)")
        check_param(is_real(gamma) and gamma > 0, "gamma", gamma,
                    "a real number > 0 (step size of λ; 0.1 in LibMTL)")
        check_param(is_real(rho) and rho >= 0, "rho", rho,
                    "a real number >= 0 (ℓ2 regularisation of λ's update; 0 in LibMTL)")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.rho = float(rho)
        self.tracked_gradients: Tensor | None = None  # y, [T, d], allocated once d is known
        self.task_weights = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)  # λ

    def _allocate(self, shared_dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        tracked = self.tracked_gradients
        if tracked is None:
            tracked = torch.zeros(self.num_tasks, shared_dim, dtype=dtype, device=device)
        elif tracked.shape != (self.num_tasks, shared_dim):
            raise ValueError(
                f"moco: gradient shape changed from {tuple(tracked.shape)} to "
                f"{(self.num_tasks, shared_dim)}"
            )
        elif tracked.device != device or tracked.dtype != dtype:
            tracked = tracked.to(device=device, dtype=dtype)
        self.tracked_gradients = tracked
        return tracked

    def draw_random(self, shared_dim: int, device: torch.device) -> None:
        """Draws nothing; allocates y [T, d] on ``device`` the first time (see the class doc)."""
        self.prepare(shared_dim, device)
        return None

    def prepare(self, shared_dim: int, device: torch.device) -> None:
        """Allocates y [T, d] on ``device`` (once; again only on another device)."""
        if self.tracked_gradients is None or self.tracked_gradients.device != torch.device(device):
            dtype = (
                torch.get_default_dtype() if self.tracked_gradients is None
                else self.tracked_gradients.dtype
            )
            self._allocate(shared_dim, torch.device(device), dtype)

    def to(self, device: torch.device | str) -> MoCo:
        device = torch.device(device)
        self.task_weights = self.task_weights.to(device)
        if self.tracked_gradients is not None:
            self.tracked_gradients = self.tracked_gradients.to(device)
        return self

    def state_tensors(self) -> list[Tensor]:
        """λ, and y once allocated (call after ``draw_random`` or a first update)."""
        tracked = [] if self.tracked_gradients is None else [self.tracked_gradients]
        return [*tracked, self.task_weights]

    def combine(self, stats: TaskStats) -> CombinerOutput:
        if stats.losses is None:
            raise ValueError("moco needs the per-task losses (Need.LOSSES)")
        grads = task_gradients(stats).detach()  # [T, d]
        losses, nonpositive = positive_losses(stats.losses.to(grads.device))  # [T] float64
        if stats.gramian is not None:  # ‖g_i‖² is already on the Gramian's diagonal
            norms = stats.gramian.diagonal().clamp_min(0).sqrt().to(grads)  # [T]
        else:
            norms = grads.norm(dim=1)
        scale = losses.to(grads.dtype) / (norms + _NORM_EPS)  # h_i = scale_i g_i = ℓ_i g_i / ‖g_i‖

        # y ← y - β (y - h) = (1 - β) y + β h, in place and without forming h: [T, d] is large.
        tracked = self._allocate(grads.shape[1], grads.device, grads.dtype)
        if foreach.in_seed_axis():  # under vmap: addcmul_ has no batching rule
            tracked.mul_(1.0 - self.beta).add_(grads * (self.beta * scale).unsqueeze(1))
        else:
            tracked.mul_(1.0 - self.beta).addcmul_(grads, (self.beta * scale).unsqueeze(1))

        if self.task_weights.device != grads.device:  # eager convenience; after to(), never
            self.task_weights = self.task_weights.to(grads.device)
        gram = (tracked @ tracked.T).double()  # [T, T]
        gram = gram + self.rho * torch.eye(self.num_tasks, dtype=torch.float64, device=gram.device)
        task_weights = self.task_weights
        task_weights.copy_(torch.softmax(task_weights - self.gamma * (gram @ task_weights), dim=0))

        direction = task_weights.to(tracked.dtype) @ tracked  # [d]
        return CombinerOutput(
            direction=direction,
            diagnostics={"weights": task_weights.clone(), "nonpositive_losses": nonpositive},
        )

    def state_dict(self) -> dict[str, Any]:
        tracked = self.tracked_gradients
        return {
            "tracked_gradients": None if tracked is None else tracked.clone(),
            "task_weights": self.task_weights.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copies into the existing tensors (on their device). y is rebound only when it
        does not exist yet or has another shape (eagerly: before any compiled call)."""
        load_into(self.task_weights, state["task_weights"], "task_weights")
        tracked = state["tracked_gradients"]
        if tracked is None:
            self.tracked_gradients = None
        elif self.tracked_gradients is None or self.tracked_gradients.shape != tracked.shape:
            self.tracked_gradients = tracked.to(self.task_weights.device).clone()
        else:
            load_into(self.tracked_gradients, tracked, "tracked_gradients")

    def __repr__(self) -> str:
        return (
            f"MoCo(num_tasks={self.num_tasks}, beta={self.beta}, gamma={self.gamma}, "
            f"rho={self.rho})"
        )
