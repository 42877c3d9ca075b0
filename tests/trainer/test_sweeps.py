"""Sweeps through Hydra's multirun with existing launchers (configs/hydra/launcher/)."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.trainer.test_configs import CONFIG_DIR
from tests.trainer.test_run_mt10 import read_metrics, run_cli

SHORT_SMOKE = ["experiment=smoke", "train.num_steps=100", "train.progress_bar=false"]


@pytest.mark.parametrize(
    ("launcher", "target", "settings"),
    [
        ("sequential", "basic_launcher.BasicLauncher", {}),
        ("parallel", "joblib_launcher.JoblibLauncher", {"n_jobs": 2}),
        ("slurm", "submitit_launcher.SlurmLauncher",
         {"gpus_per_node": 1, "cpus_per_task": 12, "timeout_min": 240, "signal_delay_s": 120}),
    ],
)
def test_each_launcher_config_composes_on_the_plugin_with_its_settings(
    launcher: str, target: str, settings: dict
) -> None:
    if launcher == "slurm":  # the optional extra "slurm"
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    for key, value in settings.items():
        assert cfg.hydra.launcher[key] == value


@pytest.mark.slow
def test_a_parallel_sweep_of_two_seeds_runs_and_relaunching_it_skips_the_finished_runs(
    tmp_path: Path,
) -> None:
    command = ["-m", "hydra/launcher=parallel", *SHORT_SMOKE, "seed=0,1"]
    first, _ = run_cli(*command, runs_dir=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dirs = [tmp_path / "smoke" / "ls" / f"seed{seed}" for seed in (0, 1)]
    results = [json.loads((run_dir / "result.json").read_text()) for run_dir in run_dirs]
    assert [result["step"] for result in results] == [100, 100]
    assert read_metrics(run_dirs[0]) != read_metrics(run_dirs[1])  # two seeds, two runs
    written = [(run_dir / "result.json").stat().st_mtime_ns for run_dir in run_dirs]

    again, seconds = run_cli(*command, "resume=true", runs_dir=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already holds a finished run: skipped") == 2
    assert [(run_dir / "result.json").stat().st_mtime_ns for run_dir in run_dirs] == written
    assert [len(read_metrics(run_dir)) for run_dir in run_dirs] == [1, 1]
    assert seconds < 60

    # The report on these two real runs: its table equals the runs' own final numbers.
    out = tmp_path / "report"
    report = subprocess.run(
        [sys.executable, "scripts/summarize.py", str(tmp_path / "smoke"), "--out", str(out)],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    with (out / "summary.csv").open(newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    finals = [read_metrics(run_dir)[-1] for run_dir in run_dirs]
    successes = [final["eval/success_mean"] for final in finals]
    assert row["combiner"] == "ls" and int(row["num_seeds"]) == 2
    assert math.isclose(float(row["success_mean"]), statistics.fmean(successes), abs_tol=1e-12)
    stderr = statistics.stdev(successes) / math.sqrt(2)
    assert math.isclose(float(row["success_stderr"]), stderr, abs_tol=1e-12)
    for task in (key.split("/", 2)[2] for key in finals[0] if key.startswith("eval/success/")):
        expected = statistics.fmean(final[f"eval/success/{task}"] for final in finals)
        assert math.isclose(float(row[f"success/{task}"]), expected, abs_tol=1e-12)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2
