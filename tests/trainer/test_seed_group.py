"""``seed=A..B`` trains the seeds side by side in one process (mtrl_ntk/trainer/).

Every run is ``run_mt10.py`` in a subprocess, as a user types it, on the smoke preset
shrunk to a few dozen steps (all ten MT10 tasks, real Meta-World and Hydra). Each
seed of a group must write the run directory a single run writes; seed k's run must
not depend on the other seeds of its group; a killed group resumes to the
uninterrupted group's results exactly (the same batched computation), also when the
kill left the seeds' checkpoints at different steps.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mtrl_ntk.checkpoint import CheckpointManager
from tests.trainer.test_resume import comparable
from tests.trainer.test_run_mt10 import REPOSITORY, read_metrics, run_cli

# 60 steps: 10 of warm-up, then 50 updates; 20-step episodes; evaluated and
# checkpointed at steps 20, 40 and 60.
SHORT = [
    "experiment=smoke", "train.progress_bar=false", "train.num_steps=60",
    "train.warmup_steps=10", "protocol.max_episode_steps=20", "protocol.eval_every_steps=20",
    "train.buffer_capacity=400",
]
EVALUATION_STEPS = [20, 40, 60]


def seed_dir(runs_dir: Path, seed: int, combiner: str = "ls") -> Path:
    return runs_dir / "smoke" / combiner / f"seed{seed}"


def run_group(runs_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    completed, _ = run_cli(*SHORT, *overrides, runs_dir=runs_dir, timeout=300.0)
    return completed


def checkpoint_state(run_dir: Path) -> dict:
    checkpoint = CheckpointManager(run_dir).latest()
    assert checkpoint is not None, run_dir
    return checkpoint.state


def max_difference(actual: object, expected: object, path: str = "") -> float:
    """The largest |difference| between two floating-point state trees (exact elsewhere)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape, path
        if not expected.is_floating_point():
            assert torch.equal(actual, expected), path
            return 0.0
        if not expected.numel():
            return 0.0
        return float((actual.double() - expected.double()).abs().max())
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
        return max((max_difference(actual[k], expected[k], f"{path}.{k}") for k in expected),
                   default=0.0)
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path  # type: ignore[arg-type]
        pairs = enumerate(zip(actual, expected))  # type: ignore[call-overload]
        return max((max_difference(a, b, f"{path}[{i}]") for i, (a, b) in pairs), default=0.0)
    if isinstance(expected, float):
        return abs(float(actual) - expected)  # type: ignore[arg-type]
    assert actual == expected, path
    return 0.0


