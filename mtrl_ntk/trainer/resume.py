"""Resume: which runs are finished, which continue, from which checkpoint, with which config.

A run directory that holds a finished run is left alone (its result is returned), so
re-launching a sweep skips the runs that finished. One that holds an unfinished run
is refused unless ``resume=true``: then, with the settings it was started with, it
continues from its newest complete checkpoint (or from scratch if it has none), with
``metrics.jsonl`` and TensorBoard rolled back to that checkpoint's step.

The seeds of a group resume from one common step: every seed's newest complete
checkpoint, or, when a kill left the seeds at different steps (one interval apart:
checkpoints are written seed after seed), the newest step all of them hold.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtrl_ntk.atomic import write_text_atomically
from mtrl_ntk.checkpoint import Checkpoint, CheckpointManager
from mtrl_ntk.errors import ConfigError
from mtrl_ntk.provenance import write_provenance
from mtrl_ntk.rundir import (
    CONFIG_FILE,
    FINISHED,
    METRICS_FILE,
    has_metrics,
    read_result,
    truncate_metrics,
)

# Settings a resumed run may change: they do not change what is computed.
RESUMABLE_CHANGES = (
    "resume", "debug", "train.progress_bar",
    # Where the seeds run, not what they compute (and keys older runs' configs lack).
    "seeds", "seed_group", "env.seed_workers",
)


def previous_result(run_dir: Path, resume: bool = False) -> dict[str, Any] | None:
    """The result of a run that already finished in ``run_dir``; a ConfigError for an
    unfinished one unless ``resume`` (its metrics would be mixed with this run's)."""
    result = read_result(run_dir)
    if result is not None and result.get("status") == FINISHED:
        return result
    if not resume and (has_metrics(run_dir) or CheckpointManager(run_dir).checkpoint_paths()):
        raise ConfigError(
            f"run directory {run_dir} already holds an unfinished run; continue it with "
            "resume=true (and the same overrides), delete it, or give this run another "
            "directory (name=... or hydra.run.dir=...)"
        )
    return None


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every leaf that differs between two config trees."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [difference for key in sorted(set(saved) | set(current), key=str)
                for difference in config_differences(
                    saved.get(key, "<absent>"), current.get(key, "<absent>"),
                    f"{prefix}.{key}" if prefix else str(key))]
    return [] if saved == current else [f"{prefix}: {saved!r} -> {current!r}"]


def check_resumed_config(run_dir: Path, cfg: DictConfig) -> None:
    """A resumed run must have the configuration the run directory was started with."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    current = OmegaConf.to_container(cfg, resolve=True)
    differences = [
        difference for difference in config_differences(saved, current)
        if not difference.split(":")[0].startswith(RESUMABLE_CHANGES)
    ]
    if differences:
        raise ConfigError(
            f"resume=true needs the settings {run_dir} was started with; changed (saved -> "
            f"now): {'; '.join(differences[:5])}{' ...' if len(differences) > 5 else ''}"
        )


def common_checkpoints(
    run_dirs: Sequence[Path], seeds: Sequence[int]
) -> list[Checkpoint | None]:
    """Every seed's checkpoint to resume from, all at one step (see the module doc); for
    one seed, its newest complete checkpoint (None: from scratch)."""
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


def resume_hint(argv: Sequence[str]) -> str:
    """The command that resumes this run: the typed command line plus resume=true."""
    arguments = [argument for argument in argv[1:] if not argument.startswith("resume=")]
    script = Path(argv[0]).name if argv else "run_mt10.py"
    return shlex.join(["python", script, *arguments, "resume=true"])
