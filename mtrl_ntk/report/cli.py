"""The report pipeline and its command line (``scripts/summarize.py``).

``generate_report`` runs the stages in order: read the runs (``runs``), compute
each method's final success over seeds (``statistics``), draw the figures
(``plots``), render Markdown, CSV and HTML (``render``), and write the files
atomically (a reader under ``--watch`` never sees half a file).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mtrl_ntk.atomic import write_text_atomically
from mtrl_ntk.report.aggregate import DEFAULT_BOOTSTRAP_SAMPLES, Aggregates, compute_aggregates
from mtrl_ntk.report.plots import (
    ntk_methods,
    plot_aggregates,
    plot_curves,
    plot_improvement,
    plot_ntk,
    plot_profiles,
    plot_sample_efficiency,
    plot_task_heatmap,
)
from mtrl_ntk.report.render import (
    CAPTIONS,
    aggregate_csv,
    build_tables,
    render_html,
    render_markdown,
    skipped_lines,
    write_csv,
)
from mtrl_ntk.report.runs import Run, Skipped, scan_runs
from mtrl_ntk.report.statistics import (
    FINAL_CHOICES,
    FinalSuccess,
    MethodSummary,
    summarize,
    task_order,
)


@dataclass
class Report:
    """What one pass over RUNS_DIR produced."""

    runs: list[Run]
    skipped: list[Skipped]
    summaries: list[MethodSummary]
    files: list[Path]
    notes: list[str]
    aggregates: Aggregates | None = None


def _write_atomic(path: Path, data: bytes | str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file (--watch)."""
    write_text_atomically(path, data)


def generate_report(
    runs_dir: Path, out_dir: Path | None = None, final: FinalSuccess | None = None,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES, improvement_of: str | None = None,
) -> Report:
    """Scan runs_dir and write summary.md, summary.csv, rliable.csv, the PNGs and report.html
    into out_dir.

    ``final`` defines each run's final success (default: its last evaluation);
    ``bootstrap_samples`` and ``improvement_of`` go to ``aggregate.compute_aggregates``
    (the number of stratified-bootstrap samples per interval; the method whose
    probability of improvement over every other is shown, default ntkmtl).
    """
    final = final or FinalSuccess()
    runs_dir = Path(runs_dir)
    out_dir = Path(out_dir) if out_dir is not None else runs_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, skipped = scan_runs(runs_dir, exclude=[out_dir])
    summaries = summarize(runs, final)
    tasks = task_order([run for s in summaries for run in s.runs])
    notes = [note for s in summaries for note in s.notes]

    images: dict[str, bytes] = {}
    aggregates = None
    if summaries:
        aggregates = compute_aggregates(summaries, tasks, bootstrap_samples, improvement_of)
        notes.extend(aggregates.notes)
        if aggregates.methods:
            images["aggregates.png"] = plot_aggregates(aggregates)
            if aggregates.improvement:
                images["improvement.png"] = plot_improvement(aggregates)
            images["profiles.png"] = plot_profiles(aggregates)
            if aggregates.curves:
                images["sample_efficiency.png"] = plot_sample_efficiency(aggregates)
        images["curves.png"] = plot_curves(summaries)
        images["tasks.png"] = plot_task_heatmap(summaries, tasks)
        with_ntk = ntk_methods(summaries)
        if with_ntk:
            images["ntk.png"] = plot_ntk(with_ntk, tasks)
        else:
            notes.append("No run logged NTK eigenvalues or varying combiner weights: no ntk.png.")
    else:
        notes.append(f"No run with an evaluation found under {runs_dir}.")
    for name in CAPTIONS:
        if name in images:
            _write_atomic(out_dir / name, images[name])
        else:
            (out_dir / name).unlink(missing_ok=True)  # stale image from an earlier pass

    tables = build_tables(summaries, tasks, runs_dir, final, aggregates)
    title = report_title(runs)
    texts = {
        "summary.md": render_markdown(tables, skipped, notes, list(images), runs_dir, title),
        "summary.csv": write_csv(summaries, tasks),
        "rliable.csv": aggregate_csv(aggregates),
        "report.html": render_html(tables, skipped, notes, images, runs_dir, title),
    }
    for name, text in texts.items():
        _write_atomic(out_dir / name, text)
    files = [out_dir / name for name in [*texts, *images]]
    return Report(runs, skipped, summaries, files, notes, aggregates)


def report_title(runs: list[Run]) -> str:
    """Title naming the benchmark (e.g. MT10) when all runs state the same one, else generic."""
    benchmarks = {run.setting[0] for run in runs}
    if len(benchmarks) == 1 and None not in benchmarks:
        return f"{next(iter(benchmarks)).upper()} results"
    return "Meta-World results"



def _report_once(
    runs_dir: Path, out_dir: Path | None, warned: set[str], final: FinalSuccess | None = None,
    **statistics,
) -> Report:
    report = generate_report(runs_dir, out_dir, final, **statistics)
    for line in skipped_lines(report.skipped, runs_dir):
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
    runs_dir: Path, out_dir: Path | None, interval: float, max_iterations: int | None = None,
    final: FinalSuccess | None = None, **statistics,
) -> int:
    """Regenerate the report every ``interval`` seconds; ``max_iterations`` bounds it (tests).

    ``statistics``: ``bootstrap_samples`` and ``improvement_of`` of ``generate_report``.
    """
    warned: set[str] = set()
    iteration = 0
    while True:
        _report_once(runs_dir, out_dir, warned, final, **statistics)
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
    parser.add_argument("--final", choices=FINAL_CHOICES, default="last",
                        help="a run's final success: its last evaluation (default; what FAMO's "
                        "authors report), the mean of its last K evaluations, or its best one")
    parser.add_argument("--last-k", type=int, default=10, metavar="K",
                        help="K for --final mean-last-k (default 10: the last 100k steps at "
                        "eval_every_steps=10000)")
    parser.add_argument("--bootstrap-samples", type=int, default=DEFAULT_BOOTSTRAP_SAMPLES,
                        metavar="N", help="stratified-bootstrap samples per confidence interval "
                        f"of the rliable statistics (default {DEFAULT_BOOTSTRAP_SAMPLES}; "
                        "rliable's papers use up to 50000)")
    parser.add_argument("--improvement-of", default=None, metavar="METHOD",
                        help="method whose probability of improvement over every other is "
                        "reported: a combiner (ntkmtl) or a method label ('ntkmtl / mtsac'); "
                        "default ntkmtl when it has runs")
    args = parser.parse_args(argv)
    if args.bootstrap_samples < 1:
        parser.error(f"--bootstrap-samples must be >= 1, got {args.bootstrap_samples}")
    if args.last_k < 1:
        parser.error(f"--last-k must be >= 1, got {args.last_k}")
    final = FinalSuccess(args.final, args.last_k)
    if not args.runs_dir.is_dir():
        parser.error(f"RUNS_DIR {args.runs_dir} is not a directory")
    if args.interval < 0:
        parser.error(f"--interval must be >= 0, got {args.interval}")
    if args.max_iterations is not None and args.max_iterations < 1:
        parser.error(f"--max-iterations must be >= 1, got {args.max_iterations}")
    try:
        statistics = {"bootstrap_samples": args.bootstrap_samples,
                      "improvement_of": args.improvement_of}
        if args.watch:
            watch(args.runs_dir, args.out, args.interval, args.max_iterations, final,
                  **statistics)
        else:
            _report_once(args.runs_dir, args.out, set(), final, **statistics)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
