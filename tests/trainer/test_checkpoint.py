"""Checkpoint files, the resumable environment state and the non-finite guard, in-process.

The end-to-end kill/resume runs of ``run_mt10.py`` are in ``test_resume.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mtrl_ntk.agent import AgentConfig, MultiTaskSAC
from mtrl_ntk.checkpoint import (
    CheckpointError,
    CheckpointManager,
    Segment,
    write_atomically,
)
from mtrl_ntk.combiners import make_combiner
from mtrl_ntk.envs import PROTOCOLS, EnvWorkerError, MultiTaskEnv
from mtrl_ntk.faults import NonFiniteUpdates, UpdateGuard, poison_batch
from mtrl_ntk.replay import MultiTaskReplayBuffer
from mtrl_ntk.rng import capture_global_rng, restore_global_rng
from mtrl_ntk.rundir import truncate_metrics
from mtrl_ntk.trainer.resume import config_differences
from tests.trainer.test_run_mt10 import REPOSITORY

TASKS, OBS, ACTION = 3, 5, 2
CAPACITY = 7  # rows per task: small, so the ring wraps within a few checkpoints


def add_numbered_rows(buffer: MultiTaskReplayBuffer, first: int, last: int) -> None:
    """Rows whose every value encodes (row, task), so a misplaced row is visible."""
    for row in range(first, last):
        value = torch.arange(TASKS, dtype=torch.float32) + 100.0 * row  # [T]
        buffer.add(
            value[:, None].expand(TASKS, OBS), value[:, None].expand(TASKS, ACTION), value,
            -value[:, None].expand(TASKS, OBS), torch.zeros(TASKS),
        )


def minimal_state(step: int) -> dict[str, Any]:
    return {"step": step, "agent": {"weight": torch.ones(3)}, "env": {"reward_var": [1.0]}}


def assert_same_buffer(restored: MultiTaskReplayBuffer, original: MultiTaskReplayBuffer) -> None:
    expected, actual = original.state_dict(), restored.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


# -- replay segments, pruning, restoring ---------------------------------------------------------


def test_each_checkpoint_appends_only_new_rows_and_restores_the_ring_exactly(
    tmp_path: Path,
) -> None:
    buffer = MultiTaskReplayBuffer(TASKS, CAPACITY, OBS, ACTION)
    manager = CheckpointManager(tmp_path, keep=2)
    saved_at = [5, 9, 20, 23]  # 20: more new rows (11) than the ring holds (7)
    added = 0
    for rows in saved_at:
        add_numbered_rows(buffer, added, rows)
        manager.save(rows, minimal_state(rows), buffer, rows_added=rows)
        newest = manager.segments_on_disk()[-1]
        assert newest == Segment(max(added, rows - CAPACITY), rows)  # only the new rows
        segment = torch.load(manager.replay_directory / newest.name, weights_only=True)
        assert segment["reward"].shape == (newest.stop - newest.start, TASKS)
        expected_rows = range(newest.start, newest.stop)
        assert segment["reward"][:, 0].tolist() == [100.0 * row for row in expected_rows]
        added = rows

        restored = MultiTaskReplayBuffer(TASKS, CAPACITY, OBS, ACTION)
        latest = CheckpointManager(tmp_path).latest()
        assert latest is not None and latest.step == rows
        CheckpointManager(tmp_path).restore_replay(latest, restored)
        assert_same_buffer(restored, buffer)

    # Kept: the checkpoints of steps 20 and 23; step 20 needs rows [13, 20), step 23 [16, 23).
    assert [path.name for path in manager.checkpoint_paths()] == [
        "step-000000000020.pt", "step-000000000023.pt",
    ]
    assert manager.segments_on_disk() == [Segment(13, 20), Segment(20, 23)]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    buffer = MultiTaskReplayBuffer(TASKS, CAPACITY, OBS, ACTION)
    manager = CheckpointManager(tmp_path, keep=3)
    for first, rows in [(0, 4), (4, 6)]:
        add_numbered_rows(buffer, first, rows)
        manager.save(rows, minimal_state(rows), buffer, rows_added=rows)
    newest = manager.checkpoint_paths()[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # e.g. a disk error after the rename
    (manager.directory / ".step-000000000008.pt.abc.tmp").write_bytes(b"partial")

    fresh = CheckpointManager(tmp_path, keep=3)
    latest = fresh.latest()
    assert latest is not None and latest.step == 4
    fresh.resume_from(latest)
    assert [path.name for path in fresh.checkpoint_paths()] == ["step-000000000004.pt"]
    assert fresh.segments_on_disk() == [Segment(0, 4)]  # rows [4, 6) came after it
    assert not list(manager.directory.glob(".*.tmp"))
    restored = MultiTaskReplayBuffer(TASKS, CAPACITY, OBS, ACTION)
    fresh.restore_replay(latest, restored)
    assert restored.size == 4
    assert restored.rows(0, 4)["reward"][:, 0].tolist() == [0.0, 100.0, 200.0, 300.0]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "file.pt"
    path.write_bytes(b"old")

    def fail_halfway(handle: Any) -> None:
        handle.write(b"new but incomplete")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, fail_halfway)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.pt"]


def test_a_non_finite_state_is_never_written(tmp_path: Path) -> None:
    buffer = MultiTaskReplayBuffer(TASKS, CAPACITY, OBS, ACTION)
    manager = CheckpointManager(tmp_path)
    add_numbered_rows(buffer, 0, 3)
    manager.save(3, minimal_state(3), buffer, rows_added=3)
    add_numbered_rows(buffer, 3, 5)
    state = minimal_state(5)
    state["agent"]["critic.q1.weight"] = torch.tensor([1.0, float("nan")])
    with pytest.raises(CheckpointError, match=r"non-finite state at step 5 \(agent.critic.q1"):
        manager.save(5, state, buffer, rows_added=5)
    assert [p.name for p in manager.checkpoint_paths()] == ["step-000000000003.pt"]
    assert manager.segments_on_disk() == [Segment(0, 3)]


# -- small pieces ---------------------------------------------------------------------------------


def test_global_generators_continue_identically_after_restore() -> None:
    state = capture_global_rng()
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    restore_global_rng(state)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == first


def test_metrics_are_cut_back_to_the_checkpoint_step_and_a_torn_line_is_dropped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": step, "eval/success_mean": step / 1000} for step in (100, 200, 300)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 40')
    assert truncate_metrics(path, 200) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
    assert truncate_metrics(path, 200) == 0


def test_config_differences_name_every_changed_leaf() -> None:
    saved = {"seed": 0, "train": {"num_steps": 300, "log_every": 50}}
    current = {"seed": 0, "train": {"num_steps": 400, "log_every": 50}, "resume": True}
    assert config_differences(saved, current) == [
        "resume: '<absent>' -> True", "train.num_steps: 300 -> 400",
    ]


# -- the non-finite guard --------------------------------------------------------------------


def tiny_agent_and_buffer() -> tuple[MultiTaskSAC, MultiTaskReplayBuffer]:
    config = AgentConfig(hidden_dim=16, num_layers=2, task_embedding_dim=4)
    agent = MultiTaskSAC(
        OBS, ACTION, TASKS, config, make_combiner("famo", TASKS), make_combiner("ls", TASKS),
        "cpu", seed=0,
    )
    buffer = MultiTaskReplayBuffer(TASKS, 50, OBS, ACTION)
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        buffer.add(torch.randn(TASKS, OBS, generator=generator),
                   torch.rand(TASKS, ACTION, generator=generator) * 2 - 1,
                   torch.rand(TASKS, generator=generator),
                   torch.randn(TASKS, OBS, generator=generator), torch.zeros(TASKS))
    return agent, buffer


def flat_state(agent: MultiTaskSAC) -> list[tuple[str, Any]]:
    def walk(tree: Any, path: str) -> list[tuple[str, Any]]:
        if isinstance(tree, dict):
            return [leaf for key, value in tree.items() for leaf in walk(value, f"{path}.{key}")]
        if isinstance(tree, (list, tuple)):
            return [leaf for i, value in enumerate(tree) for leaf in walk(value, f"{path}[{i}]")]
        return [(path, tree.clone() if isinstance(tree, torch.Tensor) else tree)]

    return walk(agent.state_dict(), "")


def assert_same_state(actual: list[tuple[str, Any]], expected: list[tuple[str, Any]]) -> None:
    assert [path for path, _ in actual] == [path for path, _ in expected]
    for (path, value), (_, reference) in zip(actual, expected, strict=True):
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, reference), path
        else:
            assert value == reference, path


def without_counters(state: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """A skipped update consumes its policy noise and counts itself: all else stays.
    (FAMO's ``losses_before`` only carries a loss from its combine to its update within
    one update: its checkpoint entry says whether one was ever made.)"""
    return [(path, value) for path, value in state
            if not path.startswith((".generator", ".health", ".critic_combiner.losses_before"))]


def test_a_skipped_update_leaves_every_part_of_the_agent_unchanged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent, buffer = tiny_agent_and_buffer()
    guard = UpdateGuard(agent, ["a", "b", "c"], max_consecutive_skips=3)
    sampler = torch.Generator().manual_seed(2)
    assert bool(guard.update(buffer.sample(4, sampler), step=1)["finite"])
    before = flat_state(agent)

    metrics = guard.update(poison_batch(buffer.sample(4, sampler), task=1), step=2)
    assert not bool(metrics["finite"])
    assert all(not value.any() for key, value in metrics.items() if key != "finite")
    # Networks, target critic, temperature, Adam moments and steps, FAMO's state.
    assert_same_state(without_counters(flat_state(agent)), without_counters(before))
    assert capsys.readouterr().err == ""  # reported at the next check, not at the update
    guard.check(step=2)
    assert "non-finite critic loss of task b (nan) at step 2: update skipped" in (
        capsys.readouterr().err
    )
    metrics = guard.update(buffer.sample(4, sampler), step=3)
    assert bool(metrics["finite"])
    guard.check(step=3)
    assert agent.health.read()["consecutive"] == 0 and guard.total_skips == 1
    changed = [path for (path, value), (_, old) in zip(flat_state(agent), before, strict=True)
               if isinstance(value, torch.Tensor) and not torch.equal(value, old)]
    assert any("critic" in path for path in changed)  # a finite update does update


def test_the_first_update_skipped_leaves_the_optimisers_at_step_zero() -> None:
    agent, buffer = tiny_agent_and_buffer()
    before = flat_state(agent)
    guard = UpdateGuard(agent, ["a", "b", "c"], max_consecutive_skips=3)
    assert not bool(guard.update(poison_batch(buffer.sample(4), task=0), step=1)["finite"])
    assert_same_state(without_counters(flat_state(agent)), without_counters(before))
    assert int(agent.critic_optimizer.step_count) == 0


def test_consecutive_skips_stop_the_run_with_the_step_and_the_task() -> None:
    agent, buffer = tiny_agent_and_buffer()
    guard = UpdateGuard(agent, ["a", "b", "c"], max_consecutive_skips=2)
    guard.update(poison_batch(buffer.sample(4), task=2), step=7)
    guard.check(step=7)  # one skip: reported, no stop
    guard.update(poison_batch(buffer.sample(4), task=2), step=8)
    with pytest.raises(NonFiniteUpdates, match=r"step 8: 2 consecutive .* task c \(nan\)"):
        guard.check(step=8)


def test_skips_between_two_checks_are_counted_and_the_last_one_is_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent, buffer = tiny_agent_and_buffer()
    guard = UpdateGuard(agent, ["a", "b", "c"], max_consecutive_skips=5)
    for step, task in ((1, 0), (2, None), (3, 2), (4, None)):
        batch = buffer.sample(4)
        guard.update(batch if task is None else poison_batch(batch, task=task), step=step)
    guard.check(step=4)
    err = capsys.readouterr().err
    assert "task c (nan) at step 3: update skipped (2 since the last check, 0 in a row, " in err
    assert guard.total_skips == 2 and guard.skips_since_eval == 2


# -- environments ---------------------------------------------------------------------------


@pytest.mark.slow
def test_an_episode_start_state_reproduces_the_reset_observation_and_what_follows() -> None:
    """With goals resampled at every reset (mwplus), only the sampler state from *before*
    the reset reproduces it; the state after it (``state_dict``) draws another goal."""
    horizon = 3
    actions = np.random.default_rng(0).uniform(-1, 1, (4 * horizon, 10, 4)).astype(np.float32)
    protocol = dataclasses.replace(PROTOCOLS["mwplus"], num_goals=10)  # 50 builds slowly

    def make() -> MultiTaskEnv:
        return MultiTaskEnv("mt10", protocol, seed=5, vector_strategy="sync",
                            max_episode_steps=horizon)

    with make() as env:
        env.reset()
        assert env.at_episode_start
        for t in range(2 * horizon - 1):
            env.step(actions[t])
            assert env.at_episode_start == ((t + 1) % horizon == 0)  # all episodes end together
        boundary = env.step(actions[2 * horizon - 1])
        assert boundary.episode_end.all() and env.at_episode_start
        episode_start, after_reset = env.episode_start_state_dict(), env.state_dict()
        following = [env.step(actions[t]) for t in range(2 * horizon, 4 * horizon)]

    with make() as resumed:
        resumed.load_state_dict(episode_start)
        np.testing.assert_array_equal(resumed.reset(), boundary.obs)
        for t, expected in zip(range(2 * horizon, 4 * horizon), following, strict=True):
            result = resumed.step(actions[t])
            np.testing.assert_array_equal(result.next_obs, expected.next_obs)
            np.testing.assert_array_equal(result.reward, expected.reward)
        resumed.load_state_dict(after_reset)
        assert not np.array_equal(resumed.reset(), boundary.obs)
        with pytest.raises(RuntimeError, match="episode_start_state_dict"):
            resumed.step(actions[0])
            resumed.episode_start_state_dict()


@pytest.mark.slow
def test_a_killed_worker_stops_the_env_naming_its_task_and_stop_signals_spare_workers() -> None:
    env = MultiTaskEnv("mt10", PROTOCOLS["classic"], seed=0, vector_strategy="async",
                       max_episode_steps=5)
    processes = list(env._vector_env.processes)
    try:
        env.reset()
        actions = np.zeros((env.num_tasks, env.action_dim), dtype=np.float32)
        # SIGTERM / SIGINT are the trainer's to handle: the workers keep running.
        os.kill(processes[0].pid, signal.SIGTERM)
        os.kill(processes[1].pid, signal.SIGINT)
        env.step(actions)
        assert all(process.is_alive() for process in processes)

        os.kill(processes[3].pid, signal.SIGKILL)
        processes[3].join(timeout=10)
        started = time.perf_counter()
        with pytest.raises(EnvWorkerError, match=r"died during step: door-open-v3 \(pid \d+, "
                                                 r"exit code -9\)"):
            env.step(actions)
    finally:
        env.close()
    assert time.perf_counter() - started < 30
    for process in processes:
        process.join(timeout=10)
    assert not any(process.is_alive() for process in processes)


# -- state ownership ------------------------------------------------------------------------------


def test_the_checkpoint_module_does_not_import_the_trainer() -> None:
    """checkpoint.py writes and reads files; the trainer composes the state it stores.
    Nothing above replay, atomic and errors comes in with it (not the agent either)."""
    probe = (
        "import sys, mtrl_ntk.checkpoint; "
        "above = ('mtrl_ntk.trainer', 'mtrl_ntk.agent'); "
        "print(any(name.startswith(above) for name in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )
    assert completed.stdout.strip() == "False", completed.stderr


def assert_same_tree(actual: Any, expected: Any, path: str = "state") -> None:
    """Equal trees: tensors bit for bit, tuples and lists alike (a saved tuple may load
    as either), everything else by ==."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual.cpu(), expected.cpu()), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), path
        for key, value in expected.items():
            assert_same_tree(actual[key], value, f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), path
        for index, (item, value) in enumerate(zip(actual, expected, strict=True)):
            assert_same_tree(item, value, f"{path}[{index}]")
    else:
        assert actual == expected, path


