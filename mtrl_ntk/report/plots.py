"""The report's figures (PNG bytes): learning curves, the per-task heatmap, NTK eigenvalues.

- ``plot_curves``: mean eval success against environment steps with a ±1 stderr band,
  seeds aligned on common steps (``statistics.aligned_curve``);
- ``plot_task_heatmap``: per-task final success, methods x tasks;
- ``plot_ntk``: per-task NTK eigenvalue λ_i and combiner weight over training (the
  paper's Fig. 2), for the methods that logged them (``ntk_methods``);
- from rliable's statistics (``aggregate.Aggregates``): ``plot_aggregates`` (IQM, mean,
  median, optimality gap with 95% intervals), ``plot_improvement`` (probability of
  improvement), ``plot_profiles`` (performance profiles), ``plot_sample_efficiency`` (IQM
  over steps with bands).

Every axis is labelled with its quantity and unit: success rates are fractions of
evaluation episodes in [0, 1]; steps are environment steps per task (the trainer's
``step``: one step moves all tasks' environments).

matplotlib is imported on first use, with the Agg backend (no display needed).
"""

from __future__ import annotations

import io

import numpy as np

from mtrl_ntk.report.aggregate import METRICS, Aggregates
from mtrl_ntk.report.runs import SUCCESS_MEAN_KEY, Run, is_number
from mtrl_ntk.report.statistics import MethodSummary, aligned_curve

NETWORKS = ("critic", "actor")
STEPS_LABEL = "environment steps per task"
SUCCESS_UNIT = "fraction of episodes, 0-1"



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
    axes.set_xlabel(STEPS_LABEL)


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
    axes.set_ylabel(f"eval success rate, mean over tasks ({SUCCESS_UNIT})")
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
    figure.colorbar(image, ax=axes,
                    label="final success rate (0-1)",
                    fraction=0.03, pad=0.02)
    axes.set_xlabel("task")
    axes.set_ylabel("method (combiner / arch, seeds)")
    axes.set_title(f"Final eval success per task ({summaries[0].final.label}; mean over seeds)")
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
        if "/weight/" in key and key.startswith("combiner/") and is_number(value)
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
                    axes.set_ylabel("NTK eigenvalue λ_i (log scale)", fontsize=8)
                else:
                    axes.set_ylabel("w_i (dimensionless)", fontsize=8)
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


def _interval_colors(methods: list[str]) -> dict[str, tuple]:
    plt = _pyplot()
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {method: palette(index % palette.N) for index, method in enumerate(methods)}


def _method_label(aggregates: Aggregates, method: str) -> str:
    return f"{method} (n={aggregates.num_runs[method]})"


def plot_aggregates(aggregates: Aggregates) -> bytes:
    """rliable's aggregate metrics of final success: point and 95% interval per method.

    One panel per metric (IQM, mean, median, optimality gap); methods best IQM first.
    """
    plt = _pyplot()
    methods = aggregates.methods
    colors = _interval_colors(methods)
    figure, axes_row = plt.subplots(
        1, len(METRICS), figsize=(3.2 * len(METRICS) + 2.5, 1.2 + 0.45 * len(methods)),
        sharey=True, squeeze=False,
    )
    for axes, metric in zip(axes_row[0], METRICS):
        for row, method in enumerate(methods):
            value = aggregates.metrics[method][metric]
            axes.barh(row, value.high - value.low, left=value.low, height=0.6,
                      color=colors[method], alpha=0.6)
            axes.vlines(value.point, row - 0.3, row + 0.3, color="black", linewidth=2)
        values = [aggregates.metrics[method][metric] for method in methods]
        low, high = min(v.low for v in values), max(v.high for v in values)
        margin = max(0.05, 0.1 * (high - low))  # a readable range even for equal scores
        axes.set_xlim(max(-0.01, low - margin), min(1.01, high + margin))
        axes.set_title(metric + (" (lower is better)" if metric == "Optimality gap" else ""),
                       fontsize=10)
        axes.set_xlabel("1 − final success rate (0-1)" if metric == "Optimality gap"
                        else f"final success rate ({SUCCESS_UNIT})", fontsize=9)
        axes.grid(axis="x", alpha=0.3)
    axes_row[0, 0].set_yticks(range(len(methods)),
                              [_method_label(aggregates, m) for m in methods], fontsize=8)
    axes_row[0, 0].set_ylabel("method (combiner / arch, seeds)")
    axes_row[0, 0].invert_yaxis()
    figure.suptitle(f"Aggregate final success over runs x tasks: point (black) and 95% "
                    f"stratified-bootstrap interval ({aggregates.samples} samples)", fontsize=10)
    figure.tight_layout()
    return _png_bytes(figure)


