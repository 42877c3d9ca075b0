"""The run directory: its file names and the rules for writing them (the report reads them).

A run directory holds (the contract other tools read, ``mtrl_ntk.report`` among them):

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
- ``result.json``: written atomically when the run finished (``"status": "finished"``)
  or when it stopped for good on its own, such as a seed whose updates stayed
  non-finite (``"status": "stopped"`` and the ``"reason"``);
- ``checkpoints/``: the last ``train.keep_checkpoints`` checkpoints and the replay
  segments they need (mtrl_ntk/checkpoint.py).

The seeds of a group (``seed=A..B``) each get such a directory, ``seed<k>``, next to
the first seed's (:func:`seed_directory`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtrl_ntk.atomic import write_text_atomically

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
TENSORBOARD_DIR = "tb"
FINISHED = "finished"
STOPPED = "stopped"


def seed_directory(run_dir: Path, first_seed: int, seed: int) -> Path:
    """Seed ``seed``'s run directory in a group: ``run_dir`` is the first seed's (Hydra's
    ``seed${seed}``); in a directory the user named, the seeds go inside it."""
    if run_dir.name != f"seed{first_seed}":
        return run_dir / f"seed{seed}"
    return run_dir.parent / f"seed{seed}"


def json_number(value: Any) -> Any:
    """Strict JSON: a non-finite float becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_metrics_row(run_dir: Path, row: Mapping[str, Any]) -> None:
    """One evaluation's row at the end of ``metrics.jsonl``, flushed and fsynced."""
    line = json.dumps({key: json_number(value) for key, value in row.items()})
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def truncate_metrics(path: Path, last_step: int) -> int:
    """Atomically drop the rows of ``path`` (metrics.jsonl) after ``last_step``, and a torn
    last line; returns how many rows were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        text = "".join(line + "\n" for line in kept)
        write_text_atomically(path, text)
    return dropped


def has_metrics(run_dir: Path) -> bool:
    path = run_dir / METRICS_FILE
    return path.exists() and path.stat().st_size > 0


def write_result(run_dir: Path, result: Mapping[str, Any]) -> None:
    """``result.json``, atomically."""
    write_text_atomically(run_dir / RESULT_FILE, json.dumps(dict(result), indent=2) + "\n")


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """``result.json`` as a dict, or None when it is absent or unreadable."""
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) else None
