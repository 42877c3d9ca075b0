"""Rendering: the report's tables as strings, then Markdown, CSV and one HTML page.

``build_tables`` formats every number once; ``render_markdown`` and ``render_html``
lay the same tables out (the HTML page from the Jinja2 template
``templates/report.html.j2``, autoescaped, images inline as base64 data URIs), and
``write_csv`` writes full precision. Every header that shows a final success names
its definition (``FinalSuccess.label``), and the note under the table spells it out.
"""

from __future__ import annotations

import base64
import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

from mtrl_ntk.report.aggregate import CONFIDENCE, METRICS, Aggregates, Interval
from mtrl_ntk.report.runs import Skipped
from mtrl_ntk.report.statistics import PUBLISHED_NOTE, FinalSuccess, MethodSummary

CAPTIONS = {
    "curves.png": "Learning curves",
    "tasks.png": "Per-task final success",
    "ntk.png": "NTK eigenvalues and combiner weights",
    "aggregates.png": "Aggregate metrics (rliable)",
    "improvement.png": "Probability of improvement (rliable)",
    "profiles.png": "Performance profiles (rliable)",
    "sample_efficiency.png": "Sample efficiency: IQM over steps (rliable)",
}
# The figures of rliable's statistics, shown in their own section.
RLIABLE_IMAGES = ("aggregates.png", "improvement.png", "profiles.png", "sample_efficiency.png")
NO_RUNS = "No run with an evaluation yet."
TEMPLATES = Path(__file__).resolve().parent / "templates"


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


def stderr_note(final: FinalSuccess) -> str:
    """The note under the main table: what the final success is and how stderr is computed."""
    used = "its last evaluation is used" if final.kind == "last" else "its evaluations so far count"
    return (
        f"{final.sentence} "
        "stderr = sample standard deviation over seeds (ddof = 1) / sqrt(n); "
        "'n/a' for a single seed. Rank 1 = highest mean. "
        f"* = at least one run has not finished ({used})."
    )


# Kept for callers of the old module: the note of the default definition.
STDERR_NOTE = stderr_note(FinalSuccess())


@dataclass
class Tables:
    """The report's tables as header + rows of strings, shared by Markdown and HTML."""

    main: tuple[list[str], list[list[str]]]
    per_task: tuple[list[str], list[list[str]]]
    runs: tuple[list[str], list[list[str]]]
    final: FinalSuccess = FinalSuccess()
    aggregates: tuple[list[str], list[list[str]]] = ([], [])
    improvement: tuple[list[str], list[list[str]]] = ([], [])
    rliable_note: str = ""

    @property
    def note(self) -> str:
        return stderr_note(self.final)


def _format_interval(value: Interval, runs: int) -> str:
    if runs < 2:
        return f"{value.point:.3f} [n/a: 1 seed]"
    return f"{value.point:.3f} [{value.low:.3f}, {value.high:.3f}]"


def rliable_note(aggregates: Aggregates) -> str:
    """What the rliable tables hold, for the note under them."""
    percent = f"{CONFIDENCE:.0%}"
    return (
        f"Computed with rliable (Agarwal et al., NeurIPS 2021) on the per-task final success of "
        f"each run over the {len(aggregates.tasks)} tasks: IQM = mean of the middle 50% of all "
        f"runs x tasks scores; mean and median of the per-task means; optimality gap = "
        f"1 − mean success (lower is better). [low, high] = {percent} percentile interval of "
        f"{aggregates.samples} stratified-bootstrap samples (runs resampled within each task; "
        f"--bootstrap-samples). P(X > Y) = probability that a run of X beats a run of Y on a "
        f"task (ties count 1/2), averaged over tasks; its interval above 0.5 means X is better "
        f"at {percent} confidence."
    )


