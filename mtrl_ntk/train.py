"""The training loop: collect with all T environments, update once per step, evaluate, log.

One step is one step of every task's environment (T transitions into the
replay buffer) followed, after the random warm-up, by one SAC update on a batch
of ``batch_size / T`` transitions per task (docs/design.md, "The data path").
Evaluations run at the protocol's cadence (and after the last step) with
deterministic actions.

Outputs in the run directory (the contract other tools read):

- ``config.yaml``: the resolved config;
- ``provenance.json``: code version, libraries, machine, command line;
- ``metrics.jsonl``: one JSON object per evaluation (``step``, ``transitions``,
  ``eval/success_mean``, ``eval/success/<task>``, ``train/success_mean``,
  ``train/success/<task>``, ``train/return/<task>``, losses, temperature,
  ``combiner/<critic|actor>/weight/<task>`` and, for the NTK combiners,
  ``combiner/<critic|actor>/ntk_eigenvalue/<task>``, averaged over the updates
  since the previous evaluation); each line is flushed and fsynced; a
  non-finite number is written as ``null``;
- ``tb/``: TensorBoard events with the same tags plus steps/s, ETA, a
  custom-scalars layout and the task-affinity image (the normalised Gramian);
- ``result.json``: written atomically, only when the run finished;
- ``checkpoints/``: the last ``train.keep_checkpoints`` checkpoints and the replay
  segments they need (mtrl_ntk/checkpoint.py); ``resume=true`` continues from the
  newest complete one, rolling ``metrics.jsonl`` and TensorBoard back to its step.

Faults (mtrl_ntk/faults.py): a non-finite update is skipped and reported with the
step and the task; SIGTERM/SIGINT finish the step, checkpoint at the next episode
end and stop with exit status 128 + signal; a dead environment worker, too many
skipped updates or a failed checkpoint write stop the run with one message
(:class:`~mtrl_ntk.faults.RunStopped`).

The update's metrics stay on the training device and are summed there; they
reach the host (``.item()`` / ``.cpu()``) only every ``train.log_every`` steps
and at evaluations, never in the per-step path.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from mtrl_ntk.agent import MultiTaskSAC
from mtrl_ntk.atomic import write_text_atomically
from mtrl_ntk.checkpoint import (
    Checkpoint,
    CheckpointManager,
    config_differences,
    truncate_metrics,
)
from mtrl_ntk.config import ConfigError, RunSpec, build_run_spec, make_combiners, seed_list
from mtrl_ntk.envs import (
    EnvWorkerError,
    Evaluator,
    MultiTaskEnv,
    StepResult,
    make_multitask_env,
)
from mtrl_ntk.faults import RunInterrupted, RunStopped, StopSignals, UpdateGuard, poison_batch
from mtrl_ntk.provenance import write_provenance
from mtrl_ntk.replay import MultiTaskReplayBuffer
from mtrl_ntk.rng import capture_global_rng, restore_global_rng
from mtrl_ntk.runtime import tune_cpu_allocator
from mtrl_ntk.tb_layout import affinity_image, custom_scalar_layout
from mtrl_ntk.update_schedule import updates_at_step

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
TENSORBOARD_DIR = "tb"
_FILE_MODE = 0o644
# The entries of Trainer.state_dict() a checkpoint refuses to hold a NaN or an infinity in:
# the learned state (networks, optimisers, combiners, reward normaliser), which would poison
# every continuation. Logged metrics and the last evaluation may legitimately be non-finite.
_MUST_BE_FINITE = ("agent", "env")

# Agent metric -> tag. Per-task metrics ([T]) get "/<task>" appended to the tag.
# Metrics the agent adds later and this table does not know are logged as "agent/<key>".
_METRIC_TAGS = {
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
}
# [T, T] metrics become an affinity image each evaluation, not scalars.
_GRAMIAN_IMAGES = {
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


def add_per_seed(windows: Sequence[MetricAccumulator], metrics: Mapping[str, Tensor]) -> None:
    """Add a seed group's metrics [S, ...] into seed k's ``windows[k]``: one multi-tensor
    addition for all seeds (after each window's first update)."""
    per_seed = [{key: value[k] for key, value in metrics.items()} for k in range(len(windows))]
    if any(not window.sums for window in windows):
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
        if key in _GRAMIAN_IMAGES:
            continue
        tag = _METRIC_TAGS.get(key, f"agent/{key}")
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


def check_resumed_observation(obs: np.ndarray, expected: np.ndarray) -> None:
    """Warn when the resumed env's first observation is not the one the checkpoint saw."""
    if not np.array_equal(obs, expected):
        difference = float(np.max(np.abs(obs - expected))) if obs.shape == expected.shape else None
        print(
            "mtrl_ntk: warning: the resumed environments' first observation differs from the "
            f"checkpoint's (max |difference| {difference}): the continuation is not bit-exact "
            "(another Meta-World or MuJoCo version?)",
            file=sys.stderr,
        )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from ``seed`` (NumPy's SeedSequence.spawn)."""
    children = np.random.SeedSequence(seed).spawn(count)
    return [int(child.generate_state(1, np.uint64)[0] >> np.uint64(1)) for child in children]


def _json_number(value: Any) -> Any:
    """Strict JSON: a non-finite float becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Trainer:
    """One run: the environments, replay buffer, agent and loggers, and the loop over steps.

    Everything a continuation needs is an attribute that owns its ``state_dict``
    (``env``, ``agent``, ``log_window``, ``episodes``, ``guard``, the generators) or
    a plain counter (``step``); ``state_dict`` composes them and ``load_state_dict``
    hands each part back to its owner, so the checkpoint module only writes and
    reads files. The replay buffer is the exception: the checkpoint manager saves
    its rows incrementally (``CheckpointManager.save`` / ``restore_replay``).
    """

    def __init__(
        self,
        spec: RunSpec,
        run_dir: Path,
        checkpoint: Checkpoint | None = None,
        resume_hint: str = "the same command with resume=true",
        *,
        in_group: bool = False,
        make_env: Callable[..., Any] = make_multitask_env,
    ) -> None:
        self.spec = spec
        # In a seed group (mtrl_ntk/seed_group.py) the group compiles and runs the update.
        self.in_group = in_group
        # Builds the training and evaluation envs (a seed group's may build them in workers).
        self.make_env = make_env
        self.run_dir = run_dir
        self.task_names = list(spec.task_names)
        self.step = 0  # steps of all T environments done so far
        self.last_eval: dict[str, float] = {}
        self.env: MultiTaskEnv | None = None
        self.evaluator: Evaluator | None = None
        self.writer: SummaryWriter | None = None
        self.resume_hint = resume_hint
        self.elapsed_offset = 0.0  # training seconds of earlier sessions (resumed runs)
        self.resumed_obs: np.ndarray | None = None  # [T, D] the checkpoint's next observation
        self._started: float | None = None
        # The TensorBoard window: its start time, its first step, the evaluation seconds in it.
        self._window = (0.0, 0, 0.0)
        self._checkpoint_due: int | None = None  # the step a periodic checkpoint is due at
        self.checkpoints = CheckpointManager(
            run_dir, spec.train.keep_checkpoints, kill_during=spec.debug.kill_during_checkpoint
        )

        try:
            self._build(checkpoint)
        except BaseException:
            self.close()  # no worker process outlives a failed construction
            raise

    def _build(self, checkpoint: Checkpoint | None) -> None:
        spec = self.spec
        # Environments first: async workers are forked before torch starts its threads.
        self.env = self.make_env(
            spec.env_backend, spec.benchmark, spec.protocol, seed=spec.seed,
            vector_strategy=spec.vector_strategy,
        )
        if self.env.task_names != self.task_names:
            raise RuntimeError(f"env tasks {self.env.task_names} != config {self.task_names}")
        device = spec.device
        self.buffer = MultiTaskReplayBuffer(
            spec.num_tasks, spec.capacity_per_task, self.env.obs_dim, self.env.action_dim, device
        )
        critic_combiner, actor_combiner = make_combiners(spec)
        # Independent streams for the policy noise, the replay sampler and the warm-up
        # actions, derived from the run's seed (not the same seed three times).
        noise_seed, sample_seed, warmup_seed = derive_seeds(spec.seed, 3)
        self.agent = MultiTaskSAC(
            self.env.obs_dim, self.env.action_dim, spec.num_tasks, spec.agent,
            critic_combiner, actor_combiner, device, seed=noise_seed,
            compile=spec.train.compile and not self.in_group,
        )
        self.sample_generator = torch.Generator(device=device)
        self.sample_generator.manual_seed(sample_seed)
        self.warmup_rng = np.random.default_rng(warmup_seed)  # uniformly random warm-up actions

        self.log_window = MetricAccumulator(device)  # since the last TensorBoard log
        self.eval_window = MetricAccumulator(device)  # since the last evaluation
        self.episodes = EpisodeStats(spec.num_tasks)  # training episodes since the last evaluation
        self.guard = (
            UpdateGuard(self.agent, self.task_names, spec.train.max_consecutive_skips,
                        label=f"seed {spec.seed}: " if self.in_group else "")
            if spec.train.check_finite else None
        )
        # A resumed run rolls TensorBoard back: events after the checkpoint's step are purged.
        purge_step = None
        if spec.resume:
            purge_step = 0 if checkpoint is None else checkpoint.step + 1
        self.writer = SummaryWriter(
            log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step
        )
        self.writer.add_custom_scalars(custom_scalar_layout(self.task_names))
        if spec.resume:
            self.checkpoints.resume_from(checkpoint)
        if checkpoint is not None:
            self.checkpoints.restore_replay(checkpoint, self.buffer)
            self.load_state_dict(checkpoint.state)

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self, obs: np.ndarray) -> dict[str, Any]:
        """Everything a continuation needs except the replay rows, at an episode start.

        ``obs`` [T, D] is the observation the next action is computed from (the loop's,
        not an attribute); a resumed run compares its first observation with it. The
        keys are those checkpoints have always had, so older checkpoints still load.
        """
        assert self.env is not None
        return {
            "step": self.step,
            "agent": self.agent.state_dict(),
            "env": self.env.episode_start_state_dict(),
            "obs": torch.from_numpy(np.array(obs, dtype=np.float32)),  # [T, D]
            "evaluator_env": None if self.evaluator is None else self.evaluator.env.state_dict(),
            "sample_generator": self.sample_generator.get_state(),
            "warmup_rng": self.warmup_rng.bit_generator.state,
            "log_window": self.log_window.state_dict(),
            "eval_window": self.eval_window.state_dict(),
            "episodes": self.episodes.state_dict(),
            "last_eval": dict(self.last_eval),
            "elapsed_seconds": self.elapsed_seconds,
            "update_guard": None if self.guard is None else self.guard.state_dict(),
            # Last: nothing after this point may draw from a global generator.
            "global_rng": capture_global_rng(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``'s state into this freshly built trainer (whose replay buffer
        the checkpoint manager fills separately). Keys it does not know (a checkpoint's
        ``format`` and replay manifest) are ignored."""
        assert self.env is not None
        self.step = int(state["step"])
        self.agent.load_state_dict(state["agent"])
        self.env.load_state_dict(state["env"])
        self.resumed_obs = state["obs"].numpy()
        if state["evaluator_env"] is not None:
            self.ensure_evaluator().env.load_state_dict(state["evaluator_env"])
        self.sample_generator.set_state(state["sample_generator"])
        self.warmup_rng.bit_generator.state = state["warmup_rng"]
        self.log_window.load_state_dict(state["log_window"])
        self.eval_window.load_state_dict(state["eval_window"])
        self.episodes.load_state_dict(state["episodes"])
        self.last_eval = dict(state["last_eval"])
        self.elapsed_offset = float(state["elapsed_seconds"])
        if self.guard is not None and state["update_guard"] is not None:
            self.guard.load_state_dict(state["update_guard"])
        # Last: building the evaluation env above re-seeds NumPy's global generator.
        restore_global_rng(state["global_rng"])

    @property
    def elapsed_seconds(self) -> float:
        """Training seconds so far, earlier sessions of a resumed run included."""
        if self._started is None:
            return self.elapsed_offset
        return time.perf_counter() - self._started

    def ensure_evaluator(self) -> Evaluator:
        """The evaluation env, built at first use and kept open across evaluations."""
        if self.evaluator is None:
            spec = self.spec
            self.evaluator = Evaluator(
                spec.benchmark, spec.protocol, spec.seed, vector_strategy=spec.vector_strategy,
                backend=spec.env_backend, make_env=self.make_env,
            )
        return self.evaluator

    # -- acting ----------------------------------------------------------------------------

    def _actions(self, obs: np.ndarray) -> np.ndarray:
        """[T, A]: uniform random during warm-up, then samples of the policy."""
        assert self.env is not None
        if self.step < self.spec.train.warmup_steps:
            shape = (self.spec.num_tasks, self.env.action_dim)
            return self.warmup_rng.uniform(
                self.env.action_low, self.env.action_high, size=shape
            ).astype(np.float32)
        obs_tensor = torch.as_tensor(obs, device=self.spec.device)  # [T, D]
        return self.agent.act(obs_tensor, deterministic=False).cpu().numpy()

    def _greedy_policy(self, obs: np.ndarray) -> np.ndarray:
        obs_tensor = torch.as_tensor(obs, device=self.spec.device)  # [T, D]
        return self.agent.act(obs_tensor, deterministic=True).cpu().numpy()

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train for ``train.num_steps`` steps; returns the final result (also in result.json)."""
        assert self.env is not None
        train = self.spec.train
        progress = progress_bar(self.spec, self.step)
        stop = StopSignals()
        stop.install()
        try:
            obs = self.begin()  # [T, D]
            while self.step < train.num_steps:
                actions = self._actions(obs)  # [T, A]
                # With async workers the T simulations of this step run while the learner
                # updates on the transitions stored so far (see _maybe_update).
                self.send_actions(actions)
                if train.overlap_env_step:
                    self._maybe_update()
                obs = self.store_step(obs, actions)
                if not train.overlap_env_step:
                    self._maybe_update()
                progress.update(1)
                self.end_step(obs, stop, progress)
        except EnvWorkerError as error:  # training or evaluation env
            raise self.worker_stopped(error) from error
        finally:
            stop.uninstall()
            progress.close()
        return self._finish(wall_seconds=self.elapsed_seconds)

    # The phases of one step, shared with the seed group's loop (mtrl_ntk/seed_group.py).

    def begin(self) -> np.ndarray:
        """Start (or continue) the clocks and the checkpoint schedule; the first observation."""
        assert self.env is not None
        self._started = time.perf_counter() - self.elapsed_offset
        self._window = (time.perf_counter(), self.step, 0.0)  # start, step, eval seconds
        every = self.spec.train.checkpoint_every
        self._checkpoint_due = (self.step // every + 1) * every if every else None
        obs = self.env.reset()  # [T, D]
        if self.resumed_obs is not None:
            check_resumed_observation(obs, self.resumed_obs)
        return obs

    def send_actions(self, actions: np.ndarray) -> None:
        """Start this step's T simulations (async workers run them until ``store_step``)."""
        assert self.env is not None
        self.env.step_async(actions)
        self.step += 1

    def store_step(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Finish the step: its T transitions into the replay buffer; the next observation."""
        assert self.env is not None
        result = self.env.step_wait()
        done = result.terminated.astype(np.float32)  # time-limit ends are not terminal
        self.buffer.add(obs, actions, result.reward, result.next_obs, done)
        self.episodes.add(result)
        return result.obs

    def end_step(
        self, obs: np.ndarray, stop: StopSignals, progress: Any = None, *, alone: bool = True,
        evaluation: tuple[dict[str, float], float] | None = None,
    ) -> Path | None:
        """Log, evaluate and checkpoint when due; returns the checkpoint written, if any.

        ``alone`` (a single run): after a stop signal's checkpoint, stop; and the
        ``debug.kill_at_step`` hook. A seed group does both once all its seeds' steps ended,
        and evaluates all its seeds at once: ``evaluation`` is this seed's (success per
        task, seconds) when it is due.
        """
        train = self.spec.train
        if self.step % train.log_every == 0:
            now = time.perf_counter()
            window_start, window_step, window_eval_seconds = self._window
            steps_per_second = (self.step - window_step) / max(
                now - window_start - window_eval_seconds, 1e-9
            )
            self._log_window(steps_per_second)
            self._window = (now, self.step, 0.0)
        if self.evaluation_due():
            eval_started = time.perf_counter()
            self._evaluate(elapsed=eval_started - (self._started or eval_started),
                           evaluation=evaluation)
            # Steps/s leave evaluations out: this one's, and a seed group's, run before.
            seconds = time.perf_counter() - eval_started + (evaluation[1] if evaluation else 0.0)
            start, step, eval_seconds = self._window
            self._window = (start, step, eval_seconds + seconds)
            if progress is not None:
                progress.set_postfix(eval=f"{self.last_eval['eval/success_mean']:.2f}")
        path = self._maybe_checkpoint(obs, stop)
        if alone:
            if path is not None:
                self.raise_if_stopped(stop, path)
            kill_if_due(self.spec, self.step)
        return path

    def evaluation_due(self) -> bool:
        return (
            self.step % self.spec.protocol.eval_every_steps == 0
            or self.step == self.spec.train.num_steps
        )

    def worker_stopped(self, error: EnvWorkerError) -> RunStopped:
        return RunStopped(
            f"{error} (step {self.step}); resume from the last checkpoint with: "
            f"{self.resume_hint}"
        )

    def _maybe_update(self) -> None:
        """This step's update, after the random warm-up (``warmup_steps`` of them at once at
        its end with ``train.warmup_burst``, mtrl's loop); its metrics stay on the device.

        With ``train.overlap_env_step`` it runs between ``env.step_async`` and
        ``env.step_wait``, so its batch is drawn from the transitions of steps
        1 .. step - 1 (this step's are not stored yet; the sequential order draws
        from 1 .. step). The next step's action comes from the updated policy in
        both orders. A step with an empty buffer (the first, when warmup_steps <= 1)
        makes no update.
        """
        train = self.spec.train
        updates = updates_at_step(self.step, train.warmup_steps, train.warmup_burst)
        if len(self.buffer) == 0:
            return
        for _ in range(updates):  # 1, or mtrl's burst when the warm-up ends
            batch = self.buffer.sample(self.spec.batch_per_task, self.sample_generator)
            metrics = self._update(batch)  # a skipped update's metrics are 0, "finite" False
            self.log_window.add(metrics)
            self.eval_window.add(metrics)

    def _check_updates(self) -> None:
        """Report non-finite updates skipped since the last check (one host sync)."""
        if self.guard is not None:
            self.guard.check(self.step)

    def _update(self, batch: Any) -> dict[str, Tensor]:
        """One SAC update (skipped on the device when not finite)."""
        batch = self.debug_batch(batch)
        if self.guard is None:
            return self.agent.update(batch)
        return self.guard.update(batch, self.step)

    def debug_batch(self, batch: Any) -> Any:
        """``batch``, with one task's rewards NaN at the steps of the ``debug.nan_at_step`` hook."""
        debug = self.spec.debug
        if debug.nan_at_step is not None and (
            debug.nan_at_step <= self.step < debug.nan_at_step + debug.nan_steps
        ):
            task = self.task_names.index(debug.nan_task) if debug.nan_task else 0
            return poison_batch(batch, task)
        return batch

    def _maybe_checkpoint(self, obs: np.ndarray, stop: StopSignals) -> Path | None:
        """Write a checkpoint when one is due (or a stop signal came) and every episode has
        just ended; returns its path (None when none was written)."""
        assert self.env is not None and self.writer is not None
        due = self._checkpoint_due is not None and self.step >= self._checkpoint_due
        if not (due or stop.requested is not None) or not self.env.at_episode_start:
            if due and self.step - self._checkpoint_due == self.env.max_episode_steps:
                print(  # all episodes should have ended together by now
                    f"mtrl_ntk: warning: the checkpoint due at step {self._checkpoint_due} "
                    "finds no episode start to be written at",
                    file=sys.stderr,
                )
            return None
        self._check_updates()  # a run that must stop for non-finite updates stops first
        self.writer.flush()  # TensorBoard up to this step is on disk before the checkpoint
        started = time.perf_counter()
        path = self.checkpoints.save(
            self.step, self.state_dict(obs), self.buffer, rows_added=self.step,
            finite_keys=_MUST_BE_FINITE,
        )
        self.checkpoints.seconds_this_session += time.perf_counter() - started
        every = self.spec.train.checkpoint_every
        self._checkpoint_due = (self.step // every + 1) * every if every else None
        return path

    def raise_if_stopped(self, stop: StopSignals, path: Path) -> None:
        """After a stop signal, once checkpoint ``path`` is written: stop the run."""
        if stop.requested is not None and self.step < self.spec.train.num_steps:
            name = signal.Signals(stop.requested).name
            raise RunInterrupted(
                f"interrupted by {name} at step {self.step}; checkpoint {path.name} written. "
                f"Resume with: {self.resume_hint}",
                stop.requested,
            )

    # -- logging -----------------------------------------------------------------------------

    def _log_window(self, steps_per_second: float) -> None:
        assert self.writer is not None
        self._check_updates()
        scalars = metric_scalars(self.log_window.means(), self.task_names)
        self.log_window.reset()
        remaining = self.spec.train.num_steps - self.step
        scalars["time/steps_per_second"] = steps_per_second
        scalars["time/eta_hours"] = remaining / max(steps_per_second, 1e-9) / 3600.0
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, self.step)

    def _evaluate(
        self, elapsed: float, evaluation: tuple[dict[str, float], float] | None = None
    ) -> None:
        """Evaluate (or take ``evaluation``: success per task and seconds, from a seed
        group), then write the metrics row, TensorBoard and the affinity images."""
        assert self.writer is not None
        self._check_updates()
        spec = self.spec
        if evaluation is None:
            evaluator = self.ensure_evaluator()  # one evaluation env, kept open across calls
            eval_started = time.perf_counter()
            success = evaluator(self._greedy_policy)  # {task: rate}
            eval_seconds = time.perf_counter() - eval_started
        else:
            success, eval_seconds = evaluation

        row: dict[str, Any] = {
            "step": self.step,
            "transitions": self.step * spec.num_tasks,
            "eval/success_mean": float(np.mean([success[task] for task in self.task_names])),
        }
        row.update({f"eval/success/{task}": success[task] for task in self.task_names})
        row.update(self.episodes.scalars(self.task_names))
        means = self.eval_window.means()
        row.update(metric_scalars(means, self.task_names))
        row["time/elapsed_seconds"] = elapsed
        row["time/eval_seconds"] = eval_seconds
        if self.guard is not None:
            row["health/skipped_updates"] = self.guard.skips_since_eval
            self.guard.skips_since_eval = 0
        self.episodes.reset()
        self.eval_window.reset()

        line = json.dumps({key: _json_number(value) for key, value in row.items()})
        with (self.run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

        for tag, value in row.items():
            if tag.startswith(("eval/", "train/", "health/")) or tag == "time/eval_seconds":
                self.writer.add_scalar(tag, value, self.step)
        for key, tag in _GRAMIAN_IMAGES.items():
            if key in means:
                self.writer.add_image(
                    tag, affinity_image(torch.from_numpy(means[key]), self.task_names), self.step
                )
        self.writer.flush()
        self.last_eval = row

    def _finish(self, wall_seconds: float) -> dict[str, Any]:
        self._check_updates()
        result = {
            "status": "finished",
            "step": self.step,
            "transitions": self.step * self.spec.num_tasks,
            "eval/success_mean": self.last_eval.get("eval/success_mean"),
            **{
                f"eval/success/{task}": self.last_eval.get(f"eval/success/{task}")
                for task in self.task_names
            },
            "device": str(self.spec.device),
            "wall_seconds": wall_seconds,
            "steps_per_second": self.step / max(wall_seconds, 1e-9),
            "skipped_updates": None if self.guard is None else self.guard.total_skips,
            "checkpoints_written_this_session": self.checkpoints.saved_this_session,
            "checkpoint_seconds_this_session": self.checkpoints.seconds_this_session,
        }
        write_text_atomically(self.run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
        return result

    def close(self) -> None:
        """Close loggers and end environment workers. Safe after a partial construction."""
        if self.writer is not None:
            self.writer.close()
        if self.evaluator is not None:
            self.evaluator.close()
        if self.env is not None:
            self.env.close()


def kill_if_due(spec: RunSpec, step: int) -> None:
    """Test hook (``debug.kill_at_step``): SIGKILL this process at the end of that step."""
    if step == spec.debug.kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)


def progress_bar(spec: RunSpec, initial: int, desc: str | None = None) -> tqdm:
    """The run's tqdm bar on stderr (disabled with ``train.progress_bar=false``)."""
    return tqdm(
        total=spec.train.num_steps, initial=initial, unit="step",
        desc=desc or spec.combiner_name, disable=not spec.train.progress_bar, file=sys.stderr,
        dynamic_ncols=True,
        # Time-based refresh only: tqdm's adaptive miniters, tuned on the fast warm-up,
        # would go quiet for minutes once the updates start.
        mininterval=1.0 if sys.stderr.isatty() else 30.0, miniters=1,
    )


def _previous_result(run_dir: Path, resume: bool = False) -> dict[str, Any] | None:
    """The result of a run that already finished in ``run_dir``; a ConfigError for an
    unfinished one unless ``resume`` (its metrics would be mixed with this run's)."""
    result_path = run_dir / RESULT_FILE
    if result_path.exists():
        try:
            result = json.loads(result_path.read_text())
        except (OSError, json.JSONDecodeError):
            result = None
        if isinstance(result, dict) and result.get("status") == "finished":
            return result
    metrics_path = run_dir / METRICS_FILE
    has_metrics = metrics_path.exists() and metrics_path.stat().st_size > 0
    if not resume and (has_metrics or CheckpointManager(run_dir).checkpoint_paths()):
        raise ConfigError(
            f"run directory {run_dir} already holds an unfinished run; continue it with "
            "resume=true (and the same overrides), delete it, or give this run another "
            "directory (name=... or hydra.run.dir=...)"
        )
    return None


# Settings a resumed run may change: they do not change what is computed.
_RESUMABLE_CHANGES = (
    "resume", "debug", "train.progress_bar",
    # Where the seeds run, not what they compute (and keys older runs' configs lack).
    "seeds", "seed_group", "env.seed_workers",
)


def _check_resumed_config(run_dir: Path, cfg: DictConfig) -> None:
    """A resumed run must have the configuration the run directory was started with."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    current = OmegaConf.to_container(cfg, resolve=True)
    differences = [
        difference for difference in config_differences(saved, current)
        if not difference.split(":")[0].startswith(_RESUMABLE_CHANGES)
    ]
    if differences:
        raise ConfigError(
            f"resume=true needs the settings {run_dir} was started with; changed (saved -> "
            f"now): {'; '.join(differences[:5])}{' ...' if len(differences) > 5 else ''}"
        )


def prepare_run_directory(
    run_dir: Path, cfg: DictConfig, argv: Sequence[str], resume: bool,
    checkpoint: Checkpoint | None,
) -> None:
    """Before training: a resumed run's metrics cut back to its checkpoint (no evaluation
    appears twice); then the resolved config and the provenance written."""
    if resume:
        last_step = 0 if checkpoint is None else checkpoint.step
        truncate_metrics(run_dir / METRICS_FILE, last_step)
        print(
            f"mtrl_ntk: resuming {run_dir} from "
            + (f"{checkpoint.path.name}" if checkpoint else "scratch (no complete checkpoint)"),
            file=sys.stderr,
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    write_provenance(run_dir, list(argv))


def _resume_hint(argv: Sequence[str]) -> str:
    """The command that resumes this run: the typed command line plus resume=true."""
    arguments = [argument for argument in argv[1:] if not argument.startswith("resume=")]
    script = Path(argv[0]).name if argv else "run_mt10.py"
    return shlex.join(["python", script, *arguments, "resume=true"])


def train(
    cfg: DictConfig, run_dir: Path | str | None = None, argv: Sequence[str] | None = None
) -> dict[str, Any]:
    """Run one training job from a composed config; returns the final result.

    The config is validated (``build_run_spec``) before any environment starts;
    invalid settings raise :class:`ConfigError`. ``run_dir`` defaults to the
    current directory; ``argv`` is recorded in ``provenance.json``. A run
    directory that already holds a finished run is left alone and its result
    returned, so re-launching a sweep skips the runs that finished. One that holds
    an unfinished run is refused unless ``resume=true``: then, with the settings it
    was started with, it continues from its newest complete checkpoint (or from
    scratch if it has none), with ``metrics.jsonl`` and TensorBoard rolled back to
    that checkpoint's step. A deliberate stop raises :class:`RunStopped`.

    With ``seeds`` (``seed=A..B``) the seeds train side by side in this process, each in
    its own ``seed<k>`` directory next to ``run_dir`` (``mtrl_ntk.seed_group``).
    """
    run_dir = Path.cwd() if run_dir is None else Path(run_dir)
    argv = list(sys.argv if argv is None else argv)
    seeds = seed_list(cfg)
    if seeds is not None and len(seeds) > 1:
        from mtrl_ntk.seed_group import train_seed_group  # it builds on this module

        return train_seed_group(cfg, run_dir, argv)
    if seeds is not None:  # seed=k..k: a single run (a group of one only adds vmap's overhead)
        cfg = OmegaConf.merge(cfg, {"seed": seeds[0], "seeds": None})
    spec = build_run_spec(cfg)
    previous = _previous_result(run_dir, resume=spec.resume)
    if previous is not None:
        print(f"{run_dir} already holds a finished run: skipped", file=sys.stderr)
        return previous
    checkpoint = None
    if spec.resume:
        _check_resumed_config(run_dir, cfg)
        checkpoint = CheckpointManager(run_dir).latest()
    prepare_run_directory(run_dir, cfg, argv, spec.resume, checkpoint)
    seed_everything(spec.seed)
    tune_cpu_allocator()  # keep freed tensor memory: no page faults per update (runtime.py)
    temperature = "one temperature per task" if spec.agent.disentangled_alpha else "one temperature"
    print(
        f"mtrl_ntk: {spec.combiner_name} on {spec.benchmark} ({spec.num_tasks} tasks, protocol "
        f"{spec.protocol.name}, arch {spec.agent.arch}, {temperature}), seed {spec.seed}, "
        f"device {spec.device}, "
        f"{spec.train.num_steps:,} steps -> {run_dir}",
        file=sys.stderr,
    )
    trainer: Trainer | None = None
    try:
        trainer = Trainer(spec, run_dir, checkpoint=checkpoint, resume_hint=_resume_hint(argv))
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
