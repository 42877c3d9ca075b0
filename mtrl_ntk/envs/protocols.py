"""Experimental protocols: the environment and evaluation presets a run reproduces.

`classic` is the setup of the NTKMTL, Nash-MTL, FairGrad and FAMO papers (the
mtrl MT10 setup of Sodhani et al., 2021): v1 rewards normalised by a running
exponential estimate of their standard deviation, 150-step episodes, one fixed
goal per task, one deterministic evaluation episode per task every 10k steps.
`mwplus` is the Meta-World+ recommendation (McLean et al., 2025): v2 rewards
without normalisation, 500-step episodes, 50 goals per task resampled at every
reset, 50 evaluation episodes per task every 200k transitions.

Meta-World 3.x ships only `-v3` task classes, so `classic` approximates, but is
not identical to, the 2021 `-v1` environments of the papers it compares with.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# Meta-World's own path limit (SawyerXYZEnv.max_path_length): stepping past it
# raises, so no protocol may ask for longer episodes.
METAWORLD_MAX_PATH_LENGTH = 500


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One environment + evaluation preset.

    Attributes:
        name: the preset's name (`protocol=<name>` on the command line).
        reward_function_version: Meta-World's reward function, "v1" (the 2021
            shaped rewards, unbounded) or "v2" (rewards in [0, 10]).
        normalize_reward: divide each task's reward by a running exponential
            estimate of its standard deviation (`MultiTaskEnv` keeps one per task).
        reward_norm_alpha: the estimate's smoothing factor α:
            μ ← (1-α) μ + α r,  σ² ← (1-α) σ² + α (r - μ)²,  r̃ = r / (σ + 1e-8).
        max_episode_steps: the horizon; the time-limit end is a truncation, never
            a terminal state for bootstrapping.
        num_goals: goals (object and target positions) per task; with one, every
            episode of a task starts from the same state; with more, each reset
            samples one of them.
        eval_every_steps: environment steps (each is one transition per task)
            between evaluations.
        eval_episodes_per_task: deterministic evaluation episodes per task.
    """

    name: str
    reward_function_version: Literal["v1", "v2"]
    normalize_reward: bool
    reward_norm_alpha: float
    max_episode_steps: int
    num_goals: int
    eval_every_steps: int
    eval_episodes_per_task: int

    def __post_init__(self) -> None:
        if self.reward_function_version not in ("v1", "v2"):
            raise ValueError(
                f"protocol.reward_function_version={self.reward_function_version!r}; "
                "allowed: 'v1', 'v2'"
            )
        if not 0.0 < self.reward_norm_alpha <= 1.0:
            raise ValueError(
                f"protocol.reward_norm_alpha={self.reward_norm_alpha!r}; allowed: 0 < alpha <= 1"
            )
        if not 1 <= self.max_episode_steps <= METAWORLD_MAX_PATH_LENGTH:
            raise ValueError(
                f"protocol.max_episode_steps={self.max_episode_steps!r}; allowed: 1 to "
                f"{METAWORLD_MAX_PATH_LENGTH} (Meta-World's path limit)"
            )
        for key in ("num_goals", "eval_every_steps", "eval_episodes_per_task"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"protocol.{key}={value!r}; allowed: an integer >= 1")


PROTOCOLS: dict[str, Protocol] = {
    "classic": Protocol(
        name="classic",
        reward_function_version="v1",
        normalize_reward=True,
        reward_norm_alpha=0.001,
        max_episode_steps=150,
        num_goals=1,
        eval_every_steps=10_000,
        eval_episodes_per_task=1,
    ),
    "mwplus": Protocol(
        name="mwplus",
        reward_function_version="v2",
        normalize_reward=False,
        reward_norm_alpha=0.001,
        max_episode_steps=500,
        num_goals=50,
        # 200k transitions of all 10 MT10 tasks together = 20k steps.
        eval_every_steps=20_000,
        eval_episodes_per_task=50,
    ),
}
