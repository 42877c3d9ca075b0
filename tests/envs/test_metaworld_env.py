"""MultiTaskEnv and evaluate on real Meta-World MT10 (short horizons to stay fast)."""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Iterator

import numpy as np
import pytest

from mtrl_ntk.envs import (
    BENCHMARK_TASKS,
    PROTOCOLS,
    MultiTaskEnv,
    Protocol,
    StepResult,
    evaluate,
)

CLASSIC, MWPLUS = PROTOCOLS["classic"], PROTOCOLS["mwplus"]
HORIZON = 5  # short time limit so episodes end within a few steps
MT10_TASKS = [
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
    "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3",
    "window-close-v3",
]
# Meta-World's observation: [hand+objects (18), the same one step earlier (18), goal (3)].
CURRENT_FRAME, PREVIOUS_FRAME, GOAL = slice(0, 18), slice(18, 36), slice(36, 39)


def random_actions(env: MultiTaskEnv, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(env.action_low, env.action_high, (env.num_tasks, env.action_dim)).astype(
        np.float32
    )


def rollout(env: MultiTaskEnv, steps: int, seed: int) -> list[StepResult]:
    rng = np.random.default_rng(seed)
    return [env.step(random_actions(env, rng)) for _ in range(steps)]


@pytest.fixture(scope="module")
def classic_env() -> Iterator[MultiTaskEnv]:
    with MultiTaskEnv("mt10", CLASSIC, seed=0, vector_strategy="sync",
                      max_episode_steps=HORIZON) as env:
        yield env


@pytest.mark.slow
def test_mt10_has_ten_named_tasks_with_39_dim_observations(classic_env: MultiTaskEnv) -> None:
    assert classic_env.task_names == BENCHMARK_TASKS["mt10"] == MT10_TASKS
    assert classic_env.num_tasks == 10
    assert (classic_env.obs_dim, classic_env.action_dim) == (39, 4)
    assert np.all(classic_env.action_low == -1) and np.all(classic_env.action_high == 1)
    obs = classic_env.reset()
    assert obs.shape == (10, 39) and obs.dtype == np.float32
    assert len(set(BENCHMARK_TASKS["mt50"])) == 50 and set(MT10_TASKS) <= set(
        BENCHMARK_TASKS["mt50"]
    )


@pytest.mark.slow
def test_classic_rewards_are_divided_by_a_running_std_per_task(classic_env: MultiTaskEnv) -> None:
    alpha = CLASSIC.reward_norm_alpha
    state = classic_env.state_dict()
    mean, var = np.array(state["reward_mean"]), np.array(state["reward_var"])  # [T]
    classic_env.reset()
    for result in rollout(classic_env, steps=2 * HORIZON, seed=1):
        raw = result.raw_reward.astype(np.float64)
        mean = (1 - alpha) * mean + alpha * raw
        var = (1 - alpha) * var + alpha * (raw - mean) ** 2
        np.testing.assert_allclose(result.reward, raw / (np.sqrt(var) + 1e-8), rtol=1e-5)
    np.testing.assert_allclose(classic_env.reward_std, np.sqrt(var))
    assert not np.allclose(result.reward, result.raw_reward)


@pytest.mark.slow
def test_time_limit_truncates_with_the_final_observation_in_next_obs(
    classic_env: MultiTaskEnv,
) -> None:
    first_obs = classic_env.reset()
    results = rollout(classic_env, steps=HORIZON + 1, seed=2)
    *within, end, after = results
    for previous, current in zip(within, [*within[1:], end], strict=True):
        assert not previous.episode_end.any()
        assert np.isnan(previous.episode_return).all() and not previous.episode_success.any()
        np.testing.assert_array_equal(previous.next_obs, previous.obs)
        np.testing.assert_array_equal(current.next_obs[:, PREVIOUS_FRAME],
                                      previous.next_obs[:, CURRENT_FRAME])
    # The time limit is a truncation, not a terminal state.
    assert end.truncated.all() and end.episode_end.all() and not end.terminated.any()
    # obs is the next episode's first observation (one fixed goal: the same start) ...
    np.testing.assert_array_equal(end.obs, first_obs)
    # ... while next_obs continues the ended episode.
    assert not np.allclose(end.next_obs, end.obs)
    np.testing.assert_array_equal(end.next_obs[:, PREVIOUS_FRAME],
                                  within[-1].next_obs[:, CURRENT_FRAME])
    np.testing.assert_allclose(
        end.episode_return, np.sum([r.raw_reward for r in results[:HORIZON]], axis=0), rtol=1e-5
    )
    np.testing.assert_array_equal(
        end.episode_success, np.any([r.success for r in results[:HORIZON]], axis=0)
    )
    assert not after.episode_end.any()
    np.testing.assert_array_equal(after.next_obs[:, PREVIOUS_FRAME], first_obs[:, CURRENT_FRAME])


@pytest.mark.slow
def test_same_seed_and_actions_reproduce_the_run_and_state_dict_restores_it(
    classic_env: MultiTaskEnv,
) -> None:
    def make() -> MultiTaskEnv:
        return MultiTaskEnv("mt10", CLASSIC, seed=3, vector_strategy="sync", max_episode_steps=4)

    with make() as first, make() as second:
        first_obs, second_obs = first.reset(), second.reset()
        np.testing.assert_array_equal(first_obs, second_obs)
        # Another seed draws other goals.
        assert not np.allclose(classic_env.reset()[:, GOAL], first_obs[:, GOAL])
        for a, b in zip(rollout(first, 10, seed=4), rollout(second, 10, seed=4), strict=True):
            for field in dataclasses.fields(StepResult):
                np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name))

        rollout(first, 7, seed=5)  # moves first's reward statistics on
        state = first.state_dict()
        # The keys checkpoints have always had (no "backend": Meta-World's is the default).
        assert list(state) == ["reward_mean", "reward_var", "task_samplers"]
        second.load_state_dict(state)
        assert second.state_dict() == state  # round-trips
        first.reset()
        second.reset()
        for a, b in zip(rollout(first, 6, seed=6), rollout(second, 6, seed=6), strict=True):
            np.testing.assert_array_equal(a.reward, b.reward)
            np.testing.assert_array_equal(a.next_obs, b.next_obs)


