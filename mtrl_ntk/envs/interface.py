"""The multi-task env interface, declared once, and the base class every backend shares.

`MultiTaskEnvInterface` is what the trainer and the evaluation use of an env: both
backends (`mtrl_ntk.envs.metaworld_env.MultiTaskEnv`,
`mtrl_ntk.envs.envpool_env.EnvPoolMultiTaskEnv`) implement it through
`MultiTaskEnvBase`, and the worker pool's `EnvProxy` implements it by forwarding
each call to a worker process. `StepResult` (mtrl_ntk/envs/episodes.py) is what a
step returns.

A backend declares what it can serve (`unavailable_reason`, `unsupported_reason`):
the backend registry (mtrl_ntk/envs/backends.py) asks it for the config's
validation, and the env asks it again before it builds anything.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, runtime_checkable
from typing import Protocol as TypingProtocol

import numpy as np

from mtrl_ntk.envs.episodes import EpisodeTracker, RewardNormalizer, StepResult
from mtrl_ntk.envs.protocols import METAWORLD_MAX_PATH_LENGTH, Protocol
from mtrl_ntk.envs.spec import BENCHMARK_TASKS, EnvSpec, VectorStrategy

# Evaluation environments draw their goal order from a stream separate from training's.
EVALUATION_SEED_STREAM = 1

DEFAULT_BACKEND = "metaworld"
"""The backend of an env state without a "backend" key: Meta-World's states never carry
one (their checkpoints predate EnvPool), so old and new checkpoints have the same keys."""

_EnvT = TypeVar("_EnvT", bound="MultiTaskEnvBase")


@runtime_checkable
class MultiTaskEnvInterface(TypingProtocol):
    """T tasks stepped together: actions [T, A] in, one transition per task out.

    Call order: `reset()`, then `step_async` + `step_wait` pairs (or `step`), nothing
    in between. Checkpoints: `episode_start_state_dict()` where `at_episode_start`,
    `load_state_dict` then `reset()` continues exactly.
    """

    backend: str
    benchmark: str
    protocol: Protocol
    seed: int
    max_episode_steps: int
    for_evaluation: bool
    task_names: list[str]
    num_tasks: int
    obs_dim: int
    action_dim: int
    action_low: np.ndarray  # [A]
    action_high: np.ndarray  # [A]

    def reset(self) -> np.ndarray: ...  # obs [T, D] float32

    def step(self, actions: np.ndarray) -> StepResult: ...

    def step_async(self, actions: np.ndarray) -> None: ...

    def step_wait(self) -> StepResult: ...

    def idle_tasks(self, idle: np.ndarray) -> None: ...

    def settle(self) -> None: ...

    @property
    def reward_std(self) -> np.ndarray: ...

    @property
    def at_episode_start(self) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def episode_start_state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def check_choice(key: str, value: Any, allowed: list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}; allowed: {', '.join(map(repr, allowed))}")


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
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


def evaluation_seed(seed: int) -> int:
    """The seed of the evaluation env's goal order (a stream separate from training's)."""
    return int(np.random.SeedSequence([seed, EVALUATION_SEED_STREAM]).generate_state(1)[0])


def checked_actions(actions: np.ndarray, num_tasks: int, action_dim: int) -> np.ndarray:
    """``actions`` as float32 [T, A]; a ValueError for any other shape (before any work)."""
    actions = np.asarray(actions, dtype=np.float32)
    if actions.shape != (num_tasks, action_dim):
        raise ValueError(
            f"actions have shape {actions.shape}; expected (T, A) = ({num_tasks}, {action_dim})"
        )
    return actions


class MultiTaskEnvBase(MultiTaskEnvInterface):
    """What every backend's multi-task env shares, so they cannot drift apart.

    The argument checks, the call order (`reset()`, then `step_async` + `step_wait`
    pairs, nothing in between), the episode bookkeeping (`EpisodeTracker`), the reward
    normaliser (`RewardNormalizer`), the `StepResult` of a step and the checkpoint
    state around the backend's goal samplers. A backend implements the hooks below
    (`_open`, `_reset_tasks`, `_send_actions`, `_collect_step`, the task-sampler
    ones and `close`); see `MultiTaskEnv` for the arguments.
    """

    backend = DEFAULT_BACKEND

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
        check_choice("benchmark", benchmark, list(BENCHMARK_TASKS))
        check_choice("vector_strategy", vector_strategy, ["async", "sync"])
        unavailable = self.unavailable_reason()
        if unavailable is not None:
            raise RuntimeError(f"env.backend={self.backend}: {unavailable}")
        unsupported = self.unsupported_reason(protocol)
        if unsupported is not None:
            raise ValueError(
                f"env.backend={self.backend} cannot serve protocol={protocol.name}: {unsupported}"
            )
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

    @classmethod
    def from_spec(cls: type[_EnvT], spec: EnvSpec) -> _EnvT:
        return cls(
            spec.benchmark, spec.protocol, spec.seed, spec.vector_strategy,
            spec.max_episode_steps, for_evaluation=spec.for_evaluation,
        )

    # -- what this backend can serve -----------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (a missing package), or None."""
        return None

    @classmethod
    def unsupported_reason(cls, protocol: Protocol) -> str | None:
        """Why this backend cannot reproduce `protocol`, or None if it can."""
        return None

    # -- backend hooks -------------------------------------------------------------------

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
        backend = {} if self.backend == DEFAULT_BACKEND else {"backend": self.backend}
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
        backend = state.get("backend", DEFAULT_BACKEND)
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
