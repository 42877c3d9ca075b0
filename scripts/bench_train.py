"""Steps per second of the real training loop, with the time split by phase.

Composes the Hydra config exactly as ``run_mt10.py`` does (``configs/``, the
preset as ``experiment=<preset>``, then any extra ``key=value`` overrides),
builds the seed runs and the loop as training does (``mtrl_ntk.trainer``:
``open_seed_runs``, ``TrainingLoop``), and runs the loop for a short warm-up of
random actions (``train.warmup_steps``) followed by ``--steps`` update steps.
Nothing is patched: the clock is one of the loop's observers
(``mtrl_ntk.trainer.LoopObserver``), told when every step and phase starts and ends
(``torch.cuda.synchronize()`` at every phase boundary on CUDA, so asynchronous GPU
work is charged to the phase that launched it). The loop's phases, for all seeds of
a step at once:

  act          the actions: warm-up draws, or one policy call for all seeds
  env          environment stepping (sending the actions, then collecting the step)
  buffer_add   writing the transitions into the replay buffers
  sample       replay sampling
  guard        telling the non-finite guards which step each update is
  update       one SAC update (of all seeds: one vmapped call)
  metrics      on-device metric sums (the log/eval windows)
  log          TensorBoard logging every ``train.log_every`` steps
  eval         evaluations (the run always ends with one)
  checkpoint   checkpoints written
  other        the rest of the loop (tqdm, episode statistics, Python)

Only the steps that contain an update are measured (after ``--skip-steps``
updates that pay one-time costs). The evaluation environment is built before
the clock starts, as training builds it (``SeedRun.ensure_evaluator``, on the
configured backend). The projection to ``--project-steps`` steps adds the per-call
cost of evaluation, logging and checkpoints at the configured cadence to the
per-step cost of the rest.

glibc's malloc is tuned first (``mtrl_ntk.runtime.tune_cpu_allocator``: no
page faults for the engine's large temporary tensors) unless
``--no-tune-allocator``.

    python scripts/bench_train.py --preset smoke --steps 100
    python scripts/bench_train.py --preset paper --steps 300 --combiner ntkmtl \\
        combiner.num_minibatches=4 --json
    python scripts/bench_train.py --preset paper --device cuda --json-out bench.json
    python scripts/bench_train.py --preset smoke --seeds 10      # a seed group (seed=0..9)

``--seeds S`` measures the loop over S seeds: S seed runs in lock step, one policy
call and one vmapped update for all of them (``--seeds 1`` is a single run, as
``seed=k..k`` is; ``update`` is that one call, the other phases every seed's). Steps/s are
the group's (every seed advanced that many steps); ``seed_steps_per_second`` is S
times it, and the projection is the time of all S seeds' runs.

``--json`` prints one JSON object on the last line of stdout instead of the table.
"""

from __future__ import annotations

import os

# As run_mt10.py: spinning OpenMP waits make torch's CPU kernels far slower on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mtrl_ntk.config import (
    ConfigError,
    build_run_spec,
    check_group_choices,
    check_override_keys,
)
from mtrl_ntk.runtime import tune_cpu_allocator

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
PRESETS = ("smoke", "paper")
PHASES = (
    "act", "env", "buffer_add", "sample", "update", "guard", "metrics", "log", "eval",
    "checkpoint", "other",
)
# The loop's phases (mtrl_ntk.trainer.PHASES) -> this table's.
_PHASE_OF = {"env_send": "env", "env_wait": "env"}
# Phases that happen at a cadence, not every step: the projection amortises them per call.
_PERIODIC = ("log", "eval", "checkpoint")
DEFAULT_WARMUP = {"smoke": 20, "paper": 20}
DEFAULT_STEPS = {"smoke": 100, "paper": 300}


