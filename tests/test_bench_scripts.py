"""The benchmark scripts run end to end (tiny shape) and report every combiner."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

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
