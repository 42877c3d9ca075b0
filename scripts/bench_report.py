"""Compare ``bench_train.py --json-out`` results: steps/s, update-time ratios, memory, 2M-step time.

    python scripts/bench_report.py runs/bench/*.json                 # table
    python scripts/bench_report.py ls.json ntkmtl.json --out all.json  # and one JSON of all

Each input is one bench_train result; its name is the file's stem (``ls.json`` ->
``ls``). The update-time ratio is each run's ``agent.update`` time per step over
that of the baseline, the run named ``--baseline`` (default ``ls``; else the
first file), which is only meaningful for runs on the same device and preset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load(paths: list[Path]) -> dict[str, dict[str, Any]]:
    results = {}
    for path in paths:
        if path.stem in results:
            raise SystemExit(f"error: two results named {path.stem!r}")
        results[path.stem] = json.loads(path.read_text())
    return results


def summarise(results: dict[str, dict[str, Any]], baseline: str) -> dict[str, Any]:
    if not results:
        raise SystemExit("error: no results given")
    if baseline not in results:
        baseline = next(iter(results))
    base_update = results[baseline]["phases"]["update"]["ms_per_step"]
    rows = {}
    for name, result in results.items():
        phases = result["phases"]
        update = phases["update"]["ms_per_step"]
        memory = result.get("peak_memory_bytes")
        rows[name] = {
            "combiner": result["combiner"],
            "combiner_params": result["combiner_params"],
            "device": result["device"],
            "device_name": result["device_name"],
            "steps_per_second": result["steps_per_second"],
            "steps_per_second_excluding_periodic": result["steps_per_second_excluding_periodic"],
            "update_ms": update,
            "update_ratio_to_baseline": update / base_update,
            "env_ms": phases["env"]["ms_per_step"],
            "act_ms": phases["act"]["ms_per_step"],
            "guard_ms": phases.get("guard", {}).get("ms_per_step", 0.0),
            "eval_seconds_per_call": phases["eval"]["ms_per_call"] / 1e3,
            "peak_memory_gib": None if memory is None else memory / 2**30,
            "projected_hours": result["projection"]["hours"],
            "projected_steps": result["projection"]["steps"],
            # A seed group (bench_train --seeds S): the projection is all S seeds' runs.
            "seeds": result.get("seeds", 1),
        }
    return {"baseline": baseline, "rows": rows}


def print_table(summary: dict[str, Any]) -> None:
    rows = summary["rows"]
    first = next(iter(rows.values()))
    print(f"on {first['device']} ({first['device_name']}); update ratio to "
          f"{summary['baseline']!r}; projection to {first['projected_steps']:,} steps")
    width = max(14, *(len(name) for name in rows))
    header = (
        f"{'run':<{width}} {'steps/s':>8} {'no eval':>8} {'update ms':>10} {'x base':>7} "
        f"{'env ms':>7} {'act ms':>7} {'guard ms':>9} {'eval s':>7} {'peak GiB':>9} {'hours':>7} "
        f"{'seeds':>5}"
    )
    print(header)
    for name, row in rows.items():
        memory = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        print(
            f"{name:<{width}} {row['steps_per_second']:>8.2f} "
            f"{row['steps_per_second_excluding_periodic']:>8.2f} {row['update_ms']:>10.2f} "
            f"{row['update_ratio_to_baseline']:>7.2f} {row['env_ms']:>7.2f} {row['act_ms']:>7.2f} "
            f"{row['guard_ms']:>9.2f} {row['eval_seconds_per_call']:>7.2f} {memory:>9} "
            f"{row['projected_hours']:>7.2f} {row['seeds']:>5}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", type=Path, help="bench_train JSON files")
    parser.add_argument("--baseline", default="ls", help="run the update ratios refer to")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = parser.parse_args(argv)
    summary = summarise(load(args.results), args.baseline)
    summary["results"] = {path.stem: json.loads(path.read_text()) for path in args.results}
    print_table(summary)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
