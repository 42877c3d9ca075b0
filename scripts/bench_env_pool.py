"""Do S seeds' envs step faster in an EnvWorkerPool? Transitions/s of S x MT10, local vs pooled.

A seed group (``seed=0..S-1`` in one process) steps S multi-task envs per training
step. ``local``: all S envs in this process (``vector_strategy=sync``), one after the
other, as the seed group does without a pool. ``pool_W``: the same S envs hosted by
an ``EnvWorkerPool`` of W worker processes (seed i in worker i % W), stepped as the
trainer would: ``step_async`` on every env, then ``step_wait`` on every env. W = 1 ..
the cores this process may use (``--workers`` to choose). Each configuration is
measured once per round and the median is reported, so that load from other jobs on
a shared machine hits every row alike.

Besides transitions/s and the speed-up over ``local``: ``main_cpu_ms``, the CPU time
this process spends per step (what is left of a step for the agent's update is the
rest), and ``build_s``, how long it took to build the S envs (and start the workers).

    python scripts/bench_env_pool.py                       # S = 4, 200 steps, 3 rounds
    python scripts/bench_env_pool.py --seeds 10 --json

One step = one transition per task of every seed; random actions (the policy is not
timed); episodes reset at the protocol's horizon, so resets are part of the cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from mtrl_ntk.envs import PROTOCOLS, EnvSpec, EnvWorkerPool, make_multitask_env


def measure(envs: list[Any], steps: int, rng: np.random.Generator) -> tuple[float, float]:
    """(transitions per second, this process's CPU milliseconds per step) of `steps` steps."""
    shape = (envs[0].num_tasks, envs[0].action_dim)
    actions = [[rng.uniform(-1, 1, shape).astype(np.float32) for _ in envs] for _ in range(steps)]
    started, cpu_started = time.perf_counter(), time.process_time()
    for step_actions in actions:
        for env, action in zip(envs, step_actions, strict=True):
            env.step_async(action)
        for env in envs:
            env.step_wait()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return steps * len(envs) * shape[0] / elapsed, 1000 * cpu / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=4, help="S, envs stepped together")
    parser.add_argument("--benchmark", default="mt10")
    parser.add_argument("--protocol", default="classic", choices=sorted(PROTOCOLS))
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="pool sizes W to measure (default: 1 .. usable cores)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per configuration")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    usable_cores = len(os.sched_getaffinity(0))
    widths = args.workers or list(range(1, usable_cores + 1))
    if args.seeds < 1 or args.steps < 1 or args.rounds < 1 or args.warmup < 0 or min(widths) < 1:
        parser.error("need --seeds, --steps, --rounds, --workers >= 1 and --warmup >= 0")

    protocol = PROTOCOLS[args.protocol]
    rng = np.random.default_rng(0)
    seeds = range(args.seeds)
    envs: dict[str, list[Any]] = {}
    build_seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        envs["local"] = [
            stack.enter_context(make_multitask_env(
                EnvSpec("metaworld", args.benchmark, protocol, seed=seed, vector_strategy="sync")
            ))
            for seed in seeds
        ]
        build_seconds["local"] = time.perf_counter() - started
        for width in widths:
            started = time.perf_counter()
            pool = stack.enter_context(EnvWorkerPool(width))
            envs[f"pool_{width}"] = [
                pool.make_env(EnvSpec("metaworld", args.benchmark, protocol, seed=seed))
                for seed in seeds
            ]
            build_seconds[f"pool_{width}"] = time.perf_counter() - started
        for group in envs.values():
            for env in group:
                env.reset()
        rates: dict[str, list[float]] = {name: [] for name in envs}
        main_cpu: dict[str, list[float]] = {name: [] for name in envs}
        for _ in range(args.rounds):
            for name, group in envs.items():
                measure(group, args.warmup, rng)
                rate, cpu_ms = measure(group, args.steps, rng)
                rates[name].append(rate)
                main_cpu[name].append(cpu_ms)

    local_rate = statistics.median(rates["local"])
    rows = {
        name: {
            "workers": 0 if name == "local" else int(name.removeprefix("pool_")),
            "transitions_per_second": statistics.median(rates[name]),
            "speedup": statistics.median(rates[name]) / local_rate,
            "main_cpu_ms_per_step": statistics.median(main_cpu[name]),
            "build_seconds": build_seconds[name],
            "rounds": rates[name],
        }
        for name in envs
    }
    result = {
        "benchmark": args.benchmark, "protocol": args.protocol, "seeds": args.seeds,
        "steps": args.steps, "rounds": args.rounds, "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores, "load_average": list(os.getloadavg()), "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{args.seeds} seeds x {args.benchmark}, protocol {args.protocol}: {args.steps} steps x "
        f"{args.rounds} rounds, {usable_cores} usable cores, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(f"{'config':<8} {'workers':>7} {'transitions/s':>14} {'speed-up':>9} "
          f"{'main CPU ms/step':>17} {'build s':>8}")
    for name, row in rows.items():
        print(
            f"{name:<8} {row['workers']:>7} {row['transitions_per_second']:>14.0f} "
            f"{row['speedup']:>9.2f} {row['main_cpu_ms_per_step']:>17.2f} "
            f"{row['build_seconds']:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
