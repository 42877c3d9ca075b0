"""Aggregate training runs into a Table-4-style report: Markdown, CSV, PNG and one HTML page.

``python scripts/summarize.py RUNS_DIR [--out DIR] [--watch [--interval S]]``

Reads every run directory under RUNS_DIR (any depth; a run is a directory with
``config.yaml`` and/or ``metrics.jsonl``, laid out as the trainer writes it:
``config.yaml`` with ``combiner.name``, ``agent.arch``, ``seed``,
``train.num_steps``; ``metrics.jsonl`` with one JSON object per evaluation;
``result.json`` once the run finished), groups the runs by (combiner, arch)
and writes into DIR (default RUNS_DIR/report):

- ``summary.md``, ``summary.csv``: one row per method with the final success
  (the last evaluation of each run), mean ± standard error over seeds, where
  stderr = sample standard deviation (ddof = 1) / sqrt(n), undefined ("n/a",
  empty in the CSV) for one seed; per-task means; rank; and the published
  Table 4 numbers of Qin et al. (NeurIPS 2025) beside ours. Those were
  measured on Meta-World v1 environments; we run the -v3 tasks, so they are a
  reference point, not a target to match digit for digit.
- ``curves.png``: mean eval success against environment steps (the trainer's
  ``step``) with a ±1 stderr band, seeds aligned on common steps.
- ``tasks.png``: heatmap of per-task final success, methods x tasks.
- ``ntk.png``: per-task NTK eigenvalue λ_i and combiner weights over training
  (the paper's Fig. 2), for methods that logged them.
- ``report.html``: all of the above on one self-contained page (images as
  base64 data URIs), readable offline.

Unfinished runs (no ``result.json``) are included and marked with the step
they reached. Unreadable files (bad YAML, bad JSON lines, empty files) are
listed under "Skipped" and warned about on stderr; they never stop the report.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mtrl_ntk.atomic import write_text_atomically

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
SUCCESS_MEAN_KEY = "eval/success_mean"
TASK_SUCCESS_PREFIX = "eval/success/"
NETWORKS = ("critic", "actor")

# Qin et al., "NTKMTL", NeurIPS 2025, Table 4: MT10 success rate, mean ± stderr over 10 seeds,
# on Meta-World v1 environments.
PUBLISHED_TABLE_4: dict[str, tuple[float, float]] = {
    "STL": (0.90, 0.03),
    "MTL SAC": (0.49, 0.07),
    "MTL SAC + TE": (0.54, 0.05),
    "MH SAC": (0.61, 0.04),
    "PCGrad": (0.72, 0.02),
    "CAGrad": (0.83, 0.05),
    "MoCo": (0.75, 0.05),
    "Nash-MTL": (0.91, 0.03),
    "FAMO": (0.83, 0.05),
    "FairGrad": (0.84, 0.07),
    "Aligned-MTL": (0.97, 0.05),
    "NTKMTL": (0.96, 0.03),
}
PUBLISHED_NOTE = (
    "Published numbers: Qin et al. (NeurIPS 2025), Table 4, MT10 success rate, mean ± stderr over "
    "10 seeds, measured on Meta-World v1 environments. Our runs use the Meta-World v3 tasks "
    "(*-v3), a different environment version: compare trends, not digits."
)
# Keys are normalised names (lower case, no "-" or "_"). Linear scalarisation (ls) is the
# plain multi-task SAC, so its published row depends on the architecture; every other
# combiner has one row whatever the architecture.
_PUBLISHED_LS_BY_ARCH = {
    "mtsac": "MTL SAC",
    "taskencoder": "MTL SAC + TE",
    "multihead": "MH SAC",
    "independent": "STL",
}
_PUBLISHED_BY_COMBINER = {
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "moco": "MoCo",
    "nashmtl": "Nash-MTL",
    "famo": "FAMO",
    "fairgrad": "FairGrad",
    "alignedmtl": "Aligned-MTL",
    "ntkmtl": "NTKMTL",
}


def _normalise_name(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def published_row(combiner: str, arch: str) -> str | None:
    """The Table 4 row matching our (combiner, arch), or None when the paper has none."""
    combiner, arch = _normalise_name(combiner), _normalise_name(arch)
    if combiner == "ls":
        return _PUBLISHED_LS_BY_ARCH.get(arch)
    return _PUBLISHED_BY_COMBINER.get(combiner)


# ----------------------------------------------------------------------------- reading runs


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
        if key.startswith(TASK_SUCCESS_PREFIX) and _is_number(value)
    }


def success_mean(row: dict) -> float:
    """eval/success_mean, or the mean of the per-task values when the row lacks it."""
    if _is_number(row.get(SUCCESS_MEAN_KEY)):
        return float(row[SUCCESS_MEAN_KEY])
    return statistics.fmean(task_success(row).values())


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_evaluation(row: dict) -> bool:
    return _is_number(row.get(SUCCESS_MEAN_KEY)) or bool(task_success(row))


def _lookup(config: dict, dotted: str) -> object:
    node: object = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_config(path: Path) -> tuple[dict | None, str | None]:
    """(config, None), or (None, reason) for a missing, unreadable, empty or non-mapping file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        return None, f"cannot read {path.name}: {error}"
    if not text.strip():
        return None, f"{path.name} is empty"
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
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        return None, f"cannot read {path.name}: {error}"
    if not text.strip():
        return None, f"{path.name} is empty"
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
        if not isinstance(row, dict) or not _is_number(row.get("step")):
            return None, f"{path.name} line {number} is not an object with a numeric 'step'"
        rows.append(row)
    if being_written.strip():
        try:
            row = json.loads(being_written)
            if isinstance(row, dict) and _is_number(row.get("step")):
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
        num_steps=num_steps if _is_number(num_steps) else None,
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