@pytest.mark.slow
def test_mwplus_rewards_are_raw_v2_and_goals_are_resampled_at_reset() -> None:
    with MultiTaskEnv("mt10", MWPLUS, seed=0, vector_strategy="sync",
                      max_episode_steps=2) as env:
        state = env.state_dict()
        goals = []  # each episode's goal [T, 3]
        for _ in range(3):
            obs = env.reset()
            goals.append(obs[:, GOAL])
            for result in rollout(env, steps=2, seed=7):
                np.testing.assert_array_equal(result.reward, result.raw_reward)
                assert np.all((result.raw_reward >= 0) & (result.raw_reward <= 10))  # v2 scale
                assert not result.terminated.any()
        assert result.truncated.all()
        # 50 goals per task: consecutive episodes mostly start from different goals.
        assert np.mean(np.any(goals[0] != goals[1], axis=1)) >= 0.5
        assert np.mean(np.any(goals[1] != goals[2], axis=1)) >= 0.5
        # The goal sampler's RNG is part of the state.
        env.load_state_dict(state)
        np.testing.assert_array_equal(env.reset()[:, GOAL], goals[0])


@pytest.mark.slow
def test_async_workers_match_sync_and_end_on_close(classic_env: MultiTaskEnv) -> None:
    workers_before = len(multiprocessing.active_children())
    with MultiTaskEnv("mt10", CLASSIC, seed=0, vector_strategy="async",
                      max_episode_steps=HORIZON) as async_env:
        assert len(multiprocessing.active_children()) == workers_before + 10
        np.testing.assert_array_equal(async_env.reset(), classic_env.reset())
        for a, b in zip(rollout(async_env, HORIZON + 1, seed=8),
                        rollout(classic_env, HORIZON + 1, seed=8), strict=True):
            np.testing.assert_array_equal(a.next_obs, b.next_obs)
            np.testing.assert_array_equal(a.obs, b.obs)
            np.testing.assert_array_equal(a.raw_reward, b.raw_reward)
            np.testing.assert_array_equal(a.truncated, b.truncated)
    assert len(multiprocessing.active_children()) == workers_before


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")
def test_evaluate_returns_a_success_rate_per_task_on_the_training_goals(
    classic_env: MultiTaskEnv,
) -> None:
    from metaworld.policies import SawyerReachV3Policy

    reach_expert = SawyerReachV3Policy()
    rng = np.random.default_rng(9)
    seen_goals = []

    def policy(obs: np.ndarray) -> np.ndarray:
        """Meta-World's scripted expert on reach-v3, random actions elsewhere."""
        seen_goals.append(obs[:, GOAL])
        actions = rng.uniform(-1, 1, (len(obs), 4))
        actions[0] = reach_expert.get_action(obs[0].astype(np.float64))
        return actions

    rates = evaluate(policy, "mt10", CLASSIC, seed=0, episodes_per_task=2,
                     vector_strategy="sync", max_episode_steps=60)
    assert list(rates) == MT10_TASKS
    assert all(rate in (0.0, 0.5, 1.0) for rate in rates.values())
    assert rates["reach-v3"] == 1.0
    # Evaluation with the run's seed uses the goals the run trains on (here the one per task).
    training_goals = classic_env.reset()[:, GOAL]
    for goals in seen_goals:
        np.testing.assert_array_equal(goals, training_goals)


def test_invalid_arguments_raise_before_building_anything() -> None:
    with pytest.raises(ValueError, match="benchmark"):
        MultiTaskEnv("mt11", CLASSIC, seed=0)
    with pytest.raises(ValueError, match="vector_strategy"):
        MultiTaskEnv("mt10", CLASSIC, seed=0, vector_strategy="threads")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_episode_steps"):
        MultiTaskEnv("mt10", CLASSIC, seed=0, max_episode_steps=501)
    with pytest.raises(ValueError, match="reward_function_version"):
        dataclasses.replace(CLASSIC, reward_function_version="v3")
    with pytest.raises(ValueError, match="num_goals"):
        dataclasses.replace(MWPLUS, num_goals=0)
    assert isinstance(dataclasses.replace(MWPLUS, max_episode_steps=200), Protocol)