@pytest.mark.slow
def test_trainer_state_dict_round_trips_through_load_state_dict(tmp_path: Path) -> None:
    """A smoke run checkpointed at step 150, between evaluations (100, 200) and logs
    (every 40 steps), so every part of the state holds something; a fresh trainer
    loaded from it reports the same state, and its reset returns the observation the
    checkpoint saw."""
    from mtrl_ntk.config import build_run_spec
    from mtrl_ntk.rng import seed_everything
    from mtrl_ntk.trainer import SeedRun, TrainingLoop
    from tests.trainer.test_configs import composed

    spec = build_run_spec(composed(
        "experiment=smoke", "train.num_steps=200", "train.progress_bar=false",
        "train.checkpoint_every=150", "train.log_every=40",
    ))
    seed_everything(spec.seed)
    trainer = SeedRun(spec, tmp_path)
    try:
        TrainingLoop([trainer], resume_hint="").run()
    finally:
        trainer.close()
    checkpoint = CheckpointManager(tmp_path).latest()
    assert checkpoint is not None and checkpoint.step == 150
    saved = {key: value for key, value in checkpoint.state.items()
             if key not in ("format", "replay")}
    assert saved["log_window"]["count"] == 30 and saved["eval_window"]["count"] == 50
    assert saved["episodes"]["episodes"].sum() > 0 and saved["evaluator_env"] is not None

    restored = SeedRun(spec, tmp_path, checkpoint=checkpoint)
    try:
        assert restored.env is not None
        rng_after_load = capture_global_rng()
        obs = restored.env.reset()
        assert np.array_equal(obs, saved["obs"].numpy())
        state = restored.state_dict(obs)
    finally:
        restored.close()
    assert_same_tree(rng_after_load, saved.pop("global_rng"), "global_rng")
    state.pop("global_rng")  # reset() may draw from the global generators
    assert_same_tree(state, saved)
