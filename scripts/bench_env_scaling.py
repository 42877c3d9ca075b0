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
the protocol defaults to mwplus (500-step episodes; with --steps 500 every measurement
holds one episode end of every task: EnvPool builds a fresh pool per episode, Meta-World
resets, and both costs are counted; a window ends when the pool builds it started are
done, so none of its work is left to the next window).

Three more EnvPool rows say where its time goes on one core: ``envpool_within_1`` is the
same backend timed within episodes (right after a reset, no episode end in the window:
no pool builds); ``envpool_pools_1`` is its ten one-env pools alone, stepped with the
same raw calls and no wrapper; ``envpool_ceiling_1`` is EnvPool alone with each task in
a one-thread pool of ten envs: the most any EnvPool backend could reach per core here.

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
import warnings
from typing import Any

import numpy as np

from mtrl_ntk.envs import PROTOCOLS, EnvSpec, MultiTaskEnv, make_multitask_env


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
    """Transitions/s of `steps` steps, the background work they started included
    (EnvPool's next-episode pools: without `settle` a window would leave the builds of
    the episodes it ended to the next window, of whatever configuration that is)."""
    size = (env.num_tasks, env.action_dim)
    actions = [rng.uniform(-1, 1, size).astype(np.float32) for _ in range(steps)]
    started = time.perf_counter()
    for action in actions:
        env.step(action)
    env.settle()
    return steps * env.num_tasks / (time.perf_counter() - started)


def _envpool_pool(task_name: str, num_envs: int) -> Any:
    import envpool

    from mtrl_ntk.envs.envpool_env import task_id

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EnvPool's gymnasium deprecation notes
        pool = envpool.make_gymnasium(
            task_id(task_name), num_envs=num_envs, num_threads=1, seed=0,
            partially_observable=False,
        )
    pool.reset()
    return pool


def envpool_pools_rate(task_names: list[str], steps: int, rng: np.random.Generator) -> float:
    """The backend's layout without the backend: one one-env pool per task, stepped
    together with the same raw ``_send`` / ``_recv`` calls (one thread hand-off per
    transition), no wrapper and no episode end (so no goal fixing)."""
    steps = min(steps, PROTOCOLS["mwplus"].max_episode_steps - 1)  # no episode ends
    pools = [_envpool_pool(name, 1) for name in task_names]
    try:
        buffers = [
            pool._from(np.zeros((1, 4), np.float32), np.zeros(1, np.int32)) for pool in pools
        ]
        actions = [rng.uniform(-1, 1, (len(pools), 4)).astype(np.float32) for _ in range(steps)]
        started = time.perf_counter()
        for action in actions:
            for task, pool in enumerate(pools):
                buffers[task][-1] = action[task : task + 1]
                pool._send(buffers[task])
            for pool in pools:
                pool._recv()
        return steps * len(pools) / (time.perf_counter() - started)
    finally:
        for pool in pools:
            pool.close()


def envpool_ceiling_rate(task_names: list[str], steps: int, rng: np.random.Generator) -> float:
    """EnvPool's own C++ step: each task alone in a one-thread pool of ten envs, one task
    after another (one hand-off per ten transitions), no wrapper and no episode end: the
    most any EnvPool backend could reach per core on this machine."""
    steps = min(steps, PROTOCOLS["mwplus"].max_episode_steps - 1)  # no episode ends
    num_envs = 10
    elapsed = 0.0
    for name in task_names:
        pool = _envpool_pool(name, num_envs)
        try:
            actions = [rng.uniform(-1, 1, (num_envs, 4)).astype(np.float32) for _ in range(steps)]
            started = time.perf_counter()
            for action in actions:
                pool.step(action)
            elapsed += time.perf_counter() - started
        finally:
            pool.close()
    return steps * num_envs * len(task_names) / elapsed


ALONE = {"pools": envpool_pools_rate, "ceiling": envpool_ceiling_rate}
"""Rows that time EnvPool's pools directly, without a MultiTaskEnv."""


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
    # name -> (backend, vector strategy, cores, what is timed): "steps" = steps of the
    # backend's env with whatever episode ends fall in the window; "within" = the same
    # env right after a reset, no episode end in the window; "pools" and "ceiling" =
    # EnvPool's pools alone (ALONE; no env, so no vector strategy).
    configs: dict[str, tuple[str, str, int, str]] = {}
    if "metaworld" in backends:
        configs["sync"] = ("metaworld", "sync", 1, "steps")
        configs.update({f"async_{w}": ("metaworld", "async", w, "steps") for w in widths})
    if "envpool" in backends:
        configs.update({f"envpool_{w}": ("envpool", "async", w, "steps") for w in widths})
        configs["envpool_within_1"] = ("envpool", "async", 1, "within")
        configs["envpool_pools_1"] = ("envpool", "-", 1, "pools")
        configs["envpool_ceiling_1"] = ("envpool", "-", 1, "ceiling")
    rates: dict[str, list[float]] = {name: [] for name in configs}
    envs: dict[tuple[str, str], MultiTaskEnv] = {}
    try:
        for backend, strategy, _, kind in configs.values():
            if kind not in ALONE and (backend, strategy) not in envs:
                envs[backend, strategy] = make_multitask_env(
                    EnvSpec(backend, args.benchmark, protocol, seed=0, vector_strategy=strategy)
                )
                envs[backend, strategy].reset()
        task_names = next(iter(envs.values())).task_names
        num_tasks = len(task_names)
        for _ in range(args.rounds):
            for name, (backend, strategy, width, kind) in configs.items():
                if kind in ALONE:
                    os.sched_setaffinity(0, set(available[:width]))  # pools built after this
                    rates[name].append(ALONE[kind](task_names, args.steps, rng))
                    continue
                env = envs[backend, strategy]
                steps = args.steps
                if kind == "within":
                    env.reset()
                    env.settle()
                    steps = min(steps, env.max_episode_steps - args.warmup - 1)
                _pin(env, set(available[:width]))
                transitions_per_second(env, args.warmup, rng)
                rates[name].append(transitions_per_second(env, steps, rng))
    finally:
        for env in envs.values():
            env.close()
        os.sched_setaffinity(0, set(available))

    rows = {}
    one_core = {
        backend: statistics.median(rates["sync" if backend == "metaworld" else "envpool_1"])
        for backend in backends
    }
    for name, (backend, strategy, width, kind) in configs.items():
        rate = statistics.median(rates[name])
        rows[name] = {
            "backend": backend, "cores": width, "timed": kind,
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
    print(f"{'config':<17} {'backend':<9} {'cores':>5} {'timed':<8} {'transitions/s':>14} "
          f"{'x (W x 1 core)':>15} {'x metaworld':>12}")
    for name, row in rows.items():
        versus = row["x_metaworld"]
        print(
            f"{name:<17} {row['backend']:<9} {row['cores']:>5} {row['timed']:<8} "
            f"{row['transitions_per_second']:>14.0f} {row['efficiency']:>15.2f} "
            f"{'' if versus is None else f'{versus:.2f}':>12}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
