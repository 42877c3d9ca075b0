"""What an evaluation costs, per backend: wall time and simulated task-steps of MT10.

The policy is Meta-World's scripted experts (``metaworld.policies``), a strong agent:
most tasks succeed early and have counted their episodes long before the slowest task
has. ``evaluate`` (``mtrl_ntk.envs.evaluate_together``) then makes those tasks idle
(``MultiTaskEnv.idle_tasks``): EnvPool, one pool per task, stops simulating them;
Meta-World's vector env steps all its envs to the end. Rows:

  metaworld          Meta-World's Python envs (``vector_strategy=sync``)
  envpool            EnvPool, idle tasks not simulated
  envpool_all_tasks  EnvPool simulating every task to the end (idle tasks ignored)

Success rates must agree between the two EnvPool rows (same goals, same physics); the
Meta-World row has other goals (see README, "Environment backends").

    python scripts/bench_eval.py                         # 20 episodes, 500-step horizon
    python scripts/bench_eval.py --episodes 5 --backend envpool --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from collections.abc import Iterator

import numpy as np

from mtrl_ntk.envs import BENCHMARK_TASKS, PROTOCOLS, MultiTaskEnv, evaluate
from mtrl_ntk.envs.envpool_env import EnvPoolMultiTaskEnv


def expert_policy(task_names: list[str]):
    from metaworld.policies import ENV_POLICY_MAP

    experts = [ENV_POLICY_MAP[task]() for task in task_names]

    def policy(obs: np.ndarray) -> np.ndarray:
        return np.stack([
            expert.get_action(o.astype(np.float64)) for expert, o in zip(experts, obs, strict=True)
        ]).clip(-1, 1)

    return policy


@contextlib.contextmanager
def counted_task_steps(simulate_idle_tasks: bool) -> Iterator[list[int]]:
    """Count the tasks each backend simulates per step (Meta-World: all of them); with
    ``simulate_idle_tasks`` EnvPool keeps simulating idle tasks too."""
    simulated: list[int] = []
    envpool_send, metaworld_send = EnvPoolMultiTaskEnv._send_actions, MultiTaskEnv._send_actions
    set_idle = EnvPoolMultiTaskEnv._set_idle

    def envpool_counting(self: EnvPoolMultiTaskEnv, actions: np.ndarray) -> None:
        envpool_send(self, actions)
        simulated.append(int((~self._idle).sum()))

    def metaworld_counting(self: MultiTaskEnv, actions: np.ndarray) -> None:
        metaworld_send(self, actions)
        simulated.append(self.num_tasks)

    EnvPoolMultiTaskEnv._send_actions = envpool_counting  # type: ignore[method-assign]
    MultiTaskEnv._send_actions = metaworld_counting  # type: ignore[method-assign]
    if simulate_idle_tasks:
        EnvPoolMultiTaskEnv._set_idle = lambda self, idle: None  # type: ignore[method-assign]
    try:
        yield simulated
    finally:
        EnvPoolMultiTaskEnv._send_actions = envpool_send  # type: ignore[method-assign]
        MultiTaskEnv._send_actions = metaworld_send  # type: ignore[method-assign]
        EnvPoolMultiTaskEnv._set_idle = set_idle  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task")
    parser.add_argument("--horizon", type=int, default=500, help="max steps per episode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="both", choices=["both", "metaworld", "envpool"])
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.episodes < 1 or not 1 <= args.horizon <= 500:
        parser.error("need --episodes >= 1 and 1 <= --horizon <= 500")

    task_names = list(BENCHMARK_TASKS["mt10"])
    rows: dict[str, dict[str, object]] = {}
    configs = [
        ("metaworld", "metaworld", True),
        ("envpool", "envpool", False),
        ("envpool_all_tasks", "envpool", True),
    ]
    for name, backend, simulate_idle in configs:
        if args.backend not in ("both", backend):
            continue
        with counted_task_steps(simulate_idle) as simulated, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the experts' and EnvPool's deprecation notes
            started = time.perf_counter()
            rates = evaluate(
                expert_policy(task_names), "mt10", PROTOCOLS["mwplus"], seed=args.seed,
                episodes_per_task=args.episodes, vector_strategy="sync",
                max_episode_steps=args.horizon, backend=backend,
            )
            seconds = time.perf_counter() - started
        rows[name] = {
            "seconds": seconds,
            "task_steps": sum(simulated),
            "mean_success": float(np.mean(list(rates.values()))),
            "success": rates,
        }
    if "envpool" in rows and rows["envpool"]["success"] != rows["envpool_all_tasks"]["success"]:
        print("error: idle tasks changed EnvPool's success rates", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"episodes": args.episodes, "horizon": args.horizon, "rows": rows}))
        return 0
    print(f"mt10, mwplus goals, scripted experts, {args.episodes} episodes per task, "
          f"horizon {args.horizon}")
    print(f"{'row':<18} {'seconds':>8} {'task-steps':>11} {'mean success':>13}")
    for name, row in rows.items():
        print(f"{name:<18} {row['seconds']:>8.2f} {row['task_steps']:>11} "
              f"{row['mean_success']:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