def plot_improvement(aggregates: Aggregates) -> bytes:
    """P(reference > other) with its 95% interval, one bar per other method."""
    plt = _pyplot()
    others = list(aggregates.improvement)
    figure, axes = plt.subplots(figsize=(8.5, 1.4 + 0.45 * len(others)))
    for row, other in enumerate(others):
        value = aggregates.improvement[other]
        axes.barh(row, value.high - value.low, left=value.low, height=0.6, color="tab:blue",
                  alpha=0.6)
        axes.vlines(value.point, row - 0.3, row + 0.3, color="black", linewidth=2)
    axes.axvline(0.5, color="gray", linestyle="--", linewidth=1)
    axes.set_xlim(0.0, 1.0)
    axes.set_yticks(range(len(others)), [_method_label(aggregates, m) for m in others],
                    fontsize=8)
    axes.invert_yaxis()
    axes.set_ylabel("other method Y (combiner / arch, seeds)")
    axes.set_xlabel(f"P({aggregates.reference} > Y): probability of improvement (0-1; "
                    "0.5 = no difference)")
    axes.grid(axis="x", alpha=0.3)
    axes.set_title(f"Probability of improvement of {aggregates.reference}, 95% "
                   f"stratified-bootstrap interval ({aggregates.samples} samples)", fontsize=10)
    return _png_bytes(figure)


def plot_profiles(aggregates: Aggregates) -> bytes:
    """Performance profiles: fraction of runs x tasks above each success threshold, bands."""
    plt = _pyplot()
    colors = _interval_colors(aggregates.methods)
    figure, axes = plt.subplots(figsize=(8.5, 5.2))
    for method in aggregates.methods:
        curve = aggregates.profiles[method]
        axes.plot(curve.steps, curve.point, color=colors[method], linewidth=2,
                  label=_method_label(aggregates, method))
        axes.fill_between(curve.steps, curve.low, curve.high, color=colors[method], alpha=0.2,
                          linewidth=0)
    axes.set_xlabel(f"final success-rate threshold τ ({SUCCESS_UNIT})")
    axes.set_ylabel("fraction of runs x tasks with final success > τ")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title("Performance profiles (score distributions), 95% interval bands")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                title="method (best IQM first)", title_fontsize=8)
    return _png_bytes(figure)


def plot_sample_efficiency(aggregates: Aggregates) -> bytes:
    """IQM of eval success over runs x tasks against steps, 95% interval bands."""
    plt = _pyplot()
    colors = _interval_colors(aggregates.methods)
    figure, axes = plt.subplots(figsize=(8.5, 5.2))
    for method in aggregates.methods:
        if method not in aggregates.curves:
            continue
        curve = aggregates.curves[method]
        axes.plot(curve.steps, curve.point, color=colors[method], linewidth=2, marker=".",
                  label=_method_label(aggregates, method))
        axes.fill_between(curve.steps, curve.low, curve.high, color=colors[method], alpha=0.2,
                          linewidth=0)
    _label_steps_axis(axes)
    axes.set_ylabel(f"IQM of eval success rate over runs x tasks ({SUCCESS_UNIT})")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title("Sample efficiency: IQM with 95% stratified-bootstrap bands "
                   "(steps every seed reached)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                title="method (best IQM first)", title_fontsize=8)
    return _png_bytes(figure)
