"""Does environment collection scale with cores? Transitions/s of MT10 on W cores.

One process (``vector_strategy=sync``, pinned to one core) against the async
vector env (one worker process per task) with all its processes pinned to the
first W cores, for W = 1 .. the cores this process may use. Rows are measured
in rounds (each configuration once per round) and the median is reported, so
that load from other jobs on a shared machine hits every row alike.

The target (issue 6): with W workers, throughput >= 0.7 x W x the one-process
rate, up to the number of tasks. ``efficiency`` = rate / (W x one-process rate).

    python scripts/bench_env_scaling.py                 # MT10, classic, 200 steps, 3 rounds
    python scripts/bench_env_scaling.py --json --steps 100 --rounds 2

One step = one transition per task; random actions (the policy is not timed);
episodes reset at the protocol's horizon, so resets are part of the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from mtrl_ntk.envs import PROTOCOLS, MultiTaskEnv


def _pin(env: MultiTaskEnv, cores: set[int]) -> None:
    """Pin this process and the env's worker processes (if any) to ``cores``."""
    os.sched_setaffinity(0, cores)
    for process in getattr(env._vector_env, "processes", []):
        os.sched_setaffinity(process.pid, cores)


def transitions_per_second(env: MultiTaskEnv, steps: int, rng: np.random.Generator) -> float:
    size = (env.num_tasks, env.action_dim)
    actions = [rng.uniform(-1, 1, size).astype(np.float32) for _ in range(steps)]
    started = time.perf_counter()
    for action in actions:
        env.step(action)
    return steps * env.num_tasks / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", default="mt10")
    parser.add_argument("--protocol", default="classic", choices=sorted(PROTOCOLS))
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps after pinning")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per configuration")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("need --steps >= 1, --rounds >= 1, --warmup >= 0")

    available = sorted(os.sched_getaffinity(0))
    protocol = PROTOCOLS[args.protocol]
    rng = np.random.default_rng(0)
    rates: dict[str, list[float]] = {"sync": []}
    widths = list(range(1, len(available) + 1))
    for width in widths:
        rates[f"async_{width}"] = []
    try:
        with (
            MultiTaskEnv(args.benchmark, protocol, seed=0, vector_strategy="sync") as single,
            MultiTaskEnv(args.benchmark, protocol, seed=0, vector_strategy="async") as workers,
        ):
            single.reset()
            workers.reset()
            num_tasks = workers.num_tasks
            for _ in range(args.rounds):
                _pin(single, {available[0]})
                transitions_per_second(single, args.warmup, rng)
                rates["sync"].append(transitions_per_second(single, args.steps, rng))
                for width in widths:
                    _pin(workers, set(available[:width]))
                    transitions_per_second(workers, args.warmup, rng)
                    rates[f"async_{width}"].append(
                        transitions_per_second(workers, args.steps, rng)
                    )
    finally:
        os.sched_setaffinity(0, set(available))

    one_process = statistics.median(rates["sync"])
    rows = {"sync": {"cores": 1, "workers": 1, "transitions_per_second": one_process,
                     "efficiency": 1.0, "rounds": rates["sync"]}}
    for width in widths:
        rate = statistics.median(rates[f"async_{width}"])
        rows[f"async_{width}"] = {
            "cores": width, "workers": num_tasks, "transitions_per_second": rate,
            "efficiency": rate / (width * one_process), "rounds": rates[f"async_{width}"],
        }
    result = {
        "benchmark": args.benchmark, "protocol": args.protocol, "steps": args.steps,
        "rounds": args.rounds, "cpu_count": os.cpu_count(), "usable_cores": len(available),
        "load_average": list(os.getloadavg()), "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{args.benchmark}, protocol {args.protocol}: {args.steps} steps x {args.rounds} rounds, "
        f"{len(available)} usable cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'config':<10} {'cores':>5} {'transitions/s':>14} {'x (W x 1 proc)':>15}")
    for name, row in rows.items():
        print(
            f"{name:<10} {row['cores']:>5} {row['transitions_per_second']:>14.0f} "
            f"{row['efficiency']:>15.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
