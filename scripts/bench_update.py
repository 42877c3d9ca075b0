"""One full multi-task SAC update (``MultiTaskSAC.update``) per combiner: GPU proxies and time.

For each combiner this reports the machine-independent measures of a GPU update
(the update as a new user runs it: TD target, critic and actor through the
engine, the actor gets LS for the methods defined for positive losses only,
temperature and Polyak steps, the non-finite guard, the metrics), then times it:

- ``ops``: ATen ops per eager update (each one a kernel launch on a GPU);
- ``syncs``: host synchronisations per update (``mtrl_ntk.opcount``);
- ``graph_breaks``: graph breaks of ``update_graph`` under ``torch.compile``
  (``torch._dynamo.explain``; 0 means the fullgraph compile of ``train.compile``
  holds);
- ``wall_ms`` / ``cpu_ms``: eager update time, and with ``--compile`` the
  compiled update's (``compiled_*``, after ``compile_s`` seconds of compilation;
  on CUDA the CUDA-graph replay).

Rows are timed round-robin (one update of each per round), so load from other
jobs hits every row alike; ratios are to the LS row of the same process.

    python scripts/bench_update.py                          # every combiner, T = 10, batch 1280
    python scripts/bench_update.py ls ntkmtl:4 --threads 1 --compile --json
    python scripts/bench_update.py --quick --json           # tiny shape, seconds (tests)
    python scripts/bench_update.py --preset mtsac256 --threads 1 --compile   # issue 10's setting

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
from typing import Any

import torch

from mtrl_ntk.agent import AgentConfig, MultiTaskSAC
from mtrl_ntk.combiners import available_combiners, make_combiner
from mtrl_ntk.opcount import count_ops
from mtrl_ntk.replay import Batch
from mtrl_ntk.runtime import tune_cpu_allocator

OBS_DIM, ACTION_DIM = 39, 4
SHAPES = {
    "paper": {"tasks": 10, "per_task": 128, "agent": AgentConfig()},
    # One-hot MT-SAC, 3x256, batch 640: the setting of the jitted-JAX comparison.
    "mtsac256": {"tasks": 10, "per_task": 64,
                 "agent": AgentConfig(arch="mtsac", hidden_dim=256)},
    "quick": {"tasks": 3, "per_task": 8,
              "agent": AgentConfig(hidden_dim=16, num_layers=2, task_embedding_dim=4)},
}


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


def make_agent(
    row: str, shape: dict, device: torch.device, compile: bool = False
) -> MultiTaskSAC:
    name, _, minibatches = row.partition(":")
    params = {"num_minibatches": int(minibatches)} if minibatches else {}
    tasks = shape["tasks"]
    torch.manual_seed(0)
    return MultiTaskSAC(
        OBS_DIM, ACTION_DIM, tasks, shape["agent"], make_combiner(name, tasks, **params),
        make_combiner(name, tasks, **params), device, seed=0, compile=compile,
    )


def graph_breaks(agent: MultiTaskSAC, batch: Batch) -> int:
    """Graph breaks of ``agent.update_graph`` under torch.compile (dynamo only, no codegen)."""
    torch._dynamo.reset()
    inputs = (
        batch.obs, batch.action, batch.reward, batch.next_obs, batch.done,
        torch.zeros(2, *batch.action.shape, device=batch.obs.device),
        agent.critic_combiner.draw_random(agent.critic_engine.shared_dim, agent.device),
        agent.actor_combiner.draw_random(agent.actor_engine.shared_dim, agent.device),
    )
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(agent.update_graph)(*inputs)
    return int(explanation.graph_break_count)


def measure(row: str, shape: dict, device: torch.device, batch: Batch) -> dict[str, Any]:
    agent = make_agent(row, shape, device)
    agent.update(batch)  # lazy allocations happen once
    _, counter = count_ops(agent.update, batch)
    return {
        "ops": counter.total,
        "syncs": counter.syncs,
        "sync_ops": dict(counter.sync_names),
        "graph_breaks": graph_breaks(make_agent(row, shape, device), batch),
    }


def benchmark(
    rows: list[str], shape: dict, device: torch.device, warmup: int, repeats: int,
    compile: bool = False,
) -> dict[str, dict[str, Any]]:
    batch = make_batch(shape["tasks"], shape["per_task"], device)
    results: dict[str, dict[str, Any]] = {
        row: measure(row, shape, device, batch) for row in rows
    }
    variants = [(row, False) for row in rows] + [(row, True) for row in rows if compile]
    agents = {}
    for row, compiled in variants:
        agent = make_agent(row, shape, device, compile=compiled)
        started = time.perf_counter()
        for _ in range(max(warmup, 2 if compiled else 0)):  # CUDA graphs record on call 2
            agent.update(batch)
        synchronize(device)
        if compiled:
            results[row]["compile_s"] = time.perf_counter() - started
            results[row]["compiled"] = agent._update_fn.compiled
        agents[row, compiled] = agent
    wall: dict[tuple[str, bool], list[float]] = {key: [] for key in agents}
    cpu: dict[tuple[str, bool], list[float]] = {key: [] for key in agents}
    for _ in range(repeats):
        for key, agent in agents.items():
            wall_started, cpu_started = time.perf_counter(), time.process_time()
            agent.update(batch)
            synchronize(device)
            wall[key].append(1e3 * (time.perf_counter() - wall_started))
            cpu[key].append(1e3 * (time.process_time() - cpu_started))
    for (row, compiled), times in wall.items():
        prefix = "compiled_" if compiled else ""
        if compiled:  # still compiled after the timed updates (no fallback to eager)
            results[row]["compiled"] = agents[row, compiled]._update_fn.compiled
        results[row][f"{prefix}wall_ms"] = statistics.median(times)
        results[row][f"{prefix}cpu_ms"] = statistics.median(cpu[row, compiled])
    baseline = results["ls"] if "ls" in results else results[rows[0]]
    for result in results.values():
        for key in ("wall_ms", "cpu_ms", "compiled_wall_ms", "compiled_cpu_ms"):
            if key in result:
                result[key.replace("_ms", "_ratio_to_ls")] = result[key] / baseline[key]
        if "compiled_wall_ms" in result:
            result["speedup"] = result["wall_ms"] / result["compiled_wall_ms"]
    return results


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rows", nargs="*", help="combiners (name or name:n); default: all")
    parser.add_argument("--quick", action="store_true", help="tiny shape, for tests")
    parser.add_argument("--preset", choices=sorted(SHAPES), default="paper",
                        help="shape: paper (default), mtsac256, quick")
    parser.add_argument("--compile", action="store_true",
                        help="also time the compiled update (train.compile=true)")
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
    shape = SHAPES["quick" if args.quick else args.preset]
    results = benchmark(
        rows, shape, torch.device(args.device), args.warmup, args.repeats, args.compile
    )
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
    header = f"{'row':<12} {'ops':>6} {'syncs':>5} {'breaks':>6} {'eager ms':>9} {'x LS':>5}"
    if args.compile:
        header += f" {'compiled ms':>11} {'x LS':>5} {'speedup':>7} {'compile s':>9}"
    print(header)
    for row, result in results.items():
        line = (
            f"{row:<12} {result['ops']:>6} {result['syncs']:>5} {result['graph_breaks']:>6} "
            f"{result['wall_ms']:>9.1f} {result['wall_ratio_to_ls']:>5.2f}"
        )
        if args.compile:
            line += (
                f" {result['compiled_wall_ms']:>11.1f} {result['compiled_wall_ratio_to_ls']:>5.2f}"
                f" {result['speedup']:>7.2f} {result['compile_s']:>9.0f}"
                + ("" if result["compiled"] else "  (compile failed: eager)")
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
