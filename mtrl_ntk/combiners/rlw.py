"""RLW: random loss weighting (Lin et al., 2021)."""

from __future__ import annotations

from typing import Any

import torch

from mtrl_ntk.combiners._tools import ReproducibleGenerator
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
    ``torch.Generator`` (CPU), seeded from torch's global RNG when the combiner is
    built (so a run's seed fixes them) and saved in ``state_dict``, so a restored
    combiner draws the same weights.

    Scale convention: the weights sum to 1 (the LS scale in expectation, the
    mean of the task gradients when all weights are equal).
    """

    need = Need.NOTHING

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.random = ReproducibleGenerator()

    def combine(self, stats: TaskStats) -> CombinerOutput:
        generator = self.random.get("cpu")
        noise = torch.randn(self.num_tasks, generator=generator, dtype=torch.float64)  # [T]
        weights = torch.softmax(noise, dim=0)
        return CombinerOutput(weights=weights, diagnostics={"weights": weights})

    def state_dict(self) -> dict[str, Any]:
        return {"random": self.random.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.random.load_state_dict(state["random"])
