"""Meta-World MT10 / MT25 / MT50 as one vector environment with one sub-environment per task.

The first stage of the data path: `MultiTaskEnv.step` takes one action per task
[T, A] and returns one transition per task [T, ...], ready for the replay buffer.

Built on Meta-World 3.x's gymnasium vector API (`gym.make_vec("Meta-World/MT10")`)
with `autoreset_mode=SAME_STEP`: when an episode ends, the vector env resets that
task at once and returns the reset observation, while the true final observation
travels in `info["final_obs"]`. `StepResult` separates the two (`next_obs` for the
buffer, `obs` for the next action), so a time-limit end never leaks a reset
observation into a stored transition.

Meta-World behaviour this module relies on (metaworld 3.1.1, gymnasium 1.4):
- Episodes never terminate: `SawyerXYZEnv.step` always returns terminated=False
  (unless success-termination is switched on, which only evaluation does); the
  only end is the `TimeLimit` truncation at `max_episode_steps`.
- All randomness of an episode's start is its goal (`rand_vec`, object and target
  positions). The goals are drawn once, at construction, from `seed` (Meta-World's
  `_make_tasks` seeds NumPy's global RNG); each sub-environment then picks one of
  its task's goals at every reset with its own RNG, also seeded by `seed`. The
  physics is deterministic, so a seed and an action sequence fix every observation.
- The number of goals per task is a module-level setting in Meta-World 3.x
  (`metaworld._N_GOALS`, which `make_vec(..., num_goals=n)` overwrites for good);
  we restore it after building the env.
- Meta-World's own reward normaliser (`NormalizeRewardsExponential`) updates its
  running statistics twice per step, so we normalise here instead (one update per
  step, as in garage's `NormalizedEnv`, which that wrapper was ported from); this
  also keeps the raw reward and makes the statistics part of `state_dict()`.
- Every sub-environment's RNG gets the same `seed`, so with several goals per task
  all tasks draw the same goal *index* at each reset (the goals themselves differ:
  each task has its own independently drawn list). Each task's goal sequence is
  still i.i.d. uniform over its goals.
- `AsyncVectorEnv` is built by Meta-World with multiprocessing's default start
  method (fork on Linux); workers only run MuJoCo, never torch or CUDA. They are
  forked with SIGINT, SIGTERM and SIGUSR2 blocked: a Ctrl-C, a scheduler's SIGTERM
  or SLURM's pre-timeout SIGUSR2 reaches the whole process group, and the trainer,
  not the workers, decides when to stop (it finishes the step and checkpoints first).
  Workers end when the env closes or, if the trainer is killed, when their pipe to
  it closes.
- Meta-World cannot save the physics of a running episode, so a resumable state
  exists only where every task's episode has just started: right after `reset()`,
  or after a step that ended all episodes (training episodes all end together at
  the time limit). `episode_start_state_dict()` returns it: the goal-sampler RNGs as
  they were *before* that reset, so that `load_state_dict` + `reset()` draws the same
  goals and returns the same observation. A state taken after the reset would make
  the resumed env draw one goal too many (with 50 goals, another observation).
"""

from __future__ import annotations

import copy
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import gymnasium as gym
import metaworld
import metaworld.env_dict as metaworld_env_dict
import mujoco
import numpy as np

from mtrl_ntk.envs.episodes import EpisodeTracker, RewardNormalizer, StepResult
from mtrl_ntk.envs.protocols import METAWORLD_MAX_PATH_LENGTH, Protocol

BENCHMARK_TASKS: dict[str, list[str]] = {
    "mt10": list(metaworld_env_dict.MT10_V3),
    "mt25": list(metaworld_env_dict.MT25_V3),
    "mt50": list(metaworld_env_dict.MT50_V3),
}
"""Task names per benchmark, in the order of the vector env's sub-environments
(task i of every [T, ...] array is `BENCHMARK_TASKS[benchmark][i]`)."""

VectorStrategy = Literal["async", "sync"]

BACKENDS = ("metaworld", "envpool")
"""`env.backend`: Meta-World's Python environments, or EnvPool's C++ ports of them
(`mtrl_ntk.envs.envpool_env`; it serves only the protocols it can reproduce)."""

# Evaluation environments draw their goal order from a stream separate from training's.
_EVALUATION_SEED_STREAM = 1
# How long a dead worker's exit status may take to appear after its pipe closed.
_WORKER_EXIT_WAIT_SECONDS = 2.0


