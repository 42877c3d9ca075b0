"""Aggregate statistics of final success with ``rliable`` (Agarwal et al., NeurIPS 2021,
"Deep RL at the edge of the statistical precipice"): interquartile mean (IQM), mean,
median and optimality gap with stratified-bootstrap confidence intervals, the probability
of improvement of one method over each other, performance profiles, and sample-efficiency
curves (IQM of success over training steps with confidence bands).

A method's scores are a matrix [N runs, T tasks] of per-task final success (in [0, 1],
so no normalisation and an optimality gap at gamma = 1), the definition chosen by
``--final`` (``statistics.FinalSuccess``). The intervals are percentile intervals of a
bootstrap stratified over tasks: each resample draws N runs with replacement within each
task (rliable's ``StratifiedBootstrap`` with ``task_bootstrap=False``: the uncertainty of
a repeat with other seeds on the same tasks; for the curves [N, T, S], as rliable does,
within each task and step, so the bands are pointwise). The probability of improvement
resamples the two methods independently (rliable's ``StratifiedIndependentBootstrap``).
With one run, every resample is that run and the interval has zero width: "n/a".

Every point estimate is rliable's own (``rliable.metrics``: ``aggregate_iqm``,
``aggregate_mean``, ``aggregate_median``, ``aggregate_optimality_gap``,
``probability_of_improvement``), except the performance profile's, which is the batched
statistic on the scores (rliable's ``library.run_score_deviation``, ``np.mean(scores > tau)``,
lives in ``rliable.library``, whose import costs seconds: see ``_rliable_metrics``).
What rliable cannot do for this report, and what is done instead:
- speed: its bootstrap (``library.get_interval_estimates`` on arch's ``IIDBootstrap``)
  calls the statistic once per resample in Python, and its IQM (``scipy.stats.trim_mean``)
  and probability of improvement (``scipy.stats.mannwhitneyu`` per task) cost 0.2 to 4 ms
  a call: for 12 methods x 10 seeds x 67 evaluations, 100 resamples took 96 s with
  rliable's bootstrap and 1.6 s here (``scripts/bench_summarize.py --rliable-samples 100``,
  a shared 2-core machine). ``stratified_bootstrap`` draws the same resamples for all samples at
  once, and the ``batched_*`` statistics compute rliable's definitions over the sample
  axis in NumPy; the tests check the statistics against rliable's functions and the
  intervals against ``library.get_interval_estimates``;
- reproducibility: rliable draws its indices from NumPy's global random state whatever
  ``random_state`` it is given (``np.random.choice`` in ``update_indices``); here a
  ``numpy.random.Generator`` seeded with ``seed`` draws them;
- figures: its ``plot_utils`` label the x axis with ``fig.text`` and put every method's
  curve on one frame grid; ``plots`` draws the figures itself, with axis labels and units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mtrl_ntk.report.runs import Run, task_success
from mtrl_ntk.report.statistics import FinalSuccess, MethodSummary

DEFAULT_BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
METRICS = ("IQM", "Mean", "Median", "Optimality gap")
PROFILE_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # [K] success-rate thresholds tau
_CHUNK_VALUES = 4_000_000  # resampled values held at once (32 MB of float64)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap confidence interval [low, high]."""

    point: float
    low: float
    high: float


@dataclass
class Curve:
    """A statistic over evaluation steps with its pointwise interval, each [S]."""

    steps: np.ndarray
    point: np.ndarray
    low: np.ndarray
    high: np.ndarray


@dataclass
class Aggregates:
    """What rliable says about the methods of one report.

    ``methods`` are the methods scored (``MethodSummary.method``), best IQM first;
    ``metrics[method][metric]`` the aggregate metrics (``METRICS``);
    ``improvement[other]`` the probability that ``reference`` improves on ``other``;
    ``profiles[method]`` the performance profile: the score distribution (fraction of
    runs x tasks with success above each of ``PROFILE_THRESHOLDS``); ``curves[method]``
    the IQM of per-task success on the evaluation steps every run of the method reached.
    """

    tasks: list[str]
    samples: int
    methods: list[str] = field(default_factory=list)
    num_runs: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, Interval]] = field(default_factory=dict)
    reference: str | None = None
    improvement: dict[str, Interval] = field(default_factory=dict)
    profiles: dict[str, Curve] = field(default_factory=dict)
    curves: dict[str, Curve] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _rliable_metrics():
    """``rliable.metrics`` (the ``report`` extra), imported on first use.

    Not ``rliable.library``: it imports arch, pandas and statsmodels (seconds) for the
    bootstrap that ``stratified_bootstrap`` replaces.
    """
    from rliable import metrics

    return metrics


def score_matrix(runs: list[Run], tasks: list[str], final: FinalSuccess) -> np.ndarray:
    """Per-task final success of each run: [N, T] (rliable's ``num_runs x num_tasks``)."""
    rows = []
    for run in runs:
        per_task = final.task_success(run)
        rows.append([per_task[task] for task in tasks])
    return np.asarray(rows, dtype=np.float64)


