"""Time to a row of seeds: ``seed=A..B`` in one process against one run per seed, one after another.

Runs ``run_mt10.py`` exactly as a user types it (subprocesses, fresh run
directories in a temporary folder, the preset and overrides given), and times:

  sequential   S single-seed runs, one after another (``seed=<k>``, each its own process)
  group        one process training the S seeds side by side (``seed=A..B``)

and reports the wall seconds of each, the seconds per seed, and the speed-up
sequential / group. Everything a user waits for counts: process start, imports,
Hydra, building the environments, warm-up, training, evaluations, checkpoints.

    python scripts/bench_seed_group.py --seeds 10                     # smoke preset
    python scripts/bench_seed_group.py --seeds 4 --preset smoke combiner=ntkmtl --json
    python scripts/bench_seed_group.py --seeds 10 --group-only        # the group alone

The issue's target (CPU, smoke preset): S = 10 in one process at least 5x faster
than the ten runs one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def timed_run(arguments: list[str], runs_dir: Path) -> float:
    """Wall seconds of one ``run_mt10.py`` process; raises if it fails."""
    env = {**os.environ, "MTRL_NTK_RUNS_DIR": str(runs_dir)}
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "run_mt10.py", *arguments, "train.progress_bar=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(
            f"run_mt10.py {' '.join(arguments)} failed ({completed.returncode}): "
            f"{completed.stderr[-2000:]}"
        )
    return seconds


def measure(seeds: int, first: int, preset: str, overrides: list[str], group_only: bool) -> dict:
    base = [f"experiment={preset}", *overrides]
    last = first + seeds - 1
    result: dict[str, Any] = {
        "preset": preset, "overrides": overrides, "seeds": seeds, "cpu_count": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_seed_group_") as folder:
        group_seconds = timed_run([*base, f"seed={first}..{last}"], Path(folder) / "group")
        result["group_seconds"] = group_seconds
        result["group_seconds_per_seed"] = group_seconds / seeds
        if not group_only:
            singles = [
                timed_run([*base, f"seed={seed}"], Path(folder) / "single")
                for seed in range(first, last + 1)
            ]
            result["single_seconds"] = singles
            result["sequential_seconds"] = sum(singles)
            result["speedup"] = sum(singles) / group_seconds
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (key=value)")
    parser.add_argument("--seeds", type=int, default=10, help="S, the seeds of the row")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--preset", default="smoke", help="experiment preset (default smoke)")
    parser.add_argument("--group-only", action="store_true",
                        help="time the group only (no single-seed runs)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.first_seed < 0:
        parser.error("need --seeds >= 1 and --first-seed >= 0")
    result = measure(args.seeds, args.first_seed, args.preset, args.overrides, args.group_only)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.seeds} seeds, {args.preset} preset {' '.join(args.overrides)}")
    print(f"group (one process): {result['group_seconds']:.1f} s "
          f"({result['group_seconds_per_seed']:.1f} s per seed)")
    if not args.group_only:
        singles = result["single_seconds"]
        print(f"sequential ({args.seeds} processes): {result['sequential_seconds']:.1f} s "
              f"({min(singles):.1f} .. {max(singles):.1f} s each)")
        print(f"speed-up: {result['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
