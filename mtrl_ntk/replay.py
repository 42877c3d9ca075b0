"""Replay stage of the data path: a task-major ring buffer sampled with equal batches per task.

Transitions are stored as [capacity_per_task, T, ...] tensors (as in the
Meta-World+ baselines, metaworld-algorithms): each environment step writes one
row holding one transition per task, and `sample` draws B_t rows per task, so a
batch arrives grouped [T, B_t, ...] and per-task losses are a reshape, not a
scatter. Sampling is uniform with replacement over the filled rows, independently
per task, on the buffer's device, with no host synchronisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

_FIELDS = ("obs", "action", "reward", "next_obs", "done")


@dataclasses.dataclass(frozen=True)
class Batch:
    """Transitions grouped by task: row i holds B_t transitions of task i."""

    obs: Tensor  # [T, B_t, D]
    action: Tensor  # [T, B_t, A]
    reward: Tensor  # [T, B_t]
    next_obs: Tensor  # [T, B_t, D]
    done: Tensor  # [T, B_t] float: 1 = terminal; 0 otherwise, time-limit truncation included

    @property
    def num_tasks(self) -> int:
        return self.reward.shape[0]

    @property
    def batch_per_task(self) -> int:
        return self.reward.shape[1]

    @property
    def task_ids(self) -> Tensor:
        """[T, B_t] long: the task index of every transition (row i is all i)."""
        tasks = torch.arange(self.num_tasks, device=self.reward.device)
        return tasks[:, None].expand(self.num_tasks, self.batch_per_task)


class MultiTaskReplayBuffer:
    """Ring buffer of `capacity_per_task` transitions for each of `num_tasks` tasks.

    Every `add` writes one transition per task into the same row, so all tasks
    always hold the same number of transitions (`size`) and the oldest row is
    overwritten once the buffer is full. Everything is stored as float32 on
    `device`.
    """

    def __init__(
        self,
        num_tasks: int,
        capacity_per_task: int,
        obs_dim: int,
        action_dim: int,
        device: torch.device | str = "cpu",
    ) -> None:
        for key, value in (
            ("num_tasks", num_tasks),
            ("capacity_per_task", capacity_per_task),
            ("obs_dim", obs_dim),
            ("action_dim", action_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r}; allowed: an integer >= 1")
        self.num_tasks = num_tasks
        self.capacity_per_task = capacity_per_task
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.device = torch.device(device)
        T, C = num_tasks, capacity_per_task
        self._shapes = {  # per-step shapes (leading dim T) of each field
            "obs": (T, obs_dim),
            "action": (T, action_dim),
            "reward": (T,),
            "next_obs": (T, obs_dim),
            "done": (T,),
        }
        self._storage = {  # each [C, T, ...]
            name: torch.zeros((C, *shape), dtype=torch.float32, device=self.device)
            for name, shape in self._shapes.items()
        }
        self._task_index = torch.arange(T, device=self.device)[:, None]  # [T, 1]
        self._next_row = 0
        self._size = 0

    @property
    def size(self) -> int:
        """Transitions stored per task (the same for every task)."""
        return self._size

    def __len__(self) -> int:
        return self._size

    def _as_tensor(self, name: str, value: Any) -> Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.device)
        if tuple(tensor.shape) != self._shapes[name]:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}; expected {self._shapes[name]} "
                "(one transition per task)"
            )
        return tensor

    def add(
        self,
        obs: Tensor | np.ndarray,
        action: Tensor | np.ndarray,
        reward: Tensor | np.ndarray,
        next_obs: Tensor | np.ndarray,
        done: Tensor | np.ndarray,
    ) -> None:
        """Store one transition per task: obs [T, D], action [T, A], reward [T],
        next_obs [T, D], done [T] (1 = terminal, 0 = not, time-limit ends included)."""
        values = dict(obs=obs, action=action, reward=reward, next_obs=next_obs, done=done)
        tensors = {name: self._as_tensor(name, value) for name, value in values.items()}
        for name, tensor in tensors.items():
            self._storage[name][self._next_row] = tensor
        self._next_row = (self._next_row + 1) % self.capacity_per_task
        self._size = min(self._size + 1, self.capacity_per_task)

    def sample(self, batch_per_task: int, generator: torch.Generator | None = None) -> Batch:
        """B_t transitions per task, uniform with replacement over the filled rows.

        Task i's transitions are drawn independently of the other tasks'. The
        indices are drawn on the buffer's device with `generator` (which must live
        on that device; None uses the global RNG).
        """
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if isinstance(batch_per_task, bool) or not isinstance(batch_per_task, int) or (
            batch_per_task < 1
        ):
            raise ValueError(f"batch_per_task={batch_per_task!r}; allowed: an integer >= 1")
        rows = torch.randint(
            0,
            self._size,
            (self.num_tasks, batch_per_task),
            device=self.device,
            generator=generator,
        )  # [T, B_t]
        # storage[rows[i, b], i] for every task i: [T, B_t, ...]
        picked = {name: storage[rows, self._task_index] for name, storage in self._storage.items()}
        return Batch(**picked)

    @property
    def next_row(self) -> int:
        """The row the next `add` writes (the ring position)."""
        return self._next_row

    def rows(self, start: int, stop: int) -> dict[str, Tensor]:
        """CPU copies of the storage rows [start, stop) (ring positions, no wrap-around),
        each [stop - start, T, ...]: what an incremental checkpoint appends."""
        if not 0 <= start <= stop <= self.capacity_per_task:
            raise ValueError(
                f"rows [{start}, {stop}) are not within the capacity {self.capacity_per_task}"
            )
        return {
            name: storage[start:stop].to("cpu", copy=True)
            for name, storage in self._storage.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """The filled rows (copied to CPU: a saved slice would drag the whole storage
        along) and the write position."""
        state: dict[str, Any] = {
            name: storage[: self._size].to("cpu", copy=True)
            for name, storage in self._storage.items()
        }
        state.update(
            num_tasks=self.num_tasks,
            capacity_per_task=self.capacity_per_task,
            next_row=self._next_row,
            size=self._size,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_tasks", "capacity_per_task"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"replay state has {key}={state[key]}; this buffer has {getattr(self, key)}"
                )
        size, next_row = int(state["size"]), int(state["next_row"])
        if not 0 <= size <= self.capacity_per_task or not 0 <= next_row < self.capacity_per_task:
            raise ValueError(f"replay state has size={size}, next_row={next_row}")
        for name in _FIELDS:
            expected = (size, *self._shapes[name])
            if tuple(state[name].shape) != expected:
                raise ValueError(
                    f"replay state {name} has shape {tuple(state[name].shape)}; "
                    f"expected {expected}"
                )
        for name in _FIELDS:
            self._storage[name].zero_()
            self._storage[name][:size] = state[name].to(self.device, torch.float32)
        self._size = size
        self._next_row = next_row
