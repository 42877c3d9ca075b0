"""Does environment collection scale with cores? Transitions/s of MT10 on W cores, per backend.

Meta-World (``env.backend=metaworld``): one process (``vector_strategy=sync``, pinned
to one core) against the async vector env (one worker process per task) with all its
processes pinned to the first W cores. EnvPool (``env.backend=envpool``): its one-env
pools (one C++ thread each, in this process) with every thread pinned to the first W
cores. W = 1 .. the cores this process may use. Rows are measured in rounds (each
configuration once per round) and the median is reported, so that load from other
jobs on a shared machine hits every row alike.

Targets: with W cores, throughput >= 0.7 x W x the one-core rate of the same backend
(issue 6; ``efficiency``); EnvPool >= 3 x Meta-World's one-process rate (issue 12;
``x metaworld``). EnvPool serves only v2-reward protocols, so with it in the comparison
the protocol defaults to mwplus (500-step episodes; use --steps 500 so that every
measurement holds one episode end of every task: EnvPool builds a fresh pool per
episode, Meta-World resets, and both costs are counted).

    python scripts/bench_env_scaling.py                          # both backends, mwplus
    python scripts/bench_env_scaling.py --backend metaworld      # classic, as in issue 6
    python scripts/bench_env_scaling.py --json --steps 100 --rounds 2

One step = one transition per task; random actions (the policy is not timed);
episodes reset at the protocol's horizon, so resets are part of the cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np

from mtrl_ntk.envs import PROTOCOLS, MultiTaskEnv, make_multitask_env


def _pin(env: MultiTaskEnv, cores: set[int]) -> None:
    """Pin this process (all its threads, EnvPool's included) and the env's worker
    processes (if any) to ``cores``; threads started later inherit the main thread's."""
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(thread), cores)
    vector_env = getattr(env, "_vector_env", None)
    for process in getattr(vector_env, "processes", []):
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
    parser.add_argument("--backend", default="both", choices=["both", "metaworld", "envpool"])
    parser.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS),
                        help="default: mwplus with envpool in the comparison, else classic")
    parser.add_argument("--steps", type=int, default=500, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps after pinning")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per configuration")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("need --steps >= 1, --rounds >= 1, --warmup >= 0")

    backends = ["metaworld", "envpool"] if args.backend == "both" else [args.backend]
    if args.protocol is None:
        args.protocol = "mwplus" if "envpool" in backends else "classic"
    available = sorted(os.sched_getaffinity(0))
    protocol = PROTOCOLS[args.protocol]
    rng = np.random.default_rng(0)
    widths = list(range(1, len(available) + 1))
    # name -> (backend, vector strategy, cores)
    configs: dict[str, tuple[str, str, int]] = {}
    if "metaworld" in backends:
        configs["sync"] = ("metaworld", "sync", 1)
        configs.update({f"async_{w}": ("metaworld", "async", w) for w in widths})
    if "envpool" in backends:
        configs.update({f"envpool_{w}": ("envpool", "async", w) for w in widths})
    rates: dict[str, list[float]] = {name: [] for name in configs}
    envs: dict[tuple[str, str], MultiTaskEnv] = {}
    try:
        for backend, strategy, _ in configs.values():
            if (backend, strategy) not in envs:
                envs[backend, strategy] = make_multitask_env(
                    backend, args.benchmark, protocol, seed=0, vector_strategy=strategy
                )
                envs[backend, strategy].reset()
        num_tasks = next(iter(envs.values())).num_tasks
        for _ in range(args.rounds):
            for name, (backend, strategy, width) in configs.items():
                env = envs[backend, strategy]
                _pin(env, set(available[:width]))
                transitions_per_second(env, args.warmup, rng)
                rates[name].append(transitions_per_second(env, args.steps, rng))
    finally:
        for env in envs.values():
            env.close()
        os.sched_setaffinity(0, set(available))

    rows = {}
    one_core = {
        backend: statistics.median(rates["sync" if backend == "metaworld" else "envpool_1"])
        for backend in backends
    }
    for name, (backend, strategy, width) in configs.items():
        rate = statistics.median(rates[name])
        rows[name] = {
            "backend": backend, "cores": width,
            "workers": 1 if strategy == "sync" and backend == "metaworld" else num_tasks,
            "transitions_per_second": rate,
            "efficiency": rate / (width * one_core[backend]),
            "x_metaworld": rate / one_core["metaworld"] if "metaworld" in one_core else None,
            "rounds": rates[name],
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
    print(f"{'config':<10} {'backend':<9} {'cores':>5} {'transitions/s':>14} "
          f"{'x (W x 1 core)':>15} {'x metaworld':>12}")
    for name, row in rows.items():
        versus = row["x_metaworld"]
        print(
            f"{name:<10} {row['backend']:<9} {row['cores']:>5} "
            f"{row['transitions_per_second']:>14.0f} {row['efficiency']:>15.2f} "
            f"{'' if versus is None else f'{versus:.2f}':>12}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
