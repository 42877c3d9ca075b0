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
  on CUDA the CUDA-graph replay);
- with ``--compile``, ``compiled_kernels``: the kernels one run of the compiled update
  launches, counted in inductor's output code (``mtrl_ntk.opcount.CompiledKernels``:
  generated kernels, extern calls such as ``mm``, and library ops such as
  ``linalg_cholesky_ex``, split in ``compiled_kernels_by_kind``, the extern and library
  ones by name in ``compiled_library_ops``), and ``compiled_kernels_ratio_to_ls``. On a
  GPU each is at least one launch of the CUDA-graph replay; the count depends on the
  graph and T, not on the layer sizes (the kernels fuse differently on a CPU and a GPU).

Rows are timed round-robin (one update of each per round), so load from other
jobs hits every row alike; ratios are to the LS row of the same process.

With ``--seeds S1,S2,...`` each row also reports, under ``seed_groups`` (keyed by S,
S = 1 always included), one ``SeedGroupSAC.update`` of S agents (one vmapped update
of every seed, ``mtrl_ntk.agent.seeds``; every seed gets the same batch, which costs
what any batch does: the update has static shapes and no host reads): its ``ops``
(the whole group update: the vmapped update's ops do not grow with S from S = 2 on,
where a few views of S = 1 become copies, and its per-seed draws add 1 to 3 per seed)
and ``syncs``, and its eager (and with ``--compile``
compiled) time per group update and per seed, the per-seed time as a ratio to S = 1
(``per_seed_ratio_to_s1``) and to the row's single agent (``per_seed_ratio_to_agent``).
Groups are timed in the same rounds as the single agents.

    python scripts/bench_update.py                          # every combiner, T = 10, batch 1280
    python scripts/bench_update.py ls ntkmtl:4 --threads 1 --compile --json
    python scripts/bench_update.py --quick --json           # tiny shape, seconds (tests)
    python scripts/bench_update.py --preset mtsac256 --threads 1 --compile   # issue 10's setting
    python scripts/bench_update.py ls ntkmtl --seeds 2,4,10 --threads 1    # seed groups

