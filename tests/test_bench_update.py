"""``scripts/bench_update.py`` times the agent's full update per combiner (tiny shape here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_json_times_every_requested_row_against_ls() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_update.py"), "--quick", "--json",
         "--threads", "1", "--warmup", "1", "--repeats", "2", "graddrop", "ntkmtl:2"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout)
    assert list(results) == ["ls", "graddrop", "ntkmtl:2"]  # LS is always the baseline
    for row, result in results.items():
        for key in ("wall_ms", "cpu_ms", "wall_ratio_to_ls", "cpu_ratio_to_ls"):
            assert math.isfinite(result[key]) and result[key] > 0, (row, key)
        # The GPU proxies: an eager update's ATen ops, none of them a host sync, one graph.
        assert result["ops"] > 100 and result["syncs"] == 0 and result["sync_ops"] == {}, row
        assert result["graph_breaks"] == 0, row
    assert results["ls"]["wall_ratio_to_ls"] == results["ls"]["cpu_ratio_to_ls"] == 1.0


def test_unknown_combiner_is_rejected_with_the_valid_names() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_update.py"), "--quick", "ntkmlt"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert completed.returncode == 2
    assert "unknown combiner 'ntkmlt'" in completed.stderr and "ntkmtl" in completed.stderr


def test_seeds_times_seed_groups_whose_ops_do_not_grow_with_the_seeds() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_update.py"), "--quick", "--json",
         "--threads", "1", "--warmup", "1", "--repeats", "2", "--seeds", "4,2", "graddrop"],
        capture_output=True, text=True, timeout=180, cwd=ROOT, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout)
    assert list(results) == ["ls", "graddrop"]
    for row, result in results.items():
        assert result["ops"] > 100 and math.isfinite(result["wall_ms"]), row  # as without
        groups = result["seed_groups"]
        assert list(groups) == ["1", "2", "4"], row  # S = 1, the reference, always included
        for size, group in groups.items():
            for key in ("wall_ms", "cpu_ms", "wall_ms_per_seed", "per_seed_ratio_to_s1",
                        "per_seed_ratio_to_agent"):
                assert math.isfinite(group[key]) and group[key] > 0, (row, size, key)
            assert group["syncs"] == 0 and group["sync_ops"] == {}, (row, size)
            assert group["wall_ms_per_seed"] == group["wall_ms"] / int(size)
        assert groups["1"]["per_seed_ratio_to_s1"] == 1.0
        # One vmapped update for all seeds: only the per-seed draws (the policy noise and
        # at most one per combiner) add ops, where a per-seed loop would add a whole update.
        assert 0 <= groups["4"]["ops"] - groups["2"]["ops"] <= 3 * 2, (row, groups)


def test_seeds_must_be_positive_integers() -> None:
    for value in ("0", "2,x"):
        completed = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "bench_update.py"), "--quick", "--seeds",
             value, "ls"],
            capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        )
        assert completed.returncode == 2 and "--seeds" in completed.stderr, value
