"""``scripts/bench_train.py`` runs the real training loop and reports a consistent breakdown."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHASES = {
    "act", "env", "buffer_add", "sample", "update", "guard", "metrics", "log", "eval",
    "checkpoint", "other",
}
STEPS = 12


@pytest.mark.slow
def test_smoke_preset_json_reports_every_phase_and_a_consistent_total(tmp_path: Path) -> None:
    saved = tmp_path / "ls.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--preset", "smoke",
         "--steps", str(STEPS), "--warmup-steps", "5", "--skip-steps", "1", "--threads", "1",
         "--json", "--json-out", str(saved), "protocol.eval_every_steps=1000"],
        capture_output=True, text=True, timeout=170, cwd=ROOT, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert json.loads(saved.read_text()) == result

    assert result["measured_steps"] == STEPS
    assert result["batch_size"] == 80 and result["num_tasks"] == 10
    for key in ("steps_per_second", "steps_per_second_excluding_periodic", "wall_seconds",
                "update_ms"):
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    assert set(result["phases"]) == PHASES
    phases = result["phases"]
    # Every step steps the environments, samples once and updates once.
    for name in ("act", "env", "buffer_add", "sample", "update"):
        assert phases[name]["calls"] == STEPS, name
        assert phases[name]["seconds"] > 0, name
    if phases["guard"]["present"]:  # the non-finite guards told of each update
        assert phases["guard"]["calls"] == STEPS
    assert phases["eval"]["calls"] == 1  # the run always ends with an evaluation
    assert phases["log"]["calls"] >= 1
    # The phases partition the measured wall time.
    total = sum(phase["seconds"] for phase in phases.values())
    assert total == pytest.approx(result["wall_seconds"], rel=1e-6)
    assert result["steps_per_second"] == pytest.approx(STEPS / result["wall_seconds"])
    assert result["steps_per_second_excluding_periodic"] >= result["steps_per_second"]
    projection = result["projection"]
    assert projection["steps"] == 2_000_000
    assert math.isfinite(projection["hours"]) and projection["hours"] > 0
    assert projection["eval_every_steps"] == 1000

    # bench_report compares saved results: the baseline's update ratio is 1.
    summary_path = tmp_path / "summary.json"
    report = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_report.py"), str(saved),
         "--out", str(summary_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )
    assert report.returncode == 0, report.stderr
    row = json.loads(summary_path.read_text())["rows"]["ls"]
    assert row["update_ratio_to_baseline"] == 1.0
    assert row["steps_per_second"] == result["steps_per_second"]


@pytest.mark.slow
def test_a_seed_group_is_measured_as_one_loop_with_one_update_per_step_after_the_burst() -> None:
    # Measured from the step that ends the warm-up, with mtrl's burst (train.warmup_burst):
    # that step makes warmup_steps = 3 updates for both seeds, every later step one.
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--preset", "smoke",
         "--seeds", "2", "--steps", "6", "--warmup-steps", "3", "--skip-steps", "0",
         "--threads", "1", "--json", "protocol.eval_every_steps=1000", "train.warmup_burst=true"],
        capture_output=True, text=True, timeout=170, cwd=ROOT, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["seeds"] == 2 and result["measured_steps"] == 6
    assert result["seed_steps_per_second"] == pytest.approx(2 * result["steps_per_second"])
    phases = result["phases"]
    # One policy call and one update for both seeds per step (the burst: 3 at the first);
    # the loop reports every phase once for all seeds (mtrl_ntk.trainer.LoopObserver).
    assert phases["act"]["calls"] == phases["env"]["calls"] == 6
    assert phases["update"]["calls"] == phases["sample"]["calls"] == 6 - 1 + 3
    assert phases["eval"]["calls"] == 1  # the final evaluation of both seeds, side by side
    total = sum(phase["seconds"] for phase in phases.values())
    assert total == pytest.approx(result["wall_seconds"], rel=1e-6)


def test_unknown_override_key_fails_fast_with_one_line() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--json",
         "train.batch_sise=80"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert completed.returncode == 2
    assert "train.batch_size" in completed.stderr  # the closest existing key is named
