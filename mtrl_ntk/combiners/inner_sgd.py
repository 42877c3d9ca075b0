"""The authors' MT10 solvers of CAGrad and FairGrad: a few SGD steps on the task weights.

Both methods' MT10 code (the ``mtrl_files`` their repositories add to mtrl) does not
solve its method's problem exactly: it takes a fixed number of momentum-SGD steps on
the task weights from a fixed start and keeps the best iterate it evaluated. The
Table-4 rows of CAGrad and FairGrad come from these solvers, so the combiners offer
them as ``solver="sgd"`` (the exact solvers of ``cagrad.py`` / ``fairgrad.py`` stay
the default). Written here from the authors' algorithms, on the Gramian in float64
(theirs run in float32 on the CPU), as static-shape tensor code: a fixed step count,
the "best iterate" kept by ``torch.where``, no host synchronisation.

torch.optim.SGD with momentum μ (no dampening, no Nesterov), which both use, is
v ← μ v + ∇, x ← x - lr v from v = 0 (its first step sets v = ∇, the same thing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl_ntk.combiners._tools import is_real
from mtrl_ntk.combiners.base import check_param

# The constants inside the authors' expressions (kept: they change the answer on small
# gradients, where the Gramian's entries are comparable to them).
CAGRAD_NORM_EPS = 1e-4  # CAGrad: sqrt(diag(GGᵀ) + 1e-4), sqrt(... + 1e-4), λ = c / (‖g_w‖ + 1e-4)
FAIRGRAD_WEIGHT_EPS = 1e-8  # FairGrad: (1 / (w + 1e-8))^(1/α); w clamped to >= 1e-8
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (‖∇‖ + 1e-6)


def check_sgd_settings(steps: int, lr: float, momentum: float) -> None:
    """Validate the step count, learning rate and momentum of an inner-SGD solver."""
    check_param(
        isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
        "sgd_steps",
        steps,
        "an integer >= 1",
    )
    check_param(is_real(lr) and lr > 0, "sgd_lr", lr, "a finite real number > 0")
    check_param(is_real(momentum) and 0 <= momentum < 1, "sgd_momentum", momentum, "in [0, 1)")


@dataclass(frozen=True)
class CAGradSGD:
    weights: Tensor  # [T] the update's task weights (1/T + λ w_i) / (1 + c²)
    dual_weights: Tensor  # [T] w = softmax of the best logits
    step: Tensor  # 0-d λ
    objective: Tensor  # 0-d the best objective evaluated (on the normalised Gramian)


def cagrad_sgd(
    gramian: Tensor, c: float, steps: int = 20, lr: float = 25.0, momentum: float = 0.5
) -> CAGradSGD:
    """CAGrad's dual by the authors' inner SGD (Cranial-XIX/CAGrad, mtrl/mtrl_files/cagrad.py,
    ``Agent.cagrad``, the ``cagrad_method=cagrad`` of their MT10 command).

    1. GGᵀ is divided by s², s = mean_i sqrt(‖g_i‖² + 1e-4) (the mean norm, squared);
       with A the result, b = A 1/T (so bᵀ1/T = ‖g_0‖² in those units) and
       ρ = c sqrt(bᵀ1/T + 1e-4).
    2. w = softmax(z), z = 0; the objective F(z) = wᵀb + ρ sqrt(wᵀAw + 1e-4) is
       evaluated at z_0 .. z_steps, with ``steps`` momentum-SGD steps between them
       (lr 25 for MT10; their code uses 50 when there are exactly 50 tasks), and the
       first iterate with the smallest F is kept (strict <).
    3. λ = ρ / (sqrt(wᵀAw + 1e-4) + 1e-4) at the kept w, and the update is
       Σ_i (1/T + λ w_i) g_i / (1 + c²): these are the returned weights.

    The gradient of F through the softmax is w ⊙ (∇_w F - wᵀ∇_w F) with
    ∇_w F = b + ρ A w / sqrt(wᵀAw + 1e-4). ``gramian`` [T, T] float64, finite.
    """
    num_tasks = gramian.shape[0]
    scale = (gramian.diagonal() + CAGRAD_NORM_EPS).sqrt().mean()
    normalised = gramian / scale.square()  # A
    linear = normalised.mean(dim=1)  # b = A 1/T, [T]
    radius = (linear.mean() + CAGRAD_NORM_EPS).sqrt() * c  # ρ
    logits = torch.zeros_like(linear)
    velocity = torch.zeros_like(linear)
    best_logits = logits
    best_objective = torch.full_like(radius, float("inf"))
    for iteration in range(steps + 1):
        weights = torch.softmax(logits, dim=0)
        product = normalised @ weights  # A w
        root = (weights @ product + CAGRAD_NORM_EPS).sqrt()
        objective = weights @ linear + radius * root
        better = objective < best_objective
        best_objective = torch.where(better, objective, best_objective)
        best_logits = torch.where(better, logits, best_logits)
        if iteration == steps:
            break
        weight_gradient = linear + radius * product / root
        gradient = weights * (weight_gradient - weights @ weight_gradient)
        velocity = momentum * velocity + gradient
        logits = logits - lr * velocity
    weights = torch.softmax(best_logits, dim=0)
    norm = (weights @ normalised @ weights + CAGRAD_NORM_EPS).sqrt()
    step = radius / (norm + CAGRAD_NORM_EPS)
    return CAGradSGD(
        weights=(1.0 / num_tasks + step * weights) / (1.0 + c**2),
        dual_weights=weights,
        step=step,
        objective=best_objective,
    )


@dataclass(frozen=True)
class FairGradSGD:
    weights: Tensor  # [T] the best iterate w
    objective: Tensor  # 0-d its ‖GGᵀw - (1/(w + 1e-8))^(1/α)‖²


def fairgrad_sgd(
    gramian: Tensor,
    alpha: float,
    steps: int = 20,
    lr: float = 0.1,
    momentum: float = 0.5,
    max_grad_norm: float = 1.0,
) -> FairGradSGD:
    """FairGrad's equations GGᵀw = w^(-1/α) by the authors' SGD (OptMN-Lab/fairgrad,
    mtrl_files/fairgrad.py, ``Agent.fairgrad``, the active branch "FairGrad with SGD";
    the ``least_squares`` variant above it is commented out).

    From w = 1/T, ``steps`` times: evaluate F(w) = ‖GGᵀw - (1/(w + 1e-8))^(1/α)‖² and
    keep w if F is below the best so far (strict <); take its gradient
    ∇F = 2 (GGᵀr + (1/α) (w + 1e-8)^(-1/α-1) ⊙ r), r the residual; scale it to norm at
    most ``max_grad_norm`` (``clip_grad_norm_``: by max_norm / (‖∇F‖ + 1e-6) when that
    is below 1); one momentum-SGD step; clamp w to >= 1e-8. The iterate after the
    last step is never evaluated (their loop evaluates before stepping), so the best
    of ``steps`` iterates is returned; it is used as it is: the update is Σ_i w_i g_i.
    ``gramian`` [T, T] float64, finite.
    """
    power = 1.0 / alpha
    weights = torch.full_like(gramian.diagonal(), 1.0 / gramian.shape[0])
    velocity = torch.zeros_like(weights)
    best_weights = weights
    best_objective = torch.full_like(weights[0], float("inf"))
    for _ in range(steps):
        shifted = weights + FAIRGRAD_WEIGHT_EPS
        residual = gramian @ weights - (1.0 / shifted).pow(power)
        objective = residual @ residual
        better = objective < best_objective
        best_objective = torch.where(better, objective, best_objective)
        best_weights = torch.where(better, weights, best_weights)
        gradient = 2.0 * (gramian @ residual + power * shifted.pow(-power - 1.0) * residual)
        # ‖∇F‖ without overflow: the largest entry times the norm of the rescaled vector.
        largest = gradient.abs().amax()
        norm = largest * (gradient / largest.clamp_min(torch.finfo(gradient.dtype).tiny)).norm()
        gradient = gradient * (max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        velocity = momentum * velocity + gradient
        weights = (weights - lr * velocity).clamp_min(FAIRGRAD_WEIGHT_EPS)
    return FairGradSGD(weights=best_weights, objective=best_objective)
