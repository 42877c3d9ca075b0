"""Environment throughput: transitions per second of MultiTaskEnv.step, sync vs async.

    python scripts/bench_env.py                      # MT10, classic, 300 steps each
    python scripts/bench_env.py --benchmark mt50 --steps 100

One step = one transition per task. Random actions; the policy's cost is excluded.
Episodes end (and reset) at the protocol's horizon, so resets are part of the cost.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from mtrl_ntk.envs import PROTOCOLS, MultiTaskEnv


def transitions_per_second(
    benchmark: str, protocol: str, strategy: str, steps: int, warmup: int
) -> float:
    rng = np.random.default_rng(0)
    with MultiTaskEnv(benchmark, PROTOCOLS[protocol], seed=0, vector_strategy=strategy) as env:
        env.reset()
        size = (env.num_tasks, env.action_dim)
        for _ in range(warmup):
            env.step(rng.uniform(-1, 1, size).astype(np.float32))
        start = time.perf_counter()
        for _ in range(steps):
            env.step(rng.uniform(-1, 1, size).astype(np.float32))
        elapsed = time.perf_counter() - start
        return steps * env.num_tasks / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="mt10")
    parser.add_argument("--protocol", default="classic", choices=sorted(PROTOCOLS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--strategies", nargs="+", default=["sync", "async"])
    args = parser.parse_args()
    print(f"{args.benchmark}, protocol {args.protocol}, {os.cpu_count()} CPU cores, "
          f"{args.steps} steps after {args.warmup} warm-up steps")
    for strategy in args.strategies:
        rate = transitions_per_second(
            args.benchmark, args.protocol, strategy, args.steps, args.warmup
        )
        print(f"{strategy:>5}: {rate:8.0f} transitions/s")


if __name__ == "__main__":
    main()