def _check_choice(key: str, value: Any, allowed: list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}; allowed: {', '.join(map(repr, allowed))}")


class EnvWorkerError(RuntimeError):
    """An async worker process died (killed, out of memory, crashed in MuJoCo)."""


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM/SIGUSR2 in this thread while worker processes are forked from it.

    The children inherit the blocked mask (they never see the signals); signals that
    arrive meanwhile stay pending and reach this process when the block ends.
    """
    stop_signals = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR2}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_PARSED_MODELS: dict[tuple[str, int, int], mujoco.MjModel] = {}
"""MuJoCo models parsed in this process, by (absolute XML path, mtime_ns, size)."""


@contextmanager
def _parsed_models_reused() -> Iterator[None]:
    """Within the block, `mujoco.MjModel.from_xml_path` parses each XML file once per process
    and returns a deep copy of that model.

    Building an MT10 env parses 20 XML files (Meta-World builds every task once to draw
    its goals, then again for the vector env; 8 distinct files), 0.1-0.16 s each: most
    of its construction time, and of a short run's. A copy takes about 12 ms and keeps
    every env the owner of its model (Meta-World writes each goal into model fields).
    The key holds the file's mtime and size, so an edited file is parsed again. Async
    workers forked within the block inherit the patch and the parsed models.
    """
    descriptor = vars(mujoco.MjModel)["from_xml_path"]
    parse = mujoco.MjModel.from_xml_path

    def from_xml_path(filename: str, *args: Any, **kwargs: Any) -> mujoco.MjModel:
        if args or kwargs:  # assets or a virtual file system: not a plain file's model
            return parse(filename, *args, **kwargs)
        path = os.path.abspath(filename)
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in _PARSED_MODELS:
            _PARSED_MODELS[key] = parse(path)
        return copy.deepcopy(_PARSED_MODELS[key])

    mujoco.MjModel.from_xml_path = staticmethod(from_xml_path)
    try:
        yield
    finally:
        mujoco.MjModel.from_xml_path = descriptor


def _evaluation_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, _EVALUATION_SEED_STREAM]).generate_state(1)[0])


_DEFAULT_BACKEND = "metaworld"
"""The backend of an env state without a "backend" key: Meta-World's states never carry
one (their checkpoints predate EnvPool), so old and new checkpoints have the same keys."""

_EnvT = TypeVar("_EnvT", bound="MultiTaskEnvBase")


def checked_actions(actions: np.ndarray, num_tasks: int, action_dim: int) -> np.ndarray:
    """``actions`` as float32 [T, A]; a ValueError for any other shape (before any work)."""
    actions = np.asarray(actions, dtype=np.float32)
    if actions.shape != (num_tasks, action_dim):
        raise ValueError(
            f"actions have shape {actions.shape}; expected (T, A) = ({num_tasks}, {action_dim})"
        )
    return actions


class MultiTaskEnvBase:
    """What every backend's multi-task env shares, so they cannot drift apart.

    The argument checks, the call order (`reset()`, then `step_async` + `step_wait`
    pairs, nothing in between), the episode bookkeeping (`EpisodeTracker`), the reward
    normaliser (`RewardNormalizer`), the `StepResult` of a step and the checkpoint
    state around the backend's goal samplers. A backend implements the hooks below
    (`_open`, `_reset_tasks`, `_send_actions`, `_collect_step`, the task-sampler
    ones and `close`); see `MultiTaskEnv` for the arguments.
    """

    backend = _DEFAULT_BACKEND

    def __init__(
        self,
        benchmark: str,
        protocol: Protocol,
        seed: int,
        vector_strategy: VectorStrategy = "async",
        max_episode_steps: int | None = None,
        *,
        for_evaluation: bool = False,
    ) -> None:
        _check_choice("benchmark", benchmark, list(BENCHMARK_TASKS))
        _check_choice("vector_strategy", vector_strategy, ["async", "sync"])
        self._check_backend_serves(protocol)
        horizon = protocol.max_episode_steps if max_episode_steps is None else max_episode_steps
        if isinstance(horizon, bool) or not isinstance(horizon, int) or not (
            1 <= horizon <= METAWORLD_MAX_PATH_LENGTH
        ):
            raise ValueError(
                f"max_episode_steps={horizon!r}; allowed: an integer from 1 to "
                f"{METAWORLD_MAX_PATH_LENGTH} (Meta-World's path limit)"
            )
        self.benchmark = benchmark
        self.protocol = protocol
        self.seed = seed
        self.max_episode_steps = horizon
        self.for_evaluation = for_evaluation
        self.task_names: list[str] = list(BENCHMARK_TASKS[benchmark])
        self.num_tasks = len(self.task_names)
        self._rewards = RewardNormalizer(
            self.num_tasks, protocol.normalize_reward, protocol.reward_norm_alpha
        )
        self._episodes = EpisodeTracker(self.num_tasks)
        self._needs_reset = True
        self._pending_actions: np.ndarray | None = None  # sent by step_async, not yet collected
        self._open(vector_strategy)

    # -- backend hooks -------------------------------------------------------------------

    def _check_backend_serves(self, protocol: Protocol) -> None:
        """Raise if this backend cannot run here or reproduce `protocol` (before any work)."""

    def _open(self, vector_strategy: VectorStrategy) -> None:
        """Build the simulators; sets obs_dim, action_dim, action_low [A], action_high [A]."""
        raise NotImplementedError

    def _reset_tasks(self) -> np.ndarray:
        """Start a new episode of every task; returns obs [T, D]."""
        raise NotImplementedError

    def _send_actions(self, actions: np.ndarray) -> None:
        """Start stepping every task with actions [T, A] float32 (checked)."""
        raise NotImplementedError

    def _collect_step(self, actions: np.ndarray) -> StepResult:
        """Finish the step `_send_actions(actions)` started; calls `_episodes.count_step`
        as soon as it knows which episodes ended, and returns `_step_result(...)`."""
        raise NotImplementedError

    def _task_samplers(self) -> list[Any]:
        """Each task's goal-sampler state now (plain Python values)."""
        raise NotImplementedError

    def _episode_start_task_samplers(self) -> list[Any]:
        """Each task's goal-sampler state before the draw of its current episode's goal."""
        raise NotImplementedError

    def _checked_task_samplers(self, state: dict[str, Any]) -> list[Any]:
        """`state["task_samplers"]`, checked before anything of this env changes."""
        return list(state["task_samplers"])

    def _load_task_samplers(self, samplers: list[Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _set_idle(self, idle: np.ndarray) -> None:
        """Stop simulating the tasks where idle [T] is true, if this backend can (see
        `idle_tasks`); by default every task keeps stepping."""

    def settle(self) -> None:
        """Wait for work this env started in the background (none here).

        EnvPool builds each task's next-episode pool in a thread; benchmarks call this
        at the end of a timed window so that the window pays for the episodes it ended.
        """

    # -- the MultiTaskEnv interface ------------------------------------------------------

    def reset(self) -> np.ndarray:
        """Start a new episode of every task; returns obs [T, D] float32."""
        self._ensure_open()
        if self._pending_actions is not None:
            raise RuntimeError("MultiTaskEnv.reset called between step_async() and step_wait()")
        obs = self._reset_tasks()  # [T, D]
        self._episodes.start_all()
        self._needs_reset = False
        return obs.astype(np.float32)

    def idle_tasks(self, idle: np.ndarray) -> None:
        """Stop stepping the tasks where idle [T] (bool) is true, until the next `reset()`.

        For an evaluation whose tasks have counted all their episodes while others still
        run. A backend that can (EnvPool: one pool per task) no longer simulates them: a
        step returns their last observation with zero reward and no episode end. One that
        cannot (Meta-World's vector env steps all its envs) keeps stepping them. Either
        way the caller ignores those tasks' results. Not between `step_async` and
        `step_wait`.
        """
        self._ensure_open()
        if self._pending_actions is not None:
            raise RuntimeError(
                "MultiTaskEnv.idle_tasks called between step_async() and step_wait()"
            )
        idle = np.asarray(idle)
        if idle.dtype != np.bool_ or idle.shape != (self.num_tasks,):
            raise ValueError(
                f"idle has dtype {idle.dtype} and shape {idle.shape}; expected bool "
                f"({self.num_tasks},)"
            )
        self._set_idle(idle.copy())

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every task with its action (actions [T, A]); see `StepResult`."""
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: np.ndarray) -> None:
        """Start stepping every task with its action (actions [T, A]); `step_wait` finishes.

        Where the backend steps in workers (Meta-World's async processes, EnvPool's
        threads) the actions are sent and this returns at once: the T simulations run
        while this process does something else (the trainer updates the agent
        meanwhile). Otherwise nothing happens until `step_wait`. `step_async` +
        `step_wait` is exactly `step`; no other method of this env may be called
        between the two.
        """
        self._ensure_open()
        if self._needs_reset:
            raise RuntimeError("MultiTaskEnv.step called before reset()")
        if self._pending_actions is not None:
            raise RuntimeError("MultiTaskEnv.step_async called again before step_wait()")
        actions = checked_actions(actions, self.num_tasks, self.action_dim)
        self._send_actions(actions)
        self._pending_actions = actions

    def step_wait(self) -> StepResult:
        """The transitions of the step that `step_async` started; see `StepResult`."""
        self._ensure_open()
        actions = self._pending_actions
        if actions is None:
            raise RuntimeError("MultiTaskEnv.step_wait called without step_async()")
        self._pending_actions = None
        return self._collect_step(actions)

    def _step_result(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        raw_reward: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        success: np.ndarray,
        episode_end: np.ndarray,
    ) -> StepResult:
        """A step's `StepResult` from the backend's arrays; ends the ended episodes.

        obs, next_obs [T, D] (any float dtype), raw_reward [T] float64, terminated,
        truncated, success, episode_end [T] bool.
        """
        episode_return, episode_success = self._episodes.end_step(raw_reward, success, episode_end)
        return StepResult(
            obs=obs.astype(np.float32),
            next_obs=next_obs.astype(np.float32),
            reward=self._rewards(raw_reward).astype(np.float32),
            raw_reward=raw_reward.astype(np.float32),
            terminated=terminated,
            truncated=truncated & ~terminated,
            success=success,
            episode_end=episode_end,
            episode_return=episode_return,
            episode_success=episode_success,
        )

    @property
    def reward_std(self) -> np.ndarray:
        """[T] the normaliser's current standard deviation estimate per task."""
        return self._rewards.std

    def _state(self, task_samplers: list[Any]) -> dict[str, Any]:
        # Keys in the order checkpoints have always had: backend (not Meta-World's),
        # reward statistics, task samplers.
        backend = {} if self.backend == _DEFAULT_BACKEND else {"backend": self.backend}
        return {**backend, **self._rewards.state_dict(), "task_samplers": task_samplers}

    def state_dict(self) -> dict[str, Any]:
        """Reward-normaliser statistics and each task's goal-sampling RNG state.

        Plain Python values only, so `torch.load(..., weights_only=True)` reads a
        checkpoint holding it. The physics state of running episodes is not saved:
        after `load_state_dict`, call `reset()` to start fresh episodes.
        """
        self._ensure_open()
        return self._state(self._task_samplers())

    @property
    def at_episode_start(self) -> bool:
        """Every task's episode has just started (after `reset()`, or after a step that
        ended all episodes) and no step is in flight: the only moments with a resumable
        state."""
        return (
            not self.for_evaluation
            and not self._needs_reset
            and self._pending_actions is None
            and self._episodes.steps_since_common_start == 0
        )

    def episode_start_state_dict(self) -> dict[str, Any]:
        """A state from which `load_state_dict` + `reset()` continues this env exactly.

        Only at an episode start (`at_episode_start`): the reward statistics as now,
        and the goal samplers as they were before the draws of the current episodes'
        goals, so the restored env's `reset()` redraws the same goals and returns the
        observation this env returned then; every later step matches too (the physics
        is deterministic). Same keys as `state_dict()`.
        """
        self._ensure_open()
        if not self.at_episode_start:
            raise RuntimeError(
                "episode_start_state_dict() needs every episode to have just started "
                "(right after reset(), or after the step that ended all episodes)"
            )
        return self._state(self._episode_start_task_samplers())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure_open()
        backend = state.get("backend", _DEFAULT_BACKEND)
        if backend != self.backend:
            raise ValueError(
                f"environment state was saved by env.backend={backend}; this env is "
                f"env.backend={self.backend} (their goals differ; resume with the same backend)"
            )
        self._rewards.check_state_dict(state)
        samplers = self._checked_task_samplers(state)
        self._rewards.load_state_dict(state)
        self._load_task_samplers(samplers)
        self._needs_reset = True
        self._episodes.lose_common_start()

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("MultiTaskEnv is closed")

    def __enter__(self: _EnvT) -> _EnvT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class MultiTaskEnv(MultiTaskEnvBase):
    """T Meta-World tasks stepped together, one sub-environment per task.

    Observations are Meta-World's 39-dim goal-observable vectors without a task
    one-hot (the agent conditions on the task itself). Rewards follow the
    protocol: v1 or v2 reward functions, optionally divided by a per-task running
    exponential estimate of the reward's standard deviation.

    Use as a context manager (or call `close()`) so async worker processes end.
    `reset()` must be called before the first `step()`.

    Args:
        benchmark: "mt10", "mt25" or "mt50".
        protocol: the environment preset (`PROTOCOLS["classic"]` or `PROTOCOLS["mwplus"]`).
        seed: fixes the goals of every task and the order in which they are sampled.
        vector_strategy: "async" (one worker process per task) or "sync" (in-process).
        max_episode_steps: overrides `protocol.max_episode_steps` (tests, smoke runs).
        for_evaluation: episodes end at the first success (terminated=True), and
            each reset takes the next goal of a shuffled cycle through the task's
            goals (each goal once per `num_goals` episodes) from a seed stream
            separate from training's; `reset()` restarts the cycle. The goals
            themselves are the training env's for the same `seed`.
    """

    def _open(self, vector_strategy: VectorStrategy) -> None:
        protocol, seed, for_evaluation = self.protocol, self.seed, self.for_evaluation
        previous_num_goals = metaworld._N_GOALS
        try:
            # Async workers must not see Ctrl-C, SIGTERM, ...
            with _stop_signals_blocked(), _parsed_models_reused():
                self._vector_env = gym.make_vec(
                    f"Meta-World/{self.benchmark.upper()}",
                    vector_strategy=vector_strategy,
                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
                    seed=seed,
                    use_one_hot=False,
                    num_goals=protocol.num_goals,
                    reward_function_version=protocol.reward_function_version,
                    max_episode_steps=self.max_episode_steps,
                    reward_normalization_method=None,
                    terminate_on_success=for_evaluation,
                    task_select="pseudorandom" if for_evaluation else "random",
                )
        finally:
            metaworld._N_GOALS = previous_num_goals
        self._closed = False
        try:
            self._check_task_order()
            if for_evaluation:
                self._vector_env.call("toggle_sample_tasks_on_reset", True)
                self._vector_env.call("seed", _evaluation_seed(seed))
        except BaseException:
            self.close()
            raise

        self.obs_dim = int(self._vector_env.single_observation_space.shape[0])
        action_space = self._vector_env.single_action_space
        self.action_dim = int(action_space.shape[0])
        self.action_low = np.asarray(action_space.low, dtype=np.float32)  # [A]
        self.action_high = np.asarray(action_space.high, dtype=np.float32)  # [A]

        # Async workers step between step_async and step_wait; sync envs step in step_wait.
        self._steps_in_workers = isinstance(self._vector_env, gym.vector.AsyncVectorEnv)
        # The goal-sampler states from before the reset that started the current episodes
        # (training envs only).
        self._samplers_before_reset: list[Any] | None = None

    def _check_task_order(self) -> None:
        all_tasks = metaworld_env_dict.ALL_V3_ENVIRONMENTS
        class_to_name = {cls.__name__: name for name, cls in all_tasks.items()}
        env_task_names = [class_to_name[c] for c in self._vector_env.get_attr("task_name")]
        if env_task_names != self.task_names:
            raise RuntimeError(
                f"Meta-World's {self.benchmark} sub-environments are {env_task_names}, "
                f"expected {self.task_names}"
            )

    def _reset_tasks(self) -> np.ndarray:
        if self.for_evaluation:
            # PseudoRandomTaskSelectWrapper shuffles its goal list when the index wraps to 0.
            self._vector_env.set_attr("current_task_idx", -1)
        self._capture_samplers_before_reset()
        try:
            obs, _ = self._vector_env.reset()
        except (EOFError, ConnectionError) as error:
            raise EnvWorkerError(self._dead_workers_message("reset")) from error
        return obs

    def _send_actions(self, actions: np.ndarray) -> None:
        if self._episodes.steps_since_common_start == self.max_episode_steps - 1:
            self._capture_samplers_before_reset()  # this step ends every episode
        if self._steps_in_workers:
            try:
                self._vector_env.step_async(actions)
            except (EOFError, ConnectionError) as error:
                raise EnvWorkerError(self._dead_workers_message("step")) from error

    def _collect_step(self, actions: np.ndarray) -> StepResult:
        try:
            if self._steps_in_workers:
                obs, raw_reward, terminated, truncated, info = self._vector_env.step_wait()
            else:
                obs, raw_reward, terminated, truncated, info = self._vector_env.step(actions)
        except (EOFError, ConnectionError) as error:
            raise EnvWorkerError(self._dead_workers_message("step")) from error
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        raw_reward = np.asarray(raw_reward, dtype=np.float64)
        episode_end = terminated | truncated
        self._episodes.count_step(episode_end)

        # Tasks that did not end carry this step's info; the ended ones carry the
        # reset's info, and their last step's info is in info["final_info"].
        success = np.zeros(self.num_tasks, dtype=bool)
        if "success" in info:
            success = info["_success"] & (info["success"] > 0)
        next_obs = obs.copy()  # [T, D] float64
        if episode_end.any():
            final_info = info["final_info"]
            for task in np.flatnonzero(episode_end):
                next_obs[task] = info["final_obs"][task]
                success[task] = final_info["success"][task] > 0
        return self._step_result(
            obs, next_obs, raw_reward, terminated, truncated, success, episode_end
        )

    def _task_samplers(self) -> list[Any]:
        return list(self._vector_env.call("get_checkpoint"))

    def _capture_samplers_before_reset(self) -> None:
        # One call per episode (about 1 ms for MT10, 50 goals): cheap enough to do always.
        if not self.for_evaluation:
            self._samplers_before_reset = self._task_samplers()

    @property
    def at_episode_start(self) -> bool:
        return super().at_episode_start and self._samplers_before_reset is not None

    def _episode_start_task_samplers(self) -> list[Any]:
        return list(self._samplers_before_reset or [])

    def _load_task_samplers(self, samplers: list[Any]) -> None:
        self._vector_env.call("load_checkpoint", samplers)

    def _dead_workers_message(self, action: str) -> str:
        processes = getattr(self._vector_env, "processes", [])

        def dead_workers() -> list[str]:
            return [
                f"{task} (pid {process.pid}, exit code {process.exitcode})"
                for task, process in zip(self.task_names, processes, strict=False)
                if process.exitcode is not None
            ]

        # A dying process closes its pipes before the kernel lets its parent reap it:
        # give the exit status a moment to appear (a loaded machine makes the gap longer).
        deadline = time.monotonic() + _WORKER_EXIT_WAIT_SECONDS
        dead = dead_workers()
        while not dead and processes and time.monotonic() < deadline:
            time.sleep(0.01)
            dead = dead_workers()
        return (
            f"environment worker process(es) died during {action}: "
            f"{', '.join(dead) or 'unknown (a pipe to a worker closed)'}"
        )

    def close(self) -> None:
        """End the worker processes (async) and free the simulators. Idempotent."""
        if not self._closed:
            self._closed = True
            try:
                self._vector_env.close()
            except (EOFError, OSError):
                # A dead worker broke the orderly shutdown (its pipe fails before the
                # others are told to close), and the vector env now counts as closed, so a
                # second close() would do nothing: terminate the live workers directly, or
                # multiprocessing's exit handler waits for them forever.
                # SIGKILL: the workers block SIGTERM (see the fork in _open).
                workers = getattr(self._vector_env, "processes", [])
                for process in workers:
                    if process.is_alive():
                        process.kill()
                for process in workers:
                    process.join(timeout=10)


def _backend_class(backend: str) -> type[MultiTaskEnvBase]:
    _check_choice("env.backend", backend, list(BACKENDS))
    if backend == "envpool":
        from mtrl_ntk.envs.envpool_env import EnvPoolMultiTaskEnv

        return EnvPoolMultiTaskEnv
    return MultiTaskEnv


def make_multitask_env(backend: str, *args: Any, **kwargs: Any) -> MultiTaskEnvBase:
    """A multi-task env on `backend` ("metaworld" or "envpool"); same interface either way.

    The other arguments are `MultiTaskEnv`'s (benchmark, protocol, seed, ...), passed on.
    """
    return _backend_class(backend)(*args, **kwargs)


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

    def __init__(
        self,
        benchmark: str,
        protocol: Protocol,
        seed: int,
        vector_strategy: VectorStrategy = "async",
        max_episode_steps: int | None = None,
        backend: str = "metaworld",
        make_env: Callable[..., MultiTaskEnvBase] | None = None,
    ) -> None:
        self.protocol = protocol
        self.env = (make_env or make_multitask_env)(
            backend, benchmark, protocol, seed, vector_strategy, max_episode_steps,
            for_evaluation=True,
        )

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
    with Evaluator(
        benchmark, protocol, seed, vector_strategy, max_episode_steps, backend
    ) as evaluator:
        return evaluator(policy, episodes_per_task)
