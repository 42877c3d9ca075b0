"""Reading run directories as the trainer writes them: config.yaml, metrics.jsonl, result.json.

A run is a directory with ``config.yaml`` and/or ``metrics.jsonl`` (any depth
below the folder searched; Hydra's ``.hydra`` copies and the report's own output
are not searched). Unreadable files (bad YAML, bad JSON lines, empty files) come
back as :class:`Skipped` with the reason; they never stop the report.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from mtrl_ntk.rundir import CONFIG_FILE, METRICS_FILE, RESULT_FILE

SUCCESS_MEAN_KEY = "eval/success_mean"
TASK_SUCCESS_PREFIX = "eval/success/"


@dataclass
class Skipped:
    """A file or run left out of the report, and why."""

    path: Path
    reason: str


@dataclass
class Run:
    """One training run: its identity from config.yaml and its evaluations from metrics.jsonl."""

    path: Path
    combiner: str
    arch: str
    seed: int | None
    num_steps: int | None  # train.num_steps, when the config has it
    evaluations: list[dict]  # metrics.jsonl rows that are evaluations, sorted by "step"
    finished: bool  # result.json says status "finished"
    result_status: str | None = None  # status in result.json when it is not "finished"
    setting: tuple[str | None, str | None] = (None, None)  # (env.benchmark, protocol.name)
    name: str | None = None  # the config's run name (``name=...``: variants of one combiner)

    @property
    def method(self) -> str:
        return f"{self.combiner} / {self.arch}"

    @property
    def final(self) -> dict:
        return self.evaluations[-1]

    @property
    def final_step(self) -> int:
        return int(self.final["step"])

    @property
    def final_success(self) -> float:
        return success_mean(self.final)

    @property
    def final_task_success(self) -> dict[str, float]:
        return task_success(self.final)

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        target = f" of {self.num_steps:,}" if self.num_steps is not None else ""
        why = f" ({self.result_status})" if self.result_status else ""
        return f"incomplete{why}: step {self.final_step:,}{target}"


def task_success(row: dict) -> dict[str, float]:
    """Per-task eval success of one metrics row, in the row's key order."""
    return {
        key[len(TASK_SUCCESS_PREFIX):]: float(value)
        for key, value in row.items()
        if key.startswith(TASK_SUCCESS_PREFIX) and is_number(value)
    }


def success_mean(row: dict) -> float:
    """eval/success_mean, or the mean of the per-task values when the row lacks it."""
    if is_number(row.get(SUCCESS_MEAN_KEY)):
        return float(row[SUCCESS_MEAN_KEY])
    return statistics.fmean(task_success(row).values())


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_evaluation(row: dict) -> bool:
    return is_number(row.get(SUCCESS_MEAN_KEY)) or bool(task_success(row))


