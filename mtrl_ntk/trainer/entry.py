"""The entry point: one training job from a composed config, for one seed or a row of seeds.

``python run_mt10.py combiner=ntkmtl seed=0`` trains one run; ``seed=0..9`` composes
one config with ``seeds: [0, ..., 9]`` (``mtrl_ntk.config.expand_integer_ranges``)
and trains the ten seeds side by side in this process, each in its own run directory
``…/seed<k>/`` with exactly what a single run writes (its ``config.yaml`` is the single
run's, ``seed: k`` and ``seeds: null``); ``seed=k..k`` is a single run. Either way
it is the one loop (mtrl_ntk/trainer/loop.py) over S >= 1 seed runs.

Seed k's run depends on seed k alone: its environments, goals, warm-up actions,
replay samples, policy noise and network initialisation come from seed k's
generators, so in a group it matches seed k trained alone to float32 rounding
(batched kernels round differently), and a non-finite update of seed k skips that
seed's update only.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mtrl_ntk.checkpoint import Checkpoint
from mtrl_ntk.config import RunSpec, build_run_spec, seed_list
from mtrl_ntk.rundir import FINISHED, seed_directory
from mtrl_ntk.runtime import tune_cpu_allocator
from mtrl_ntk.trainer.loop import LoopObserver, TrainingLoop
from mtrl_ntk.trainer.resume import (
    check_resumed_config,
    common_checkpoints,
    prepare_run_directory,
    previous_result,
    resume_hint,
)
from mtrl_ntk.trainer.seed_run import open_seed_runs


def seed_config(cfg: DictConfig, seed: Any) -> DictConfig:
    """The config of seed ``seed``'s run: the job's, with ``seed: <seed>`` and ``seeds: null``."""
    single = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(single, False)
    single.seed = seed
    single.seeds = None
    return single


def train(
    cfg: DictConfig, run_dir: Path | str | None = None, argv: Sequence[str] | None = None,
    observers: Sequence[LoopObserver] = (),
) -> dict[str, Any]:
    """Run one training job from a composed config; returns the final result.

    The config is validated (``build_run_spec``, every seed's) before any environment
    starts; invalid settings raise :class:`~mtrl_ntk.errors.ConfigError`. ``run_dir``
    defaults to the current directory; ``argv`` is recorded in ``provenance.json``.
    Finished runs are skipped and unfinished ones resumed as
    ``mtrl_ntk.trainer.resume`` says. A deliberate stop raises
    :class:`~mtrl_ntk.errors.RunStopped`. One seed returns its run's result; a group
    ``{"status", "seeds": {seed: result}, "eval/success_mean"}`` (the mean over seeds).
    ``observers`` watch the loop (``LoopObserver``).
    """
    run_dir = Path.cwd() if run_dir is None else Path(run_dir)
    argv = list(sys.argv if argv is None else argv)
    seeds = seed_list(cfg) or [cfg.get("seed")]  # checked with the rest by build_run_spec
    configs = [seed_config(cfg, seed) for seed in seeds]
    specs = [build_run_spec(config) for config in configs]  # every seed's errors before any work
    if len(seeds) == 1:
        run_dirs = [run_dir]
    else:
        run_dirs = [seed_directory(run_dir, seeds[0], seed) for seed in seeds]
    results: dict[int, dict[str, Any]] = {}
    pending: list[int] = []
    for index, (seed, spec, seed_dir) in enumerate(zip(seeds, specs, run_dirs, strict=True)):
        previous = previous_result(seed_dir, resume=spec.resume)
        if previous is not None:
            print(f"{seed_dir} already holds a finished run: skipped", file=sys.stderr)
            results[seed] = previous
        else:
            pending.append(index)
    if pending:
        checkpoints: list[Checkpoint | None] = [None] * len(pending)
        if specs[0].resume:
            for index in pending:
                check_resumed_config(run_dirs[index], configs[index])
            checkpoints = common_checkpoints(
                [run_dirs[index] for index in pending], [seeds[index] for index in pending]
            )
        for index, checkpoint in zip(pending, checkpoints, strict=True):
            prepare_run_directory(run_dirs[index], configs[index], argv, specs[index].resume,
                                  checkpoint)
        results.update(_train(
            [specs[i] for i in pending], [run_dirs[i] for i in pending], checkpoints,
            resume_hint(argv), observers,
        ))
    if len(seeds) == 1:
        return results[seeds[0]]
    successes = [results[seed].get("eval/success_mean") for seed in seeds]
    finite = [value for value in successes if value is not None]
    return {
        "status": FINISHED,
        "seeds": {seed: results[seed] for seed in seeds},
        "eval/success_mean": float(np.mean(finite)) if finite else float("nan"),
    }


def _train(
    specs: list[RunSpec], run_dirs: list[Path], checkpoints: list[Checkpoint | None],
    hint: str, observers: Sequence[LoopObserver],
) -> dict[int, dict[str, Any]]:
    tune_cpu_allocator()  # keep freed tensor memory: no page faults per update (runtime.py)
    print(_banner(specs, run_dirs), file=sys.stderr)
    started = time.perf_counter()
    with open_seed_runs(specs, run_dirs, checkpoints) as runs:
        results = TrainingLoop(runs, hint, observers).run()
    if len(specs) > 1:
        print(f"mtrl_ntk: {len(specs)} seeds finished in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    return results


def _banner(specs: Sequence[RunSpec], run_dirs: Sequence[Path]) -> str:
    first = specs[0]
    temperature = (
        "one temperature per task" if first.agent.disentangled_alpha else "one temperature"
    )
    if len(specs) == 1:
        who, where = f"seed {first.seed}", run_dirs[0]
    else:
        workers = first.seed_worker_count(len(specs), os.cpu_count())
        seeds = ", ".join(str(spec.seed) for spec in specs)
        who = f"seeds {seeds} side by side"
        if workers:
            who += f", envs in {workers} worker process{'es' * (workers > 1)}"
        where = run_dirs[0].parent
    return (
        f"mtrl_ntk: {first.combiner_name} on {first.benchmark} ({first.num_tasks} tasks, "
        f"protocol {first.protocol.name}, arch {first.agent.arch}, {temperature}), {who}, "
        f"device {first.device}, {first.train.num_steps:,} steps -> {where}"
    )
