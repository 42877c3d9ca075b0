"""The learner of a loop of S seeds, chosen by S, behind one interface.

- One seed: the plain agent (``MultiTaskSAC``, compiled as a single run's with
  ``train.compile``): a single run's numbers and its bit-exact CPU resume, no vmap.
- S > 1 seeds: the vmapped group (``SeedGroupSAC``): one policy call for all S x T
  environments and one update of all S agents, each on its own batch.

Either way the loop sees observations [S, T, D] -> actions [S, T, A] and batches
(one per seed) -> one metrics dict per seed, kept on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from mtrl_ntk.agent import MultiTaskSAC
from mtrl_ntk.agent.seeds import SeedGroupSAC
from mtrl_ntk.replay import Batch


class Learner(Protocol):
    """What the loop asks of the seeds' agents (see the module doc)."""

    agents: list[MultiTaskSAC]

    def act(self, observations: np.ndarray, deterministic: bool) -> np.ndarray:
        """Actions [S, T, A] (float32, host) for observations [S, T, D]."""
        ...

    def update(self, batches: Sequence[Batch]) -> list[dict[str, Tensor]]:
        """One update of every seed on its batch; seed k's metrics (on the device)."""
        ...

    def without(self, index: int) -> Learner:
        """The learner of the other seeds, when seed ``index`` stopped."""
        ...


class SingleSeedLearner:
    """One seed: its agent, as a single run drives it."""

    def __init__(self, agent: MultiTaskSAC) -> None:
        self.agents = [agent]
        self.agent = agent

    def act(self, observations: np.ndarray, deterministic: bool) -> np.ndarray:
        obs = torch.as_tensor(observations[0], device=self.agent.device)  # [T, D]
        return self.agent.act(obs, deterministic=deterministic).cpu().numpy()[np.newaxis]

    def update(self, batches: Sequence[Batch]) -> list[dict[str, Tensor]]:
        (batch,) = batches
        return [self.agent.update(batch)]

    def without(self, index: int) -> Learner:
        raise ValueError("the only seed of a single run cannot leave it")


class SeedGroupLearner:
    """S > 1 seeds: one vmapped policy call and one vmapped update for all of them."""

    def __init__(self, agents: Sequence[MultiTaskSAC], compile: bool) -> None:
        self.agents = list(agents)
        self.compile = compile
        self.group = SeedGroupSAC(self.agents, compile=compile)

    def act(self, observations: np.ndarray, deterministic: bool) -> np.ndarray:
        obs = torch.as_tensor(observations, device=self.group.device)  # [S, T, D]
        return self.group.act(obs, deterministic=deterministic).cpu().numpy()

    def update(self, batches: Sequence[Batch]) -> list[dict[str, Tensor]]:
        metrics = self.group.update(batches)  # [S, ...] each
        return [{key: value[k] for key, value in metrics.items()} for k in range(len(batches))]

    def without(self, index: int) -> Learner:
        """The others as a new group (their state is copied into a new stack; ``compile``
        compiles its update again)."""
        return SeedGroupLearner(
            [agent for k, agent in enumerate(self.agents) if k != index], self.compile
        )


def make_learner(agents: Sequence[MultiTaskSAC], compile: bool) -> Learner:
    """The learner for ``len(agents)`` seeds (module doc). A lone agent was built with
    ``compile`` itself; a group's agents without it (the group compiles its update)."""
    if len(agents) == 1:
        return SingleSeedLearner(agents[0])
    return SeedGroupLearner(agents, compile)