A row ``name:n`` sets ``num_minibatches=n`` (NTKMTL's n mini-batches per task).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_mt10.py

import argparse
import functools
import json
import statistics
import sys
import time
from typing import Any

import torch

from mtrl_ntk.agent import AgentConfig, MultiTaskSAC
from mtrl_ntk.agent.seeds import SeedGroupSAC
from mtrl_ntk.combiners import available_combiners, make_combiner
from mtrl_ntk.opcount import CompiledKernels, count_ops
from mtrl_ntk.replay import Batch
from mtrl_ntk.runtime import tune_cpu_allocator

OBS_DIM, ACTION_DIM = 39, 4
SHAPES = {
    "paper": {"tasks": 10, "per_task": 128, "agent": AgentConfig()},
    # One-hot MT-SAC, 3x256, batch 640: the setting of the jitted-JAX comparison.
    "mtsac256": {"tasks": 10, "per_task": 64,
                 "agent": AgentConfig(arch="mtsac", hidden_dim=256)},
    # T = 10 on tiny layers: the compiled update's kernels are those of "paper" (they
    # depend on the graph and T, not on layer sizes), compiled in a fraction of the time.
    "kernels": {"tasks": 10, "per_task": 4,
                "agent": AgentConfig(hidden_dim=16, task_embedding_dim=4)},
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
    row: str, shape: dict, device: torch.device, compile: bool = False, seed: int = 0
) -> MultiTaskSAC:
    name, _, minibatches = row.partition(":")
    params = {"num_minibatches": int(minibatches)} if minibatches else {}
    tasks = shape["tasks"]
    torch.manual_seed(seed)
    return MultiTaskSAC(
        OBS_DIM, ACTION_DIM, tasks, shape["agent"], make_combiner(name, tasks, **params),
        make_combiner(name, tasks, **params), device, seed=seed, compile=compile,
    )


def make_group(
    row: str, shape: dict, device: torch.device, seeds: int, compile: bool = False
) -> SeedGroupSAC:
    """S agents of seeds 0 .. S-1 (each built eagerly), compiled as one group if asked."""
    return SeedGroupSAC(
        [make_agent(row, shape, device, seed=seed) for seed in range(seeds)], compile=compile
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


def measure_group(
    row: str, shape: dict, device: torch.device, batch: Batch, seeds: int
) -> dict[str, Any]:
    group = make_group(row, shape, device, seeds)
    group.update([batch] * seeds)  # lazy allocations happen once
    _, counter = count_ops(group.update, [batch] * seeds)
    return {"ops": counter.total, "syncs": counter.syncs, "sync_ops": dict(counter.sync_names)}


def benchmark(
    rows: list[str], shape: dict, device: torch.device, warmup: int, repeats: int,
    compile: bool = False, seeds: list[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per row: the single agent's measures and times, and with ``seeds`` its seed groups'
    (``seed_groups``, keyed by S as a string); see the module docstring."""
    batch = make_batch(shape["tasks"], shape["per_task"], device)
    results: dict[str, dict[str, Any]] = {
        row: measure(row, shape, device, batch) for row in rows
    }
    # A variant: (row, compiled, S), S = None for the single agent.
    variants: list[tuple[str, bool, int | None]] = []
    for compiled in (False, True) if compile else (False,):
        variants += [(row, compiled, size) for row in rows for size in [None, *(seeds or [])]]
    for row in rows:
        if seeds:
            results[row]["seed_groups"] = {
                str(size): measure_group(row, shape, device, batch, size) for size in seeds
            }
    updates = {}
    for row, compiled, size in variants:
        if size is None:
            agent = make_agent(row, shape, device, compile=compiled)
            update, target = functools.partial(agent.update, batch), agent
            result = results[row]
        else:
            group = make_group(row, shape, device, size, compile=compiled)
            update, target = functools.partial(group.update, [batch] * size), group
            result = results[row]["seed_groups"][str(size)]
        started = time.perf_counter()
        with CompiledKernels() as kernels:
            for _ in range(max(warmup, 2 if compiled else 0)):  # CUDA graphs record on call 2
                update()
            synchronize(device)
        if compiled:
            result["compile_s"] = time.perf_counter() - started
            result["compiled_kernels"] = kernels.total
            result["compiled_kernels_by_kind"] = kernels.by_kind
            result["compiled_library_ops"] = {
                name: count for name, count in kernels.by_name.items() if name != "generated"
            }
        updates[row, compiled, size] = (update, target, result)
    wall: dict[tuple[str, bool, int | None], list[float]] = {key: [] for key in updates}
    cpu: dict[tuple[str, bool, int | None], list[float]] = {key: [] for key in updates}
    for _ in range(repeats):
        for key, (update, _, _) in updates.items():
            wall_started, cpu_started = time.perf_counter(), time.process_time()
            update()
            synchronize(device)
            wall[key].append(1e3 * (time.perf_counter() - wall_started))
            cpu[key].append(1e3 * (time.process_time() - cpu_started))
    for (row, compiled, size), times in wall.items():
        _, target, result = updates[row, compiled, size]
        prefix = "compiled_" if compiled else ""
        if compiled:  # still compiled after the timed updates (no fallback to eager)
            result["compiled"] = target._update_fn.compiled
        result[f"{prefix}wall_ms"] = statistics.median(times)
        result[f"{prefix}cpu_ms"] = statistics.median(cpu[row, compiled, size])
        if size is not None:
            result[f"{prefix}wall_ms_per_seed"] = result[f"{prefix}wall_ms"] / size
    for row in rows:
        groups = results[row].get("seed_groups", {})
        for group in groups.values():
            for prefix in ("", "compiled_") if compile else ("",):
                per_seed = group[f"{prefix}wall_ms_per_seed"]
                group[f"{prefix}per_seed_ratio_to_s1"] = (
                    per_seed / groups["1"][f"{prefix}wall_ms_per_seed"]
                )
                group[f"{prefix}per_seed_ratio_to_agent"] = (
                    per_seed / results[row][f"{prefix}wall_ms"]
                )
    baseline = results["ls"] if "ls" in results else results[rows[0]]
    for result in results.values():
        for key in ("wall_ms", "cpu_ms", "compiled_wall_ms", "compiled_cpu_ms"):
            if key in result:
                result[key.replace("_ms", "_ratio_to_ls")] = result[key] / baseline[key]
        if "compiled_kernels" in result:
            result["compiled_kernels_ratio_to_ls"] = (
                result["compiled_kernels"] / baseline["compiled_kernels"]
            )
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
                        help="shape: paper (default), mtsac256, kernels, quick")
    parser.add_argument("--compile", action="store_true",
                        help="also time the compiled update (train.compile=true)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates per row")
    parser.add_argument("--repeats", type=int, default=9, help="timed updates per row")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="keep glibc's default malloc settings (see mtrl_ntk/runtime.py)")
    parser.add_argument("--seeds", default=None, metavar="S[,S2,...]",
                        help="also time seed groups of S agents (SeedGroupSAC; S = 1 added)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    seeds = None
    if args.seeds is not None:
        try:
            seeds = sorted({1, *(int(size) for size in args.seeds.split(","))})
        except ValueError:
            parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
        if seeds[0] < 1:
            parser.error("--seeds must be >= 1")
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
        rows, shape, torch.device(args.device), args.warmup, args.repeats, args.compile, seeds
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
        header += (
            f" {'compiled ms':>11} {'x LS':>5} {'speedup':>7} {'compile s':>9}"
            f" {'kernels':>7} {'x LS':>5}"
        )
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
                f" {result['compiled_kernels']:>7} {result['compiled_kernels_ratio_to_ls']:>5.2f}"
                + ("" if result["compiled"] else "  (compile failed: eager)")
            )
        print(line)
    if seeds:
        print_seed_groups(results, args.compile)
    return 0


def print_seed_groups(results: dict[str, dict[str, Any]], compile: bool) -> None:
    print("\nSeedGroupSAC.update of S agents (per seed = group time / S; x S=1 and x agent: "
          "per-seed time over S = 1's and over the single agent's)")
    header = (f"{'row':<12} {'S':>3} {'ops':>6} {'syncs':>5} {'eager ms':>9} {'/seed':>7} "
              f"{'x S=1':>6} {'x agent':>7}")
    if compile:
        header += f" {'compiled ms':>11} {'/seed':>7} {'x S=1':>6} {'x agent':>7}"
    print(header)
    for row, result in results.items():
        for size, group in result["seed_groups"].items():
            line = (
                f"{row:<12} {size:>3} {group['ops']:>6} {group['syncs']:>5} "
                f"{group['wall_ms']:>9.1f} {group['wall_ms_per_seed']:>7.1f} "
                f"{group['per_seed_ratio_to_s1']:>6.2f} {group['per_seed_ratio_to_agent']:>7.2f}"
            )
            if compile:
                line += (
                    f" {group['compiled_wall_ms']:>11.1f}"
                    f" {group['compiled_wall_ms_per_seed']:>7.1f}"
                    f" {group['compiled_per_seed_ratio_to_s1']:>6.2f}"
                    f" {group['compiled_per_seed_ratio_to_agent']:>7.2f}"
                    + ("" if group["compiled"] else "  (compile failed: eager)")
                )
            print(line)


if __name__ == "__main__":
    sys.exit(main())
