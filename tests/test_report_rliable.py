"""rliable's statistics in the report (mtrl_ntk.report.aggregate): hand-computed cases, a
known ordering, and agreement with rliable's own functions and bootstrap."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mtrl_ntk.report import generate_report, main, scan_runs, summarize
from mtrl_ntk.report.aggregate import (
    batched_final_statistics,
    batched_improvement,
    batched_iqm,
    compute_aggregates,
    percentile_interval,
    stratified_bootstrap,
)

TASKS = ["reach-v3", "push-v3", "pick-place-v3", "door-open-v3"]


def write_run(directory: Path, combiner: str, seed: int, finals: list[list[float]]) -> None:
    """A run whose evaluations have the given per-task success rows (one row per step)."""
    directory.mkdir(parents=True)
    config = {"seed": seed, "combiner": {"name": combiner}, "agent": {"arch": "mtsac"},
              "env": {"benchmark": "mt10"}, "train": {"num_steps": 100 * len(finals)}}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for index, success in enumerate(finals, start=1):
        row = {"step": 100 * index, "eval/success_mean": float(np.mean(success))}
        row.update({f"eval/success/{task}": float(v) for task, v in zip(TASKS, success)})
        lines.append(json.dumps(row))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "result.json").write_text(json.dumps({"status": "finished"}))


def test_iqm_and_the_other_metrics_equal_a_hand_computation(tmp_path: Path) -> None:
    # Two runs x four tasks: 8 scores; the IQM drops int(0.25 * 8) = 2 at each end.
    scores = {0: [0.0, 0.1, 0.9, 1.0], 1: [0.2, 0.3, 0.5, 0.8]}
    for seed, row in scores.items():
        write_run(tmp_path / f"s{seed}", "ls", seed, [[0.0] * 4, row])
    runs, _ = scan_runs(tmp_path)
    aggregates = compute_aggregates(summarize(runs), TASKS, samples=200)
    metrics = aggregates.metrics["ls / mtsac"]
    # sorted: 0.0 0.1 | 0.2 0.3 0.5 0.8 | 0.9 1.0
    assert metrics["IQM"].point == pytest.approx((0.2 + 0.3 + 0.5 + 0.8) / 4)
    task_means = [0.1, 0.2, 0.7, 0.9]
    assert metrics["Mean"].point == pytest.approx(np.mean(task_means))
    assert metrics["Median"].point == pytest.approx((0.2 + 0.7) / 2)
    assert metrics["Optimality gap"].point == pytest.approx(1 - np.mean(task_means))
    all_scores = np.array([scores[0], scores[1]])
    assert batched_iqm(all_scores[None])[0] == pytest.approx(metrics["IQM"].point)
    # The curve: IQM at each step over the same 8 scores.
    curve = aggregates.curves["ls / mtsac"]
    assert curve.steps.tolist() == [100, 200]
    assert curve.point == pytest.approx([0.0, metrics["IQM"].point])
    # Profile: fraction of the 8 scores above tau.
    profile = aggregates.profiles["ls / mtsac"]
    assert profile.point[50] == pytest.approx(3 / 8)  # tau = 0.5: 0.8, 0.9, 1.0
    assert profile.point[0] == pytest.approx(7 / 8)  # tau = 0: all but the 0.0
    for interval in metrics.values():
        assert interval.low <= interval.point + 1e-12 <= interval.high + 2e-12


def test_a_better_method_has_probability_of_improvement_above_one_half_with_its_interval(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(7)
    for seed in range(5):
        good = rng.binomial(10, 0.8, size=len(TASKS)) / 10
        bad = rng.binomial(10, 0.3, size=len(TASKS)) / 10
        write_run(tmp_path / "runs" / f"a{seed}", "alpha", seed, [good])
        write_run(tmp_path / "runs" / f"b{seed}", "beta", seed, [bad])
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--improvement-of", "alpha",
                 "--bootstrap-samples", "500"]) == 0
    with (out / "rliable.csv").open() as file:
        rows = {row["method"]: row for row in csv.DictReader(file)}
    beta = rows["beta / mtsac"]
    assert beta["improvement_of"] == "alpha / mtsac"
    assert float(beta["probability_of_improvement_low"]) > 0.5
    assert float(beta["probability_of_improvement"]) > 0.8
    assert rows["alpha / mtsac"]["probability_of_improvement"] == ""  # no P(A > A)
    assert float(rows["alpha / mtsac"]["iqm_low"]) > float(beta["iqm_high"])
    page = (out / "report.html").read_text()
    assert "P(alpha / mtsac &gt; Y)" in page and "alpha / mtsac better" in page
    # The other way round the interval lies below one half.
    reverse = compute_aggregates(summarize(scan_runs(tmp_path / "runs")[0]), TASKS, 500, "beta")
    assert reverse.improvement["alpha / mtsac"].high < 0.5


def test_batched_statistics_equal_rliables_functions_on_scores_with_ties() -> None:
    from rliable import library, metrics

    rng = np.random.default_rng(3)
    for runs_x, runs_y, tasks in [(5, 3, 4), (1, 2, 10), (4, 4, 1)]:
        x = rng.integers(0, 4, size=(runs_x, tasks)) / 3  # few values: many ties
        y = rng.integers(0, 4, size=(runs_y, tasks)) / 3
        values = batched_final_statistics(x[None])[0]
        assert values[0] == pytest.approx(metrics.aggregate_iqm(x))
        assert values[1] == pytest.approx(metrics.aggregate_mean(x))
        assert values[2] == pytest.approx(metrics.aggregate_median(x))
        assert values[3] == pytest.approx(metrics.aggregate_optimality_gap(x, 1.0))
        taus = np.linspace(0, 1, 101)
        assert values[4:] == pytest.approx(library.score_distributions(x, taus))
        assert batched_improvement(x[None], y[None])[0] == pytest.approx(
            metrics.probability_of_improvement(x, y))
        assert batched_improvement(x[None], x[None])[0] == pytest.approx(0.5)
    curves = rng.random((3, 4, 6))  # [N, T, S]
    assert batched_iqm(curves[None])[0] == pytest.approx(
        [metrics.aggregate_iqm(curves[..., step]) for step in range(6)])


def test_intervals_agree_with_rliables_own_stratified_bootstrap() -> None:
    from rliable import library, metrics

    scores = np.random.default_rng(11).random((6, 5))  # [N, T]
    np.random.seed(0)  # rliable draws from the global state
    _, theirs = library.get_interval_estimates(
        {"m": scores}, lambda s: np.array([metrics.aggregate_iqm(s), metrics.aggregate_mean(s)]),
        reps=2000)
    ours = np.stack(percentile_interval(stratified_bootstrap(
        scores, lambda b: batched_final_statistics(b)[:, :2], 2000, np.random.default_rng(0))))
    # Two Monte-Carlo estimates of the same percentiles (interval width ~0.2 here).
    assert ours == pytest.approx(theirs["m"], abs=0.02)


def test_one_seed_reads_n_a_and_a_bad_reference_or_sample_count_is_explained(
    tmp_path: Path, capsys,
) -> None:
    write_run(tmp_path / "runs" / "a", "ntkmtl", 0, [[1.0, 0.0, 1.0, 1.0]])
    write_run(tmp_path / "runs" / "b", "ls", 0, [[0.0, 0.0, 1.0, 0.0]])
    report = generate_report(tmp_path / "runs", tmp_path / "out", improvement_of="famo")
    assert any("'famo' matches no method" in note for note in report.notes)
    assert report.aggregates.improvement == {}
    page = (tmp_path / "out" / "report.html").read_text()
    assert "[n/a: 1 seed]" in page
    assert not (tmp_path / "out" / "improvement.png").exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "runs"), "--bootstrap-samples", "0"])
    assert "--bootstrap-samples must be >= 1" in capsys.readouterr().err


def test_the_statistics_are_reproducible_and_leave_numpys_global_state_alone(
    tmp_path: Path,
) -> None:
    for seed in range(3):
        write_run(tmp_path / f"a{seed}", "ntkmtl", seed, [[0.5, 0.1 * seed, 1.0, 0.0]])
        write_run(tmp_path / f"b{seed}", "ls", seed, [[0.2 * seed, 0.1, 0.0, 0.0]])
    summaries = summarize(scan_runs(tmp_path)[0])
    np.random.seed(5)
    before = np.random.random()
    np.random.seed(5)
    first = compute_aggregates(summaries, TASKS, 300)
    assert np.random.random() == before
    second = compute_aggregates(summaries, TASKS, 300)
    assert first.metrics == second.metrics and first.improvement == second.improvement
    assert first.reference == "ntkmtl / mtsac"


def test_bench_summarize_runs_end_to_end_at_a_tiny_size() -> None:
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_summarize.py"), "--methods", "2",
         "--seeds", "2", "--evaluations", "3", "--bootstrap-samples", "50"],
        capture_output=True, text=True, timeout=300, cwd=root, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "2 methods x 2 seeds x 3 evaluations x 10 tasks" in completed.stdout
    assert "rliable statistics, 50 bootstrap samples" in completed.stdout
    assert "whole report (50 bootstrap samples)" in completed.stdout
