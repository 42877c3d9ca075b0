"""Aggregate training runs into a Table-4-style report: Markdown, CSV, PNG and one HTML page.

``python scripts/summarize.py RUNS_DIR [--out DIR] [--final last|mean-last-k|best]
[--last-k K] [--watch [--interval S]]``

Reads every run directory under RUNS_DIR (any depth; a run is a directory with
``config.yaml`` and/or ``metrics.jsonl``, laid out as the trainer writes it:
``config.yaml`` with ``combiner.name``, ``agent.arch``, ``seed``,
``train.num_steps``; ``metrics.jsonl`` with one JSON object per evaluation;
``result.json`` once the run finished), groups the runs by (combiner, arch)
and writes into DIR (default RUNS_DIR/report):

- ``summary.md``, ``summary.csv``: one row per method with the final success
  (``--final``: the last evaluation of each run by default, the mean of its last
  K evaluations, or its best one; the table header names the definition), mean ±
  standard error over seeds, where stderr = sample standard deviation (ddof = 1)
  / sqrt(n), undefined ("n/a", empty in the CSV) for one seed; per-task means;
  rank; and the published Table 4 numbers of Qin et al. (NeurIPS 2025) beside
  ours. Those were measured on Meta-World v1 environments; we run the -v3 tasks,
  so they are a reference point, not a target to match digit for digit.
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

One module per stage: ``runs`` (reading run directories), ``statistics`` (the
final-success definition, mean ± stderr, ranks, aligned curves, the published
numbers), ``plots`` (the figures), ``render`` (tables, Markdown, CSV, HTML from
``templates/report.html.j2``), ``cli`` (the pipeline and the command line). The
names below stay importable from ``mtrl_ntk.report``.
"""

from mtrl_ntk.report.cli import Report, generate_report, main, report_title, watch
from mtrl_ntk.report.plots import (
    NETWORKS,
    ntk_methods,
    plot_curves,
    plot_ntk,
    plot_task_heatmap,
)
from mtrl_ntk.report.render import (
    CAPTIONS,
    NO_RUNS,
    STDERR_NOTE,
    Tables,
    build_tables,
    render_html,
    render_markdown,
    stderr_note,
    write_csv,
)
from mtrl_ntk.report.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    RESULT_FILE,
    SUCCESS_MEAN_KEY,
    TASK_SUCCESS_PREFIX,
    Run,
    Skipped,
    find_run_dirs,
    load_run,
    read_config,
    read_metrics,
    scan_runs,
    success_mean,
    task_success,
)
from mtrl_ntk.report.statistics import (
    FINAL_CHOICES,
    PUBLISHED_NOTE,
    PUBLISHED_TABLE_4,
    FinalSuccess,
    MethodSummary,
    aligned_curve,
    mean_and_stderr,
    published_row,
    summarize,
    task_order,
)

__all__ = [
    "CAPTIONS", "CONFIG_FILE", "FINAL_CHOICES", "METRICS_FILE", "NETWORKS", "NO_RUNS",
    "PUBLISHED_NOTE", "PUBLISHED_TABLE_4", "RESULT_FILE", "STDERR_NOTE", "SUCCESS_MEAN_KEY",
    "TASK_SUCCESS_PREFIX", "FinalSuccess", "MethodSummary", "Report", "Run", "Skipped", "Tables",
    "aligned_curve", "build_tables", "find_run_dirs", "generate_report", "load_run", "main",
    "mean_and_stderr", "ntk_methods", "plot_curves", "plot_ntk", "plot_task_heatmap",
    "published_row", "read_config", "read_metrics", "render_html", "render_markdown",
    "report_title", "scan_runs", "stderr_note", "success_mean", "summarize", "task_order",
    "task_success", "watch", "write_csv",
]