class PhaseClock:
    """Exclusive wall time and call counts per phase, inside the measured window only.

    A loop observer (``mtrl_ntk.trainer.LoopObserver``): the loop reports every step
    and phase. A phase started while another runs pauses the outer one's clock, so
    each second is charged to exactly one phase. Sending a step's actions and
    collecting it are one "env" call.
    """

    def __init__(self, device: torch.device, synchronize: bool) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.calls = dict.fromkeys(PHASES, 0)
        self.present = dict.fromkeys(PHASES, True)  # the loop reports every phase
        self.measuring = False
        self.window_start: float | None = None
        self.window_end: float | None = None
        self.measured_steps = 0
        self._stack: list[list[Any]] = []  # [phase, running since, counted]
        self._synchronize = synchronize and device.type == "cuda"
        self._device = device
        self.first_measured_step = 1  # the 1-based step whose start opens the window
        self._open: list[Any] = []  # the phases the loop has started and not yet ended

    def sync(self) -> None:
        if self._synchronize:
            torch.cuda.synchronize(self._device)

    @contextlib.contextmanager
    def phase(self, name: str, count: bool = True) -> Iterator[None]:
        if not self.measuring:
            yield
            return
        self.sync()
        now = time.perf_counter()
        if self._stack:  # pause the caller's phase
            outer = self._stack[-1]
            self.seconds[outer[0]] += now - outer[1]
        counted = count and not any(entry[0] == name and entry[2] for entry in self._stack)
        if counted:
            self.calls[name] += 1
        self._stack.append([name, now, counted])
        try:
            yield
        finally:
            self.sync()
            now = time.perf_counter()
            self.seconds[name] += now - self._stack.pop()[1]
            if self._stack:  # resume the caller's phase
                self._stack[-1][1] = now

    # -- mtrl_ntk.trainer.LoopObserver ---------------------------------------------------

    def step_started(self, step: int) -> None:
        """Open the window at the first measured step; count the steps in it."""
        if not self.measuring and self.window_start is None and step >= self.first_measured_step:
            self.start_window()
        if self.measuring:
            self.measured_steps += 1

    def phase_started(self, phase: str) -> None:
        name = _PHASE_OF.get(phase, phase)
        self.present[name] = True
        self._open.append(self.phase(name, count=phase != "env_send"))
        self._open[-1].__enter__()

    def phase_ended(self, phase: str) -> None:
        self._open.pop().__exit__(None, None, None)

    def start_window(self) -> None:
        self.sync()
        self.window_start = time.perf_counter()
        self.measuring = True

    def stop_window(self) -> None:
        if self.measuring:
            self.sync()
            self.window_end = time.perf_counter()
            self.measuring = False


def compose_config(preset: str, overrides: list[str]) -> DictConfig:
    """The config run_mt10.py would compose for ``experiment=<preset> <overrides>``."""
    arguments = [f"experiment={preset}", *overrides]
    check_group_choices(arguments, CONFIG_DIR)
    check_override_keys(arguments, CONFIG_DIR)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=arguments)


