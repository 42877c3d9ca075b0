"""Adam whose step can be captured in one graph: device-side step count, learning rate and skip.

``torch.optim.Adam.step`` cannot be part of a ``torch.compile(fullgraph=True)``
graph (it breaks the graph on purpose, around its no-grad section), its
``capturable`` mode refuses CPU tensors, and its fused kernel does not pass
through AOTAutograd's functionalisation. ``CapturableAdam`` is the same
algorithm (Kingma & Ba 2015, as ``torch.optim.Adam`` with ``amsgrad=False`` and
no weight decay) written with multi-tensor ops (``mtrl_ntk.foreach``: ``torch._foreach_*``
kernels, or one op per tensor under vmap over a seed axis) on tensors it owns:

- the step count and the learning rate are 0-d device tensors, so nothing is
  read on the host and a schedule can change the rate in place;
- ``step(grads, apply)`` takes the gradients as a list (no ``.grad`` attribute)
  and a bool tensor ``apply``: where it is False the parameters, moments and the
  step count stay exactly as they were (AMP's found-inf logic: a non-finite
  update is skipped on the device, without a host branch);
- its tensors are allocated once and updated in place, so a compiled or
  CUDA-graph-captured step keeps pointing at them, and ``load_state_dict``
  copies into them.

``state_dict`` has ``torch.optim.Adam``'s layout (``state`` by parameter index,
``param_groups``), so it loads into ``torch.optim.Adam`` and back.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtrl_ntk import foreach


class CapturableAdam:
    """Adam over ``params`` with on-device state; see the module docstring."""

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not params:
            raise ValueError("CapturableAdam needs at least one parameter")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"invalid learning rate {lr!r}: expected a number > 0")
        self.params = list(params)
        device = self.params[0].device
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.lr = torch.tensor(float(lr), dtype=torch.float32, device=device)
        # One count for all parameters: they always step together.
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]

    @torch.no_grad()
    def step(self, grads: list[Tensor], apply: Tensor) -> None:
        """One Adam step with ``grads`` (one per parameter, in order) where ``apply`` is True.

        Non-finite gradients are harmless when ``apply`` is False: they are replaced
        by zeros before they touch any state.
        """
        beta1, beta2 = self.betas
        keep = apply.to(torch.float32)
        zero = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
        grads = [torch.where(apply, grad, zero) for grad in grads]
        self.step_count.add_(keep)
        # m ← β₁ m + (1 - β₁) g and v ← β₂ v + (1 - β₂) g², or unchanged when skipped
        # (the gradients are 0 then, and the decay factors 1).
        foreach.mul_(self.exp_avg, 1.0 - (1.0 - beta1) * keep)
        foreach.add_(self.exp_avg, grads, alpha=1.0 - beta1)
        foreach.mul_(self.exp_avg_sq, 1.0 - (1.0 - beta2) * keep)
        foreach.addcmul_(self.exp_avg_sq, grads, grads, value=1.0 - beta2)
        # θ ← θ - lr / (1 - β₁ᵗ) · m / (sqrt(v / (1 - β₂ᵗ)) + ε), as torch.optim.Adam.
        steps = self.step_count.clamp_min(1.0)  # t = 0 only while every step was skipped
        bias_correction1 = 1.0 - torch.pow(beta1, steps)
        bias_correction2_sqrt = (1.0 - torch.pow(beta2, steps)).sqrt()
        updates = foreach.adam_directions(
            self.exp_avg, self.exp_avg_sq, bias_correction2_sqrt, self.eps
        )
        foreach.mul_(updates, -self.lr / bias_correction1 * keep)
        foreach.add_(self.params, updates)

    def state_tensors(self) -> list[Tensor]:
        return [self.step_count, self.lr, *self.exp_avg, *self.exp_avg_sq]

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Adam``'s layout: per-parameter step and moments, one param group."""
        return {
            "state": {
                index: {
                    "step": self.step_count.detach().clone(),
                    "exp_avg": exp_avg.detach().clone(),
                    "exp_avg_sq": exp_avg_sq.detach().clone(),
                }
                for index, (exp_avg, exp_avg_sq) in enumerate(zip(self.exp_avg, self.exp_avg_sq))
            },
            "param_groups": [{
                "lr": float(self.lr),
                "betas": self.betas,
                "eps": self.eps,
                "weight_decay": 0.0,
                "amsgrad": False,
                "params": list(range(len(self.params))),
            }],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy a ``state_dict`` (ours or ``torch.optim.Adam``'s) into the existing tensors.

        A parameter without state (an optimiser that never stepped) gets zero moments.
        """
        groups = state.get("param_groups", [])
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state has {[len(g['params']) for g in groups]} parameters in "
                f"{len(groups)} group(s), expected one group of {len(self.params)}"
            )
        per_param = state.get("state", {})
        indices = groups[0]["params"]
        steps = {float(per_param[i]["step"]) for i in indices if i in per_param}
        if len(steps) > 1:
            raise ValueError(f"parameters have different Adam step counts {sorted(steps)}")
        for position, index in enumerate(indices):
            entry = per_param.get(index)
            if entry is None:
                self.exp_avg[position].zero_()
                self.exp_avg_sq[position].zero_()
                continue
            for mine, saved in ((self.exp_avg[position], entry["exp_avg"]),
                                (self.exp_avg_sq[position], entry["exp_avg_sq"])):
                if saved.shape != mine.shape:
                    raise ValueError(
                        f"Adam moment of parameter {position} has shape {tuple(saved.shape)}, "
                        f"expected {tuple(mine.shape)}"
                    )
                mine.copy_(saved)
        self.step_count.fill_(steps.pop() if steps else 0.0)
        self.lr.fill_(float(groups[0]["lr"]))
        self.betas = tuple(float(b) for b in groups[0]["betas"])  # type: ignore[assignment]
        self.eps = float(groups[0]["eps"])
