"""Statistics over runs: the final-success definition, mean ± stderr over seeds, ranks,
curves aligned on common steps, and the published Table-4 numbers beside ours.

The final success of a run is defined by :class:`FinalSuccess` (``--final`` of
``scripts/summarize.py``): its ``last`` evaluation (the default, what FAMO's
authors answer they report: the eval success logged at 2M steps), the mean of
its last k evaluations (``mean-last-k``, steadier: one deterministic episode per
task moves a seed's score in steps of 1/T), or its ``best`` evaluation.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from mtrl_ntk.report.runs import Run, is_number, success_mean, task_success

FINAL_CHOICES = ("last", "mean-last-k", "best")


@dataclass(frozen=True)
class FinalSuccess:
    """Which evaluations of a run make its final success: ``last``, ``mean-last-k`` or ``best``.

    ``mean-last-k`` averages the last ``k`` evaluations (all of them when a run
    has fewer); ``best`` takes the evaluation with the highest mean success (the
    first such), and its per-task values. Per-task final success uses the same
    evaluations as the mean.
    """

    kind: str = "last"
    k: int = 10

    def __post_init__(self) -> None:
        if self.kind not in FINAL_CHOICES:
            raise ValueError(f"final must be one of {', '.join(FINAL_CHOICES)}, got {self.kind!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")

    def evaluations(self, run: Run) -> list[dict]:
        """The evaluations of ``run`` that define its final success."""
        if self.kind == "last":
            return run.evaluations[-1:]
        if self.kind == "mean-last-k":
            return run.evaluations[-self.k:]
        return [max(run.evaluations, key=success_mean)]

    def success(self, run: Run) -> float:
        return statistics.fmean(success_mean(row) for row in self.evaluations(run))

    def task_success(self, run: Run) -> dict[str, float]:
        per_task: dict[str, list[float]] = {}
        for row in self.evaluations(run):
            for task, value in task_success(row).items():
                per_task.setdefault(task, []).append(value)
        return {task: statistics.fmean(values) for task, values in per_task.items()}

    @property
    def label(self) -> str:
        """Short name for table headers: "last evaluation", "mean of last 10 evaluations"."""
        if self.kind == "last":
            return "last evaluation"
        if self.kind == "mean-last-k":
            return f"mean of last {self.k} evaluations"
        return "best evaluation"

    @property
    def sentence(self) -> str:
        """What the number is, for the note under the table."""
        if self.kind == "last":
            return ("Final success = eval success of the last evaluation of each run, "
                    "averaged over tasks.")
        if self.kind == "mean-last-k":
            return (f"Final success = eval success averaged over the last {self.k} evaluations "
                    "of each run (all of them if fewer) and over tasks.")
        return ("Final success = the highest eval success (averaged over tasks) of any "
                "evaluation of each run: an optimistic, selected number.")


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
    "obsonly": "MTL SAC",  # mtrl's MT-SAC: no task input (should_use_task_encoder=False)
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
    final: FinalSuccess = field(default_factory=lambda: FinalSuccess())
    run_finals: list[float] = field(default_factory=list)  # each run's final success, as runs
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


def summarize(runs: list[Run], final: FinalSuccess | None = None) -> list[MethodSummary]:
    """One summary per (combiner, arch), ranked by mean final success (1 = best, ties share).

    ``final`` says which evaluations of a run make its final success (default: the last).

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
                combiner, arch, variant, (name or "(unnamed)") if len(names) > 1 else None,
                final or FinalSuccess(),
            ))
    summaries.sort(key=lambda s: (-s.mean, s.method))
    for index, summary in enumerate(summaries):
        tied = index > 0 and summary.mean == summaries[index - 1].mean
        summary.rank = summaries[index - 1].rank if tied else index + 1
    return summaries


def _summarize_group(
    combiner: str, arch: str, group: list[Run], variant: str | None, final: FinalSuccess
) -> MethodSummary:
    group.sort(key=lambda run: (run.seed is None, run.seed or 0, str(run.path)))
    finals = [final.success(run) for run in group]
    mean, stderr = mean_and_stderr(finals)
    per_task: dict[str, list[float]] = {}
    for run in group:
        for task, value in final.task_success(run).items():
            per_task.setdefault(task, []).append(value)
    summary = MethodSummary(
        combiner, arch, group, mean, stderr,
        {task: statistics.fmean(values) for task, values in per_task.items()}, variant=variant,
        final=final, run_finals=finals,
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
        points = [(row["step"], row[key]) for row in run.evaluations if is_number(row.get(key))]
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
