"""EnvWorkerPool: envs in worker processes behave exactly as the same envs built here."""

from __future__ import annotations

import dataclasses
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mtrl_ntk.envs import (
    PROTOCOLS,
    EnvProxy,
    EnvSpec,
    EnvWorkerError,
    EnvWorkerPool,
    MultiTaskEnv,
    MultiTaskEnvInterface,
    StepResult,
)
from mtrl_ntk.envs import worker_pool as worker_pool_module

pytestmark = pytest.mark.slow

CLASSIC = PROTOCOLS["classic"]
HORIZON = 20
SEEDS = [0, 1, 2]  # seeds 0 and 2 share worker 0


@dataclasses.dataclass
class Pair:
    proxies: list[EnvProxy]
    local: list[MultiTaskEnv]
    pool: EnvWorkerPool


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with EnvWorkerPool(2) as pool:
        proxies = [
            pool.make_env(
                EnvSpec("metaworld", "mt10", CLASSIC, seed=seed, max_episode_steps=HORIZON)
            )
            for seed in SEEDS
        ]
        local = [
            MultiTaskEnv("mt10", CLASSIC, seed=seed, vector_strategy="sync",
                         max_episode_steps=HORIZON)
            for seed in SEEDS
        ]
        try:
            yield Pair(proxies, local, pool)
        finally:
            for env in local:
                env.close()


def random_actions(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1, 1, (10, 4)).astype(np.float32)


def assert_same_step(got: StepResult, expected: StepResult) -> None:
    for field in dataclasses.fields(expected):
        np.testing.assert_array_equal(
            getattr(got, field.name), getattr(expected, field.name), err_msg=field.name
        )


def test_proxies_step_bit_for_bit_as_local_envs(pair: Pair) -> None:
    env_class = type(pair.local[0])
    public = {  # an env's own members (a backend's class methods build and describe it)
        name for name in dir(pair.local[0]) if not name.startswith("_")
        and not isinstance(inspect.getattr_static(env_class, name, None), classmethod)
    }
    assert public <= set(dir(pair.proxies[0]))  # nothing of the env's interface is missing
    assert isinstance(pair.proxies[0], MultiTaskEnvInterface)
    for proxy, env in zip(pair.proxies, pair.local, strict=True):
        for name in ("backend", "benchmark", "protocol", "seed", "max_episode_steps",
                     "task_names", "num_tasks", "obs_dim", "action_dim"):
            assert getattr(proxy, name) == getattr(env, name), name
        np.testing.assert_array_equal(proxy.action_low, env.action_low)
        np.testing.assert_array_equal(proxy.action_high, env.action_high)
        np.testing.assert_array_equal(proxy.reset(), env.reset())
        assert proxy.at_episode_start and env.at_episode_start
    rng = np.random.default_rng(0)
    for step in range(1, 2 * HORIZON + 1):  # two episodes
        actions = [random_actions(rng) for _ in SEEDS]
        for proxy, action in zip(pair.proxies, actions, strict=True):
            proxy.step_async(action)
        assert not pair.proxies[0].at_episode_start  # a step is in flight
        # Collected last-started first: seed 2's reply comes after seed 0's from worker 0.
        got = {i: pair.proxies[i].step_wait() for i in reversed(range(len(SEEDS)))}
        for i, (env, action) in enumerate(zip(pair.local, actions, strict=True)):
            assert_same_step(got[i], env.step(action))
            assert pair.proxies[i].at_episode_start == env.at_episode_start == (
                step % HORIZON == 0
            )
        if step % HORIZON == 0:
            for proxy, env in zip(pair.proxies, pair.local, strict=True):
                proxy.settle()  # forwarded to the worker's env
                assert proxy.state_dict() == env.state_dict()
                assert proxy.episode_start_state_dict() == env.episode_start_state_dict()
                np.testing.assert_array_equal(proxy.reward_std, env.reward_std)


def test_a_call_while_another_proxy_of_the_worker_steps_gets_its_own_reply(pair: Pair) -> None:
    first, third = pair.proxies[0], pair.proxies[2]  # both in worker 0
    for proxy, env in zip(pair.proxies, pair.local, strict=True):
        np.testing.assert_array_equal(proxy.reset(), env.reset())
    actions = random_actions(np.random.default_rng(1))
    first.step_async(actions)
    assert third.state_dict() == pair.local[2].state_dict()  # read first's reply on the way
    np.testing.assert_array_equal(third.reward_std, pair.local[2].reward_std)
    assert_same_step(first.step_wait(), pair.local[0].step(actions))


