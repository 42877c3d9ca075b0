"""``step_async`` + ``step_wait`` is ``step``: the async workers simulate while the caller works."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from mtrl_ntk.envs import PROTOCOLS, MultiTaskEnv

CLASSIC = PROTOCOLS["classic"]
HORIZON = 3  # episodes end (and reset) at steps 3 and 6 of the steps below
STEPS = 6


def actions_for(env: MultiTaskEnv, rng: np.random.Generator) -> np.ndarray:
    shape = (env.num_tasks, env.action_dim)
    return rng.uniform(env.action_low, env.action_high, shape).astype(np.float32)


@pytest.mark.slow
def test_split_async_step_returns_exactly_what_a_sync_step_returns() -> None:
    with (
        MultiTaskEnv("mt10", CLASSIC, seed=3, vector_strategy="async",
                     max_episode_steps=HORIZON) as split,
        MultiTaskEnv("mt10", CLASSIC, seed=3, vector_strategy="sync",
                     max_episode_steps=HORIZON) as whole,
    ):
        np.testing.assert_array_equal(split.reset(), whole.reset())
        rng = np.random.default_rng(0)
        for _ in range(STEPS):
            actions = actions_for(whole, rng)
            split.step_async(actions)
            time.sleep(0.01)  # the caller's work (the learner's update) would happen here
            got, expected = split.step_wait(), whole.step(actions)
            for field in dataclasses.fields(expected):
                np.testing.assert_array_equal(
                    getattr(got, field.name), getattr(expected, field.name), err_msg=field.name
                )
        assert split.state_dict() == whole.state_dict()  # usable again after step_wait


@pytest.mark.slow
def test_steps_must_be_started_once_and_collected_once() -> None:
    with MultiTaskEnv("mt10", CLASSIC, seed=0, vector_strategy="sync",
                      max_episode_steps=HORIZON) as env:
        env.reset()
        with pytest.raises(RuntimeError, match="without step_async"):
            env.step_wait()
        actions = np.zeros((env.num_tasks, env.action_dim), dtype=np.float32)
        env.step_async(actions)
        with pytest.raises(RuntimeError, match="again before step_wait"):
            env.step_async(actions)
        with pytest.raises(RuntimeError, match="between step_async"):
            env.reset()
        result = env.step_wait()
        assert result.obs.shape == (env.num_tasks, env.obs_dim)
        with pytest.raises(ValueError, match="shape"):
            env.step_async(actions[:2])
        env.step(actions)  # a failed step_async left nothing pending