# ----------------------------------------------------------------------------- aggregation


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample std with ddof = 1, over sqrt(n)); stderr None for n = 1."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


@dataclass
class MethodSummary:
    """Final success of one (combiner, arch) over its seeds."""

    combiner: str
    arch: str
    runs: list[Run]
    mean: float
    stderr: float | None
    task_means: dict[str, float]
    variant: str | None = None  # the run name, when one (combiner, arch) has several
    rank: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        label = f"{self.combiner} / {self.arch}"
        return label if self.variant is None else f"{label} [{self.variant}]"

    @property
    def num_seeds(self) -> int:
        return len(self.runs)

    @property
    def num_incomplete(self) -> int:
        return sum(not run.finished for run in self.runs)

    @property
    def seeds(self) -> list[int | None]:
        return [run.seed for run in self.runs]

    @property
    def published(self) -> tuple[str, float, float] | None:
        """The matching Table 4 row (name, mean, stderr); None off MT10 or without a match."""
        if any(run.setting[0] not in (None, "mt10") for run in self.runs):
            return None  # Table 4 is MT10 only
        row = published_row(self.combiner, self.arch)
        return None if row is None else (row, *PUBLISHED_TABLE_4[row])


def summarize(runs: list[Run]) -> list[MethodSummary]:
    """One summary per (combiner, arch), ranked by mean final success (1 = best, ties share).

    Runs of one (combiner, arch) under several run names (``name=...``, the
    trainer's way to keep variants apart, e.g. other hyperparameters or another
    protocol) are not averaged together: each name becomes its own row.
    """
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.combiner, run.arch), []).append(run)
    summaries = []
    for (combiner, arch), group in groups.items():
        names = sorted({run.name or "" for run in group})
        for name in names:
            variant = [run for run in group if (run.name or "") == name]
            summaries.append(_summarize_group(
                combiner, arch, variant, (name or "(unnamed)") if len(names) > 1 else None
            ))
    summaries.sort(key=lambda s: (-s.mean, s.method))
    for index, summary in enumerate(summaries):
        tied = index > 0 and summary.mean == summaries[index - 1].mean
        summary.rank = summaries[index - 1].rank if tied else index + 1
    return summaries