def test_an_episode_start_state_from_a_proxy_resumes_a_local_env(pair: Pair) -> None:
    proxy = pair.proxies[1]
    proxy.reset()
    rng = np.random.default_rng(2)
    for _ in range(HORIZON):
        result = proxy.step(random_actions(rng))
    assert result.episode_end.all() and proxy.at_episode_start
    state = proxy.episode_start_state_dict()
    with MultiTaskEnv("mt10", CLASSIC, seed=1, vector_strategy="sync",
                      max_episode_steps=HORIZON) as resumed:
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(resumed.reset(), result.obs)
        for _ in range(HORIZON + 3):  # past the next episode's end
            actions = random_actions(rng)
            assert_same_step(resumed.step(actions), proxy.step(actions))
        assert resumed.state_dict() == proxy.state_dict()


def test_an_env_error_in_a_worker_is_raised_again_with_its_type_and_message(pair: Pair) -> None:
    proxy = pair.proxies[0]
    with pytest.raises(ValueError, match=r"state\['reward_mean'\] has shape \(1,\)") as error:
        proxy.load_state_dict({"reward_mean": [0.0], "reward_var": [1.0], "task_samplers": []})
    assert f"worker pid {pair.pool.pids[0]}" in str(error.value.__cause__)
    assert "episodes.py" in str(error.value.__cause__)  # the worker's traceback
    proxy.load_state_dict(pair.local[0].state_dict())  # a fresh state: step needs reset()
    proxy.step_async(random_actions(np.random.default_rng(3)))  # sent; fails in the worker
    with pytest.raises(RuntimeError, match=r"step called before reset\(\)"):
        proxy.step_wait()
    with pytest.raises(ValueError, match=r"actions have shape \(10, 3\)"):
        proxy.step_async(np.zeros((10, 3)))  # checked here, nothing sent
    with pytest.raises(ValueError, match="benchmark='mt11'"):
        pair.pool.make_env(EnvSpec("metaworld", "mt11", CLASSIC, seed=7))
    assert proxy.reset().shape == (10, 39)  # the worker serves on


def test_workers_ignore_stop_signals_and_do_not_load_torch(pair: Pair) -> None:
    for pid in pair.pool.pids:
        for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
            os.kill(pid, stop)
    for proxy in pair.proxies:
        assert proxy.reset().shape == (10, 39)  # alive and answering
    for pid in pair.pool.pids:
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()


def test_a_killed_worker_raises_env_worker_error_naming_it_not_a_hang() -> None:
    with EnvWorkerPool(1) as pool:
        envs = [pool.make_env(EnvSpec("metaworld", "mt10", CLASSIC, seed=seed, max_episode_steps=5))
                for seed in (3, 4)]
        for env in envs:
            env.reset()
        (pid,) = pool.pids
        envs[0].step_async(np.zeros((10, 4)))
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        message = rf"^environment worker process died during step: pid {pid} \(exit code -9\), "
        with pytest.raises(EnvWorkerError, match=message + "hosting seeds 3, 4$"):
            envs[0].step_wait()
        assert time.monotonic() - started < 5
        with pytest.raises(EnvWorkerError, match=message):
            envs[1].state_dict()
        envs[1].close()  # a dead worker's env counts as closed
    assert not Path(f"/proc/{pid}").exists()


def test_close_is_idempotent_kills_a_stuck_worker_and_leaves_no_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_pool_module, "_CLOSE_WAIT_SECONDS", 0.5)
    pool = EnvWorkerPool(2)
    env = pool.make_env(EnvSpec("metaworld", "mt10", CLASSIC, seed=5, max_episode_steps=5))
    env.reset()
    env.step_async(np.zeros((10, 4)))
    os.kill(pool.pids[1], signal.SIGSTOP)  # a worker that never answers the close
    env.close()  # after the step in flight
    env.close()
    pool.close()
    pool.close()
    for pid in pool.pids:
        assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(RuntimeError, match="MultiTaskEnv is closed"):
        env.reset()
    with pytest.raises(RuntimeError, match="EnvWorkerPool is closed"):
        pool.make_env(EnvSpec("metaworld", "mt10", CLASSIC, seed=5))


def test_workers_end_when_the_main_process_dies() -> None:
    main = subprocess.Popen(
        [sys.executable, "-c",
         "import os, signal, sys; from mtrl_ntk.envs import EnvWorkerPool; "
         "pool = EnvWorkerPool(2); print(*pool.pids, flush=True); "
         "sys.stdin.readline(); os.kill(os.getpid(), signal.SIGKILL)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    pids = [int(pid) for pid in main.stdout.readline().split()]
    main.communicate("\n", timeout=30)  # it dies without closing the pool
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in pids)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
