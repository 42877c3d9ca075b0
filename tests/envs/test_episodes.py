"""The per-step bookkeeping both env backends share (no environment is built here)."""

from __future__ import annotations

import numpy as np
import pytest

from mtrl_ntk.envs.episodes import REWARD_STD_EPS, EpisodeTracker, RewardNormalizer


def test_reward_normalizer_is_garages_running_std_and_its_state_round_trips() -> None:
    rng = np.random.default_rng(0)
    alpha = 0.01
    normalizer = RewardNormalizer(3, enabled=True, alpha=alpha)
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(20):
        raw = rng.uniform(0, 10, 3)
        mean = (1.0 - alpha) * mean + alpha * raw
        var = (1.0 - alpha) * var + alpha * np.square(raw - mean)
        np.testing.assert_array_equal(normalizer(raw), raw / (np.sqrt(var) + REWARD_STD_EPS))
    np.testing.assert_array_equal(normalizer.std, np.sqrt(var))

    state = normalizer.state_dict()
    assert list(state) == ["reward_mean", "reward_var"]  # the keys of every env checkpoint
    restored = RewardNormalizer(3, enabled=True, alpha=alpha)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    raw = rng.uniform(0, 10, 3)
    np.testing.assert_array_equal(restored(raw), normalizer(raw))

    with pytest.raises(ValueError, match=r"state\['reward_var'\] has shape \(2,\)"):
        restored.load_state_dict({"reward_mean": [0.0] * 3, "reward_var": [1.0] * 2})
    assert restored.state_dict() == normalizer.state_dict()  # a bad state changes nothing


def test_disabled_reward_normalizer_passes_rewards_through_and_keeps_its_state() -> None:
    normalizer = RewardNormalizer(2, enabled=False, alpha=0.5)
    raw = np.array([3.0, -1.0])
    assert normalizer(raw) is raw
    assert normalizer.state_dict() == {"reward_mean": [0.0, 0.0], "reward_var": [1.0, 1.0]}


def test_episode_tracker_reports_return_and_success_once_at_each_end() -> None:
    tracker = EpisodeTracker(2)
    assert tracker.steps_since_common_start is None  # not started yet
    tracker.start_all()
    no_end = np.array([False, False])
    tracker.count_step(no_end)
    episode_return, episode_success = tracker.end_step(
        np.array([1.0, 2.0]), np.array([True, False]), no_end
    )
    assert np.isnan(episode_return).all() and not episode_success.any()
    assert tracker.steps_since_common_start == 1

    first_ends = np.array([True, False])
    tracker.count_step(first_ends)
    episode_return, episode_success = tracker.end_step(
        np.array([0.5, 0.25]), np.array([False, False]), first_ends
    )
    np.testing.assert_array_equal(episode_return, [1.5, np.nan])
    np.testing.assert_array_equal(episode_success, [True, False])  # success at any step
    assert tracker.steps_since_common_start is None  # the episodes fell out of step

    both_end = np.array([True, True])
    episode_return, episode_success = tracker.end_step(
        np.array([4.0, 1.0]), np.array([False, True]), both_end
    )
    np.testing.assert_array_equal(episode_return, [4.0, 3.25])  # task 0 started afresh
    np.testing.assert_array_equal(episode_success, [False, True])

    tracker.start_all()
    tracker.count_step(both_end)
    assert tracker.steps_since_common_start == 0  # all ended together: a common start
    tracker.lose_common_start()
    assert tracker.steps_since_common_start is None
