"""Evaluation: success rates of a deterministic policy, one env or a seed group's at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mtrl_ntk.envs.backends import make_multitask_env
from mtrl_ntk.envs.interface import MultiTaskEnvInterface
from mtrl_ntk.envs.protocols import Protocol
from mtrl_ntk.envs.spec import EnvSpec, VectorStrategy

MakeEnv = Callable[[EnvSpec], MultiTaskEnvInterface]
"""Builds an env from its spec: `make_multitask_env`, or an `EnvWorkerPool`'s `make_env`."""

Policy = Callable[[np.ndarray], np.ndarray]
"""Deterministic policy: obs [T, D] float32 -> actions [T, A]."""


class Evaluator:
    """Success rates of a policy, with one evaluation env kept open across calls.

    Each call runs `episodes_per_task` episodes of every task, all tasks stepping
    in parallel in one vector env. An episode succeeds if `info["success"]` is
    set at any of its steps; it ends at its first success (as in Meta-World+'s
    `metaworld.evaluation.evaluation`) or at the time limit. Goals are visited in
    a freshly shuffled cycle each call, so `episodes_per_task = num_goals` (as both
    protocols use) evaluates every goal exactly once and the result does not
    depend on the seed stream.

    Use as a context manager (or call `close()`).
    """

    def __init__(self, spec: EnvSpec, make_env: MakeEnv = make_multitask_env) -> None:
        """`spec` is the training env's (or the evaluation env's) spec; the evaluation env
        is built from `spec.evaluation()` by `make_env` (in a worker, for a seed group)."""
        self.spec = spec.evaluation()
        self.protocol = spec.protocol
        self.env = make_env(self.spec)

    def __call__(self, policy: Policy, episodes_per_task: int | None = None) -> dict[str, float]:
        """Returns {task name: success rate in [0, 1]}."""
        (success,) = evaluate_together(
            [self], lambda obs: policy(obs[0])[np.newaxis], episodes_per_task
        )
        return success

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def evaluate_together(
    evaluators: Sequence[Evaluator],
    policy: Callable[[np.ndarray], np.ndarray],
    episodes_per_task: int | None = None,
) -> list[dict[str, float]]:
    """Each evaluator's ``__call__``, all at once: the evaluations of a seed group.

    ``policy`` maps the observations of every evaluator's env [S, T, D] to their
    actions [S, T, A], one call per step for all of them. Each step is sent to every
    env that still has episodes to count before any is collected, so envs that step
    elsewhere (worker processes, threads) step concurrently. Evaluator k's result is
    what ``evaluators[k](lambda obs: policy(...)[k])`` gives on its own: an env whose
    episodes are all counted is not stepped again, and a task whose episodes are all
    counted is made idle (`MultiTaskEnv.idle_tasks`): EnvPool stops simulating it.
    """
    episodes = episodes_per_task
    if episodes is None:
        episodes = evaluators[0].protocol.eval_episodes_per_task
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes_per_task={episodes!r}; allowed: an integer >= 1")
    envs = [evaluator.env for evaluator in evaluators]
    finished = [np.zeros(env.num_tasks, dtype=np.int64) for env in envs]  # [T] episodes counted
    successes = [np.zeros(env.num_tasks, dtype=np.int64) for env in envs]  # [T]
    observations = [env.reset() for env in envs]  # reset: no task is idle
    idle = [np.zeros(env.num_tasks, dtype=bool) for env in envs]  # [T] all episodes counted
    while True:
        running = [k for k, counted in enumerate(finished) if (counted < episodes).any()]
        if not running:
            break
        actions = policy(np.stack(observations))  # [S, T, A]
        for k in running:
            envs[k].step_async(actions[k])
        for k in running:
            result = envs[k].step_wait()
            # Tasks that are done are ignored; the env stops simulating them if it can.
            counted = result.episode_end & (finished[k] < episodes)
            successes[k] += counted & result.episode_success
            finished[k] += counted
            observations[k] = result.obs
        # After every env's step is collected: envs sharing a worker answer in order.
        for k in running:
            done = finished[k] >= episodes
            if (done != idle[k]).any():
                envs[k].idle_tasks(done)
                idle[k] = done
    return [
        {name: float(wins[i] / episodes) for i, name in enumerate(env.task_names)}
        for env, wins in zip(envs, successes, strict=True)
    ]


def evaluate(
    policy: Policy,
    benchmark: str,
    protocol: Protocol,
    seed: int,
    episodes_per_task: int | None = None,
    vector_strategy: VectorStrategy = "async",
    max_episode_steps: int | None = None,
    backend: str = "metaworld",
) -> dict[str, float]:
    """One evaluation in a fresh env: {task name: success rate} over `episodes_per_task`
    deterministic episodes per task (default `protocol.eval_episodes_per_task`).

    `seed` must be the training run's seed: it fixes the goals, so evaluation uses
    the goals the agent trained on (with one goal per task, the only goal). To
    evaluate repeatedly without rebuilding the env, keep an `Evaluator` open.
    """
    spec = EnvSpec(backend, benchmark, protocol, seed, vector_strategy, max_episode_steps)
    with Evaluator(spec) as evaluator:
        return evaluator(policy, episodes_per_task)