def _summarize_group(
    combiner: str, arch: str, group: list[Run], variant: str | None
) -> MethodSummary:
    group.sort(key=lambda run: (run.seed is None, run.seed or 0, str(run.path)))
    mean, stderr = mean_and_stderr([run.final_success for run in group])
    per_task: dict[str, list[float]] = {}
    for run in group:
        for task, value in run.final_task_success.items():
            per_task.setdefault(task, []).append(value)
    summary = MethodSummary(
        combiner, arch, group, mean, stderr,
        {task: statistics.fmean(values) for task, values in per_task.items()}, variant=variant,
    )
    seeds = [seed for seed in summary.seeds if seed is not None]
    if len(set(seeds)) < len(seeds):
        summary.notes.append(f"{summary.method}: several runs share a seed ({sorted(seeds)})")
    settings = {run.setting for run in group}
    if len(settings) > 1:
        mixed = sorted(map(str, settings))
        summary.notes.append(f"{summary.method}: runs mix (benchmark, protocol) {mixed}")
    return summary


def task_order(runs: list[Run]) -> list[str]:
    """Task names in order of first appearance in the runs' final evaluations."""
    order: dict[str, None] = {}
    for run in runs:
        order.update(dict.fromkeys(run.final_task_success))
    return list(order)


def aligned_curve(runs: list[Run], key: str) -> tuple[np.ndarray, ...]:
    """Mean, stderr and seed count of metric ``key`` on the union of the runs' evaluation steps.

    Each run is linearly interpolated onto the common steps inside its own
    range (exact where runs evaluate at the same steps, as the trainer does)
    and missing outside it. Returns (steps, mean, stderr, count), each [S];
    stderr is NaN where fewer than two runs have a value.
    """
    series = []
    for run in runs:
        points = [(row["step"], row[key]) for row in run.evaluations if _is_number(row.get(key))]
        if points:
            series.append(np.asarray(points, dtype=np.float64))  # [E, 2]
    if not series:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    steps = np.unique(np.concatenate([points[:, 0] for points in series]))  # [S]
    values = np.full((len(series), len(steps)), np.nan)  # [R, S]
    for index, points in enumerate(series):
        inside = (steps >= points[0, 0]) & (steps <= points[-1, 0])
        values[index, inside] = np.interp(steps[inside], points[:, 0], points[:, 1])
    count = np.sum(~np.isnan(values), axis=0)  # [S]
    mean = np.nanmean(values, axis=0)
    stderr = np.full(len(steps), np.nan)
    several = count >= 2
    stderr[several] = np.nanstd(values[:, several], axis=0, ddof=1) / np.sqrt(count[several])
    return steps, mean, stderr, count


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _format_steps(value: float, _position: int | None = None) -> str:
    """Axis label for a step count: 0, 500, 20k, 1.5M."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:g}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


def _label_steps_axis(axes) -> None:
    from matplotlib.ticker import FuncFormatter

    axes.xaxis.set_major_formatter(FuncFormatter(_format_steps))
    axes.set_xlabel("environment steps")


def _method_colors(summaries: list[MethodSummary]) -> dict[str, tuple]:
    plt = _pyplot()
    palette = plt.get_cmap("tab10" if len(summaries) <= 10 else "tab20")
    return {s.method: palette(index % palette.N) for index, s in enumerate(summaries)}


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def plot_curves(summaries: list[MethodSummary]) -> bytes:
    """Mean eval success vs environment steps per method, ±1 stderr band.

    Solid where every seed of the method has reached the step, dashed where
    only some have (unfinished runs).
    """
    plt = _pyplot()
    colors = _method_colors(summaries)
    figure, axes = plt.subplots(figsize=(8.5, 5.2))
    for summary in summaries:
        steps, mean, stderr, count = aligned_curve(summary.runs, SUCCESS_MEAN_KEY)
        color = colors[summary.method]
        complete = count == summary.num_seeds
        axes.plot(steps, mean, "--", color=color, linewidth=1.2, alpha=0.7)
        axes.plot(
            np.where(complete, steps, np.nan), np.where(complete, mean, np.nan), "-",
            color=color, linewidth=2, label=f"{summary.method} (n={summary.num_seeds})",
        )
        band = ~np.isnan(stderr)
        axes.fill_between(
            steps, mean - stderr, mean + stderr, where=band, color=color, alpha=0.2, linewidth=0,
        )
    _label_steps_axis(axes)
    axes.set_ylabel("eval success rate (mean over tasks)")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title("Eval success: mean ± stderr over seeds (dashed: not all seeds there yet)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                title="method (rank order)", title_fontsize=8)
    return _png_bytes(figure)


def plot_task_heatmap(summaries: list[MethodSummary], tasks: list[str]) -> bytes:
    """Heatmap of per-task final success (mean over seeds), methods x tasks."""
    plt = _pyplot()
    matrix = np.array(
        [[s.task_means.get(task, np.nan) for task in tasks] for s in summaries]
    )  # [M, T]
    figure, axes = plt.subplots(
        figsize=(1.6 + 0.85 * max(len(tasks), 4), 1.4 + 0.5 * max(len(summaries), 2))
    )
    image = axes.imshow(
        np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto"
    )
    axes.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right", fontsize=8)
    axes.set_yticks(
        range(len(summaries)), [f"{s.method} (n={s.num_seeds})" for s in summaries], fontsize=8
    )
    for row, column in np.ndindex(matrix.shape):
        value = matrix[row, column]
        text = "–" if np.isnan(value) else f"{value:.2f}"
        axes.text(
            column, row, text, ha="center", va="center", fontsize=8,
            color="black" if not np.isnan(value) and value > 0.6 else "white",
        )
    figure.colorbar(image, ax=axes, label="final success", fraction=0.03, pad=0.02)
    axes.set_title("Final eval success per task (mean over seeds)")
    return _png_bytes(figure)


def _logged_tasks(runs: list[Run], prefix: str) -> list[str]:
    order: dict[str, None] = {}
    for run in runs:
        for row in run.evaluations:
            order.update(dict.fromkeys(k[len(prefix):] for k in row if k.startswith(prefix)))
    return list(order)


def _weights_vary(runs: list[Run]) -> bool:
    values = [
        value for run in runs for row in run.evaluations for key, value in row.items()
        if "/weight/" in key and key.startswith("combiner/") and _is_number(value)
    ]
    return bool(values) and max(values) - min(values) > 1e-9


def ntk_methods(summaries: list[MethodSummary]) -> list[MethodSummary]:
    """Methods that logged NTK eigenvalues, or combiner weights that change over training."""
    return [
        s for s in summaries
        if any(_logged_tasks(s.runs, f"combiner/{network}/ntk_eigenvalue/") for network in NETWORKS)
        or _weights_vary(s.runs)
    ]


def plot_ntk(summaries: list[MethodSummary], tasks: list[str]) -> bytes:
    """Per-task λ_i (log scale) and combiner weights over training, mean over seeds.

    A 2 x 2 block per method: rows λ_i and w_i, columns critic and actor. A task
    keeps its colour in every panel; the legend is on the right.
    """
    plt = _pyplot()
    kinds = ("ntk_eigenvalue", "weight")
    all_tasks = list(tasks)
    for summary in summaries:
        for network in NETWORKS:
            for kind in kinds:
                for task in _logged_tasks(summary.runs, f"combiner/{network}/{kind}/"):
                    if task not in all_tasks:
                        all_tasks.append(task)
    palette = plt.get_cmap("tab10" if len(all_tasks) <= 10 else "tab20")
    task_colors = {task: palette(index % palette.N) for index, task in enumerate(all_tasks)}

    figure, axes_grid = plt.subplots(
        2 * len(summaries), len(NETWORKS), figsize=(10, 3.1 * 2 * len(summaries) + 0.6),
        squeeze=False,
    )
    for index, summary in enumerate(summaries):
        for kind_index, kind in enumerate(kinds):
            row = 2 * index + kind_index
            for column, network in enumerate(NETWORKS):
                axes = axes_grid[row, column]
                prefix = f"combiner/{network}/{kind}/"
                logged = _logged_tasks(summary.runs, prefix)
                label = "NTK eigenvalue λ_i" if kind == "ntk_eigenvalue" else "weight w_i"
                axes.set_title(f"{summary.method} (n={summary.num_seeds}): {network} {label}",
                               fontsize=10)
                if not logged:
                    axes.text(0.5, 0.5, "not logged", ha="center", va="center",
                              transform=axes.transAxes, color="gray")
                    axes.set_xticks([])
                    axes.set_yticks([])
                    continue
                for task in logged:
                    steps, mean, _, _ = aligned_curve(summary.runs, prefix + task)
                    axes.plot(steps, mean, color=task_colors[task], linewidth=1.4)
                if kind == "ntk_eigenvalue":
                    axes.set_yscale("log")
                _label_steps_axis(axes)
                axes.grid(alpha=0.3)
                axes.tick_params(labelsize=8)
    handles = [
        plt.Line2D([], [], color=task_colors[task], linewidth=2, label=task) for task in all_tasks
    ]
    figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9,
                  title="task", frameon=False)
    figure.suptitle("Per-task NTK eigenvalues λ_i and combiner weights (mean over seeds)")
    figure.tight_layout()
    return _png_bytes(figure)


# ----------------------------------------------------------------------------- tables


def _format_success(mean: float, stderr: float | None) -> str:
    return f"{mean:.3f} ± {'n/a' if stderr is None else f'{stderr:.3f}'}"


def _format_published(summary: MethodSummary) -> str:
    if summary.published is None:
        return "—"
    row, mean, stderr = summary.published
    return f"{mean:.2f} ± {stderr:.2f} ({row})"


def _format_seeds(summary: MethodSummary) -> str:
    text = str(summary.num_seeds)
    if summary.num_incomplete:
        text += f" ({summary.num_incomplete} incomplete)"
    return text


@dataclass
class Tables:
    """The report's tables as header + rows of strings, shared by Markdown and HTML."""

    main: tuple[list[str], list[list[str]]]
    per_task: tuple[list[str], list[list[str]]]
    runs: tuple[list[str], list[list[str]]]


