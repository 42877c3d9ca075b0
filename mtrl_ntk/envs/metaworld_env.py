"""The Meta-World backend: MT10 / MT25 / MT50 as one vector env with one sub-environment per task.

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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gymnasium as gym
import metaworld
import metaworld.env_dict as metaworld_env_dict
import mujoco
import numpy as np

from mtrl_ntk.envs.episodes import StepResult
from mtrl_ntk.envs.interface import (
    MultiTaskEnvBase,
    evaluation_seed,
    stop_signals_blocked,
)
from mtrl_ntk.envs.spec import VectorStrategy
from mtrl_ntk.errors import EnvWorkerError

# How long a dead worker's exit status may take to appear after its pipe closed.
_WORKER_EXIT_WAIT_SECONDS = 2.0


_PARSED_MODELS: dict[tuple[str, int, int], mujoco.MjModel] = {}
"""MuJoCo models parsed in this process, by (absolute XML path, mtime_ns, size)."""


@contextmanager
def parsed_models_reused() -> Iterator[None]:
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
            with stop_signals_blocked(), parsed_models_reused():
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
                self._vector_env.call("seed", evaluation_seed(seed))
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
