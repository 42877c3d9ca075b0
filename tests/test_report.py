"""scripts/summarize.py / mtrl_ntk.report on run directories laid out as the trainer writes them."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from mtrl_ntk.report import (
    aligned_curve,
    generate_report,
    main,
    published_row,
    report_title,
    scan_runs,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
MT10 = [
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
]
EVAL_EVERY = 10_000
NUM_STEPS = 50_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    directory: Path, combiner: str, arch: str, seed: int, evaluations: int, finished: bool,
    ntk: bool = False, tail: str = "", name: str | None = None, benchmark: str = "mt10",
) -> list[dict]:
    """A run directory as the trainer writes it; returns its metrics rows.

    Success rates are multiples of 1/50 (50 eval episodes per task) rising with
    training; NTK methods log λ_i and w_i = (mean λ / λ_i)^0.5 per network.
    """
    rng = np.random.default_rng(zlib.crc32(f"{combiner}/{arch}/{seed}".encode()))
    directory.mkdir(parents=True)
    config = {
        "name": name or f"mt10-mwplus-{arch}",
        "seed": seed,
        "combiner": {"name": combiner, "exponent": 0.5} if ntk else {"name": combiner},
        "agent": {"arch": arch, "hidden_sizes": [400, 400, 400]},
        "env": {"benchmark": benchmark, "vector_strategy": "async"},
        "protocol": {"name": "mwplus", "max_episode_steps": 500},
        "train": {"num_steps": NUM_STEPS, "batch_size": 1280},
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / ".hydra").mkdir()  # Hydra's own copy must not count as a second run
    (directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / "tb").mkdir()
    (directory / "provenance.json").write_text(json.dumps({"git": "abc123"}))
    rows = []
    for index in range(1, evaluations + 1):
        step = index * EVAL_EVERY
        row = {"step": step, "transitions": step * len(MT10)}
        success = rng.binomial(50, np.minimum(0.95, 0.15 * index + 0.2 * rng.random(10)))
        for task, successes in zip(MT10, success / 50):
            row[f"eval/success/{task}"] = float(successes)
        row["eval/success_mean"] = float(np.mean(success / 50))
        row["train/success_mean"] = float(rng.random())
        eigenvalues = 10.0 ** rng.uniform(-2, 3, size=10) / index
        for network in ("critic", "actor"):
            weights = np.sqrt(eigenvalues.mean() / eigenvalues) if ntk else np.ones(10)
            for task, weight, eigenvalue in zip(MT10, weights, eigenvalues):
                row[f"combiner/{network}/weight/{task}"] = float(weight)
                if ntk:
                    row[f"combiner/{network}/ntk_eigenvalue/{task}"] = float(eigenvalue)
        rows.append(row)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    if finished:
        result = {"status": "finished", "step": rows[-1]["step"],
                  "eval/success_mean": rows[-1]["eval/success_mean"]}
        (directory / "result.json").write_text(json.dumps(result))
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two finished seeds each of ls/mtsac and ntkmtl/mtsac, a third ntkmtl seed still running,
    one single-seed method, a run with a corrupt metrics file and one with bad YAML."""
    root = tmp_path_factory.mktemp("runs")
    sweep = root / "multirun" / "2025-06-01" / "12-00-00"
    rows = {
        ("ls / mtsac", 0): write_run(sweep / "0", "ls", "mtsac", 0, 5, True),
        ("ls / mtsac", 1): write_run(sweep / "1", "ls", "mtsac", 1, 5, True),
        ("ntkmtl / mtsac", 0): write_run(sweep / "2", "ntkmtl", "mtsac", 0, 5, True, ntk=True),
        ("ntkmtl / mtsac", 1): write_run(sweep / "3", "ntkmtl", "mtsac", 1, 5, True, ntk=True),
        # Still running: three evaluations and a line being written (no newline yet).
        ("ntkmtl / mtsac", 2): write_run(
            root / "single" / "ntkmtl_seed2", "ntkmtl", "mtsac", 2, 3, False, ntk=True,
            tail='{"step": 40000, "eval/succ',
        ),
        ("pcgrad / multihead", 7): write_run(root / "pcgrad7", "pcgrad", "multihead", 7, 4, True),
    }
    corrupt = root / "famo_seed0"
    write_run(corrupt, "famo", "mtsac", 0, 4, True)
    lines = (corrupt / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]  # torn line in the middle of the file
    (corrupt / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    bad_yaml = root / "broken_config"
    write_run(bad_yaml, "cagrad", "mtsac", 0, 2, True)
    (bad_yaml / "config.yaml").write_text("combiner: {name: cagrad\nagent: [arch: mtsac\n")
    empty = root / "empty_metrics"
    write_run(empty, "moco", "mtsac", 0, 1, False)
    (empty / "metrics.jsonl").write_text("")
    report = generate_report(root)
    return {"root": root, "out": root / "report", "rows": rows, "report": report}


def expected_summary(rows: dict) -> dict[str, dict]:
    """Mean and stderr (ddof=1) of the last evaluation of each run, computed independently."""
    by_method: dict[str, list[dict]] = {}
    for (method, _seed), run_rows in rows.items():
        by_method.setdefault(method, []).append(run_rows[-1])
    expected = {}
    for method, finals in by_method.items():
        values = np.array([final["eval/success_mean"] for final in finals])
        stderr = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else None
        tasks = {t: float(np.mean([f[f"eval/success/{t}"] for f in finals])) for t in MT10}
        expected[method] = {"mean": values.mean(), "stderr": stderr, "n": len(values),
                            "tasks": tasks}
    return expected


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as file:
        return {row["method"]: row for row in csv.DictReader(file)}


def test_table_numbers_are_mean_and_stderr_of_final_evaluations(runs: dict) -> None:
    expected = expected_summary(runs["rows"])
    table = read_csv(runs["out"] / "summary.csv")
    assert set(table) == set(expected)
    markdown = (runs["out"] / "summary.md").read_text()
    page = (runs["out"] / "report.html").read_text()
    for method, want in expected.items():
        row = table[method]
        assert float(row["success_mean"]) == pytest.approx(want["mean"], abs=1e-12)
        assert int(row["num_seeds"]) == want["n"]
        for task in MT10:
            assert float(row[f"success/{task}"]) == pytest.approx(want["tasks"][task], abs=1e-12)
        if want["stderr"] is None:
            assert row["success_stderr"] == ""
            shown = f"{want['mean']:.3f} ± n/a"
        else:
            assert float(row["success_stderr"]) == pytest.approx(want["stderr"], abs=1e-12)
            shown = f"{want['mean']:.3f} ± {want['stderr']:.3f}"
        assert shown in markdown
        assert shown in page
    ranked = sorted(expected, key=lambda method: -expected[method]["mean"])
    assert [table[method]["rank"] for method in ranked] == ["1", "2", "3"]


def test_published_table_4_numbers_sit_beside_ours_labelled_as_v1(runs: dict) -> None:
    table = read_csv(runs["out"] / "summary.csv")
    assert (table["ls / mtsac"]["published_row"], table["ls / mtsac"]["published_mean"]) == (
        "MTL SAC", "0.49")
    assert table["ntkmtl / mtsac"]["published_stderr"] == "0.03"
    assert table["pcgrad / multihead"]["published_row"] == "PCGrad"
    for text in ((runs["out"] / "summary.md").read_text(),
                 (runs["out"] / "report.html").read_text()):
        assert "0.96 ± 0.03 (NTKMTL)" in text
        assert "0.49 ± 0.07 (MTL SAC)" in text
        assert "Meta-World v1" in text and "v3" in text


@pytest.mark.parametrize(
    ("combiner", "arch", "row"),
    [
        ("ls", "mtsac", "MTL SAC"), ("ls", "task_encoder", "MTL SAC + TE"),
        ("ls", "multihead", "MH SAC"), ("ls", "independent", "STL"),
        ("nashmtl", "multihead", "Nash-MTL"), ("aligned_mtl", "mtsac", "Aligned-MTL"),
        ("fairgrad", "task_encoder", "FairGrad"), ("ntkmtl", "mtsac", "NTKMTL"),
        ("ntkmtl_sr", "mtsac", None), ("ls", "something_new", None),
    ],
)
def test_published_row_mapping(combiner: str, arch: str, row: str | None) -> None:
    assert published_row(combiner, arch) == row


def test_images_are_valid_pngs_and_embedded_in_the_html(runs: dict) -> None:
    page = (runs["out"] / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    names = ("curves.png", "tasks.png", "ntk.png", "aggregates.png", "improvement.png",
             "profiles.png", "sample_efficiency.png")
    assert len(embedded) == len(names)
    for name in names:
        data = (runs["out"] / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 10_000
        image = matplotlib.image.imread(runs["out"] / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 200
        assert base64.b64encode(data).decode("ascii") in embedded
        umask = os.umask(0)
        os.umask(umask)
        assert (runs["out"] / name).stat().st_mode & 0o777 == 0o666 & ~umask
    # Self-contained: nothing is fetched from disk or network.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<table>" in page


def test_corrupt_and_empty_files_are_reported_and_skipped(runs: dict) -> None:
    reasons = {item.path.relative_to(runs["root"]).as_posix(): item.reason
               for item in runs["report"].skipped}
    assert "line 2 is not valid JSON" in reasons["famo_seed0/metrics.jsonl"]
    assert "not valid YAML" in reasons["broken_config/config.yaml"]
    assert "empty" in reasons["empty_metrics/metrics.jsonl"]
    methods = {summary.method for summary in runs["report"].summaries}
    assert not methods & {"famo / mtsac", "cagrad / mtsac", "moco / mtsac"}
    markdown = (runs["out"] / "summary.md").read_text()
    page = (runs["out"] / "report.html").read_text()
    skipped_section = markdown.split("## Skipped")[1]
    for path in reasons:
        assert path in skipped_section
        assert path in page.split("<h2>Skipped</h2>")[1]


def test_run_discovery_at_any_depth_ignores_hydra_copies_and_the_report(runs: dict) -> None:
    found, _ = scan_runs(runs["root"], exclude=[runs["out"]])
    assert sorted((run.method, run.seed) for run in found) == sorted(runs["rows"])


def test_incomplete_run_is_included_and_marked_with_its_step(runs: dict) -> None:
    markdown = (runs["out"] / "summary.md").read_text()
    assert f"incomplete: step 30,000 of {NUM_STEPS:,}" in markdown
    assert "3 (1 incomplete)" in markdown
    (incomplete,) = [run for run in runs["report"].runs if not run.finished]
    # The half-written last line was ignored, not treated as corruption.
    assert [row["step"] for row in incomplete.evaluations] == [10_000, 20_000, 30_000]


def test_summarize_cli_warns_on_stderr_and_watch_stops_after_max_iterations(
    tmp_path: Path, capsys
) -> None:
    root = tmp_path / "runs"
    write_run(root / "good", "ls", "mtsac", 0, 2, True)
    write_run(root / "torn", "famo", "mtsac", 0, 2, True)
    with (root / "torn" / "metrics.jsonl").open("a") as file:
        file.write("{not json}\n")
    out = tmp_path / "watched"
    args = [str(root), "--out", str(out), "--watch", "--interval", "0", "--max-iterations", "2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.count("report: 1 runs, 1 methods, 1 skipped") == 2
    # Warned once, not once per regeneration.
    assert captured.err.count("warning: skipped torn/metrics.jsonl: metrics.jsonl line 3") == 1
    assert (out / "summary.csv").exists() and not (root / "report").exists()


def test_report_without_ntk_logs_or_runs_still_renders(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "a", "ls", "mtsac", 0, 2, True)
    report = generate_report(tmp_path / "runs")
    assert not (tmp_path / "runs" / "report" / "ntk.png").exists()
    assert any("NTK" in note for note in report.notes)
    assert "± n/a" in (tmp_path / "runs" / "report" / "summary.md").read_text()
    empty = generate_report(tmp_path / "nothing_here_yet", tmp_path / "empty_report")
    assert empty.runs == [] and (tmp_path / "empty_report" / "report.html").exists()


def test_watch_regenerates_and_exits_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root / "first", "ls", "mtsac", 0, 2, True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "summarize.py"), str(root), "--watch",
         "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    printed: list[str] = []  # stdout lines, read as they come
    reader = threading.Thread(target=lambda: printed.extend(process.stdout), daemon=True)
    reader.start()
    try:
        page = root / "report" / "report.html"
        wait_for(lambda: page.exists())
        write_run(root / "second", "cagrad", "mtsac", 0, 2, True)
        wait_for(lambda: page.exists() and "cagrad / mtsac" in page.read_text())
        # The page is written before the pass prints its line: wait for both.
        wait_for(lambda: sum(line.startswith("report:") for line in printed) >= 2)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
        reader.join(timeout=20)
        stderr = process.stderr.read()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "stopped" in stderr
    assert sum(line.startswith("report:") for line in printed) >= 2


def wait_for(condition, timeout: float = 25.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_aligned_curve_mean_and_stderr_match_numpy_and_drop_unfinished_seeds(
    tmp_path: Path,
) -> None:
    full = [write_run(tmp_path / f"s{seed}", "ls", "mtsac", seed, 4, True) for seed in (0, 1, 2)]
    short = write_run(tmp_path / "s3", "ls", "mtsac", 3, 2, False)
    found, _ = scan_runs(tmp_path)
    steps, mean, stderr, count = aligned_curve(found, "eval/success_mean")
    assert steps.tolist() == [10_000, 20_000, 30_000, 40_000]
    assert count.tolist() == [4, 4, 3, 3]
    for index in range(4):
        values = [rows[index]["eval/success_mean"] for rows in full]
        if index < 2:
            values.append(short[index]["eval/success_mean"])
        assert mean[index] == pytest.approx(np.mean(values))
        assert stderr[index] == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))


def test_resumed_run_keeps_the_later_evaluation_of_a_repeated_step(tmp_path: Path) -> None:
    rows = write_run(tmp_path / "run", "ls", "mtsac", 0, 4, True)
    # Killed after the evaluation at 30k, resumed from the checkpoint at 20k: 30k is evaluated
    # again (differently), then training goes on to 40k.
    again = {**rows[2], "eval/success_mean": 0.123}
    lines = [rows[0], rows[1], rows[2], again, rows[3]]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run,), skipped = scan_runs(tmp_path)
    assert skipped == []
    assert [row["step"] for row in run.evaluations] == [10_000, 20_000, 30_000, 40_000]
    assert run.evaluations[2]["eval/success_mean"] == 0.123


def test_variants_of_one_combiner_under_different_run_names_are_not_averaged(
    tmp_path: Path,
) -> None:
    for seed in (0, 1):
        write_run(tmp_path / "p05" / f"seed{seed}", "ntkmtl", "mtsac", seed, 2, True, ntk=True,
                  name="ntk-p0.5")
    write_run(tmp_path / "p1" / "seed0", "ntkmtl", "mtsac", 0, 2, True, ntk=True, name="ntk-p1")
    summaries = summarize(scan_runs(tmp_path)[0])
    assert sorted((s.method, s.num_seeds) for s in summaries) == [
        ("ntkmtl / mtsac [ntk-p0.5]", 2), ("ntkmtl / mtsac [ntk-p1]", 1)]
    assert all(s.published[0] == "NTKMTL" for s in summaries)


def test_published_mt10_numbers_are_not_shown_beside_mt50_runs(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "ntkmtl", "mtsac", 0, 2, True, ntk=True, benchmark="mt50")
    runs, _ = scan_runs(tmp_path)
    (summary,) = summarize(runs)
    assert summary.published is None
    assert report_title(runs) == "MT50 results"


# -- the final-success definition (--final) ------------------------------------------------------


@pytest.mark.parametrize(("final", "label"), [
    (["--final", "last"], "last evaluation"),
    (["--final", "mean-last-k", "--last-k", "3"], "mean of last 3 evaluations"),
    (["--final", "best"], "best evaluation"),
])
def test_final_success_definitions_are_computed_and_named_in_every_header(
    tmp_path: Path, final: list[str], label: str
) -> None:
    rows = {seed: write_run(tmp_path / "runs" / f"s{seed}", "ls", "mtsac", seed, 5, True)
            for seed in (0, 1)}
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out), *final]) == 0

    def per_run(run_rows: list[dict]) -> float:
        values = [row["eval/success_mean"] for row in run_rows]
        return {"last evaluation": values[-1], "best evaluation": max(values),
                "mean of last 3 evaluations": float(np.mean(values[-3:]))}[label]

    expected = float(np.mean([per_run(run_rows) for run_rows in rows.values()]))
    row = read_csv(out / "summary.csv")["ls / mtsac"]
    assert math.isclose(float(row["success_mean"]), expected, rel_tol=1e-12)
    assert row["final"] == label
    markdown = (out / "summary.md").read_text()
    assert f"Final success: {label} (mean ± stderr)" in markdown
    assert f"## Final success per method ({label})" in markdown
    page = (out / "report.html").read_text()
    assert f"Final success: {label} (mean ± stderr)" in page


def test_mean_last_k_uses_every_evaluation_of_a_shorter_run(tmp_path: Path) -> None:
    from mtrl_ntk.report import FinalSuccess, scan_runs

    run_rows = write_run(tmp_path / "r", "ls", "mtsac", 0, 2, True)
    (run,), _ = scan_runs(tmp_path)
    values = [row["eval/success_mean"] for row in run_rows]
    assert math.isclose(FinalSuccess("mean-last-k", 10).success(run), float(np.mean(values)))
    with pytest.raises(ValueError, match="final must be one of"):
        FinalSuccess("median")


def test_html_escapes_every_value(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "x", "<script>alert(1)</script>", "mtsac", 0, 2, True)
    generate_report(tmp_path / "runs", tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