def build_tables(
    summaries: list[MethodSummary], tasks: list[str], runs_dir: Path
) -> Tables:
    main_header = [
        "Rank", "Method (combiner / arch)", "Seeds", "Final success (mean ± stderr)",
        "Published Table 4 (Meta-World v1)",
    ]
    main_rows = [
        [str(s.rank), s.method, _format_seeds(s),
         _format_success(s.mean, s.stderr) + (" *" if s.num_incomplete else ""),
         _format_published(s)]
        for s in summaries
    ]
    task_header = ["Method", *tasks]
    task_rows = [
        [s.method, *(f"{s.task_means[t]:.2f}" if t in s.task_means else "—" for t in tasks)]
        for s in summaries
    ]
    run_header = ["Run", "Method", "Seed", "Status", "Evaluations", "Final success"]
    run_rows = [
        [_relative(run.path, runs_dir), s.method, "?" if run.seed is None else str(run.seed),
         run.status, str(len(run.evaluations)), f"{run.final_success:.3f}"]
        for s in summaries for run in s.runs
    ]
    return Tables((main_header, main_rows), (task_header, task_rows), (run_header, run_rows))


def _relative(path: Path, root: Path) -> str:
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError:
        return str(path)
    return str(relative) if str(relative) != "." else "."


def write_csv(summaries: list[MethodSummary], tasks: list[str]) -> str:
    """summary.csv: full precision; stderr empty for one seed."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([
        "rank", "method", "combiner", "arch", "variant", "num_seeds", "num_incomplete", "seeds",
        "success_mean", "success_stderr", "published_row", "published_mean", "published_stderr",
        *(f"success/{task}" for task in tasks),
    ])
    for s in summaries:
        published = s.published or ("", "", "")
        writer.writerow([
            s.rank, s.method, s.combiner, s.arch, s.variant or "", s.num_seeds, s.num_incomplete,
            " ".join("?" if seed is None else str(seed) for seed in s.seeds),
            repr(s.mean), "" if s.stderr is None else repr(s.stderr), *published,
            *(repr(s.task_means[t]) if t in s.task_means else "" for t in tasks),
        ])
    return buffer.getvalue()


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


STDERR_NOTE = (
    "Final success = eval success of the last evaluation of each run, averaged over tasks. "
    "stderr = sample standard deviation over seeds (ddof = 1) / sqrt(n); "
    "'n/a' for a single seed. Rank 1 = highest mean. "
    "* = at least one run has not finished (its last evaluation is used)."
)


# ----------------------------------------------------------------------------- the report


@dataclass
class Report:
    """What one pass over RUNS_DIR produced."""

    runs: list[Run]
    skipped: list[Skipped]
    summaries: list[MethodSummary]
    files: list[Path]
    notes: list[str]


def _write_atomic(path: Path, data: bytes | str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file (--watch)."""
    write_text_atomically(path, data)


