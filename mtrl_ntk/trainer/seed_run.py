"""One seed's run: everything it owns, its state, and the phases the loop drives.

A :class:`SeedRun` holds one seed's environments (training and evaluation), replay
buffer, agent, generators, metric windows, episode statistics, non-finite guard,
TensorBoard writer and checkpoint manager, and writes its run directory
(mtrl_ntk/rundir.py). It does not loop: the loop (mtrl_ntk/trainer/loop.py) calls
its public phases for every seed of a step, and the learner it is given updates its
agent (alone, or vmapped with the other seeds' agents).

Everything a continuation needs is an attribute that owns its ``state_dict``
(``env``, ``agent``, ``log_window``, ``episodes``, ``guard``, the generators) or a
plain counter (``step``); ``state_dict`` composes them and ``load_state_dict`` hands
each part back to its owner, so the checkpoint module only writes and reads files.
The replay buffer is the exception: the checkpoint manager saves its rows
incrementally (``CheckpointManager.save`` / ``restore_replay``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from mtrl_ntk.agent import MultiTaskSAC
from mtrl_ntk.checkpoint import Checkpoint, CheckpointManager
from mtrl_ntk.config import RunSpec, make_combiners
from mtrl_ntk.envs import (
    EnvSpec,
    EnvWorkerPool,
    Evaluator,
    MakeEnv,
    MultiTaskEnvInterface,
    StepResult,
    make_multitask_env,
)
from mtrl_ntk.faults import UpdateGuard, poison_batch
from mtrl_ntk.replay import Batch, MultiTaskReplayBuffer
from mtrl_ntk.rng import capture_global_rng, derive_seeds, restore_global_rng, seed_everything
from mtrl_ntk.rundir import (
    FINISHED,
    STOPPED,
    TENSORBOARD_DIR,
    append_metrics_row,
    write_result,
)
from mtrl_ntk.tb_layout import affinity_image, custom_scalar_layout
from mtrl_ntk.trainer.metrics import (
    GRAMIAN_IMAGES,
    EpisodeStats,
    MetricAccumulator,
    metric_scalars,
)
from mtrl_ntk.update_schedule import updates_at_step

# The entries of SeedRun.state_dict() a checkpoint refuses to hold a NaN or an infinity in:
# the learned state (networks, optimisers, combiners, reward normaliser), which would poison
# every continuation. Logged metrics and the last evaluation may legitimately be non-finite.
MUST_BE_FINITE = ("agent", "env")


def env_spec(spec: RunSpec) -> EnvSpec:
    """The training env of a run's spec."""
    return EnvSpec(
        backend=spec.env_backend, benchmark=spec.benchmark, protocol=spec.protocol,
        seed=spec.seed, vector_strategy=spec.vector_strategy,  # type: ignore[arg-type]
    )


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


