"""``seed=A..B`` as one process: S runs trained side by side, with one update for all.

``python run_mt10.py combiner=ntkmtl seed=0..9`` composes one config with
``seeds: [0, ..., 9]`` (``mtrl_ntk.config.expand_integer_ranges``). Each seed is
an ordinary run: a ``Trainer`` with its own environments, replay buffer, agent,
generators, loggers and run directory ``…/seed<k>/`` (config, provenance,
metrics.jsonl, TensorBoard, checkpoints, result.json, exactly what a single run
writes; its ``config.yaml`` is the single run's, ``seed: k`` and ``seeds: null``).
The group drives them in lock step and replaces their per-seed work where it can
be batched:

- the policy's actions for all S x T environments come from one call
  (``SeedGroupSAC.act``), the warm-up's random actions from each seed's generator;
- the update of all S agents is one vmapped update (``SeedGroupSAC.update``) on
  the seeds' own batches, compiled as one graph with ``train.compile=true``;
- the metrics of all seeds go into their windows with one multi-tensor addition.

Seed k's run depends on seed k alone: its environments, goals, warm-up actions,
replay samples, policy noise and network initialisation come from seed k's
generators (the global ones are seeded with k before its trainer is built), so it
matches seed k trained alone to float32 rounding (batched kernels round
differently), and a non-finite update of seed k skips that seed's update only.

Runs that finished before are skipped; ``resume=true`` continues the others
from one common step: every seed's newest complete checkpoint, or, when a kill
left the seeds at different steps (one interval apart: checkpoints are written
seed after seed), the newest step all of them hold. A stop signal checkpoints
every seed, then stops the group. Logs, evaluations and checkpoints happen at
the same steps for every seed; evaluations run seed after seed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mtrl_ntk.agent.seeds import SeedGroupSAC
from mtrl_ntk.checkpoint import Checkpoint, CheckpointManager
from mtrl_ntk.config import ConfigError, RunSpec, build_run_spec, seed_list
from mtrl_ntk.envs import EnvWorkerError, EnvWorkerPool, evaluate_together, make_multitask_env
from mtrl_ntk.faults import RunInterrupted, StopSignals
from mtrl_ntk.runtime import tune_cpu_allocator
from mtrl_ntk.train import (
    Trainer,
    _check_resumed_config,
    _previous_result,
    _resume_hint,
    add_per_seed,
    kill_if_due,
    prepare_run_directory,
    progress_bar,
    seed_everything,
)
from mtrl_ntk.update_schedule import updates_at_step


def seed_config(cfg: DictConfig, seed: int) -> DictConfig:
    """The config of seed ``seed``'s run: the group's, with ``seed: <seed>`` and ``seeds: null``."""
    single = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(single, False)
    single.seed = seed
    single.seeds = None
    return single


def seed_directory(run_dir: Path, first_seed: int, seed: int) -> Path:
    """Seed ``seed``'s run directory: ``run_dir`` is the first seed's (Hydra's ``seed${seed}``)."""
    if run_dir.name != f"seed{first_seed}":
        return run_dir / f"seed{seed}"  # a run directory the user named: the seeds inside it
    return run_dir.parent / f"seed{seed}"


def common_checkpoints(
    run_dirs: Sequence[Path], seeds: Sequence[int]
) -> list[Checkpoint | None]:
    """Every seed's checkpoint to resume from, all at one step (see the module doc)."""
    latest = [CheckpointManager(run_dir).latest() for run_dir in run_dirs]
    steps = [0 if checkpoint is None else checkpoint.step for checkpoint in latest]
    target = min(steps)
    if target == 0:  # a seed without a checkpoint: all from scratch, or none
        if max(steps) == 0:
            return latest
        missing = next(seed for seed, step in zip(seeds, steps, strict=True) if step == 0)
        raise _no_common_step(seeds, steps, missing, target)
    chosen: list[Checkpoint | None] = []
    for seed, run_dir, checkpoint in zip(seeds, run_dirs, latest, strict=True):
        if checkpoint is not None and checkpoint.step > target:
            checkpoint = CheckpointManager(run_dir).latest(at_most=target)
        if checkpoint is None or checkpoint.step != target:
            raise _no_common_step(seeds, steps, seed, target)
        chosen.append(checkpoint)
    return chosen


def _no_common_step(
    seeds: Sequence[int], steps: Sequence[int], seed: int, target: int
) -> ConfigError:
    holders = [f"seed {s} at step {step}" for s, step in zip(seeds, steps, strict=True)]
    return ConfigError(
        f"the seeds of this group cannot resume from one step (their newest checkpoints: "
        f"{', '.join(holders)}; seed {seed} has none at step {target}); resume them one "
        "by one with seed=<k> resume=true, or as separate jobs with seed_group=false"
    )


def in_workers(pool: EnvWorkerPool) -> Callable[..., Any]:
    """``make_multitask_env`` building its env in ``pool``'s workers, in-process there
    (``vector_strategy="sync"``: a worker steps its seeds' envs itself)."""

    def make_env(
        backend: str, benchmark: str, protocol: Any, seed: int, vector_strategy: str = "sync",
        max_episode_steps: int | None = None, *, for_evaluation: bool = False,
    ) -> Any:
        return pool.make_env(
            backend, benchmark, protocol, seed, "sync", max_episode_steps,
            for_evaluation=for_evaluation,
        )

    return make_env


class SeedGroupTrainer:
    """The loop of S seeds' trainers in lock step, with one update for all (module doc)."""

    def __init__(self, trainers: Sequence[Trainer], resume_hint: str) -> None:
        self.trainers = list(trainers)
        self.spec = self.trainers[0].spec
        self.resume_hint = resume_hint
        self.group = SeedGroupSAC(
            [trainer.agent for trainer in self.trainers], compile=self.spec.train.compile
        )

    @property
    def step(self) -> int:
        return self.trainers[0].step

    def run(self) -> list[dict[str, Any]]:
        """Train every seed for ``train.num_steps`` steps; returns their results."""
        train = self.spec.train
        seeds = ",".join(str(trainer.spec.seed) for trainer in self.trainers)
        progress = progress_bar(
            self.spec, self.step, desc=f"{self.spec.combiner_name} seeds {seeds}"
        )
        stop = StopSignals()
        stop.install()
        try:
            observations = [trainer.begin() for trainer in self.trainers]
            while self.step < train.num_steps:
                actions = self._actions(observations)
                for trainer, seed_actions in zip(self.trainers, actions, strict=True):
                    trainer.send_actions(seed_actions)
                if train.overlap_env_step:
                    self._maybe_update()
                observations = [
                    trainer.store_step(obs, seed_actions)
                    for trainer, obs, seed_actions in zip(
                        self.trainers, observations, actions, strict=True
                    )
                ]
                if not train.overlap_env_step:
                    self._maybe_update()
                progress.update(1)
                evaluations = self._evaluations()
                paths = [
                    trainer.end_step(obs, stop, alone=False, evaluation=evaluation)
                    for trainer, obs, evaluation in zip(
                        self.trainers, observations, evaluations, strict=True
                    )
                ]
                self._stop_if_requested(stop, paths)
                kill_if_due(self.spec, self.step)
        except EnvWorkerError as error:
            raise self.trainers[0].worker_stopped(error) from error
        finally:
            stop.uninstall()
            progress.close()
        return [trainer._finish(wall_seconds=trainer.elapsed_seconds) for trainer in self.trainers]

    def _actions(self, observations: list[np.ndarray]) -> list[np.ndarray]:
        """[T, A] per seed: each seed's warm-up actions, then one policy call for all seeds."""
        if self.step < self.spec.train.warmup_steps:
            return [
                trainer._actions(obs)
                for trainer, obs in zip(self.trainers, observations, strict=True)
            ]
        return list(self._policy(np.stack(observations), deterministic=False))

    def _policy(self, observations: np.ndarray, deterministic: bool) -> np.ndarray:
        """Every seed's actions [S, T, A] for observations [S, T, D], in one call."""
        obs = torch.as_tensor(observations, device=self.spec.device)
        return self.group.act(obs, deterministic=deterministic).cpu().numpy()

    def _evaluations(self) -> list[tuple[dict[str, float], float] | None]:
        """Every seed's evaluation when one is due (None otherwise), run side by side: one
        deterministic policy call per step for all seeds (``evaluate_together``)."""
        if not self.trainers[0].evaluation_due():
            return [None] * len(self.trainers)
        evaluators = [trainer.ensure_evaluator() for trainer in self.trainers]
        started = time.perf_counter()
        successes = evaluate_together(
            evaluators, lambda obs: self._policy(obs, deterministic=True)
        )
        seconds = time.perf_counter() - started
        return [(success, seconds) for success in successes]

    def _maybe_update(self) -> None:
        """Every seed's update of this step, as one (see ``Trainer._maybe_update``)."""
        first = self.trainers[0]
        train = self.spec.train
        if len(first.buffer) == 0:
            return
        for _ in range(updates_at_step(self.step, train.warmup_steps, train.warmup_burst)):
            self._update_once()

    def _update_once(self) -> None:
        batches = []
        for trainer in self.trainers:
            batch = trainer.buffer.sample(self.spec.batch_per_task, trainer.sample_generator)
            batches.append(trainer.debug_batch(batch))
            if trainer.guard is not None:
                trainer.guard.note_update(trainer.step)
        metrics = self.group.update(batches)
        add_per_seed([trainer.log_window for trainer in self.trainers], metrics)
        add_per_seed([trainer.eval_window for trainer in self.trainers], metrics)

    def _stop_if_requested(self, stop: StopSignals, paths: list[Path | None]) -> None:
        """After a stop signal, once every seed wrote its checkpoint: stop the group."""
        if stop.requested is None or any(path is None for path in paths):
            return
        if self.step < self.spec.train.num_steps:
            name = signal.Signals(stop.requested).name
            raise RunInterrupted(
                f"interrupted by {name} at step {self.step}; all {len(self.trainers)} seeds of "
                f"the group checkpointed ({paths[0].name}). Resume with: {self.resume_hint}",
                stop.requested,
            )


def train_seed_group(
    cfg: DictConfig, run_dir: Path, argv: Sequence[str]
) -> dict[str, Any]:
    """Train the seeds of ``cfg.seeds`` in one process (see the module doc); returns
    ``{"status", "seeds": {seed: result}, "eval/success_mean"}`` (the mean over seeds)."""
    seeds = seed_list(cfg)
    assert seeds is not None
    configs = [seed_config(cfg, seed) for seed in seeds]
    specs = [build_run_spec(config) for config in configs]  # every seed's errors before any work
    run_dirs = [seed_directory(run_dir, seeds[0], seed) for seed in seeds]
    results: dict[int, dict[str, Any]] = {}
    pending: list[int] = []
    for index, (seed, spec, seed_dir) in enumerate(zip(seeds, specs, run_dirs, strict=True)):
        previous = _previous_result(seed_dir, resume=spec.resume)
        if previous is not None:
            print(f"{seed_dir} already holds a finished run: skipped", file=sys.stderr)
            results[seed] = previous
        else:
            pending.append(index)
    if pending:
        checkpoints: list[Checkpoint | None] = [None] * len(pending)
        if specs[0].resume:
            for index in pending:
                _check_resumed_config(run_dirs[index], configs[index])
            checkpoints = common_checkpoints(
                [run_dirs[index] for index in pending], [seeds[index] for index in pending]
            )
        hint = _resume_hint(argv)
        new_results = _train_pending(
            [configs[i] for i in pending], [specs[i] for i in pending],
            [run_dirs[i] for i in pending], checkpoints, argv, hint,
        )
        results.update({seeds[i]: result for i, result in zip(pending, new_results, strict=True)})
    successes = [results[seed].get("eval/success_mean") for seed in seeds]
    finite = [value for value in successes if value is not None]
    return {
        "status": "finished",
        "seeds": {seed: results[seed] for seed in seeds},
        "eval/success_mean": float(np.mean(finite)) if finite else float("nan"),
    }


def _train_pending(
    configs: list[DictConfig],
    specs: list[RunSpec],
    run_dirs: list[Path],
    checkpoints: list[Checkpoint | None],
    argv: Sequence[str],
    resume_hint: str,
) -> list[dict[str, Any]]:
    for config, spec, seed_dir, checkpoint in zip(
        configs, specs, run_dirs, checkpoints, strict=True
    ):
        prepare_run_directory(seed_dir, config, argv, spec.resume, checkpoint)
    tune_cpu_allocator()
    first = specs[0]
    workers = first.seed_worker_count(len(specs), os.cpu_count())
    where = f"{workers} worker process{'es' * (workers > 1)}" if workers else "this process"
    print(
        f"mtrl_ntk: {first.combiner_name} on {first.benchmark} ({first.num_tasks} tasks, protocol "
        f"{first.protocol.name}, arch {first.agent.arch}), seeds "
        f"{', '.join(str(spec.seed) for spec in specs)} side by side, device {first.device}, "
        f"envs in {where}, "
        f"{first.train.num_steps:,} steps -> {run_dirs[0].parent}",
        file=sys.stderr,
    )
    trainers: list[Trainer] = []
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        make_env: Callable[..., Any] = make_multitask_env
        if workers:
            make_env = in_workers(stack.enter_context(EnvWorkerPool(workers)))
        try:
            for spec, seed_dir, checkpoint in zip(specs, run_dirs, checkpoints, strict=True):
                seed_everything(spec.seed)  # network initialisation as in the seed's single run
                trainers.append(
                    Trainer(spec, seed_dir, checkpoint=checkpoint, resume_hint=resume_hint,
                            in_group=True, make_env=make_env)
                )
            results = SeedGroupTrainer(trainers, resume_hint).run()
        finally:
            for trainer in trainers:
                trainer.close()
    print(
        f"mtrl_ntk: {len(trainers)} seeds finished in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    return results