def aggregate_tables(
    aggregates: Aggregates,
) -> tuple[tuple[list[str], list[list[str]]], tuple[list[str], list[list[str]]]]:
    """(metrics table, probability-of-improvement table) of rliable's statistics."""
    header = ["Method (combiner / arch)", "Seeds",
              *(f"{metric} [{CONFIDENCE:.0%} CI]" for metric in METRICS)]
    rows = [
        [method, str(aggregates.num_runs[method]),
         *(_format_interval(aggregates.metrics[method][metric], aggregates.num_runs[method])
           for metric in METRICS)]
        for method in aggregates.methods
    ]
    improvement_header = [
        "Method Y (combiner / arch)", "Seeds of Y",
        f"P({aggregates.reference} > Y) [{CONFIDENCE:.0%} CI]", "Verdict",
    ]
    improvement_rows = []
    for other, value in aggregates.improvement.items():
        if value.low > 0.5:
            verdict = f"{aggregates.reference} better"
        elif value.high < 0.5:
            verdict = f"{other} better"
        else:
            verdict = "no clear difference (interval holds 0.5)"
        improvement_rows.append([
            other, str(aggregates.num_runs[other]), _format_interval(value, 2), verdict,
        ])
    return (header, rows), (improvement_header, improvement_rows)


def build_tables(
    summaries: list[MethodSummary], tasks: list[str], runs_dir: Path,
    final: FinalSuccess | None = None, aggregates: Aggregates | None = None,
) -> Tables:
    final = final or (summaries[0].final if summaries else FinalSuccess())
    main_header = [
        "Rank", "Method (combiner / arch)", "Seeds",
        f"Final success: {final.label} (mean ± stderr)", "Published Table 4 (Meta-World v1)",
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
    run_header = [
        "Run", "Method", "Seed", "Status", "Evaluations", f"Final success ({final.label})",
    ]
    run_rows = [
        [_relative(run.path, runs_dir), s.method, "?" if run.seed is None else str(run.seed),
         run.status, str(len(run.evaluations)), f"{final.success(run):.3f}"]
        for s in summaries for run in s.runs
    ]
    tables = Tables((main_header, main_rows), (task_header, task_rows), (run_header, run_rows),
                    final)
    if aggregates is not None and aggregates.methods:
        tables.aggregates, tables.improvement = aggregate_tables(aggregates)
        tables.rliable_note = rliable_note(aggregates)
    return tables


def _relative(path: Path, root: Path) -> str:
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError:
        return str(path)
    return str(relative) if str(relative) != "." else "."


def write_csv(summaries: list[MethodSummary], tasks: list[str]) -> str:
    """summary.csv: full precision; stderr empty for one seed; ``final`` names the definition."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([
        "rank", "method", "combiner", "arch", "variant", "num_seeds", "num_incomplete", "seeds",
        "final", "success_mean", "success_stderr", "published_row", "published_mean",
        "published_stderr", *(f"success/{task}" for task in tasks),
    ])
    for s in summaries:
        published = s.published or ("", "", "")
        writer.writerow([
            s.rank, s.method, s.combiner, s.arch, s.variant or "", s.num_seeds, s.num_incomplete,
            " ".join("?" if seed is None else str(seed) for seed in s.seeds), s.final.label,
            repr(s.mean), "" if s.stderr is None else repr(s.stderr), *published,
            *(repr(s.task_means[t]) if t in s.task_means else "" for t in tasks),
        ])
    return buffer.getvalue()


def aggregate_csv(aggregates: Aggregates | None) -> str:
    """rliable.csv: per method, each metric's point and interval bounds and the probability
    of improvement of the reference method over it (empty for the reference itself)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = [metric.lower().replace(" ", "_") for metric in METRICS]
    writer.writerow([
        "method", "num_seeds", "bootstrap_samples",
        *(f"{name}{part}" for name in columns for part in ("", "_low", "_high")),
        "improvement_of", "probability_of_improvement", "probability_of_improvement_low",
        "probability_of_improvement_high",
    ])
    for method in aggregates.methods if aggregates is not None else []:
        values = [aggregates.metrics[method][metric] for metric in METRICS]
        improvement = aggregates.improvement.get(method)
        writer.writerow([
            method, aggregates.num_runs[method], aggregates.samples,
            *(repr(number) for value in values
              for number in (value.point, value.low, value.high)),
            aggregates.reference or "",
            *(("", "", "") if improvement is None
              else (repr(improvement.point), repr(improvement.low), repr(improvement.high))),
        ])
    return buffer.getvalue()


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def skipped_lines(skipped: list[Skipped], runs_dir: Path) -> list[str]:
    return [f"{_relative(item.path, runs_dir)}: {item.reason}" for item in skipped]


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
            f"## Final success per method ({tables.final.label})",
            _markdown_table(*tables.main),
            tables.note,
            PUBLISHED_NOTE,
            f"## Final success per task ({tables.final.label}; mean over seeds)",
            _markdown_table(*tables.per_task),
            *_markdown_rliable(tables, images),
            *(f"![{CAPTIONS[name]}]({name})" for name in images if name not in RLIABLE_IMAGES),
            "## Runs",
            _markdown_table(*tables.runs),
        ]
    else:
        parts.append(NO_RUNS)
    if notes:
        parts += ["## Notes", "\n".join(f"- {note}" for note in notes)]
    parts += ["## Skipped", "\n".join(f"- `{line}`" for line in skipped_lines(skipped, runs_dir))
              if skipped else "Nothing skipped."]
    return "\n\n".join(parts) + "\n"