def generate_report(runs_dir: Path, out_dir: Path | None = None) -> Report:
    """Scan runs_dir and write summary.md, summary.csv, the PNGs and report.html into out_dir."""
    runs_dir = Path(runs_dir)
    out_dir = Path(out_dir) if out_dir is not None else runs_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, skipped = scan_runs(runs_dir, exclude=[out_dir])
    summaries = summarize(runs)
    tasks = task_order([run for s in summaries for run in s.runs])
    notes = [note for s in summaries for note in s.notes]

    images: dict[str, bytes] = {}
    if summaries:
        images["curves.png"] = plot_curves(summaries)
        images["tasks.png"] = plot_task_heatmap(summaries, tasks)
        with_ntk = ntk_methods(summaries)
        if with_ntk:
            images["ntk.png"] = plot_ntk(with_ntk, tasks)
        else:
            notes.append("No run logged NTK eigenvalues or varying combiner weights: no ntk.png.")
    else:
        notes.append(f"No run with an evaluation found under {runs_dir}.")
    for name in ("curves.png", "tasks.png", "ntk.png"):
        if name in images:
            _write_atomic(out_dir / name, images[name])
        else:
            (out_dir / name).unlink(missing_ok=True)  # stale image from an earlier pass

    tables = build_tables(summaries, tasks, runs_dir)
    title = report_title(runs)
    texts = {
        "summary.md": render_markdown(tables, skipped, notes, list(images), runs_dir, title),
        "summary.csv": write_csv(summaries, tasks),
        "report.html": render_html(tables, skipped, notes, images, runs_dir, title),
    }
    for name, text in texts.items():
        _write_atomic(out_dir / name, text)
    files = [out_dir / name for name in [*texts, *images]]
    return Report(runs, skipped, summaries, files, notes)