def measure(
    preset: str,
    overrides: list[str],
    steps: int,
    warmup_steps: int,
    skip_steps: int,
    project_steps: int,
    sync_timers: bool,
    run_dir: Path | None,
    seeds: int | None = None,
) -> dict[str, Any]:
    """Run the loop and return the breakdown (see the module docstring)."""
    from mtrl_ntk.trainer import TrainingLoop, open_seed_runs, seed_config

    if seeds == 1:
        seeds = None  # as run_mt10.py runs seed=k..k: a single run, not a group of one

    cfg = compose_config(preset, overrides)
    # Cadences of a real run, for the projection, before this benchmark shortens them.
    log_every = int(cfg.train.log_every)
    checkpoint_every = int(OmegaConf.select(cfg, "train.checkpoint_every", default=0) or 0)
    num_steps = max(warmup_steps, 1) + skip_steps + steps - 1
    OmegaConf.update(cfg, "train.warmup_steps", warmup_steps)
    OmegaConf.update(cfg, "train.num_steps", num_steps)
    OmegaConf.update(cfg, "train.progress_bar", False)
    # Log (and checkpoint) inside the window, so that their costs are measured.
    OmegaConf.update(cfg, "train.log_every", max(1, min(log_every, steps // 2)))
    if checkpoint_every:
        OmegaConf.update(cfg, "train.checkpoint_every", max(1, min(checkpoint_every, steps // 2)))
    seed_list = [int(cfg.seed)] if seeds is None else list(range(cfg.seed, cfg.seed + seeds))
    specs = [build_run_spec(seed_config(cfg, seed)) for seed in seed_list]
    spec = specs[0]

    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train_")))
        run_dir.mkdir(parents=True, exist_ok=True)
        run_dirs = [run_dir] if seeds is None else [run_dir / f"seed{seed}" for seed in seed_list]
        clock = PhaseClock(spec.device, sync_timers)
        clock.first_measured_step = max(warmup_steps, 1) + skip_steps
        setup_started = time.perf_counter()
        with open_seed_runs(specs, run_dirs, [None] * len(specs)) as runs:
            evaluator_started = time.perf_counter()
            for run in runs:  # the evaluation envs the first evaluation would build
                run.ensure_evaluator()
            evaluator_seconds = time.perf_counter() - evaluator_started
            loop = TrainingLoop(runs, resume_hint="", observers=[clock])
            setup_seconds = time.perf_counter() - setup_started
            if spec.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(spec.device)
            run_started = time.perf_counter()
            loop.run()
            clock.stop_window()
            run_seconds = time.perf_counter() - run_started

    result = summarise(
        clock, spec, cfg, preset, overrides,
        log_every=log_every, checkpoint_every=checkpoint_every, project_steps=project_steps,
        setup_seconds=setup_seconds, evaluator_seconds=evaluator_seconds, run_seconds=run_seconds,
    )
    result["seeds"] = 1 if seeds is None else seeds
    result["seed_steps_per_second"] = result["seeds"] * result["steps_per_second"]
    return result


def summarise(
    clock: PhaseClock,
    spec: Any,
    cfg: DictConfig,
    preset: str,
    overrides: list[str],
    *,
    log_every: int,
    checkpoint_every: int,
    project_steps: int,
    setup_seconds: float,
    evaluator_seconds: float,
    run_seconds: float,
) -> dict[str, Any]:
    if clock.window_start is None or clock.window_end is None or clock.measured_steps == 0:
        raise RuntimeError("no update step was measured (is --steps >= 1?)")
    wall = clock.window_end - clock.window_start
    steps = clock.measured_steps
    timed = sum(clock.seconds[name] for name in PHASES if name != "other")
    clock.seconds["other"] = max(wall - timed, 0.0)
    clock.calls["other"] = steps
    phases = {
        name: {
            "seconds": clock.seconds[name],
            "calls": clock.calls[name],
            "ms_per_step": 1e3 * clock.seconds[name] / steps,
            "ms_per_call": 1e3 * clock.seconds[name] / max(clock.calls[name], 1),
            "fraction": clock.seconds[name] / wall if wall > 0 else 0.0,
            "present": clock.present[name],
        }
        for name in PHASES
    }
    periodic_seconds = sum(clock.seconds[name] for name in _PERIODIC)
    per_step_seconds = (wall - periodic_seconds) / steps  # everything but the periodic phases

    # Projection: per-step cost x steps + each periodic phase's per-call cost x its calls.
    eval_every = spec.protocol.eval_every_steps
    cadences = {"eval": eval_every, "log": log_every, "checkpoint": checkpoint_every}
    projected = per_step_seconds * project_steps
    projection_notes = {}
    for name in _PERIODIC:
        calls = clock.calls[name]
        if cadences[name] and calls:
            per_call = clock.seconds[name] / calls
            projected += per_call * project_steps / cadences[name]
            projection_notes[name] = f"{per_call:.3f} s per call every {cadences[name]} steps"
        else:  # no cadence or no call: amortised as measured in the window
            projected += clock.seconds[name] / steps * project_steps
            projection_notes[name] = (
                "as measured per step" if clock.present[name] else "absent in this run"
            )

    device = spec.device
    agent = spec.agent
    return {
        "preset": preset,
        "overrides": overrides,
        "combiner": spec.combiner_name,
        "combiner_params": spec.combiner_params,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "num_tasks": spec.num_tasks,
        "batch_size": spec.train.batch_size,
        "hidden_dim": agent.hidden_dim,
        "num_layers": agent.num_layers,
        "arch": agent.arch,
        "vector_strategy": spec.vector_strategy,
        "compile": bool(OmegaConf.select(cfg, "train.compile", default=False)),
        "warmup_steps": spec.train.warmup_steps,
        "measured_steps": steps,
        "wall_seconds": wall,
        "steps_per_second": steps / wall,
        "steps_per_second_excluding_periodic": 1.0 / per_step_seconds,
        "update_ms": phases["update"]["ms_per_call"],
        "phases": phases,
        "setup_seconds": setup_seconds,
        "evaluator_setup_seconds": evaluator_seconds,
        "run_seconds": run_seconds,
        "peak_memory_bytes": (
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ),
        "projection": {
            "steps": project_steps,
            "hours": projected / 3600.0,
            "eval_every_steps": eval_every,
            "log_every_steps": log_every,
            "checkpoint_every_steps": checkpoint_every,
            "notes": projection_notes,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['preset']} preset, {result['combiner']} {result['combiner_params'] or ''}, "
        f"batch {result['batch_size']}, {result['num_layers']}x{result['hidden_dim']} "
        f"{result['arch']}, env {result['vector_strategy']}, on {result['device']} "
        f"({result['device_name']}, {result['threads']} threads, {result['cpu_count']} cores, "
        f"allocator {'tuned' if result['tuned_allocator'] else 'default'})"
    )
    seeds = result["seeds"]
    group = f" of a {seeds}-seed group ({result['seed_steps_per_second']:.2f} seed-steps/s)"
    print(
        f"{result['measured_steps']} update steps in {result['wall_seconds']:.2f} s: "
        f"{result['steps_per_second']:.2f} steps/s{group if seeds > 1 else ''} "
        f"({result['steps_per_second_excluding_periodic']:.2f} without eval/log/checkpoint)"
    )
    print(f"{'phase':<11} {'ms/step':>9} {'share':>6} {'calls':>6} {'ms/call':>9}")
    for name, phase in result["phases"].items():
        absent = "" if phase["present"] else "  (absent)"
        print(
            f"{name:<11} {phase['ms_per_step']:>9.2f} {100 * phase['fraction']:>5.1f}% "
            f"{phase['calls']:>6} {phase['ms_per_call']:>9.2f}{absent}"
        )
    projection = result["projection"]
    print(
        f"projected {projection['steps']:,} steps: {projection['hours']:.2f} h "
        f"(eval every {projection['eval_every_steps']}, log every "
        f"{projection['log_every_steps']}, checkpoint every "
        f"{projection['checkpoint_every_steps'] or 'never'} steps)"
    )
    if result["peak_memory_bytes"] is not None:
        print(f"peak GPU memory: {result['peak_memory_bytes'] / 2**30:.2f} GiB")


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_json(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (key=value)")
    parser.add_argument("--preset", choices=PRESETS, default="smoke",
                        help="experiment preset: smoke (2x32, batch 80) or paper (3x400, 1280)")
    parser.add_argument("--combiner", default=None, help="shortcut for combiner=<name>")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured update steps (smoke 100, paper 300)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="random-action steps before the first update (train.warmup_steps; "
                        "default 20)")
    parser.add_argument("--skip-steps", type=int, default=3,
                        help="update steps run before the clock starts (one-time costs)")
    parser.add_argument("--device", default=None, help="device override: cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--project-steps", type=int, default=2_000_000,
                        help="steps of the projected full run (2M = the paper's MT10 run)")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="keep glibc's default malloc settings (see mtrl_ntk/runtime.py)")
    parser.add_argument("--no-sync-timers", action="store_true",
                        help="do not torch.cuda.synchronize around phases (overlap stays)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="keep the run's files here (default: a temporary directory)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="measure a seed group of S seeds (seed .. seed+S-1) in one process")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    steps = DEFAULT_STEPS[args.preset] if args.steps is None else args.steps
    warmup = DEFAULT_WARMUP[args.preset] if args.warmup_steps is None else args.warmup_steps
    if steps < 1 or warmup < 0 or args.skip_steps < 0 or args.project_steps < 1:
        parser.error("need --steps >= 1, --warmup-steps >= 0, --skip-steps >= 0")
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    tuned_allocator = False if args.no_tune_allocator else tune_cpu_allocator()
    overrides = list(args.overrides)
    if args.combiner is not None:
        overrides.insert(0, f"combiner={args.combiner}")
    if args.device is not None:
        overrides.append(f"device={args.device}")

    try:
        result = measure(
            args.preset, overrides, steps, warmup, args.skip_steps, args.project_steps,
            sync_timers=not args.no_sync_timers, run_dir=args.run_dir, seeds=args.seeds,
        )
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result["tuned_allocator"] = tuned_allocator
    result = _finite_json(result)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
