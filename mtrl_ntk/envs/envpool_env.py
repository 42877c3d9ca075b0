"""Meta-World v3 through EnvPool's native C++ ports: the `env.backend=envpool` MultiTaskEnv.

Same interface (`mtrl_ntk.envs.interface.MultiTaskEnvInterface`) as the Meta-World
backend (StepResult, autoreset with the true final observation, success at any step,
raw and normalised rewards, `state_dict` / `episode_start_state_dict` for checkpoints),
built on EnvPool 1.2.5's `MetaWorld/<Task>-v3` pools instead of Meta-World's Python
environments.

What EnvPool's Meta-World is, found by reading envpool 1.2.5 and by experiment
(README, "Environment backends", has the protocol-by-protocol table):
- Physics, observation layout and the v2 reward match Meta-World 3.1.1 for the same
  goal (tests/envs/test_envpool_env.py sets Meta-World's goal to EnvPool's and steps
  both with the same actions). Observations are 39-dim, hand / gripper / objects,
  the previous frame, goal; the goal is zero unless `partially_observable=False`
  (EnvPool's default is True; Meta-World's MT benchmarks show it; we pass False).
- Only the v2 reward exists (`reward` == `info["unscaled_reward"]`, in [0, 10]);
  there is no v1 reward, so `classic` cannot be served.
- Goals: every reset draws a fresh goal from the task's continuous goal space with
  the env's own RNG, which is seeded once, at construction (`reset(seed=...)` is
  ignored with a warning). There is no fixed goal list and no way to set a goal.
  We get a protocol's finite goal set back from the one thing that is fixed: the
  first reset of a pool built with seed s always gives the same goal. Goal k of
  task i is the first reset of a pool seeded with `_goal_seed(seed, i, k)`, so every
  episode runs in a freshly built one-env pool (about 17 ms of CPU per task and
  episode: 12 ms building, mostly MuJoCo compiling the model, and 5 ms of reset
  physics). A background thread builds the next episode's pool while the current one
  runs; the build holds Python's GIL, so a spare core hides only the reset. The goals differ
  from Meta-World's for the same seed (another RNG), but are drawn from the same
  goal space, one set of `num_goals` per task, visited as Meta-World visits them
  (uniformly at random in training, in shuffled cycles in evaluation).
- Autoreset: EnvPool resets an ended env on the *next* step (that step's action is
  ignored and it returns the reset observation). We never let that happen: an
  ended episode's pool is replaced at once, so `StepResult.obs` already holds the
  next episode's first observation and `next_obs` the true final one.
- Horizon: `max_episode_steps` truncates (`elapsed_step` counts steps); we keep our
  own step count and end episodes at the horizon ourselves. Episodes never
  terminate on their own; evaluation ends an episode at its first success
  (`info["success"] > 0`), as Meta-World's AutoTerminateOnSuccessWrapper does.
- Idle tasks (`idle_tasks`, used by evaluations for tasks that have counted all their
  episodes): their pools are not sent actions until the next reset; a step returns
  their last observation with zero reward and no episode end.
- Threads: one pool (one env, one C++ worker thread) per task. `step_async` sends
  all T actions and returns, `step_wait` collects; the T threads run on whatever
  cores the process may use, so no process is forked and no signal reaches them.
- Failures: EnvPool raises RuntimeError from a failed pool (construction, send,
  receive); they become `EnvWorkerError`, which the trainer turns into its one-line
  stop, as for a dead Meta-World worker process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import warnings
from typing import Any

import numpy as np

from mtrl_ntk.envs.episodes import StepResult
from mtrl_ntk.envs.interface import MultiTaskEnvBase, evaluation_seed
from mtrl_ntk.envs.protocols import Protocol
from mtrl_ntk.envs.spec import VectorStrategy
from mtrl_ntk.errors import EnvWorkerError

ENVPOOL_VERSION = "1.2.5"
"""The EnvPool release whose Meta-World this module was checked against (pinned in the locks)."""

_OBS_DIM = 39
_ACTION_DIM = 4
# Seed-sequence streams: goals (shared by training and evaluation) and goal-order RNGs.
_GOAL_STREAM = 2
_ORDER_STREAM = 3


def envpool_unavailable_reason() -> str | None:
    """Why `env.backend=envpool` cannot run here (envpool missing), or None."""
    try:
        import envpool  # noqa: F401
        from envpool.mujoco.metaworld import registration  # noqa: F401
    except ImportError as error:
        return (
            f"the envpool package is not importable ({error}); install it with "
            f"pip install envpool=={ENVPOOL_VERSION} (or the 'rl' extra)"
        )
    return None


def protocol_unsupported_reason(protocol: Protocol) -> str | None:
    """Why EnvPool's Meta-World cannot reproduce `protocol`, or None if it can."""
    if protocol.reward_function_version != "v2":
        return (
            f"EnvPool's Meta-World computes only the v2 reward, protocol {protocol.name!r} "
            f"uses reward_function_version={protocol.reward_function_version!r}"
        )
    return None