def _skipped_lines(skipped: list[Skipped], runs_dir: Path) -> list[str]:
    return [f"{_relative(item.path, runs_dir)}: {item.reason}" for item in skipped]


def report_title(runs: list[Run]) -> str:
    """Title naming the benchmark (e.g. MT10) when all runs state the same one, else generic."""
    benchmarks = {run.setting[0] for run in runs}
    if len(benchmarks) == 1 and None not in benchmarks:
        return f"{next(iter(benchmarks)).upper()} results"
    return "Meta-World results"


CAPTIONS = {
    "curves.png": "Learning curves",
    "tasks.png": "Per-task final success",
    "ntk.png": "NTK eigenvalues and combiner weights",
}
NO_RUNS = "No run with an evaluation yet."


def render_markdown(
    tables: Tables, skipped: list[Skipped], notes: list[str], images: list[str], runs_dir: Path,
    title: str,
) -> str:
    parts = [
        f"# {title}",
        f"Runs under `{runs_dir}`; generated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
    ]
    if tables.main[1]:
        parts += [
            "## Final success per method",
            _markdown_table(*tables.main),
            STDERR_NOTE,
            PUBLISHED_NOTE,
            "## Final success per task (mean over seeds)",
            _markdown_table(*tables.per_task),
            *(f"![{CAPTIONS[name]}]({name})" for name in images),
            "## Runs",
            _markdown_table(*tables.runs),
        ]
    else:
        parts.append(NO_RUNS)
    if notes:
        parts += ["## Notes", "\n".join(f"- {note}" for note in notes)]
    parts += ["## Skipped", "\n".join(f"- `{line}`" for line in _skipped_lines(skipped, runs_dir))
              if skipped else "Nothing skipped."]
    return "\n\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1300px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta, .note { color: #555; font-size: 0.9em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f0f2f5; white-space: normal; vertical-align: bottom; }
