"""A pool of worker processes, each hosting the whole multi-task envs of several seeds.

Why: a seed group trains S seeds in one process, and each seed's env (T Meta-World
tasks, about 0.5 ms of Python and MuJoCo per transition) would step in that process,
one seed after another, while the other cores idle. `vector_strategy="async"` gives
every task of every seed its own process (T x S of them: 100 for ten MT10 seeds).
`EnvWorkerPool(W)` instead hosts seed i's env in worker `i % W`, and
`pool.make_env(...)` returns an `EnvProxy` with the env's interface, so a trainer uses
it as it would the env. `step_async` only sends the actions: when the main process
starts the steps of all S proxies and then collects them, the W workers step their
seeds concurrently with each other and with whatever the main process does meanwhile
(the update, with `train.overlap_env_step`).

Requests and replies: one pipe per worker. A worker handles its requests one at a
time, in the order they arrive, and sends exactly one reply for each, so the n-th
reply read from a pipe answers the n-th request written to it, whichever proxy sent
it. The main process numbers each worker's requests as it writes them and files
every reply it reads under its number until the proxy that asked takes it (a proxy
collecting its step may first read the replies to other proxies' earlier requests).
Replies therefore cannot be mixed up, however proxies of one worker interleave; the
pool, like the envs, is for one thread.

Workers are started by executing a fresh interpreter (`python -c`), not with one of
multiprocessing's start methods: the main process has imported torch and started
its threads, so forking it is unsafe, and multiprocessing's "spawn" and "forkserver"
children both import the main script again (`run_mt10.py` imports torch: 1.5 s and a
peak of 270 MB per worker). A worker imports only `mtrl_ntk.envs` (numpy, gymnasium,
Meta-World: 0.5 s and 80 MB; a worker answers about 0.9 s after its start). It
starts with SIGINT, SIGTERM and SIGUSR2 blocked, as Meta-World's async workers do
(`stop_signals_blocked`; the mask survives exec): the trainer decides when to stop.
A worker ends when the pool closes, or when its pipe reaches end-of-file because the
main process died.

Faults: an exception raised by an env in a worker is raised again by the proxy call
(same type and message; its cause holds the worker's traceback). A worker that died
makes every later call on its proxies raise `EnvWorkerError` naming its pid, exit
code and seeds; waiting for a reply checks the process every `_POLL_SECONDS`, so a
dead worker never leaves the main process waiting (a live but stuck one does, as a
stuck local env would).
"""

from __future__ import annotations

import contextlib
import pickle
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any

import numpy as np

from mtrl_ntk.envs.backends import make_multitask_env
from mtrl_ntk.envs.episodes import StepResult
from mtrl_ntk.envs.interface import MultiTaskEnvInterface, checked_actions, stop_signals_blocked
from mtrl_ntk.envs.spec import EnvSpec
from mtrl_ntk.errors import EnvWorkerError

# How often a wait for a reply checks that the worker is alive.
_POLL_SECONDS = 0.1
# How long a dead worker's exit status may take to appear after its pipe closed.
_EXIT_STATUS_WAIT_SECONDS = 2.0
# How long close() lets the workers close their envs before it kills them.
_CLOSE_WAIT_SECONDS = 10.0

_STATIC_ATTRIBUTES = (
    "backend", "benchmark", "protocol", "seed", "max_episode_steps", "for_evaluation",
    "task_names", "num_tasks", "obs_dim", "action_dim", "action_low", "action_high",
)
"""What an env never changes after construction: sent once, read by the proxy locally."""

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_WORKER_CODE = (
    f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
    "from mtrl_ntk.envs.worker_pool import _serve; _serve(int(sys.argv[1]))"
)


class _WorkerTraceback(Exception):
    """Where in a worker an env error was raised: the cause of the error raised again here."""


