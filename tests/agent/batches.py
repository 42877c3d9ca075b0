"""A random replay batch grouped [T, B_t] for the agent tests."""

from __future__ import annotations

import torch

from mtrl_ntk.replay import Batch


def random_batch(
    tasks: int, per_task: int, obs_dim: int, action_dim: int, seed: int = 0,
    done: torch.Tensor | None = None,
) -> Batch:
    """Gaussian observations and rewards, actions in [-1, 1), ``done`` (default: ~10%
    terminal transitions) — all drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randn(tasks, per_task, obs_dim, generator=generator)
    action = torch.rand(tasks, per_task, action_dim, generator=generator) * 2 - 1
    reward = torch.randn(tasks, per_task, generator=generator)
    next_obs = torch.randn(tasks, per_task, obs_dim, generator=generator)
    if done is None:
        done = (torch.rand(tasks, per_task, generator=generator) < 0.1).float()
    return Batch(obs=obs, action=action, reward=reward, next_obs=next_obs, done=done)
