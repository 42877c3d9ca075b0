"""Time one full multi-task SAC update (``MultiTaskSAC.update``) per combiner, against LS.

Unlike ``bench_combiners.py`` (the engine alone, both networks under the
combiner), this is the agent's real update at paper scale: TD target, critic
and actor through the engine (the actor gets LS for the methods defined for
positive losses only, as in training), temperature and Polyak steps, with the
task-encoder architecture of ``configs/agent/default.yaml``. Rows are timed
round-robin (one update of each per round) so that load from other jobs on a
shared machine hits every row alike; both the wall time and the process's CPU
time are reported (on a loaded machine, CPU time with ``--threads 1`` is the
steadier measure).

    python scripts/bench_update.py                          # every combiner, T = 10, batch 1280
    python scripts/bench_update.py ls ntkmtl:4 graddrop --threads 1 --json
    python scripts/bench_update.py --quick --json           # tiny shape, seconds (tests)

A row ``name:n`` sets ``num_minibatches=n`` (NTKMTL's n mini-batches per task).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_mt10.py

import argparse
import json
import statistics
import sys
import time

import torch

from mtrl_ntk.agent import AgentConfig, MultiTaskSAC
from mtrl_ntk.combiners import available_combiners, make_combiner
from mtrl_ntk.replay import Batch
from mtrl_ntk.runtime import tune_cpu_allocator

OBS_DIM, ACTION_DIM = 39, 4
PAPER = {"tasks": 10, "per_task": 128, "agent": AgentConfig()}
QUICK = {"tasks": 3, "per_task": 8,
         "agent": AgentConfig(hidden_dim=16, num_layers=2, task_embedding_dim=4)}


def make_batch(tasks: int, per_task: int, device: torch.device) -> Batch:
    generator = torch.Generator().manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(device)

    return Batch(
        obs=randn(tasks, per_task, OBS_DIM),
        action=torch.tanh(randn(tasks, per_task, ACTION_DIM)),
        reward=randn(tasks, per_task),
        next_obs=randn(tasks, per_task, OBS_DIM),
        done=torch.zeros(tasks, per_task, device=device),
    )


def make_agent(row: str, shape: dict, device: torch.device) -> MultiTaskSAC:
    name, _, minibatches = row.partition(":")
    params = {"num_minibatches": int(minibatches)} if minibatches else {}
    tasks = shape["tasks"]
    torch.manual_seed(0)
    return MultiTaskSAC(
        OBS_DIM, ACTION_DIM, tasks, shape["agent"], make_combiner(name, tasks, **params),
        make_combiner(name, tasks, **params), device, seed=0,
    )


def benchmark(
    rows: list[str], shape: dict, device: torch.device, warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    batch = make_batch(shape["tasks"], shape["per_task"], device)
    agents = {row: make_agent(row, shape, device) for row in rows}

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for agent in agents.values():
        for _ in range(warmup):
            agent.update(batch)
    synchronize()
    wall: dict[str, list[float]] = {row: [] for row in rows}
    cpu: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(repeats):
        for row, agent in agents.items():
            wall_started, cpu_started = time.perf_counter(), time.process_time()
            agent.update(batch)
            synchronize()
            wall[row].append(1e3 * (time.perf_counter() - wall_started))
            cpu[row].append(1e3 * (time.process_time() - cpu_started))
    results = {
        row: {"wall_ms": statistics.median(wall[row]), "cpu_ms": statistics.median(cpu[row])}
        for row in rows
    }
    baseline = results["ls"] if "ls" in results else results[rows[0]]
    for result in results.values():
        result["wall_ratio_to_ls"] = result["wall_ms"] / baseline["wall_ms"]
        result["cpu_ratio_to_ls"] = result["cpu_ms"] / baseline["cpu_ms"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rows", nargs="*", help="combiners (name or name:n); default: all")
    parser.add_argument("--quick", action="store_true", help="tiny shape, for tests")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates per row")
    parser.add_argument("--repeats", type=int, default=9, help="timed updates per row")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="keep glibc's default malloc settings (see mtrl_ntk/runtime.py)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("need --repeats >= 1 and --warmup >= 0")
    rows = args.rows or ["ls", *[n for n in available_combiners() if n != "ls"], "ntkmtl:4"]
    if "ls" not in rows:
        rows.insert(0, "ls")
    for row in rows:
        name = row.partition(":")[0]
        if name not in available_combiners():
            parser.error(f"unknown combiner {name!r}; valid: {', '.join(available_combiners())}")
    if not args.no_tune_allocator:
        tune_cpu_allocator()
    shape = QUICK if args.quick else PAPER
    results = benchmark(rows, shape, torch.device(args.device), args.warmup, args.repeats)
    if args.json:
        print(json.dumps(results))
        return 0
    agent = shape["agent"]
    print(
        f"MultiTaskSAC.update, T={shape['tasks']} batch={shape['tasks'] * shape['per_task']} "
        f"{agent.num_layers}x{agent.hidden_dim} {agent.arch} on {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warm-up, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'row':<12} {'wall ms':>9} {'x LS':>6} {'cpu ms':>9} {'x LS':>6}")
    for row, result in results.items():
        print(
            f"{row:<12} {result['wall_ms']:>9.1f} {result['wall_ratio_to_ls']:>6.2f} "
            f"{result['cpu_ms']:>9.1f} {result['cpu_ratio_to_ls']:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