def _lookup(config: dict, dotted: str) -> object:
    node: object = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _read_nonempty_text(path: Path) -> tuple[str | None, str | None]:
    """(text, None), or (None, reason) for a missing, unreadable or empty file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        return None, f"cannot read {path.name}: {error}"
    if not text.strip():
        return None, f"{path.name} is empty"
    return text, None


def read_config(path: Path) -> tuple[dict | None, str | None]:
    """(config, None), or (None, reason) for a missing, unreadable, empty or non-mapping file."""
    text, reason = _read_nonempty_text(path)
    if text is None:
        return None, reason
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return None, f"{path.name} is not valid YAML: {first_line}"
    if not isinstance(config, dict):
        return None, f"{path.name} is not a mapping (got {type(config).__name__})"
    return config, None


def read_metrics(path: Path) -> tuple[list[dict] | None, str | None]:
    """(evaluation rows sorted by step, None), or (None, reason) when the file is unusable.

    A file with any line that is not a JSON object with a numeric "step" is
    corrupt and skipped whole, except an unterminated last line: that is a
    line the trainer is still writing (seen under --watch) and is ignored.
    When a step appears twice (a run resumed from a checkpoint evaluates it
    again), the later line is kept.
    """
    text, reason = _read_nonempty_text(path)
    if text is None:
        return None, reason
    lines = text.split("\n")
    being_written = lines[-1]  # "" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return None, f"{path.name} line {number} is not valid JSON ({error.msg})"
        if not isinstance(row, dict) or not is_number(row.get("step")):
            return None, f"{path.name} line {number} is not an object with a numeric 'step'"
        rows.append(row)
    if being_written.strip():
        try:
            row = json.loads(being_written)
            if isinstance(row, dict) and is_number(row.get("step")):
                rows.append(row)
        except json.JSONDecodeError:
            pass
    # A resumed run re-evaluates the steps after its checkpoint: the later line wins.
    by_step = {row["step"]: row for row in rows if _is_evaluation(row)}
    evaluations = [by_step[step] for step in sorted(by_step)]
    if not evaluations:
        return None, f"{path.name} has no evaluation yet"
    return evaluations, None


def _read_result(path: Path) -> tuple[dict | None, str | None]:
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path.name} is unreadable ({error}); run counted as incomplete"
    if not isinstance(result, dict):
        return None, f"{path.name} is not a JSON object; run counted as incomplete"
    return result, None


def load_run(directory: Path) -> tuple[Run | None, list[Skipped]]:
    """Read one run directory: (run, problems) or (None, problems) when it cannot be used."""
    config_path = directory / CONFIG_FILE
    if not config_path.exists() and (directory / ".hydra" / CONFIG_FILE).exists():
        # Hydra's copy of the resolved config, when the trainer's own is missing.
        config_path = directory / ".hydra" / CONFIG_FILE
    if not config_path.exists():
        return None, [Skipped(directory, f"no {CONFIG_FILE}: cannot tell the method")]
    config, problem = read_config(config_path)
    if config is None:
        return None, [Skipped(config_path, problem)]
    combiner = _lookup(config, "combiner.name")
    if combiner is None and isinstance(config.get("combiner"), str):
        combiner = config["combiner"]
    arch = _lookup(config, "agent.arch")
    if not isinstance(combiner, str) or not isinstance(arch, str):
        return None, [Skipped(config_path, "config lacks combiner.name or agent.arch")]

    metrics_path = directory / METRICS_FILE
    if not metrics_path.exists():
        return None, [Skipped(directory, f"no {METRICS_FILE}: no evaluation yet")]
    evaluations, problem = read_metrics(metrics_path)
    if evaluations is None:
        return None, [Skipped(metrics_path, problem)]

    problems = []
    finished, result_status = False, None
    if (directory / RESULT_FILE).exists():
        result, problem = _read_result(directory / RESULT_FILE)
        if result is None:
            problems.append(Skipped(directory / RESULT_FILE, problem))
        else:
            finished = result.get("status") == "finished"
            result_status = None if finished else str(result.get("status"))
    seed = _lookup(config, "seed")
    num_steps = _lookup(config, "train.num_steps")
    benchmark, protocol = _lookup(config, "env.benchmark"), _lookup(config, "protocol.name")
    run = Run(
        path=directory,
        combiner=combiner,
        arch=arch,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        num_steps=num_steps if is_number(num_steps) else None,
        evaluations=evaluations,
        finished=finished,
        result_status=result_status,
        setting=(
            benchmark if isinstance(benchmark, str) else None,
            protocol if isinstance(protocol, str) else None,
        ),
        name=str(config["name"]) if config.get("name") is not None else None,
    )
    return run, problems


def find_run_dirs(root: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Directories under root (root included) holding config.yaml or metrics.jsonl.

    Hidden directories (Hydra's ``.hydra``) and ``exclude`` (the report's own
    output) are not searched.
    """
    excluded = {Path(path).resolve() for path in exclude}
    found = []
    for current, subdirs, files in os.walk(root):
        subdirs[:] = sorted(
            name for name in subdirs
            if not name.startswith(".") and (Path(current) / name).resolve() not in excluded
        )
        if CONFIG_FILE in files or METRICS_FILE in files:
            found.append(Path(current))
    return sorted(found)


def scan_runs(root: Path, exclude: Iterable[Path] = ()) -> tuple[list[Run], list[Skipped]]:
    """All readable runs under root, and everything skipped with the reason."""
    runs, skipped = [], []
    for directory in find_run_dirs(root, exclude):
        run, problems = load_run(directory)
        skipped.extend(problems)
        if run is not None:
            runs.append(run)
    return runs, skipped