def curve_scores(runs: list[Run], tasks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-task success of each run at the steps every run evaluated: ([S], [N, T, S]).

    The trainer evaluates every run at the same steps; a run that has not finished
    yet shortens the curve to the steps it reached (the bootstrap needs every run at
    every step).
    """
    common: set | None = None
    for run in runs:
        steps = {row["step"] for row in run.evaluations if set(tasks) <= set(task_success(row))}
        common = steps if common is None else common & steps
    steps = np.array(sorted(common or ()), dtype=np.float64)  # [S]
    scores = np.empty((len(runs), len(tasks), len(steps)))  # [N, T, S]
    for index, run in enumerate(runs):
        by_step = {row["step"]: task_success(row) for row in run.evaluations}
        for column, step in enumerate(steps):
            scores[index, :, column] = [by_step[step][task] for task in tasks]
    return steps, scores


def point_metrics(scores: np.ndarray) -> np.ndarray:
    """rliable's IQM, mean, median and optimality gap (gamma = 1) of scores [N, T]: [4]."""
    metrics = _rliable_metrics()
    return np.array([
        metrics.aggregate_iqm(scores),
        metrics.aggregate_mean(scores),
        metrics.aggregate_median(scores),
        metrics.aggregate_optimality_gap(scores, gamma=1.0),
    ])


def point_iqm_over_steps(scores: np.ndarray) -> np.ndarray:
    """rliable's IQM at each step of scores [N, T, S]: [S]."""
    metrics = _rliable_metrics()
    return np.array([metrics.aggregate_iqm(scores[..., step]) for step in range(scores.shape[-1])])


def batched_iqm(samples: np.ndarray) -> np.ndarray:
    """IQM over runs and tasks of each resample: [B, N, T] -> [B], [B, N, T, S] -> [B, S].

    ``rliable.metrics.aggregate_iqm`` = ``scipy.stats.trim_mean(x, 0.25, axis=None)``:
    drop ``int(0.25 n)`` of the n = N*T values at each end, average the rest.
    """
    batch, runs, tasks = samples.shape[:3]
    count = runs * tasks
    flat = samples.reshape(batch, count, -1).transpose(0, 2, 1)  # [B, S or 1, n]
    cut = int(0.25 * count)
    iqm = np.sort(flat, axis=-1)[..., cut:count - cut].mean(axis=-1)  # [B, S or 1]
    return iqm if samples.ndim == 4 else iqm[:, 0]


def batched_final_statistics(samples: np.ndarray) -> np.ndarray:
    """rliable's four ``METRICS`` then the score distribution at ``PROFILE_THRESHOLDS`` of
    each resample [B, N, T]: [B, 4 + K].

    Mean = mean of the per-task means, median = median of the per-task means (rliable's
    ``aggregate_mean``, ``aggregate_median``), optimality gap = 1 - mean of min(x, 1),
    profile = fraction of the N*T scores above tau (``library.run_score_deviation``).
    """
    task_means = samples.mean(axis=1)  # [B, T]
    batch = samples.shape[0]
    flat = samples.reshape(batch, -1)  # [B, N*T]
    profile = (flat[:, :, None] > PROFILE_THRESHOLDS[None, None, :]).mean(axis=1)  # [B, K]
    return np.concatenate([
        batched_iqm(samples)[:, None],
        task_means.mean(axis=1)[:, None],
        np.median(task_means, axis=1)[:, None],
        (1.0 - np.minimum(flat, 1.0).mean(axis=1))[:, None],
        profile,
    ], axis=1)


def batched_improvement(samples_x: np.ndarray, samples_y: np.ndarray) -> np.ndarray:
    """P(X > Y) averaged over tasks for each resample pair [B, N_x, T], [B, N_y, T]: [B].

    ``rliable.metrics.probability_of_improvement``: per task, the Mann-Whitney U of X over
    Y divided by N_x N_y, the fraction of run pairs with x > y, ties counting one half.
    """
    x, y = samples_x[:, :, None, :], samples_y[:, None, :, :]  # [B, N_x, 1, T], [B, 1, N_y, T]
    per_task = (x > y).mean(axis=(1, 2)) + 0.5 * (x == y).mean(axis=(1, 2))  # [B, T]
    return per_task.mean(axis=1)


def stratified_bootstrap(
    scores: np.ndarray, statistic, samples: int, rng: np.random.Generator
) -> np.ndarray:
    """``statistic`` of ``samples`` stratified resamples of scores [N, T, ...]: [samples, ...].

    Each resample draws, independently for every task (and every further index, e.g.
    the step), N runs with replacement: rliable's ``StratifiedBootstrap.update_indices``.
    ``statistic`` maps a batch [B, N, T, ...] to [B, ...]; batches hold at most
    ``_CHUNK_VALUES`` values.
    """
    flat = scores.reshape(-1)  # [N * C], C = T * ... values per run
    per_run = flat.size // scores.shape[0]
    columns = np.arange(per_run)  # [C]
    batch = max(1, _CHUNK_VALUES // scores.size)
    results = []
    for start in range(0, samples, batch):
        size = min(batch, samples - start)
        runs = rng.integers(0, scores.shape[0], size=(size, scores.shape[0], per_run))
        resampled = flat[runs * per_run + columns]  # [B, N, C]: run drawn per column
        results.append(statistic(resampled.reshape(size, *scores.shape)))
    return np.concatenate(results)


def percentile_interval(bootstrapped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``CONFIDENCE`` percentile interval over axis 0 (arch's ``method='percentile'``)."""
    tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
    low, high = np.percentile(bootstrapped, [tail, 100.0 - tail], axis=0)
    return low, high


def compute_aggregates(
    summaries: list[MethodSummary], tasks: list[str], samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    reference: str | None = None, seed: int = BOOTSTRAP_SEED,
) -> Aggregates:
    """rliable's statistics of the methods in ``summaries`` over ``tasks``.

    ``reference`` is the method whose probability of improvement over every other is
    estimated: a ``MethodSummary.method`` or a combiner name; default the first method
    whose combiner is ntkmtl, else none. ``samples`` bootstrap resamples per interval,
    drawn from a generator seeded with ``seed``. Methods whose runs lack one of ``tasks``
    in an evaluation used are left out with a note.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    result = Aggregates(list(tasks), samples)
    finals: dict[str, np.ndarray] = {}
    for summary in summaries:
        final = summary.final
        missing = sorted({
            task for run in summary.runs for task in tasks
            if task not in final.task_success(run)
        })
        if missing:
            result.notes.append(
                f"{summary.method}: no final success for {', '.join(missing)}; "
                "left out of the rliable statistics"
            )
            continue
        finals[summary.method] = score_matrix(summary.runs, tasks, final)  # [N, T]
        result.num_runs[summary.method] = len(summary.runs)
    if not finals or not tasks:
        return result
    rng = np.random.default_rng(seed)

    for method, scores in finals.items():
        low, high = percentile_interval(
            stratified_bootstrap(scores, batched_final_statistics, samples, rng))  # [4 + K]
        points = point_metrics(scores)
        result.metrics[method] = {
            name: Interval(float(points[index]), float(low[index]), float(high[index]))
            for index, name in enumerate(METRICS)
        }
        count = len(METRICS)
        profile = batched_final_statistics(scores[None])[0, count:]  # [K]
        result.profiles[method] = Curve(PROFILE_THRESHOLDS, profile, low[count:], high[count:])
    result.methods = sorted(finals, key=lambda m: (-result.metrics[m]["IQM"].point, m))

    result.reference = _reference_method(summaries, finals, reference, result.notes)
    if result.reference is not None:
        metrics = _rliable_metrics()
        best = finals[result.reference]
        for other in result.methods:
            if other == result.reference:
                continue
            worse = finals[other]
            resampled_best = stratified_bootstrap(best, lambda batch: batch, samples, rng)
            resampled_other = stratified_bootstrap(worse, lambda batch: batch, samples, rng)
            low, high = percentile_interval(batched_improvement(resampled_best, resampled_other))
            point = metrics.probability_of_improvement(best, worse)
            result.improvement[other] = Interval(float(point), float(low), float(high))

    for summary in summaries:
        if summary.method not in finals:
            continue
        steps, scores = curve_scores(summary.runs, tasks)  # [S], [N, T, S]
        if not len(steps):
            continue
        low, high = percentile_interval(stratified_bootstrap(scores, batched_iqm, samples, rng))
        result.curves[summary.method] = Curve(steps, point_iqm_over_steps(scores), low, high)
    return result


def _reference_method(
    summaries: list[MethodSummary], finals: dict[str, np.ndarray], wanted: str | None,
    notes: list[str],
) -> str | None:
    """The method of ``wanted`` (method label or combiner), default the first ntkmtl one."""
    scored = [s for s in summaries if s.method in finals]
    if wanted is None:
        candidates = [s.method for s in scored if s.combiner == "ntkmtl"]
        if not candidates:
            notes.append("No ntkmtl run: no probability of improvement (choose a method "
                         "with --improvement-of).")
    else:
        candidates = [s.method for s in scored if wanted in (s.method, s.combiner)]
        if not candidates:
            known = ", ".join(sorted(finals))
            notes.append(f"--improvement-of {wanted!r} matches no method ({known}): "
                         "no probability of improvement.")
    if not candidates:
        return None
    if len(scored) < 2:
        notes.append("One method only: no probability of improvement.")
        return None
    return candidates[0]
