"""MultiTaskReplayBuffer: equal per-task batches of transitions that were actually stored."""

from __future__ import annotations

import pytest
import torch

from mtrl_ntk.replay import Batch, MultiTaskReplayBuffer

TASKS, OBS_DIM, ACTION_DIM = 3, 5, 2


def transition(step: int) -> dict[str, torch.Tensor]:
    """A transition per task whose every entry encodes (step, task): 100 * step + task."""
    code = 100.0 * step + torch.arange(TASKS, dtype=torch.float32)  # [T]
    return dict(
        obs=code[:, None].expand(TASKS, OBS_DIM).clone(),
        action=-code[:, None].expand(TASKS, ACTION_DIM).clone(),
        reward=code + 0.5,
        next_obs=code[:, None].expand(TASKS, OBS_DIM) + 0.25,
        done=(torch.arange(TASKS) == step % TASKS).float(),
    )


def filled_buffer(steps: int, capacity: int = 8) -> MultiTaskReplayBuffer:
    buffer = MultiTaskReplayBuffer(TASKS, capacity, OBS_DIM, ACTION_DIM, device="cpu")
    for step in range(steps):
        buffer.add(**transition(step))
    return buffer


def decode(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(step [T, B_t], task [T, B_t]) of each sampled transition, read from its obs."""
    code = batch.obs[..., 0]
    return torch.div(code, 100, rounding_mode="floor"), code % 100


def assert_transitions_consistent(batch: Batch) -> None:
    """Every field of a sampled transition comes from the same stored transition."""
    code = batch.obs[..., 0]  # [T, B_t]
    step = torch.div(code, 100, rounding_mode="floor")
    assert torch.equal(batch.obs, code[..., None].expand_as(batch.obs))
    assert torch.equal(batch.action, -code[..., None].expand_as(batch.action))
    assert torch.equal(batch.reward, code + 0.5)
    assert torch.equal(batch.next_obs, batch.obs + 0.25)
    assert torch.equal(batch.done, (batch.task_ids == step.long() % TASKS).float())


def test_batch_is_grouped_by_task_with_equal_samples_per_task() -> None:
    buffer = filled_buffer(steps=5)
    batch = buffer.sample(7, torch.Generator().manual_seed(0))
    assert batch.obs.shape == (TASKS, 7, OBS_DIM)
    assert batch.next_obs.shape == (TASKS, 7, OBS_DIM)
    assert batch.action.shape == (TASKS, 7, ACTION_DIM)
    assert batch.reward.shape == batch.done.shape == (TASKS, 7)
    assert (batch.num_tasks, batch.batch_per_task) == (TASKS, 7)
    _, task = decode(batch)
    # Row i holds only task i's transitions, and task_ids says so.
    assert torch.equal(task.long(), batch.task_ids)
    assert torch.equal(batch.task_ids, torch.arange(TASKS)[:, None].expand(TASKS, 7))


def test_samples_are_stored_transitions_of_the_right_task() -> None:
    buffer = filled_buffer(steps=5)
    batch = buffer.sample(200, torch.Generator().manual_seed(1))
    step, _ = decode(batch)
    assert_transitions_consistent(batch)
    # Uniform over the 5 filled rows: every stored step appears, nothing else does.
    for row in step:
        assert set(row.long().tolist()) == {0, 1, 2, 3, 4}


def test_tasks_are_sampled_independently() -> None:
    buffer = filled_buffer(steps=8)
    step, _ = decode(buffer.sample(64, torch.Generator().manual_seed(2)))
    assert not torch.equal(step[0], step[1])


def test_ring_buffer_overwrites_the_oldest_transitions() -> None:
    capacity = 4
    buffer = filled_buffer(steps=capacity + 3, capacity=capacity)
    assert buffer.size == len(buffer) == capacity
    batch = buffer.sample(200, torch.Generator().manual_seed(3))
    step, _ = decode(batch)
    assert_transitions_consistent(batch)
    assert set(step.long().flatten().tolist()) == {3, 4, 5, 6}


def test_sampling_is_reproducible_with_the_same_generator_seed() -> None:
    buffer = filled_buffer(steps=6)
    first = buffer.sample(16, torch.Generator().manual_seed(4))
    second = buffer.sample(16, torch.Generator().manual_seed(4))
    assert torch.equal(first.obs, second.obs)


def test_state_dict_round_trip_restores_contents_and_write_position() -> None:
    capacity = 4
    buffer = filled_buffer(steps=6, capacity=capacity)
    state = buffer.state_dict()
    assert state["obs"].shape == (capacity, TASKS, OBS_DIM)
    partial = filled_buffer(steps=2, capacity=capacity).state_dict()
    assert partial["obs"].shape == (2, TASKS, OBS_DIM)  # only the filled rows are saved

    restored = MultiTaskReplayBuffer(TASKS, capacity, OBS_DIM, ACTION_DIM)
    restored.load_state_dict(state)
    assert restored.size == buffer.size
    for generator_seed in (5, 6):
        original = buffer.sample(32, torch.Generator().manual_seed(generator_seed))
        copy = restored.sample(32, torch.Generator().manual_seed(generator_seed))
        assert torch.equal(original.obs, copy.obs)
        assert torch.equal(original.done, copy.done)
    # The next add overwrites the same (oldest) row in both.
    buffer.add(**transition(6))
    restored.add(**transition(6))
    original = buffer.sample(32, torch.Generator().manual_seed(7))
    copy = restored.sample(32, torch.Generator().manual_seed(7))
    assert torch.equal(original.reward, copy.reward)
    assert set(decode(copy)[0].long().flatten().tolist()) == {3, 4, 5, 6}


def test_state_dict_does_not_alias_the_storage() -> None:
    buffer = filled_buffer(steps=2)
    state = buffer.state_dict()
    before = state["obs"].clone()
    buffer.add(**transition(2))
    buffer._storage["obs"].fill_(-1.0)
    assert torch.equal(state["obs"], before)


@pytest.mark.parametrize(
    ("field", "shape"),
    [("obs", (TASKS + 1, OBS_DIM)), ("action", (TASKS, ACTION_DIM + 1)), ("reward", (TASKS, 1)),
     ("next_obs", (OBS_DIM,)), ("done", (TASKS - 1,))],
)
def test_add_rejects_wrong_shapes(field: str, shape: tuple[int, ...]) -> None:
    buffer = MultiTaskReplayBuffer(TASKS, 4, OBS_DIM, ACTION_DIM)
    values = transition(0)
    values[field] = torch.zeros(shape)
    with pytest.raises(ValueError, match=field):
        buffer.add(**values)
    assert buffer.size == 0


def test_invalid_construction_and_sampling_raise() -> None:
    with pytest.raises(ValueError, match="capacity_per_task"):
        MultiTaskReplayBuffer(TASKS, 0, OBS_DIM, ACTION_DIM)
    buffer = MultiTaskReplayBuffer(TASKS, 4, OBS_DIM, ACTION_DIM)
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(4)
    buffer.add(**transition(0))
    with pytest.raises(ValueError, match="batch_per_task"):
        buffer.sample(0)


def test_load_state_dict_rejects_a_different_buffer_shape() -> None:
    state = filled_buffer(steps=3, capacity=4).state_dict()
    with pytest.raises(ValueError, match="capacity_per_task"):
        MultiTaskReplayBuffer(TASKS, 5, OBS_DIM, ACTION_DIM).load_state_dict(state)
    with pytest.raises(ValueError, match="obs"):
        MultiTaskReplayBuffer(TASKS, 4, OBS_DIM + 1, ACTION_DIM).load_state_dict(state)