def _markdown_rliable(tables: Tables, images: list[str]) -> list[str]:
    if not tables.aggregates[1]:
        return []
    parts = [
        f"## Aggregate metrics with rliable ({tables.final.label})",
        _markdown_table(*tables.aggregates),
    ]
    if tables.improvement[1]:
        parts += ["### Probability of improvement", _markdown_table(*tables.improvement)]
    parts.append(tables.rliable_note)
    parts += [f"![{CAPTIONS[name]}]({name})" for name in images if name in RLIABLE_IMAGES]
    return parts


def _html_environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every value is escaped; nothing is marked safe
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _html_cells(
    table: tuple[list[str], list[list[str]]], numeric_from: int
) -> dict[str, list]:
    """(classes, text) per cell: columns from ``numeric_from`` on are right-aligned (``num``),
    an unfinished run's status is highlighted (``incomplete``)."""

    def cell(index: int, text: str) -> tuple[str, str]:
        classes = ["num"] if index >= numeric_from else []
        if text.startswith("incomplete"):
            classes.append("incomplete")
        return " ".join(classes), text

    header, rows = table
    return {
        "header": [cell(index, text) for index, text in enumerate(header)],
        "rows": [[cell(index, text) for index, text in enumerate(row)] for row in rows],
    }


def render_html(
    tables: Tables, skipped: list[Skipped], notes: list[str], images: dict[str, bytes],
    runs_dir: Path, title: str,
) -> str:
    """One self-contained page: tables inline, images as base64 data URIs."""
    figures = [
        (CAPTIONS[name], base64.b64encode(data).decode("ascii"))
        for name, data in images.items() if name not in RLIABLE_IMAGES
    ]
    rliable_figures = [
        (CAPTIONS[name], base64.b64encode(images[name]).decode("ascii"))
        for name in RLIABLE_IMAGES if name in images
    ]
    return _html_environment().get_template("report.html.j2").render(
        title=title,
        runs_dir=str(runs_dir),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        tables=tables,
        main=_html_cells(tables.main, numeric_from=3),
        per_task=_html_cells(tables.per_task, numeric_from=1),
        runs=_html_cells(tables.runs, numeric_from=4),
        aggregates=_html_cells(tables.aggregates, numeric_from=1),
        improvement=_html_cells(tables.improvement, numeric_from=1),
        rliable_figures=rliable_figures,
        published_note=PUBLISHED_NOTE,
        figures=figures,
        notes=notes,
        skipped=skipped_lines(skipped, runs_dir),
        no_runs=NO_RUNS,
    )