def _goal_seed(seed: int, task_index: int, goal: int) -> int:
    """The pool seed whose first reset is goal `goal` of task `task_index` (EnvPool: int32)."""
    state = np.random.SeedSequence([seed, _GOAL_STREAM, task_index, goal]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def task_id(task_name: str) -> str:
    """EnvPool's id of a Meta-World task (`MetaWorld/<Task>-v3`)."""
    from envpool.mujoco.metaworld.registration import metaworld_task_id

    return metaworld_task_id(task_name)


class EnvPoolMultiTaskEnv(MultiTaskEnvBase):
    """T Meta-World v3 tasks on EnvPool, one one-env pool per task; see the module docstring.

    Same constructor and methods as `MultiTaskEnv` (`vector_strategy` is accepted and
    ignored: stepping is always asynchronous, in EnvPool's C++ threads).
    """

    backend = "envpool"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return envpool_unavailable_reason()

    @classmethod
    def unsupported_reason(cls, protocol: Protocol) -> str | None:
        return protocol_unsupported_reason(protocol)

    def _open(self, vector_strategy: VectorStrategy) -> None:
        self.obs_dim = _OBS_DIM
        self.action_dim = _ACTION_DIM
        self.action_low = -np.ones(_ACTION_DIM, dtype=np.float32)
        self.action_high = np.ones(_ACTION_DIM, dtype=np.float32)
        self._task_ids = [task_id(name) for name in self.task_names]
        self._base_path: str | None = None  # None: EnvPool's installed assets

        order_seed = evaluation_seed(self.seed) if self.for_evaluation else self.seed
        self._order_rngs = [
            np.random.default_rng(np.random.SeedSequence([order_seed, _ORDER_STREAM, task]))
            for task in range(self.num_tasks)
        ]
        # Evaluation: each task's shuffled cycle through its goals and the position in it.
        self._cycles: list[list[int]] = [[] for _ in range(self.num_tasks)]
        self._cycle_positions = [0] * self.num_tasks

        self._pools: list[Any] = [None] * self.num_tasks
        # The next episode of each task, prepared while the current one runs: the goal
        # sampler's state before its draw, and its pool being built in the background.
        self._builder = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="envpool-builder"
        )
        self._prepared: list[tuple[dict[str, Any], concurrent.futures.Future] | None] = [
            None
        ] * self.num_tasks
        # The goal sampler's state before the draw of each task's current episode.
        self._episode_samplers: list[dict[str, Any] | None] = [None] * self.num_tasks
        self._action_buffers: list[list[np.ndarray]] = [[] for _ in range(self.num_tasks)]
        self._state_index: dict[str, int] = {}
        self._closed = False
        self._steps = np.zeros(self.num_tasks, dtype=np.int64)  # [T] steps of each episode
        # [T] not simulated (idle_tasks); fixed from step_async to step_wait (the base
        # class refuses idle_tasks in between), so it also names the tasks of a step.
        self._idle = np.zeros(self.num_tasks, dtype=bool)
        self._last_obs = np.zeros((self.num_tasks, _OBS_DIM))  # [T, D] what an idle task shows
        self._steps_in_workers = True  # as MultiTaskEnv's async strategy (trainer overlap)

    # -- goals -----------------------------------------------------------------------------

    def _next_goal(self, task: int) -> int:
        num_goals = self.protocol.num_goals
        rng = self._order_rngs[task]
        if not self.for_evaluation:
            return int(rng.integers(num_goals))
        if self._cycle_positions[task] >= len(self._cycles[task]):
            self._cycles[task] = [int(goal) for goal in rng.permutation(num_goals)]
            self._cycle_positions[task] = 0
        goal = self._cycles[task][self._cycle_positions[task]]
        self._cycle_positions[task] += 1
        return goal

    def _sampler(self, task: int) -> dict[str, Any]:
        """Task's goal-order state (plain Python values): RNG, evaluation cycle, position."""
        return {
            "rng": self._order_rngs[task].bit_generator.state,
            "cycle": list(self._cycles[task]),
            "position": int(self._cycle_positions[task]),
        }

    def _set_sampler(self, task: int, sampler: dict[str, Any]) -> None:
        self._order_rngs[task].bit_generator.state = sampler["rng"]
        self._cycles[task] = [int(goal) for goal in sampler["cycle"]]
        self._cycle_positions[task] = int(sampler["position"])

    def _samplers(self) -> list[dict[str, Any]]:
        """Every task's goal-order state as if no next episode had been prepared."""
        return [
            self._prepared[task][0] if self._prepared[task] is not None else self._sampler(task)
            for task in range(self.num_tasks)
        ]

    # -- pools -----------------------------------------------------------------------------

    def _build_pool(self, task: int, goal: int, base_path: str | None) -> tuple[Any, np.ndarray]:
        """A one-env pool of task whose first reset is goal `goal`, reset; (pool, obs [D])."""
        import envpool

        options: dict[str, Any] = {}
        if base_path is not None:
            options["base_path"] = base_path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool = envpool.make_gymnasium(
                self._task_ids[task],
                num_envs=1,
                num_threads=1,
                seed=_goal_seed(self.seed, task, goal),
                partially_observable=False,
                max_episode_steps=self.max_episode_steps,
                **options,
            )
        obs, _ = pool.reset()
        return pool, np.asarray(obs[0], dtype=np.float64)

    def _prepare(self, task: int) -> None:
        """Draw task's next goal now and build its pool in the background thread.

        The draw is the one the next reset would make, so preparing changes no goal; the
        sampler state from before it is kept for checkpoints and for `_unprepare`.
        """
        before = self._sampler(task)
        goal = self._next_goal(task)
        self._prepared[task] = (before, self._builder.submit(
            self._build_pool, task, goal, self._base_path
        ))

    def _unprepare(self, task: int) -> None:
        """Forget task's prepared episode: close its pool and rewind its goal draw."""
        prepared = self._prepared[task]
        if prepared is None:
            return
        self._prepared[task] = None
        before, future = prepared
        self._set_sampler(task, before)
        with contextlib.suppress(Exception):  # a failed build has nothing to close
            future.result()[0].close()

    def _start_episode(self, task: int, action: str) -> np.ndarray:
        """Replace task's pool with the prepared one on its next goal; returns obs [D] float64."""
        if self._prepared[task] is None:
            self._prepare(task)
        before, future = self._prepared[task]  # type: ignore[misc]
        self._prepared[task] = None
        old = self._pools[task]
        self._pools[task] = None
        try:
            if old is not None:
                old.close()
            pool, obs = future.result()
            self._pools[task] = pool
            if not self._state_index:
                self._state_index = {key: i for i, key in enumerate(pool._state_keys)}
            self._action_buffers[task] = pool._from(
                np.zeros((1, _ACTION_DIM), dtype=np.float32), np.zeros(1, dtype=np.int32)
            )
        except (RuntimeError, AssertionError, OSError) as error:
            raise EnvWorkerError(self._failure_message(task, action, error)) from error
        self._episode_samplers[task] = before
        self._prepare(task)  # the next episode's pool builds while this one runs
        return obs

    def _failure_message(self, task: int, action: str, error: BaseException) -> str:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        return (
            f"EnvPool pool of task {self.task_names[task]} failed during {action}: {detail}"
        )

    # -- MultiTaskEnvBase's backend hooks ---------------------------------------------------

    def _reset_tasks(self) -> np.ndarray:
        for task in range(self.num_tasks):
            self._unprepare(task)
        if self.for_evaluation:  # restart every goal cycle, as MultiTaskEnv does
            self._cycles = [[] for _ in range(self.num_tasks)]
            self._cycle_positions = [0] * self.num_tasks
        obs = np.stack([self._start_episode(task, "reset") for task in range(self.num_tasks)])
        self._steps[:] = 0
        self._idle = np.zeros(self.num_tasks, dtype=bool)
        self._last_obs = obs
        return obs

    def _set_idle(self, idle: np.ndarray) -> None:
        self._idle = idle

    def _send_actions(self, actions: np.ndarray) -> None:
        """Send every task's action to its pool (idle tasks': none) and return;
        `step_wait` collects."""
        for task in np.flatnonzero(~self._idle):
            buffer = self._action_buffers[task]
            buffer[-1] = np.ascontiguousarray(actions[task : task + 1])
            try:
                self._pools[task]._send(buffer)
            except RuntimeError as error:
                raise EnvWorkerError(self._failure_message(task, "step", error)) from error

    def _collect_step(self, actions: np.ndarray) -> StepResult:
        index = self._state_index
        # Idle tasks: their last observation, no reward, no success, no end.
        obs = self._last_obs.copy()
        raw_reward = np.zeros(self.num_tasks, dtype=np.float64)
        success = np.zeros(self.num_tasks, dtype=bool)
        stepping = ~self._idle
        for task in np.flatnonzero(stepping):
            try:
                state = self._pools[task]._recv()
            except RuntimeError as error:
                raise EnvWorkerError(self._failure_message(task, "step", error)) from error
            obs[task] = state[index["obs"]][0]
            raw_reward[task] = state[index["reward"]][0]
            success[task] = state[index["info:success"]][0] > 0
        self._steps[stepping] += 1
        truncated = (self._steps >= self.max_episode_steps) & stepping
        terminated = success if self.for_evaluation else np.zeros(self.num_tasks, dtype=bool)
        episode_end = terminated | truncated
        self._episodes.count_step(episode_end)

        next_obs = obs.copy()
        for task in np.flatnonzero(episode_end):
            obs[task] = self._start_episode(int(task), "step")
            self._steps[task] = 0
        self._last_obs = obs
        return self._step_result(
            obs, next_obs, raw_reward, terminated, truncated, success, episode_end
        )

    def _task_samplers(self) -> list[Any]:
        return self._samplers()

    def _episode_start_task_samplers(self) -> list[Any]:
        return list(self._episode_samplers)

    def _checked_task_samplers(self, state: dict[str, Any]) -> list[Any]:
        samplers = super()._checked_task_samplers(state)
        if len(samplers) != self.num_tasks:
            raise ValueError(
                f"state['task_samplers'] has {len(samplers)} entries; expected {self.num_tasks}"
            )
        return samplers

    def _load_task_samplers(self, samplers: list[Any]) -> None:
        for task, sampler in enumerate(samplers):
            self._unprepare(task)
            self._set_sampler(task, sampler)

    def settle(self) -> None:
        """Wait until every prepared next-episode pool is built (a failed build raises
        later, when its episode starts)."""
        concurrent.futures.wait(
            [prepared[1] for prepared in self._prepared if prepared is not None]
        )

    def close(self) -> None:
        """Free every pool (its C++ thread and simulator). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in range(self.num_tasks):
            self._unprepare(task)
        self._builder.shutdown(wait=True)
        for task, pool in enumerate(self._pools):
            if pool is not None:
                if self._pending_actions is not None and not self._idle[task]:
                    with contextlib.suppress(RuntimeError):  # collect the step in flight
                        pool._recv()
                pool.close()
            self._pools[task] = None
        self._pending_actions = None
