"""The report's figures (PNG bytes): learning curves, the per-task heatmap, NTK eigenvalues.

- ``plot_curves``: mean eval success against environment steps with a ±1 stderr band,
  seeds aligned on common steps (``statistics.aligned_curve``);
- ``plot_task_heatmap``: per-task final success, methods x tasks;
- ``plot_ntk``: per-task NTK eigenvalue λ_i and combiner weight over training (the
  paper's Fig. 2), for the methods that logged them (``ntk_methods``).

matplotlib is imported on first use, with the Agg backend (no display needed).
"""

from __future__ import annotations

import io

import numpy as np

from mtrl_ntk.report.runs import SUCCESS_MEAN_KEY, Run, is_number
from mtrl_ntk.report.statistics import MethodSummary, aligned_curve

NETWORKS = ("critic", "actor")



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
    figure.colorbar(image, ax=axes, label=f"final success ({summaries[0].final.label})",
                    fraction=0.03, pad=0.02)
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
