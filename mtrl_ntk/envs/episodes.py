"""Per-step episode bookkeeping that every `MultiTaskEnv` backend shares.

Meta-World's Python environments and EnvPool's C++ ports differ in how they step
and reset, but not in what a step reports: one `StepResult` per step, the raw
return and success of each episode at its end, and rewards divided by the same
running estimate of their standard deviation. Those live here, once, so the two
backends cannot drift apart (and resumed runs stay bit-exact on either).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Standard deviation floor of the reward normaliser (as in garage / Meta-World).
REWARD_STD_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One transition per task, from `MultiTaskEnv.step`. Arrays have leading dim T.

    `next_obs` is what the replay buffer stores; `obs` is what the policy sees next.
    They differ only where `episode_end`: there `next_obs` is the episode's true
    final observation and `obs` the first observation of the next episode.
    """

    obs: np.ndarray  # [T, D] float32, already reset where episode_end
    next_obs: np.ndarray  # [T, D] float32, true next observation (final one at an end)
    reward: np.ndarray  # [T] float32, normalised per the protocol
    raw_reward: np.ndarray  # [T] float32, Meta-World's reward
    terminated: np.ndarray  # [T] bool, a terminal state (never during training)
    truncated: np.ndarray  # [T] bool, the time limit ended the episode (not terminal)
    success: np.ndarray  # [T] bool, info["success"] > 0 at this step
    episode_end: np.ndarray  # [T] bool, terminated | truncated
    episode_return: np.ndarray  # [T] float64, raw return of the ended episode, NaN elsewhere
    episode_success: np.ndarray  # [T] bool, ended episode succeeded at any step, False elsewhere


class RewardNormalizer:
    """Per-task running exponential std normalisation of rewards (garage's NormalizedEnv).

    Meta-World's own wrapper (`NormalizeRewardsExponential`) updates its statistics
    twice per step; this one updates them once per step, as garage does, and keeps
    them in plain Python values for checkpoints. With `enabled=False` rewards pass
    through unchanged and the statistics stay at their initial values.

    Args:
        num_tasks: T, the number of tasks (one statistic of each kind per task).
        enabled: `protocol.normalize_reward`.
        alpha: `protocol.reward_norm_alpha`, the weight of each new reward.
    """

    def __init__(self, num_tasks: int, enabled: bool, alpha: float) -> None:
        self.num_tasks = num_tasks
        self.enabled = enabled
        self.alpha = alpha
        self._mean = np.zeros(num_tasks, dtype=np.float64)  # [T] running mean of raw rewards
        self._var = np.ones(num_tasks, dtype=np.float64)  # [T] running variance of raw rewards

    def __call__(self, raw_reward: np.ndarray) -> np.ndarray:
        """Updates the statistics with raw_reward [T] float64; returns the normalised [T]."""
        if not self.enabled:
            return raw_reward
        alpha = self.alpha
        self._mean = (1.0 - alpha) * self._mean + alpha * raw_reward
        self._var = (1.0 - alpha) * self._var + alpha * np.square(raw_reward - self._mean)
        return raw_reward / (np.sqrt(self._var) + REWARD_STD_EPS)

    @property
    def std(self) -> np.ndarray:
        """[T] the current standard deviation estimate per task."""
        return np.sqrt(self._var)

    def state_dict(self) -> dict[str, list[float]]:
        """{"reward_mean": [T], "reward_var": [T]}: the keys env checkpoints have always had."""
        return {"reward_mean": self._mean.tolist(), "reward_var": self._var.tolist()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raises ValueError unless `state` holds statistics for this many tasks.

        Separate from `load_state_dict` so an env can check all of a state before it
        changes any of its own.
        """
        for key in ("reward_mean", "reward_var"):
            value = np.asarray(state[key], dtype=np.float64)
            if value.shape != (self.num_tasks,):
                raise ValueError(
                    f"state[{key!r}] has shape {value.shape}; expected ({self.num_tasks},)"
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self._mean = np.array(state["reward_mean"], dtype=np.float64)
        self._var = np.array(state["reward_var"], dtype=np.float64)


class EpisodeTracker:
    """Per-task raw return and success of the running episodes, reported at their ends.

    Also counts the steps since every task's episode started together (after a
    `reset()`, or after a step that ended all episodes at once): only at such a
    start can an env's state be saved and resumed exactly. The count is None once
    the tasks' episodes fell out of step (only success-termination in evaluation
    does that) and after a state was loaded, until the next `start_all`.
    """

    def __init__(self, num_tasks: int) -> None:
        self._running_return = np.zeros(num_tasks, dtype=np.float64)  # [T] raw return so far
        self._running_success = np.zeros(num_tasks, dtype=bool)  # [T] success at any step so far
        self.steps_since_common_start: int | None = None

    def start_all(self) -> None:
        """Every task's episode starts now (a `reset()`)."""
        self._running_return[:] = 0.0
        self._running_success[:] = False
        self.steps_since_common_start = 0

    def lose_common_start(self) -> None:
        """The episodes' common start is unknown until the next `start_all` (a state was loaded)."""
        self.steps_since_common_start = None

    def count_step(self, episode_end: np.ndarray) -> None:
        """Advance the common-start count by one step; episode_end [T] bool."""
        if self.steps_since_common_start is None:
            return
        if episode_end.all():
            self.steps_since_common_start = 0
        elif episode_end.any():
            self.steps_since_common_start = None  # out of step until the next start_all()
        else:
            self.steps_since_common_start += 1

    def end_step(
        self, raw_reward: np.ndarray, success: np.ndarray, episode_end: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Add a step (raw_reward [T] float64, success [T] bool) to the running episodes.

        Returns (episode_return [T] float64, NaN where no episode ended; episode_success
        [T] bool, False where none ended) and starts afresh the episodes that ended.
        """
        self._running_return += raw_reward
        self._running_success |= success
        episode_return = np.where(episode_end, self._running_return, np.nan)
        episode_success = episode_end & self._running_success
        self._running_return[episode_end] = 0.0
        self._running_success[episode_end] = False
        return episode_return, episode_success
