"""What a multi-task env is asked to be: one frozen value, passed whole, not loose arguments."""

from __future__ import annotations

import dataclasses
from typing import Literal

import metaworld.env_dict as metaworld_env_dict

from mtrl_ntk.envs.protocols import Protocol

BENCHMARK_TASKS: dict[str, list[str]] = {
    "mt10": list(metaworld_env_dict.MT10_V3),
    "mt25": list(metaworld_env_dict.MT25_V3),
    "mt50": list(metaworld_env_dict.MT50_V3),
}
"""Task names per benchmark, in the order of the vector env's sub-environments
(task i of every [T, ...] array is `BENCHMARK_TASKS[benchmark][i]`)."""

VectorStrategy = Literal["async", "sync"]


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """One multi-task env: which backend builds it, on which benchmark and protocol, how.

    Attributes:
        backend: `env.backend`, a name of `mtrl_ntk.envs.backends.BACKENDS`.
        benchmark: "mt10", "mt25" or "mt50".
        protocol: the environment preset (`PROTOCOLS["classic"]` or `PROTOCOLS["mwplus"]`).
        seed: fixes the goals of every task and the order in which they are sampled.
        vector_strategy: "async" (one worker process per task) or "sync" (in-process);
            EnvPool always steps in its own threads.
        max_episode_steps: overrides `protocol.max_episode_steps` (tests, smoke runs).
        for_evaluation: the evaluation env of the run with this seed (episodes end at
            the first success, goals visited in shuffled cycles; see `MultiTaskEnv`).
    """

    backend: str
    benchmark: str
    protocol: Protocol
    seed: int
    vector_strategy: VectorStrategy = "async"
    max_episode_steps: int | None = None
    for_evaluation: bool = False

    def evaluation(self) -> EnvSpec:
        """The spec of this env's evaluation env (same goals, evaluation episodes)."""
        return dataclasses.replace(self, for_evaluation=True)

    def in_process(self) -> EnvSpec:
        """The same env stepped in the process that builds it (a worker hosting it)."""
        return dataclasses.replace(self, vector_strategy="sync")
