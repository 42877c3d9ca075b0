"""RLW: random loss weighting (Lin et al., 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl_ntk.combiners._tools import ReproducibleGenerator, stats_device
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    register_combiner,
)


@register_combiner("rlw")
class RandomLossWeighting(GradientCombiner):
    """RLW (Lin et al., "Reasonable effectiveness of random weighting: a litmus test
    for multi-task learning", TMLR 2022 / arXiv:2111.10603, normal variant).

    Each call draws ε ~ N(0, I_T) and uses w = softmax(ε), as LibMTL's default
    (``dist='Normal'``). The draws come from the combiner's own
    ``torch.Generator`` on the device of the update, seeded from torch's global
    RNG when the combiner is built (so a run's seed fixes them) and saved in
    ``state_dict``, so a restored combiner draws the same weights.

    Capture: ``draw_random(d, device)`` draws ε [T] (float64) eagerly, before the
    compiled update, and ``combine`` reads it from ``stats.random``; without it
    (the pure function path) ``combine`` draws ε itself, on the device of the
    statistics (that given to ``to`` if they hold no tensor), the same numbers for the same
    generator state. The generator state is not a tensor: ``state_tensors()`` is
    empty, and a draw is not undone by restoring them.

    Scale convention: the weights sum to 1 (the LS scale in expectation, the
    mean of the task gradients when all weights are equal).
    """

    need = Need.NOTHING

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.random = ReproducibleGenerator()
        self.device = torch.device("cpu")  # for combine without stats.random or any statistic

    def to(self, device: torch.device | str) -> RandomLossWeighting:
        self.device = torch.device(device)
        return self

    def draw_random(self, shared_dim: int, device: torch.device) -> Tensor:
        """ε ~ N(0, I_T) [T] float64 on ``device``, from the combiner's generator."""
        generator = self.random.get(device)
        return torch.randn(self.num_tasks, generator=generator, dtype=torch.float64, device=device)

    def combine(self, stats: TaskStats) -> CombinerOutput:
        noise = stats.random
        if noise is None:
            noise = self.draw_random(0, stats_device(stats, self.device))
        elif noise.shape != (self.num_tasks,):
            raise ValueError(f"rlw: stats.random must have shape [{self.num_tasks}]")
        weights = torch.softmax(noise.double(), dim=0)
        return CombinerOutput(weights=weights, diagnostics={"weights": weights})

    def state_dict(self) -> dict[str, Any]:
        return {"random": self.random.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.random.load_state_dict(state["random"])