tr:nth-child(even) td { background: #fafafa; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
td.incomplete { color: #8a5a00; font-weight: 600; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
.skipped li { font-family: ui-monospace, monospace; font-size: 0.85em; color: #8a1f11; }
"""


def _html_table(header: list[str], rows: list[list[str]], numeric_from: int) -> str:
    """Columns from ``numeric_from`` on are right-aligned; unfinished runs are highlighted."""

    def attributes(index: int, cell: str) -> str:
        classes = ["num"] if index >= numeric_from else []
        if cell.startswith("incomplete"):
            classes.append("incomplete")
        return f' class="{" ".join(classes)}"' if classes else ""

    head = "".join(
        f"<th{attributes(index, cell)}>{html.escape(cell)}</th>"
        for index, cell in enumerate(header)
    )
    body = "".join(
        "<tr>" + "".join(
            f"<td{attributes(index, cell)}>{html.escape(cell)}</td>"
            for index, cell in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def render_html(
    tables: Tables, skipped: list[Skipped], notes: list[str], images: dict[str, bytes],
    runs_dir: Path, title: str,
) -> str:
    """One self-contained page: tables inline, images as base64 data URIs."""
    figures = "".join(
        f"<h2>{CAPTIONS[name]}</h2><img alt=\"{CAPTIONS[name]}\" "
        f"src=\"data:image/png;base64,{base64.b64encode(data).decode('ascii')}\">"
        for name, data in images.items()
    )
    if tables.main[1]:
        results = f"""<h2>Final success per method</h2>
{_html_table(*tables.main, numeric_from=3)}
<p class=note>{html.escape(STDERR_NOTE)}</p>
<p class=note>{html.escape(PUBLISHED_NOTE)}</p>
<h2>Final success per task (mean over seeds)</h2>
{_html_table(*tables.per_task, numeric_from=1)}
{figures}
<h2>Runs</h2>
{_html_table(*tables.runs, numeric_from=4)}"""
    else:
        results = f"<p>{NO_RUNS}</p>"
    skipped_html = (
        "<ul class=skipped>" + "".join(
            f"<li>{html.escape(line)}</li>" for line in _skipped_lines(skipped, runs_dir)
        ) + "</ul>"
        if skipped else "<p>Nothing skipped.</p>"
    )
    notes_html = (
        "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
        if notes else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class=meta>Runs under <code>{html.escape(str(runs_dir))}</code>;
generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>
{results}
{notes_html}
<h2>Skipped</h2>
{skipped_html}
</body></html>
"""


# ----------------------------------------------------------------------------- command line


def _report_once(runs_dir: Path, out_dir: Path | None, warned: set[str]) -> Report:
    report = generate_report(runs_dir, out_dir)
    for line in _skipped_lines(report.skipped, runs_dir):
        if line not in warned:  # under --watch, warn about each problem once
            warned.add(line)
            print(f"warning: skipped {line}", file=sys.stderr)
    print(
        f"report: {len(report.runs)} runs, {len(report.summaries)} methods, "
        f"{len(report.skipped)} skipped -> {report.files[0].parent}",
        flush=True,
    )
    return report


def watch(
    runs_dir: Path, out_dir: Path | None, interval: float, max_iterations: int | None = None
) -> int:
    """Regenerate the report every ``interval`` seconds; ``max_iterations`` bounds it (tests)."""
    warned: set[str] = set()
    iteration = 0
    while True:
        _report_once(runs_dir, out_dir, warned)
        iteration += 1
        if max_iterations is not None and iteration >= max_iterations:
            return iteration
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="summarize.py",
        description="Summarise training runs into a Table-4-style report (md, csv, png, html).",
    )
    parser.add_argument("runs_dir", type=Path, help="directory searched (any depth) for runs")
    parser.add_argument("--out", type=Path, default=None, help="output directory "
                        "(default RUNS_DIR/report)")
    parser.add_argument("--watch", action="store_true", help="regenerate until interrupted")
    parser.add_argument("--interval", type=float, default=60.0,
                        help="seconds between regenerations with --watch (default 60)")
    parser.add_argument("--max-iterations", type=int, default=None,
                        help="with --watch, stop after this many reports (for tests)")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        parser.error(f"RUNS_DIR {args.runs_dir} is not a directory")
    if args.interval < 0:
        parser.error(f"--interval must be >= 0, got {args.interval}")
    if args.max_iterations is not None and args.max_iterations < 1:
        parser.error(f"--max-iterations must be >= 1, got {args.max_iterations}")
    try:
        if args.watch:
            watch(args.runs_dir, args.out, args.interval, args.max_iterations)
        else:
            _report_once(args.runs_dir, args.out, set())
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
