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

import dataclasses
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import gymnasium as gym
import metaworld
import metaworld.env_dict as metaworld_env_dict
import numpy as np

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

# Standard deviation floor of the reward normaliser (as in garage / Meta-World).
_REWARD_STD_EPS = 1e-8

# Evaluation environments draw their goal order from a stream separate from training's.
_EVALUATION_SEED_STREAM = 1


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One transition per task, from `MultiTaskEnv.step`. Arrays have leading dim T.

    `next_obs` is what the replay buffer stores; `obs` is what the policy sees next.
    They differ only where `episode_end`: there `next_obs` is the episode's true
    final observation and `obs` the first observation of the next episode.
    """

    obs: np.ndarray  # [T, D] float32, already reset where episode_end
    next_obs: np.ndarray  # [T, D] float32, true next observation (final one at an end)
    reward: np.ndarray  # [T] float32, normalised per the protocol
    raw_reward: np.ndarray  # [T] float32, Meta-World's reward
    terminated: np.ndarray  # [T] bool, a terminal state (never during training)
    truncated: np.ndarray  # [T] bool, the time limit ended the episode (not terminal)
    success: np.ndarray  # [T] bool, info["success"] > 0 at this step
    episode_end: np.ndarray  # [T] bool, terminated | truncated
    episode_return: np.ndarray  # [T] float64, raw return of the ended episode, NaN elsewhere
    episode_success: np.ndarray  # [T] bool, ended episode succeeded at any step, False elsewhere


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


def _evaluation_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, _EVALUATION_SEED_STREAM]).generate_state(1)[0])


class MultiTaskEnv:
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

        previous_num_goals = metaworld._N_GOALS
        try:
            with _stop_signals_blocked():  # async workers must not see Ctrl-C, SIGTERM, ...
                self._vector_env = gym.make_vec(
                    f"Meta-World/{benchmark.upper()}",
                    vector_strategy=vector_strategy,
                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
                    seed=seed,
                    use_one_hot=False,
                    num_goals=protocol.num_goals,
                    reward_function_version=protocol.reward_function_version,
                    max_episode_steps=horizon,
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

        self._reward_mean = np.zeros(self.num_tasks)  # [T] running mean of raw rewards
        self._reward_var = np.ones(self.num_tasks)  # [T] running variance of raw rewards
        self._running_return = np.zeros(self.num_tasks)  # [T] raw return so far
        self._running_success = np.zeros(self.num_tasks, dtype=bool)  # [T]
        self._needs_reset = True
        # Async workers step between step_async and step_wait; sync envs step in step_wait.
        self._steps_in_workers = isinstance(self._vector_env, gym.vector.AsyncVectorEnv)
        self._pending_actions: np.ndarray | None = None  # sent by step_async, not yet collected
        # Steps since every task's episode started together (None once they fell out of
        # step, which only success-termination in evaluation does), and the goal-sampler
        # states from before the reset that started them (training envs only).
        self._episode_steps: int | None = None
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

    def reset(self) -> np.ndarray:
        """Start a new episode of every task; returns obs [T, D] float32."""
        self._ensure_open()
        if self._pending_actions is not None:
            raise RuntimeError("MultiTaskEnv.reset called between step_async() and step_wait()")
        if self.for_evaluation:
            # PseudoRandomTaskSelectWrapper shuffles its goal list when the index wraps to 0.
            self._vector_env.set_attr("current_task_idx", -1)
        self._capture_samplers_before_reset()
        try:
            obs, _ = self._vector_env.reset()
        except (EOFError, ConnectionError) as error:
            raise EnvWorkerError(self._dead_workers_message("reset")) from error
        self._running_return[:] = 0.0
        self._running_success[:] = False
        self._needs_reset = False
        self._episode_steps = 0
        return obs.astype(np.float32)

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every task with its action (actions [T, A]); see `StepResult`."""
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: np.ndarray) -> None:
        """Start stepping every task with its action (actions [T, A]); `step_wait` finishes.

        With async workers the actions are sent and this returns at once: the T
        simulations run in the workers while this process does something else (the
        trainer updates the agent meanwhile). With sync sub-environments nothing
        happens until `step_wait`. `step_async` + `step_wait` is exactly `step`; no
        other method of this env may be called between the two.
        """
        self._ensure_open()
        if self._needs_reset:
            raise RuntimeError("MultiTaskEnv.step called before reset()")
        if self._pending_actions is not None:
            raise RuntimeError("MultiTaskEnv.step_async called again before step_wait()")
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (self.num_tasks, self.action_dim):
            raise ValueError(
                f"actions have shape {actions.shape}; expected (T, A) = "
                f"({self.num_tasks}, {self.action_dim})"
            )
        if self._episode_steps == self.max_episode_steps - 1:  # this step ends every episode
            self._capture_samplers_before_reset()
        if self._steps_in_workers:
            try:
                self._vector_env.step_async(actions)
            except (EOFError, ConnectionError) as error:
                raise EnvWorkerError(self._dead_workers_message("step")) from error
        self._pending_actions = actions

    def step_wait(self) -> StepResult:
        """The transitions of the step that `step_async` started; see `StepResult`."""
        self._ensure_open()
        actions = self._pending_actions
        if actions is None:
            raise RuntimeError("MultiTaskEnv.step_wait called without step_async()")
        self._pending_actions = None
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
        if self._episode_steps is not None:
            if episode_end.all():
                self._episode_steps = 0
            elif episode_end.any():
                self._episode_steps = None  # out of step until the next reset()
            else:
                self._episode_steps += 1

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

        self._running_return += raw_reward
        self._running_success |= success
        episode_return = np.where(episode_end, self._running_return, np.nan)
        episode_success = episode_end & self._running_success
        self._running_return[episode_end] = 0.0
        self._running_success[episode_end] = False

        return StepResult(
            obs=obs.astype(np.float32),
            next_obs=next_obs.astype(np.float32),
            reward=self._normalize(raw_reward).astype(np.float32),
            raw_reward=raw_reward.astype(np.float32),
            terminated=terminated,
            truncated=truncated & ~terminated,
            success=success,
            episode_end=episode_end,
            episode_return=episode_return,
            episode_success=episode_success,
        )

    def _normalize(self, raw_reward: np.ndarray) -> np.ndarray:
        """Running exponential std normalisation (garage's NormalizedEnv), per task."""
        if not self.protocol.normalize_reward:
            return raw_reward
        alpha = self.protocol.reward_norm_alpha
        self._reward_mean = (1.0 - alpha) * self._reward_mean + alpha * raw_reward
        self._reward_var = (1.0 - alpha) * self._reward_var + alpha * np.square(
            raw_reward - self._reward_mean
        )
        return raw_reward / (np.sqrt(self._reward_var) + _REWARD_STD_EPS)

    @property
    def reward_std(self) -> np.ndarray:
        """[T] the normaliser's current standard deviation estimate per task."""
        return np.sqrt(self._reward_var)

    def state_dict(self) -> dict[str, Any]:
        """Reward-normaliser statistics and each task's goal-sampling RNG state.

        Plain Python values only, so `torch.load(..., weights_only=True)` reads a
        checkpoint holding it. The physics state of running episodes is not saved:
        after `load_state_dict`, call `reset()` to start fresh episodes.
        """
        self._ensure_open()
        return {
            "reward_mean": self._reward_mean.tolist(),
            "reward_var": self._reward_var.tolist(),
            "task_samplers": list(self._vector_env.call("get_checkpoint")),
        }

    def _capture_samplers_before_reset(self) -> None:
        # One call per episode (about 1 ms for MT10, 50 goals): cheap enough to do always.
        if not self.for_evaluation:
            self._samplers_before_reset = list(self._vector_env.call("get_checkpoint"))

    @property
    def at_episode_start(self) -> bool:
        """Every task's episode has just started (after `reset()`, or after a step that
        ended all episodes) and no step is in flight: the only moments with a resumable
        state."""
        return (
            not self.for_evaluation
            and not self._needs_reset
            and self._pending_actions is None
            and self._episode_steps == 0
            and self._samplers_before_reset is not None
        )

    def episode_start_state_dict(self) -> dict[str, Any]:
        """A state from which `load_state_dict` + `reset()` continues this env exactly.

        Only at an episode start (`at_episode_start`): the reward statistics as now,
        and the goal-sampler RNGs as they were before the reset that started the
        current episodes, so the restored env's `reset()` redraws the same goals and
        returns the observation this env returned then; every later step matches too
        (the physics is deterministic). Same keys as `state_dict()`.
        """
        self._ensure_open()
        if not self.at_episode_start:
            raise RuntimeError(
                "episode_start_state_dict() needs every episode to have just started "
                "(right after reset(), or after the step that ended all episodes)"
            )
        return {
            "reward_mean": self._reward_mean.tolist(),
            "reward_var": self._reward_var.tolist(),
            "task_samplers": list(self._samplers_before_reset or []),
        }

    def _dead_workers_message(self, action: str) -> str:
        processes = getattr(self._vector_env, "processes", [])
        dead = [
            f"{task} (pid {process.pid}, exit code {process.exitcode})"
            for task, process in zip(self.task_names, processes, strict=False)
            if process.exitcode is not None
        ]
        return (
            f"environment worker process(es) died during {action}: "
            f"{', '.join(dead) or 'unknown (a pipe to a worker closed)'}"
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure_open()
        backend = state.get("backend", "metaworld")
        if backend != "metaworld":
            raise ValueError(
                f"environment state was saved by env.backend={backend}; this env is "
                "env.backend=metaworld (their goals differ; resume with the same backend)"
            )
        for key in ("reward_mean", "reward_var"):
            value = np.asarray(state[key], dtype=np.float64)
            if value.shape != (self.num_tasks,):
                raise ValueError(
                    f"state[{key!r}] has shape {value.shape}; expected ({self.num_tasks},)"
                )
        self._reward_mean = np.array(state["reward_mean"], dtype=np.float64)
        self._reward_var = np.array(state["reward_var"], dtype=np.float64)
        self._vector_env.call("load_checkpoint", list(state["task_samplers"]))
        self._needs_reset = True
        self._episode_steps = None

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("MultiTaskEnv is closed")

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
                # SIGKILL: the workers block SIGTERM (see the fork in __init__).
                workers = getattr(self._vector_env, "processes", [])
                for process in workers:
                    if process.is_alive():
                        process.kill()
                for process in workers:
                    process.join(timeout=10)

    def __enter__(self) -> MultiTaskEnv:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def make_multitask_env(
    backend: str,
    benchmark: str,
    protocol: Protocol,
    seed: int,
    vector_strategy: VectorStrategy = "async",
    max_episode_steps: int | None = None,
    *,
    for_evaluation: bool = False,
) -> MultiTaskEnv:
    """A `MultiTaskEnv` on `backend` ("metaworld" or "envpool"); same interface either way."""
    _check_choice("env.backend", backend, list(BACKENDS))
    if backend == "envpool":
        from mtrl_ntk.envs.envpool_env import EnvPoolMultiTaskEnv

        return EnvPoolMultiTaskEnv(  # type: ignore[return-value]
            benchmark, protocol, seed, vector_strategy, max_episode_steps,
            for_evaluation=for_evaluation,
        )
    return MultiTaskEnv(
        benchmark, protocol, seed, vector_strategy, max_episode_steps,
        for_evaluation=for_evaluation,
    )


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
    ) -> None:
        self.protocol = protocol
        self.env = make_multitask_env(
            backend, benchmark, protocol, seed, vector_strategy, max_episode_steps,
            for_evaluation=True,
        )

    def __call__(self, policy: Policy, episodes_per_task: int | None = None) -> dict[str, float]:
        """Returns {task name: success rate in [0, 1]}."""
        episodes = episodes_per_task
        if episodes is None:
            episodes = self.protocol.eval_episodes_per_task
        if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
            raise ValueError(f"episodes_per_task={episodes!r}; allowed: an integer >= 1")
        env = self.env
        finished = np.zeros(env.num_tasks, dtype=np.int64)  # [T] episodes counted
        successes = np.zeros(env.num_tasks, dtype=np.int64)  # [T]
        obs = env.reset()
        while (finished < episodes).any():
            result = env.step(policy(obs))
            # Tasks that are done keep stepping (the vector env steps all); ignore them.
            counted = result.episode_end & (finished < episodes)
            successes += counted & result.episode_success
            finished += counted
            obs = result.obs
        return {name: float(successes[i] / episodes) for i, name in enumerate(env.task_names)}

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