class SeedRun:
    """One seed's run (module doc).

    Args:
        spec: the seed's validated run spec.
        run_dir: its run directory (prepared: config and provenance written).
        checkpoint: the checkpoint it continues from (None: from the start).
        compile_agent: compile the agent's own update (``train.compile`` of a single
            run; a seed group compiles its vmapped update instead).
        label: how its messages name it (``"seed <k>: "`` in a group).
        make_env: builds its envs from their spec (a worker pool's, for a group).
    """

    def __init__(
        self,
        spec: RunSpec,
        run_dir: Path,
        checkpoint: Checkpoint | None = None,
        *,
        compile_agent: bool | None = None,
        label: str = "",
        make_env: MakeEnv = make_multitask_env,
    ) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.label = label
        self.make_env = make_env
        self.task_names = list(spec.task_names)
        self.step = 0  # steps of all T environments done so far
        self.observation: np.ndarray | None = None  # [T, D] the next action's observation
        self.last_eval: dict[str, float] = {}
        self.env: MultiTaskEnvInterface | None = None
        self.evaluator: Evaluator | None = None
        self.writer: SummaryWriter | None = None
        self.elapsed_offset = 0.0  # training seconds of earlier sessions (resumed runs)
        self.resumed_obs: np.ndarray | None = None  # [T, D] the checkpoint's next observation
        self._started: float | None = None
        # The TensorBoard window: its start time, its first step, the evaluation seconds in it.
        self._window = (0.0, 0, 0.0)
        self._checkpoint_due: int | None = None  # the step a periodic checkpoint is due at
        self.checkpoints = CheckpointManager(
            run_dir, spec.train.keep_checkpoints, kill_during=spec.debug.kill_during_checkpoint
        )
        compile_agent = spec.train.compile if compile_agent is None else compile_agent
        try:
            self._build(checkpoint, compile_agent)
        except BaseException:
            self.close()  # no worker process outlives a failed construction
            raise

    def _build(self, checkpoint: Checkpoint | None, compile_agent: bool) -> None:
        spec = self.spec
        # Environments first: async workers are forked before torch starts its threads.
        self.env = self.make_env(env_spec(spec))
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
            critic_combiner, actor_combiner, device, seed=noise_seed, compile=compile_agent,
        )
        self.sample_generator = torch.Generator(device=device)
        self.sample_generator.manual_seed(sample_seed)
        self.warmup_rng = np.random.default_rng(warmup_seed)  # uniformly random warm-up actions

        self.log_window = MetricAccumulator(device)  # since the last TensorBoard log
        self.eval_window = MetricAccumulator(device)  # since the last evaluation
        self.episodes = EpisodeStats(spec.num_tasks)  # training episodes since the last evaluation
        self.guard = (
            UpdateGuard(self.agent, self.task_names, spec.train.max_consecutive_skips,
                        label=self.label)
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

        ``obs`` [T, D] is the observation the next action is computed from; a resumed
        run compares its first observation with it. The keys are those checkpoints
        have always had, so older checkpoints still load.
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
        """Restore ``state_dict``'s state into this freshly built run (whose replay buffer
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
            self.evaluator = Evaluator(env_spec(self.spec), make_env=self.make_env)
        return self.evaluator

    # -- the phases of a step, in the loop's order ------------------------------------------

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
        self.observation = obs
        return obs

    def warmup_actions(self) -> np.ndarray:
        """[T, A] uniformly random actions of the warm-up, from the seed's own generator."""
        assert self.env is not None
        shape = (self.spec.num_tasks, self.env.action_dim)
        return self.warmup_rng.uniform(
            self.env.action_low, self.env.action_high, size=shape
        ).astype(np.float32)

    def send_actions(self, actions: np.ndarray) -> None:
        """Start this step's T simulations (async workers run them until ``wait_step``)."""
        assert self.env is not None
        self.env.step_async(actions)
        self.step += 1

    def wait_step(self) -> StepResult:
        """The transitions of the step ``send_actions`` started."""
        assert self.env is not None
        return self.env.step_wait()

    def store_step(self, actions: np.ndarray, result: StepResult) -> None:
        """The step's T transitions into the replay buffer; the next observation kept."""
        done = result.terminated.astype(np.float32)  # time-limit ends are not terminal
        self.buffer.add(self.observation, actions, result.reward, result.next_obs, done)
        self.episodes.add(result)
        self.observation = result.obs

    def updates_due(self) -> int:
        """How many updates this step makes: none during the random warm-up or with an
        empty buffer (the first step, when warmup_steps <= 1), then one per step, or
        ``warmup_steps`` at once at the step that ends the warm-up with
        ``train.warmup_burst`` (mtrl's loop; ``mtrl_ntk/update_schedule.py``).

        With ``train.overlap_env_step`` the updates run between ``send_actions`` and
        ``wait_step``, so their batches are drawn from the transitions of steps
        1 .. step - 1 (this step's are not stored yet; the sequential order draws from
        1 .. step). The next step's action comes from the updated policy in both orders.
        """
        if len(self.buffer) == 0:
            return 0
        train = self.spec.train
        return updates_at_step(self.step, train.warmup_steps, train.warmup_burst)

    def sample_batch(self) -> Batch:
        """This update's batch, from the seed's own sampler."""
        batch = self.buffer.sample(self.spec.batch_per_task, self.sample_generator)
        return self.debug_batch(batch)

    def note_update(self) -> None:
        """Tell the guard that the agent's next update is made at this step (host only)."""
        if self.guard is not None:
            self.guard.note_update(self.step)

    def debug_batch(self, batch: Batch) -> Batch:
        """``batch``, with one task's rewards NaN at the steps of the ``debug.nan_at_step`` hook."""
        debug = self.spec.debug
        if debug.nan_at_step is not None and (
            debug.nan_at_step <= self.step < debug.nan_at_step + debug.nan_steps
        ) and (debug.nan_seed is None or debug.nan_seed == self.spec.seed):
            task = self.task_names.index(debug.nan_task) if debug.nan_task else 0
            return poison_batch(batch, task)
        return batch

    def check_updates(self) -> None:
        """Report non-finite updates skipped since the last check (one host sync); raises
        NonFiniteUpdates when too many in a row were skipped."""
        if self.guard is not None:
            self.guard.check(self.step)

    def log_due(self) -> bool:
        return self.step % self.spec.train.log_every == 0

    def log(self) -> None:
        """The TensorBoard window's averages, steps/s (evaluations left out) and ETA."""
        assert self.writer is not None
        now = time.perf_counter()
        window_start, window_step, window_eval_seconds = self._window
        steps_per_second = (self.step - window_step) / max(
            now - window_start - window_eval_seconds, 1e-9
        )
        self.check_updates()
        scalars = metric_scalars(self.log_window.means(), self.task_names)
        self.log_window.reset()
        remaining = self.spec.train.num_steps - self.step
        scalars["time/steps_per_second"] = steps_per_second
        scalars["time/eta_hours"] = remaining / max(steps_per_second, 1e-9) / 3600.0
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, self.step)
        self._window = (now, self.step, 0.0)

    def evaluation_due(self) -> bool:
        return (
            self.step % self.spec.protocol.eval_every_steps == 0
            or self.step == self.spec.train.num_steps
        )

    def record_evaluation(self, success: Mapping[str, float], eval_seconds: float) -> None:
        """Write an evaluation's metrics row, TensorBoard and affinity images: ``success``
        per task, measured in ``eval_seconds`` (left out of the steps/s)."""
        assert self.writer is not None
        written = time.perf_counter()
        self.check_updates()
        spec = self.spec
        row: dict[str, Any] = {
            "step": self.step,
            "transitions": self.step * spec.num_tasks,
            "eval/success_mean": float(np.mean([success[task] for task in self.task_names])),
        }
        row.update({f"eval/success/{task}": success[task] for task in self.task_names})
        row.update(self.episodes.scalars(self.task_names))
        means = self.eval_window.means()
        row.update(metric_scalars(means, self.task_names))
        row["time/elapsed_seconds"] = self.elapsed_seconds - eval_seconds
        row["time/eval_seconds"] = eval_seconds
        if self.guard is not None:
            row["health/skipped_updates"] = self.guard.skips_since_eval
            self.guard.skips_since_eval = 0
        self.episodes.reset()
        self.eval_window.reset()
        append_metrics_row(self.run_dir, row)

        for tag, value in row.items():
            if tag.startswith(("eval/", "train/", "health/")) or tag == "time/eval_seconds":
                self.writer.add_scalar(tag, value, self.step)
        for key, tag in GRAMIAN_IMAGES.items():
            if key in means:
                self.writer.add_image(
                    tag, affinity_image(torch.from_numpy(means[key]), self.task_names), self.step
                )
        self.writer.flush()
        self.last_eval = row
        start, step, seconds = self._window
        self._window = (start, step, seconds + eval_seconds + time.perf_counter() - written)

    def checkpoint_ready(self, stop_requested: bool) -> bool:
        """A checkpoint is due (or a stop signal came) and every episode has just ended."""
        assert self.env is not None
        due = self._checkpoint_due is not None and self.step >= self._checkpoint_due
        if not (due or stop_requested):
            return False
        if not self.env.at_episode_start:
            if due and self.step - self._checkpoint_due == self.env.max_episode_steps:
                print(  # all episodes should have ended together by now
                    f"mtrl_ntk: warning: {self.label}the checkpoint due at step "
                    f"{self._checkpoint_due} finds no episode start to be written at",
                    file=sys.stderr,
                )
            return False
        return True

    def write_checkpoint(self) -> Path:
        """Write this step's checkpoint (``checkpoint_ready``); returns its path."""
        assert self.writer is not None
        self.check_updates()  # a seed that must stop for non-finite updates stops first
        self.writer.flush()  # TensorBoard up to this step is on disk before the checkpoint
        started = time.perf_counter()
        path = self.checkpoints.save(
            self.step, self.state_dict(self.observation), self.buffer, rows_added=self.step,
            finite_keys=MUST_BE_FINITE,
        )
        self.checkpoints.seconds_this_session += time.perf_counter() - started
        every = self.spec.train.checkpoint_every
        self._checkpoint_due = (self.step // every + 1) * every if every else None
        return path

    # -- the end --------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """The result of the finished run, also written to ``result.json``."""
        self.check_updates()
        wall_seconds = self.elapsed_seconds
        result = {
            "status": FINISHED,
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
        write_result(self.run_dir, result)
        return result

    def stop(self, reason: str) -> dict[str, Any]:
        """Stop this seed for good (its updates stay non-finite): ``result.json`` says why
        and names the last checkpoint, which holds no non-finite state."""
        paths = self.checkpoints.checkpoint_paths()
        result = {
            "status": STOPPED,
            "step": self.step,
            "reason": reason,
            "last_checkpoint": paths[-1].name if paths else None,
            "skipped_updates": None if self.guard is None else self.guard.total_skips,
        }
        write_result(self.run_dir, result)
        self.close()
        return result

    def close(self) -> None:
        """Close loggers and end environment workers. Safe after a partial construction."""
        if self.writer is not None:
            self.writer.close()
        if self.evaluator is not None:
            self.evaluator.close()
        if self.env is not None:
            self.env.close()


@contextlib.contextmanager
def open_seed_runs(
    specs: Sequence[RunSpec],
    run_dirs: Sequence[Path],
    checkpoints: Sequence[Checkpoint | None],
) -> Iterator[list[SeedRun]]:
    """The seed runs of one loop, closed (with their worker processes) on exit.

    Seed k's run depends on seed k alone: the global generators are seeded with k
    before its run is built (network initialisation as in the seed's single run). A
    group's envs live in ``env.seed_workers`` worker processes (``EnvWorkerPool``);
    a single run's in this process.
    """
    first = specs[0]
    alone = len(specs) == 1
    workers = 0 if alone else first.seed_worker_count(len(specs), os.cpu_count())
    runs: list[SeedRun] = []
    with contextlib.ExitStack() as stack:
        make_env: MakeEnv = make_multitask_env
        if workers:
            make_env = stack.enter_context(EnvWorkerPool(workers)).make_env
        try:
            for spec, run_dir, checkpoint in zip(specs, run_dirs, checkpoints, strict=True):
                seed_everything(spec.seed)
                runs.append(SeedRun(
                    spec, run_dir, checkpoint,
                    compile_agent=alone and spec.train.compile,
                    label="" if alone else f"seed {spec.seed}: ",
                    make_env=make_env,
                ))
            yield runs
        finally:
            for run in runs:
                run.close()