class _Worker:
    """One worker process, its pipe, and the replies read before their proxy asked."""

    def __init__(self) -> None:
        self.connection, child_end = Pipe()
        with stop_signals_blocked():  # the worker inherits the blocked mask through exec
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, str(child_end.fileno())],
                pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL,
            )
        child_end.close()  # the worker's copy is its only one: its death closes the pipe
        self.seeds: list[int] = []  # of the envs it hosts, for the death message
        self.closed = False
        self._death: str | None = None  # the message, once the worker is known to be dead
        self._sent = 0  # requests written so far; the next one's number
        self._read = 0  # replies read so far; the next one answers request number _read
        self._unclaimed: dict[int, tuple[Any, ...]] = {}  # request number -> its reply

    def send(self, request: tuple[Any, ...], action: str) -> int:
        """Write `request`; returns its number, for `reply`."""
        self._check_alive()
        try:
            self.connection.send(request)
        except OSError as error:  # BrokenPipeError, ConnectionResetError: the worker died
            raise self._died(action) from error
        self._sent += 1
        return self._sent - 1

    def reply(self, number: int, action: str) -> Any:
        """The result of request `number`; raises what the worker's env raised."""
        while number not in self._unclaimed:
            self._check_alive()
            self._unclaimed[self._read] = self._receive(action)
            self._read += 1
        status, value, worker_traceback = self._unclaimed.pop(number)
        if status == "error":
            raise value from _WorkerTraceback(
                f"in environment worker pid {self.process.pid}:\n{worker_traceback.rstrip()}"
            )
        return value

    def call(self, request: tuple[Any, ...], action: str) -> Any:
        return self.reply(self.send(request, action), action)

    def _receive(self, action: str) -> tuple[Any, ...]:
        # Poll the process too: a dead worker's pipe stays open while a process it forked
        # (async vector envs) holds a copy.
        while not self.connection.poll(_POLL_SECONDS):
            if self.process.poll() is not None:
                raise self._died(action)
        try:
            return self.connection.recv()
        except (EOFError, OSError) as error:
            raise self._died(action) from error

    def _check_alive(self) -> None:
        if self._death is not None:
            raise EnvWorkerError(self._death)

    def _died(self, action: str) -> EnvWorkerError:
        # A dying process closes its pipe before the kernel lets its parent reap it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=_EXIT_STATUS_WAIT_SECONDS)
        seeds = ", ".join(map(str, self.seeds)) or "none"
        self._death = (
            f"environment worker process died during {action}: pid {self.process.pid} "
            f"(exit code {self.process.returncode}), hosting seeds {seeds}"
        )
        return EnvWorkerError(self._death)

    def request_exit(self) -> None:
        """Tell the worker to close its envs and exit (a dead one needs no telling)."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.connection.send(None)
        self.connection.close()


class EnvWorkerPool:
    """W worker processes; `make_env` builds an env in one of them and returns its proxy.

    Env i (the i-th `make_env` call) lives in worker `i % W`. Use as a context manager
    (or call `close()`); closing the pool closes every env in it.

    Args:
        num_workers: W, at most the cores the envs may use (more only adds processes).
    """

    def __init__(self, num_workers: int) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r}; allowed: an integer >= 1")
        self._workers: list[_Worker] = []
        self._made = 0
        try:
            for _ in range(num_workers):  # they import Meta-World concurrently
                self._workers.append(_Worker())
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, worker 0 first."""
        return [worker.process.pid for worker in self._workers]

    def make_env(self, spec: EnvSpec) -> EnvProxy:
        """`make_multitask_env(spec.in_process())`, built in the next worker in turn: the
        worker is the env's process ("async" would fork T more processes from it)."""
        if not self._workers or self._workers[0].closed:
            raise RuntimeError("EnvWorkerPool is closed")
        worker = self._workers[self._made % len(self._workers)]
        env_id = self._made
        self._made += 1
        static = worker.call(
            (env_id, "make", (spec.in_process(),)), f"construction of seed {spec.seed}'s env"
        )
        worker.seeds.append(spec.seed)
        return EnvProxy(worker, env_id, static)

    def close(self) -> None:
        """Close every env and end the workers; kills those that do not exit. Idempotent."""
        for worker in self._workers:
            if not worker.closed:
                worker.request_exit()
        deadline = time.monotonic() + _CLOSE_WAIT_SECONDS  # for all workers together
        for worker in self._workers:
            try:
                worker.process.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                worker.process.kill()  # SIGKILL: the workers block SIGTERM
                worker.process.wait()

    def __enter__(self) -> EnvWorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EnvProxy(MultiTaskEnvInterface):
    """A multi-task env living in an `EnvWorkerPool` worker: a `MultiTaskEnvInterface`.

    The attributes fixed at construction (`_STATIC_ATTRIBUTES`) are read locally; every
    other call is one request to the worker and waits for its reply, except
    `step_async`, which sends the actions and returns (the worker runs the whole step;
    `step_wait` takes its result, and an error of the step, such as a step before
    `reset()`, is raised there). Calls made while a step is in flight are answered
    after it, in order.
    """

    def __init__(self, worker: _Worker, env_id: int, static: dict[str, Any]) -> None:
        self._worker = worker
        self._env_id = env_id
        for name in _STATIC_ATTRIBUTES:
            setattr(self, name, static[name])
        self._step_request: int | None = None  # the number of the step in flight
        self._closed = False

    def _call(self, method: str, *args: Any) -> Any:
        self._ensure_open()
        return self._worker.call((self._env_id, method, args), method)

    def _get(self, attribute: str) -> Any:
        self._ensure_open()
        return self._worker.call((self._env_id, attribute, None), f"reading {attribute}")

    def _ensure_open(self) -> None:
        if self._closed or self._worker.closed:
            raise RuntimeError("MultiTaskEnv is closed")

    def reset(self) -> np.ndarray:
        """See `MultiTaskEnvInterface.reset`."""
        if self._step_request is not None:
            raise RuntimeError("MultiTaskEnv.reset called between step_async() and step_wait()")
        return self._call("reset")

    def step(self, actions: np.ndarray) -> StepResult:
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: np.ndarray) -> None:
        """Send the actions [T, A]; the worker steps while this process goes on."""
        self._ensure_open()
        if self._step_request is not None:
            raise RuntimeError("MultiTaskEnv.step_async called again before step_wait()")
        actions = checked_actions(actions, self.num_tasks, self.action_dim)
        self._step_request = self._worker.send((self._env_id, "step", (actions,)), "step")

    def step_wait(self) -> StepResult:
        self._ensure_open()
        number = self._step_request
        if number is None:
            raise RuntimeError("MultiTaskEnv.step_wait called without step_async()")
        self._step_request = None
        return self._worker.reply(number, "step")

    @property
    def reward_std(self) -> np.ndarray:
        return self._get("reward_std")

    @property
    def at_episode_start(self) -> bool:
        return self._step_request is None and self._get("at_episode_start")

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict")

    def episode_start_state_dict(self) -> dict[str, Any]:
        return self._call("episode_start_state_dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._call("load_state_dict", state)

    def settle(self) -> None:
        self._call("settle")

    def idle_tasks(self, idle: np.ndarray) -> None:
        if self._step_request is not None:
            raise RuntimeError(
                "MultiTaskEnv.idle_tasks called between step_async() and step_wait()"
            )
        self._call("idle_tasks", np.asarray(idle))

    def close(self) -> None:
        """Close the env in its worker (after the step in flight, whose result and error
        are dropped). Idempotent; a dead worker's env counts as closed."""
        if self._closed:
            return
        self._closed = True
        if self._worker.closed:
            return
        number, self._step_request = self._step_request, None
        try:
            if number is not None:
                with contextlib.suppress(Exception):  # the step's result no longer matters
                    self._worker.reply(number, "step")
            self._worker.call((self._env_id, "close", ()), "close")
        except EnvWorkerError:
            pass

    def __enter__(self) -> EnvProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _portable(error: Exception) -> Exception:
    """`error` if it survives pickling (the main process raises it again), else a
    RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _serve(fd: int) -> None:
    """A worker's loop: handle the requests on the pipe `fd` until told to exit or EOF."""
    connection = Connection(fd)
    envs: dict[int, MultiTaskEnvInterface] = {}
    try:
        while True:
            try:
                request = connection.recv()
            except EOFError:  # the main process died
                return
            if request is None:  # the pool closes
                return
            env_id, method, args = request
            try:
                if method == "make":
                    (spec,) = args
                    env = make_multitask_env(spec)
                    envs[env_id] = env
                    value = {name: getattr(env, name) for name in _STATIC_ATTRIBUTES}
                elif args is None:
                    value = getattr(envs[env_id], method)
                else:
                    value = getattr(envs[env_id], method)(*args)
                    if method == "close":
                        del envs[env_id]
                reply: tuple[Any, ...] = ("ok", value, None)
            except Exception as error:
                reply = ("error", _portable(error), traceback.format_exc())
            try:
                connection.send(reply)
            except OSError:  # the main process died
                return
    finally:
        for env in envs.values():
            env.close()
