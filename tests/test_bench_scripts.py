"""The benchmark scripts run end to end (tiny shape) and report every combiner."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mtrl_ntk.combiners import available_combiners

ROOT = Path(__file__).resolve().parents[1]


def test_bench_combiners_quick_json_covers_every_combiner() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_combiners.py"),
         "--quick", "--json", "--threads", "1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)
    expected_rows = {"ls_backward", "per_task_loop", "jacobian_n1", "jacobian_n4", "ntkmtl_n4"}
    assert expected_rows | set(available_combiners()) <= set(results)
    for row, result in results.items():
        for key in ("ms", "ratio_to_ls"):
            value = result[key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (row, key)
    assert results["ls_backward"]["ratio_to_ls"] == 1.0


@pytest.mark.slow
def test_bench_env_scaling_reports_every_envpool_row() -> None:
    pytest.importorskip("envpool", reason="envpool is not installed")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_env_scaling.py"), "--backend", "envpool",
         "--steps", "3", "--warmup", "1", "--rounds", "1", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["protocol"] == "mwplus"  # EnvPool serves only v2-reward protocols
    rows = result["rows"]
    cores = result["usable_cores"]
    expected = {f"envpool_{w}" for w in range(1, cores + 1)}
    expected |= {"envpool_within_1", "envpool_pools_1", "envpool_ceiling_1"}
    assert set(rows) == expected
    for name, row in rows.items():
        rate = row["transitions_per_second"]
        assert isinstance(rate, float) and math.isfinite(rate) and rate > 0, name
        assert row["x_metaworld"] is None  # Meta-World was not measured
    assert rows["envpool_1"]["efficiency"] == 1.0
    assert rows["envpool_ceiling_1"]["timed"] == "ceiling"


@pytest.mark.slow
def test_bench_eval_counts_fewer_simulated_task_steps_with_idle_tasks() -> None:
    pytest.importorskip("envpool", reason="envpool is not installed")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_eval.py"), "--episodes", "2",
         "--horizon", "60", "--backend", "envpool", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)["rows"]
    assert set(rows) == {"envpool", "envpool_all_tasks"}
    # Every task to the slowest task's last step: a multiple of the 10 tasks.
    assert rows["envpool_all_tasks"]["task_steps"] % 10 == 0
    assert rows["envpool"]["task_steps"] < rows["envpool_all_tasks"]["task_steps"]
    assert rows["envpool"]["success"] == rows["envpool_all_tasks"]["success"]
