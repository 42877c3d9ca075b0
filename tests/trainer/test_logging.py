"""The trainer's bookkeeping: averaged update metrics, episode statistics, metric tags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtrl_ntk.agent.sac import _combiner_metrics
from mtrl_ntk.combiners.base import CombinerOutput
from mtrl_ntk.engine import EngineResult
from mtrl_ntk.envs import StepResult
from mtrl_ntk.trainer.metrics import EpisodeStats, MetricAccumulator, metric_scalars

TASKS = ["reach-v3", "push-v3", "pick-place-v3"]


def test_accumulator_averages_every_metric_over_the_updates_since_reset() -> None:
    window = MetricAccumulator()
    window.add({"critic_loss": torch.tensor(1.0), "critic_weights": torch.tensor([1.0, 2.0, 3.0])})
    window.add({"critic_loss": torch.tensor(3.0), "critic_weights": torch.tensor([3.0, 2.0, 1.0])})
    means = window.means()
    assert means["critic_loss"] == pytest.approx(2.0)
    np.testing.assert_allclose(means["critic_weights"], [2.0, 2.0, 2.0])
    window.reset()
    assert window.means() == {}


def test_accumulator_does_not_alias_the_first_metric_tensor() -> None:
    first = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    window = MetricAccumulator()
    window.add({"actor_weights": first})
    window.add({"actor_weights": first})
    assert first.tolist() == [1.0, 1.0, 1.0]


def test_scalars_get_one_tag_per_task_and_gramians_are_left_to_the_image() -> None:
    means = {
        "critic_loss": np.array(2.0),
        "critic_weights": np.array([0.2, 0.3, 0.5]),
        "actor_ntk_eigenvalues": np.array([1.0, 4.0, 9.0]),
        "critic_gramian": np.eye(3),
        "finite": np.array(1.0),
        "something_new": np.array(7.0),
    }
    scalars = metric_scalars(means, TASKS)
    assert scalars["loss/critic"] == 2.0
    assert [scalars[f"combiner/critic/weight/{task}"] for task in TASKS] == [0.2, 0.3, 0.5]
    assert scalars["combiner/actor/ntk_eigenvalue/push-v3"] == 4.0
    assert scalars["health/finite_fraction"] == 1.0
    assert scalars["agent/something_new"] == 7.0  # unknown metrics are kept, not dropped
    assert not any("gramian" in tag for tag in scalars)


def test_conflicting_pairs_count_negative_off_diagonal_gramian_entries_once() -> None:
    gradients = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0]])  # 0-1 conflict only
    result = EngineResult(
        losses=torch.ones(3), output=CombinerOutput(weights=torch.ones(3)),
        gramian=gradients @ gradients.T, finite=torch.tensor(True),
    )
    assert _combiner_metrics("critic", result)["critic_conflicting_pairs"] == 1


def test_skipped_updates_count_in_the_finite_fraction_only() -> None:
    window = MetricAccumulator()
    window.add({"critic_loss": torch.tensor(2.0), "finite": torch.tensor(True)})
    window.add({"critic_loss": torch.tensor(0.0), "finite": torch.tensor(False)})  # skipped
    window.add({"critic_loss": torch.tensor(4.0), "finite": torch.tensor(True)})
    means = window.means()
    assert means["critic_loss"] == pytest.approx(3.0)
    assert means["finite"] == pytest.approx(2 / 3)


def _step(ended: list[bool], success: list[bool], returns: list[float]) -> StepResult:
    num_tasks = len(ended)
    zeros = np.zeros(num_tasks, dtype=np.float32)
    ended_array = np.array(ended)
    return StepResult(
        obs=np.zeros((num_tasks, 39), np.float32), next_obs=np.zeros((num_tasks, 39), np.float32),
        reward=zeros, raw_reward=zeros, terminated=np.zeros(num_tasks, bool),
        truncated=ended_array, success=np.array(success), episode_end=ended_array,
        episode_return=np.where(ended_array, returns, np.nan),
        episode_success=ended_array & np.array(success),
    )


def test_episode_stats_average_only_the_episodes_that_ended() -> None:
    stats = EpisodeStats(3)
    stats.add(_step([True, False, False], [True, True, False], [10.0, 0.0, 0.0]))
    stats.add(_step([True, True, False], [False, True, False], [20.0, 5.0, 0.0]))
    scalars = stats.scalars(TASKS)
    assert scalars["train/success/reach-v3"] == 0.5
    assert scalars["train/return/reach-v3"] == 15.0
    assert scalars["train/success/push-v3"] == 1.0
    assert "train/success/pick-place-v3" not in scalars  # no episode ended: no number
    assert scalars["train/success_mean"] == 0.75  # over the tasks with an ended episode
    stats.reset()
    assert stats.scalars(TASKS) == {}



def test_accumulator_and_episode_stats_continue_from_their_state_dicts() -> None:
    """What a checkpoint keeps of them: a restored window averages as the original would."""
    window = MetricAccumulator()
    window.add({"critic_loss": torch.tensor(1.0), "finite": torch.tensor(1.0)})
    restored = MetricAccumulator()
    restored.load_state_dict(window.state_dict())
    for accumulator in (window, restored):
        accumulator.add({"critic_loss": torch.tensor(3.0), "finite": torch.tensor(1.0)})
    assert restored.means() == window.means() and restored.count == 2

    stats = EpisodeStats(3)
    stats.add(_step([True, False, False], [True, True, False], [10.0, 0.0, 0.0]))
    state = stats.state_dict()
    stats.reset()  # the state is a copy, not a view of the live counters
    copy = EpisodeStats(3)
    copy.load_state_dict(state)
    assert copy.scalars(TASKS)["train/return/reach-v3"] == 10.0
