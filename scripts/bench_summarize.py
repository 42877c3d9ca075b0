"""Time the report (scripts/summarize.py) on a Table-4-sized set of synthetic runs.

    python scripts/bench_summarize.py [--methods 12] [--seeds 10] [--evaluations 67]
                                      [--bootstrap-samples N ...]

Writes METHODS x SEEDS run directories with EVALUATIONS evaluations of the ten MT10 tasks
each (success rates in steps of 0.1, one episode per task, rising with training) into a
temporary directory, then times, in this one process: reading the runs, rliable's
statistics (``report.aggregate``) at each ``--bootstrap-samples``, and the whole report
(``generate_report``: statistics, every figure, Markdown, CSV, HTML) at the first.

``--rliable-samples N`` also times, in the same process, the same intervals computed by
rliable's own bootstrap (``library.get_interval_estimates``, one Python call of rliable's
metric per resample) and by ``compute_aggregates``, both at N resamples: the reason the
report resamples in NumPy (see ``mtrl_ntk/report/aggregate.py``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from mtrl_ntk.report import generate_report, scan_runs, summarize, task_order
from mtrl_ntk.report.aggregate import (
    DEFAULT_BOOTSTRAP_SAMPLES,
    compute_aggregates,
    curve_scores,
    score_matrix,
)

MT10 = [
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
]
COMBINERS = ["ntkmtl", "ntkmtl_sr", "pcgrad", "cagrad", "nashmtl", "fairgrad", "aligned_mtl",
             "mgda", "imtlg", "famo", "moco", "ls", "uw", "dwa", "rlw", "graddrop", "si"]


def write_runs(root: Path, methods: int, seeds: int, evaluations: int) -> None:
    rng = np.random.default_rng(0)
    for index, combiner in enumerate(COMBINERS[:methods]):
        skill = 0.4 + 0.5 * index / max(methods - 1, 1)
        for seed in range(seeds):
            run = root / combiner / f"seed{seed}"
            run.mkdir(parents=True)
            config = {"seed": seed, "combiner": {"name": combiner}, "agent": {"arch": "mtsac"},
                      "env": {"benchmark": "mt10"}, "train": {"num_steps": 2_000_000}}
            (run / "config.yaml").write_text(yaml.safe_dump(config))
            lines = []
            for evaluation in range(evaluations):
                step = (evaluation + 1) * 30_000
                chance = skill * min(1.0, 2.0 * (evaluation + 1) / evaluations)
                success = rng.binomial(1, np.full(len(MT10), chance)).astype(float)  # [T]
                row = {"step": step, "eval/success_mean": float(success.mean())}
                row.update({f"eval/success/{task}": float(s) for task, s in zip(MT10, success)})
                lines.append(json.dumps(row))
            (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
            (run / "result.json").write_text(json.dumps({"status": "finished"}))


def time_rliable_bootstrap(summaries: list, tasks: list[str], samples: int) -> None:
    """rliable's bootstrap of the same statistics vs ``compute_aggregates``, N resamples."""
    from rliable import library, metrics

    finals = {s.method: score_matrix(s.runs, tasks, s.final) for s in summaries}  # [N, T]
    curves = {s.method: curve_scores(s.runs, tasks)[1] for s in summaries}  # [N, T, S]
    reference = next(iter(finals))
    pairs = {m: (finals[reference], finals[m]) for m in finals if m != reference}

    def aggregates(scores):
        return np.array([
            metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores),
            metrics.aggregate_median(scores), metrics.aggregate_optimality_gap(scores),
        ])

    def iqm_per_step(scores):
        return np.array([metrics.aggregate_iqm(scores[..., s]) for s in range(scores.shape[-1])])

    start = time.perf_counter()
    library.get_interval_estimates(finals, aggregates, reps=samples)
    library.create_performance_profile(finals, np.linspace(0, 1, 101), reps=samples)
    library.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=samples)
    library.get_interval_estimates(curves, iqm_per_step, reps=samples)
    theirs = time.perf_counter() - start
    start = time.perf_counter()
    compute_aggregates(summaries, tasks, samples)
    ours = time.perf_counter() - start
    print(f"{samples} resamples: rliable's bootstrap {theirs:.2f} s, compute_aggregates "
          f"{ours:.2f} s ({theirs / ours:.0f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--evaluations", type=int, default=67)
    parser.add_argument("--bootstrap-samples", type=int, nargs="+",
                        default=[DEFAULT_BOOTSTRAP_SAMPLES])
    parser.add_argument("--rliable-samples", type=int, default=0, metavar="N",
                        help="also time rliable's own bootstrap at N resamples (0: skip)")
    args = parser.parse_args(argv)
    if not 1 <= args.methods <= len(COMBINERS):
        parser.error(f"--methods must be in 1..{len(COMBINERS)}")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory) / "runs"
        write_runs(root, args.methods, args.seeds, args.evaluations)
        start = time.perf_counter()
        runs, _ = scan_runs(root)
        summaries = summarize(runs)
        read = time.perf_counter() - start
        print(f"{args.methods} methods x {args.seeds} seeds x {args.evaluations} evaluations "
              f"x {len(MT10)} tasks; reading the runs: {read:.2f} s")
        tasks = task_order(runs)
        for samples in args.bootstrap_samples:
            start = time.perf_counter()
            compute_aggregates(summaries, tasks, samples)
            print(f"rliable statistics, {samples} bootstrap samples: "
                  f"{time.perf_counter() - start:.2f} s")
        if args.rliable_samples > 0:
            time_rliable_bootstrap(summaries, tasks, args.rliable_samples)
        start = time.perf_counter()
        generate_report(root, Path(directory) / "report",
                        bootstrap_samples=args.bootstrap_samples[0])
        print(f"whole report ({args.bootstrap_samples[0]} bootstrap samples): "
              f"{time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
