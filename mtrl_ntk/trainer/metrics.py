"""What a run logs: the update's metrics averaged over a window, and the training episodes.

The update's metrics stay on the training device and are summed there
(:class:`MetricAccumulator`); they reach the host (``.item()`` / ``.cpu()``) only
every ``train.log_every`` steps and at evaluations, never in the per-step path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtrl_ntk.envs import StepResult

# Agent metric -> tag. Per-task metrics ([T]) get "/<task>" appended to the tag.
# Metrics the agent adds later and this table does not know are logged as "agent/<key>".
METRIC_TAGS = {
    "critic_loss": "loss/critic",
    "actor_loss": "loss/actor",
    "alpha_loss": "loss/temperature",
    "critic_task_losses": "loss/critic",
    "actor_task_losses": "loss/actor",
    "alpha": "temperature",
    "entropy": "policy/entropy",
    "task_entropy": "policy/entropy",
    "critic_weights": "combiner/critic/weight",
    "actor_weights": "combiner/actor/weight",
    "critic_ntk_eigenvalues": "combiner/critic/ntk_eigenvalue",
    "actor_ntk_eigenvalues": "combiner/actor/ntk_eigenvalue",
    "finite": "health/finite_fraction",
    "critic_conflicting_pairs": "combiner/critic/conflicting_pairs",
    "actor_conflicting_pairs": "combiner/actor/conflicting_pairs",
    "critic_solver_fallback": "combiner/critic/solver_fallback_fraction",
    "actor_solver_fallback": "combiner/actor/solver_fallback_fraction",
    "alpha_weights": "combiner/alpha/weight",
    "alpha_conflicting_pairs": "combiner/alpha/conflicting_pairs",
    "alpha_solver_fallback": "combiner/alpha/solver_fallback_fraction",
}
# [T, T] metrics become an affinity image each evaluation, not scalars.
GRAMIAN_IMAGES = {
    "critic_gramian": "combiner/critic/affinity",
    "actor_gramian": "combiner/actor/affinity",
}


class MetricAccumulator:
    """Running sums of the agent's metric tensors since the last ``reset``, kept on device.

    ``add`` launches one multi-tensor addition (no host synchronisation); ``means``
    moves the averages to the host once. The agent zeroes every metric of an update
    it did not apply, so each metric is averaged over the applied updates (the sum
    of ``finite``), and ``finite`` itself over all of them.

    Args:
        device: where ``load_state_dict`` puts the sums: the device the metrics come
            from (a checkpoint is read onto the CPU).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, metrics: Mapping[str, Tensor]) -> None:
        if not self.sums:
            self.sums = {key: value.detach().to(torch.float64) for key, value in metrics.items()}
            # .to() may return the metric itself: own the sums.
            self.sums = {key: value.clone() for key, value in self.sums.items()}
        else:
            if metrics.keys() != self.sums.keys():
                raise ValueError(
                    f"metrics {sorted(metrics)} differ from the window's {sorted(self.sums)}"
                )
            torch._foreach_add_(
                list(self.sums.values()), [metrics[key].detach() for key in self.sums]
            )
        self.count += 1

    def means(self) -> dict[str, np.ndarray]:
        if not self.count:
            return {}
        sums = {key: total.cpu().numpy() for key, total in self.sums.items()}
        applied = max(float(sums.get("finite", self.count)), 1.0)
        return {
            key: total / (self.count if key == "finite" else applied)
            for key, total in sums.items()
        }

    def reset(self) -> None:
        self.sums = {}
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        """The window so far, so a resumed run logs the same averages as an uninterrupted one."""
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums = {key: value.to(self.device) for key, value in state["sums"].items()}
        self.count = int(state["count"])


def add_per_seed(
    windows: Sequence[MetricAccumulator], per_seed: Sequence[Mapping[str, Tensor]]
) -> None:
    """Add seed k's metrics ``per_seed[k]`` into ``windows[k]``: one multi-tensor addition
    for all seeds (after each window's first update)."""
    if len(windows) == 1 or any(not window.sums for window in windows):
        for window, seed_metrics in zip(windows, per_seed, strict=True):
            window.add(seed_metrics)
        return
    sums, values = [], []
    for window, seed_metrics in zip(windows, per_seed, strict=True):
        if seed_metrics.keys() != window.sums.keys():
            raise ValueError(
                f"metrics {sorted(seed_metrics)} differ from the window's {sorted(window.sums)}"
            )
        sums += window.sums.values()
        values += [seed_metrics[key].detach() for key in window.sums]
    torch._foreach_add_(sums, values)
    for window in windows:
        window.count += 1


def metric_scalars(means: Mapping[str, np.ndarray], task_names: Sequence[str]) -> dict[str, float]:
    """Flatten averaged agent metrics into tags: scalars keep their tag, [T] vectors get
    one tag per task; [T, T] matrices (Gramians) are left to the affinity image."""
    scalars: dict[str, float] = {}
    for key, value in means.items():
        if key in GRAMIAN_IMAGES:
            continue
        tag = METRIC_TAGS.get(key, f"agent/{key}")
        if value.ndim == 0 or value.size == 1:
            scalars[tag] = float(value.reshape(()))
        elif value.shape == (len(task_names),):
            for task, item in zip(task_names, value.tolist(), strict=True):
                scalars[f"{tag}/{task}"] = float(item)
        else:  # any other shape: its mean, so nothing is silently dropped
            scalars[f"{tag}/mean"] = float(value.mean())
    return scalars


class EpisodeStats:
    """Success and raw return of the training episodes that ended since the last ``reset``."""

    def __init__(self, num_tasks: int) -> None:
        self.successes = np.zeros(num_tasks)  # [T] ended episodes that succeeded
        self.returns = np.zeros(num_tasks)  # [T] sum of their raw returns
        self.episodes = np.zeros(num_tasks, dtype=np.int64)  # [T] ended episodes

    def add(self, result: StepResult) -> None:
        ended = result.episode_end  # [T] bool
        if ended.any():
            self.successes += result.episode_success & ended
            self.returns += np.where(ended, result.episode_return, 0.0)
            self.episodes += ended

    def scalars(self, task_names: Sequence[str]) -> dict[str, float]:
        """Per-task and mean (over tasks with an ended episode) success and return."""
        scalars: dict[str, float] = {}
        ended = self.episodes > 0
        if not ended.any():
            return scalars
        success = self.successes[ended] / self.episodes[ended]
        returns = self.returns[ended] / self.episodes[ended]
        for task, rate, episode_return in zip(
            np.asarray(task_names)[ended], success, returns, strict=True
        ):
            scalars[f"train/success/{task}"] = float(rate)
            scalars[f"train/return/{task}"] = float(episode_return)
        scalars["train/success_mean"] = float(success.mean())
        scalars["train/return_mean"] = float(returns.mean())
        return scalars

    def reset(self) -> None:
        self.successes[:] = 0.0
        self.returns[:] = 0.0
        self.episodes[:] = 0

    def state_dict(self) -> dict[str, Tensor]:
        """Copies as tensors (``torch.load(weights_only=True)`` reads them; NumPy arrays not)."""
        return {
            "successes": torch.from_numpy(self.successes.copy()),
            "returns": torch.from_numpy(self.returns.copy()),
            "episodes": torch.from_numpy(self.episodes.copy()),
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.successes[:] = state["successes"].numpy()
        self.returns[:] = state["returns"].numpy()
        self.episodes[:] = state["episodes"].numpy()