@pytest.fixture(scope="module")
def group_of_three(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """seed=0..2 with ntkmtl, uninterrupted."""
    runs_dir = tmp_path_factory.mktemp("group")
    completed = run_group(runs_dir, "combiner=ntkmtl", "seed=0..2")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr.count("side by side") == 1  # one process trained all three
    return runs_dir


@pytest.mark.slow
def test_each_seed_of_a_group_writes_the_run_directory_of_a_single_run(
    group_of_three: Path, tmp_path: Path
) -> None:
    for seed in range(3):
        run_dir = seed_dir(group_of_three, seed, "ntkmtl")
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["seed"] == seed and config["seeds"] is None
        assert json.loads((run_dir / "result.json").read_text())["step"] == 60
        assert [row["step"] for row in read_metrics(run_dir)] == EVALUATION_STEPS
        assert (run_dir / "provenance.json").is_file()
        assert list((run_dir / "tb").glob("events.out.tfevents.*"))
        assert CheckpointManager(run_dir).latest() is not None
    assert not seed_dir(group_of_three, 3, "ntkmtl").exists()
    # The report sees one method with three seeds.
    report = tmp_path / "report"
    completed = subprocess.run(
        [sys.executable, "scripts/summarize.py", str(group_of_three), "--out", str(report)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    with (report / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["combiner"], row["num_seeds"], row["seeds"]) for row in rows] == [
        ("ntkmtl", "3", "0 1 2")
    ]


@pytest.fixture(scope="module")
def seed_one_alone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """seed=1 with ntkmtl: a single run."""
    runs_dir = tmp_path_factory.mktemp("alone")
    completed = run_group(runs_dir, "combiner=ntkmtl", "seed=1")
    assert completed.returncode == 0, completed.stderr[-3000:]
    return seed_dir(runs_dir, 1, "ntkmtl")


def written_files(run_dir: Path) -> list[str]:
    """The run directory's files, TensorBoard event files by their folder only (their names
    hold the time and the host)."""
    return sorted(
        str(path.parent.relative_to(run_dir)) + "/<events>" if "tfevents" in path.name
        else str(path.relative_to(run_dir))
        for path in run_dir.rglob("*") if path.is_file() and ".hydra" not in path.parts
    )


@pytest.mark.slow
def test_a_single_run_and_a_row_of_one_seed_write_the_same_files(
    seed_one_alone: Path, tmp_path: Path
) -> None:
    completed = run_group(tmp_path, "combiner=ntkmtl", "seed=1..1")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "side by side" not in completed.stderr  # one seed: no group
    row = seed_dir(tmp_path, 1, "ntkmtl")
    assert written_files(row) == written_files(seed_one_alone)
    assert (row / "config.yaml").read_text() == (seed_one_alone / "config.yaml").read_text()
    assert comparable(row) == comparable(seed_one_alone)  # the same computation, bit for bit
    state, expected_state = checkpoint_state(row), checkpoint_state(seed_one_alone)
    for key in ("agent", "env", "obs", "sample_generator", "warmup_rng", "log_window"):
        assert max_difference(state[key], expected_state[key], key) == 0.0
    result, expected = (json.loads((d / "result.json").read_text()) for d in (row, seed_one_alone))
    assert result.keys() == expected.keys() and result["status"] == "finished"
    assert {k: v for k, v in result.items() if "second" not in k} == {
        k: v for k, v in expected.items() if "second" not in k
    }


@pytest.mark.slow
def test_a_seed_trained_in_a_group_is_the_seed_trained_alone(
    group_of_three: Path, seed_one_alone: Path
) -> None:
    alone, grouped = seed_one_alone, seed_dir(group_of_three, 1, "ntkmtl")
    alone_state, grouped_state = checkpoint_state(alone), checkpoint_state(grouped)
    assert alone_state["step"] == grouped_state["step"] == 60
    # The goals (every task's goal sampler), the replay sampler and the warm-up generator
    # come from seed 1 alone: identical.
    assert grouped_state["env"]["task_samplers"] == alone_state["env"]["task_samplers"]
    for key in ("sample_generator", "warmup_rng"):
        assert max_difference(grouped_state[key], alone_state[key], key) == 0.0
    # The first evaluation (before batched rounding can move any action) is identical.
    first_alone, first_grouped = read_metrics(alone)[0], read_metrics(grouped)[0]
    assert {k: v for k, v in first_grouped.items() if k.startswith("eval/")} == {
        k: v for k, v in first_alone.items() if k.startswith("eval/")
    }
    # After 50 updates the agents agree to float32 rounding: the vmapped kernels sum in
    # another order (~1e-7 relative per op); the RL loop feeds the differences back
    # through the actions it takes (and so the rewards and the reward normaliser), so
    # they grow over the updates, to ~1e-5 here.
    difference = max_difference(grouped_state["agent"], alone_state["agent"], "agent")
    assert difference < 1e-3, difference
    for key in ("obs", "env"):
        difference = max_difference(grouped_state[key], alone_state[key], key)
        assert difference < 1e-3, (key, difference)


@pytest.mark.slow
def test_finished_seeds_are_skipped_and_the_others_trained(
    group_of_three: Path, tmp_path: Path
) -> None:
    runs_dir = tmp_path / "runs"
    shutil.copytree(group_of_three, runs_dir)
    completed = run_group(runs_dir, "combiner=ntkmtl", "seed=1..3")
    assert completed.returncode == 0, completed.stderr[-3000:]
    for seed in (1, 2):
        assert f"seed{seed} already holds a finished run: skipped" in completed.stderr
        assert comparable(seed_dir(runs_dir, seed, "ntkmtl")) == comparable(
            seed_dir(group_of_three, seed, "ntkmtl")
        )
    assert json.loads((seed_dir(runs_dir, 3, "ntkmtl") / "result.json").read_text())["step"] == 60


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """seed=0..1 with ls, uninterrupted, its envs in one worker process: what a resumed
    group (its envs in this process or in the worker) must reproduce exactly."""
    runs_dir = tmp_path_factory.mktemp("pair")
    completed = run_group(runs_dir, "seed=0..1", "env.seed_workers=1")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "envs in 1 worker process," in completed.stderr
    return runs_dir


def assert_group_reproduces(runs_dir: Path, reference: Path) -> None:
    for seed in (0, 1):
        assert comparable(seed_dir(runs_dir, seed)) == comparable(seed_dir(reference, seed))
        result = json.loads((seed_dir(runs_dir, seed) / "result.json").read_text())
        expected = json.loads((seed_dir(reference, seed) / "result.json").read_text())
        assert result["eval/success_mean"] == expected["eval/success_mean"]


@pytest.mark.slow
def test_a_killed_group_resumes_to_the_uninterrupted_groups_results(
    pair: Path, tmp_path: Path
) -> None:
    killed = run_group(tmp_path, "seed=0..1", "debug.kill_at_step=50", "env.seed_workers=0")
    assert killed.returncode == -9, killed.stderr[-3000:]
    steps = [CheckpointManager(seed_dir(tmp_path, seed)).latest().step for seed in (0, 1)]
    assert steps == [40, 40]
    # As if the kill had come between seed 0's and seed 1's checkpoint at step 40: the
    # group resumes both seeds from step 20, the newest step both hold. (The plain case,
    # both seeds at one step, is the SIGTERM test's resume below.)
    newest = CheckpointManager(seed_dir(tmp_path, 1)).checkpoint_paths()[-1]
    newest.unlink()
    resumed = run_group(tmp_path, "seed=0..1", "resume=true", "env.seed_workers=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count(f"from step-{20:012d}.pt") == 2, resumed.stderr[-3000:]
    assert_group_reproduces(tmp_path, pair)


@pytest.mark.slow
def test_sigterm_checkpoints_every_seed_and_the_printed_command_resumes_the_group(
    pair: Path, tmp_path: Path
) -> None:
    env_dir = tmp_path
    process = subprocess.Popen(
        [sys.executable, "run_mt10.py", *SHORT, "seed=0..1", "env.seed_workers=0"],
        cwd=REPOSITORY, env={**os.environ, "MTRL_NTK_RUNS_DIR": str(env_dir)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Wait for the first checkpoint of both seeds, then ask the group to stop.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if all(CheckpointManager(seed_dir(env_dir, seed)).checkpoint_paths() for seed in (0, 1)):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    if process.returncode == 0:
        pytest.skip("the group finished before the signal arrived (a fast machine)")
    assert process.returncode == 143, stderr[-3000:]
    assert "all 2 seeds of the group checkpointed" in stderr
    steps = {CheckpointManager(seed_dir(env_dir, seed)).latest().step for seed in (0, 1)}
    assert len(steps) == 1  # both seeds at the same step
    assert "seed=0..1" in stderr and "resume=true" in stderr
    resumed = run_group(env_dir, "seed=0..1", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_group_reproduces(env_dir, pair)


@pytest.mark.slow
def test_seed_group_false_runs_one_job_per_seed(tmp_path: Path) -> None:
    completed = run_group(tmp_path, "seed=0..1", "seed_group=false", "train.num_steps=20")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "side by side" not in completed.stderr
    for seed in (0, 1):
        config = yaml.safe_load((seed_dir(tmp_path, seed) / "config.yaml").read_text())
        assert config["seed"] == seed and config["seeds"] is None


@pytest.mark.slow
def test_a_non_finite_update_is_skipped_and_reported_for_each_seed_it_hit(tmp_path: Path) -> None:
    completed = run_group(
        tmp_path, "seed=0..1", "train.num_steps=20", "debug.nan_at_step=15",
        "debug.nan_task=push-v3",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for seed in (0, 1):
        assert f"mtrl_ntk: seed {seed}: non-finite critic loss of task push-v3" in (
            completed.stderr
        ), completed.stderr[-3000:]
        result = json.loads((seed_dir(tmp_path, seed) / "result.json").read_text())
        assert result["skipped_updates"] == 1


@pytest.mark.slow
def test_a_seed_whose_updates_stay_non_finite_stops_alone_and_the_others_carry_on(
    tmp_path: Path,
) -> None:
    """Seed 1's updates are NaN from step 25 on: it stops at the next check (the log of
    step 30) with its checkpoint of step 20 and the reason in its run directory; seed 0
    trains to the end; the job then reports the stop (exit status 1)."""
    completed = run_group(
        tmp_path, "seed=0..1", "train.log_every=10", "debug.nan_at_step=25",
        "debug.nan_steps=1000", "debug.nan_seed=1", "train.max_consecutive_skips=3",
    )
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "seed 1: stopped at step 30: 6 consecutive updates" in completed.stderr
    assert "seeds 0 carry on" in completed.stderr
    stopped = json.loads((seed_dir(tmp_path, 1) / "result.json").read_text())
    assert stopped["status"] == "stopped" and stopped["step"] == 30
    assert "seed 1: stopped at step 30" in stopped["reason"]
    assert stopped["last_checkpoint"] == f"step-{20:012d}.pt"
    latest = CheckpointManager(seed_dir(tmp_path, 1)).latest()
    assert latest is not None and latest.step == 20
    assert [row["step"] for row in read_metrics(seed_dir(tmp_path, 1))] == [20]
    finished = json.loads((seed_dir(tmp_path, 0) / "result.json").read_text())
    assert finished["status"] == "finished" and finished["step"] == 60
    assert finished["skipped_updates"] == 0
    assert [row["step"] for row in read_metrics(seed_dir(tmp_path, 0))] == EVALUATION_STEPS
