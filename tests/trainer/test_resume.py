"""Runs that survive: kill, resume, SIGTERM, NaNs and a full disk, end to end.

Every run is ``run_mt10.py`` in a subprocess on the smoke preset (all ten MT10 tasks,
300 steps, 50-step episodes, evaluations and checkpoints at steps 100, 200, 300),
with a replay buffer of 120 rows so the ring wraps and resuming must put rows back
at their ring positions. On CPU a resumed run must reproduce the uninterrupted
run's metrics exactly (every number of every ``metrics.jsonl`` row but wall times).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtrl_ntk.checkpoint import CheckpointManager, non_finite_entries
from tests.trainer.test_configs import composed
from tests.trainer.test_run_mt10 import REPOSITORY, read_metrics, run_cli

SMOKE = ["experiment=smoke", "train.buffer_capacity=1200", "train.progress_bar=false"]
EVALUATION_STEPS = [100, 200, 300]


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock entries."""
    return [
        {key: value for key, value in row.items() if not key.startswith("time/")}
        for row in read_metrics(run_dir)
    ]


def scalar_events(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    completed, _ = run_cli(*SMOKE, f"hydra.run.dir={run_dir}", *overrides)
    return completed


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    completed = run(run_dir)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [row["step"] for row in read_metrics(run_dir)] == EVALUATION_STEPS
    return run_dir


def assert_reproduces(run_dir: Path, reference: Path) -> None:
    assert comparable(run_dir) == comparable(reference)
    result, expected = (json.loads((d / "result.json").read_text()) for d in (run_dir, reference))
    assert result["eval/success_mean"] == expected["eval/success_mean"]
    # TensorBoard was rolled back: every evaluation once, every logged loss as in the reference.
    assert [step for step, _ in scalar_events(run_dir, "eval/success_mean")] == EVALUATION_STEPS
    assert scalar_events(run_dir, "loss/critic") == scalar_events(reference, "loss/critic")


def test_smoke_preset_checkpoints_at_every_one_of_its_three_evaluations() -> None:
    from mtrl_ntk.config import build_run_spec

    spec = build_run_spec(composed(*SMOKE))
    every = spec.train.checkpoint_every
    assert every == spec.protocol.eval_every_steps
    assert spec.train.num_steps // every >= 3
    assert every % spec.protocol.max_episode_steps == 0  # episode ends: written without delay


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_reproduces_the_uninterrupted_run(
    reference: Path, tmp_path: Path
) -> None:
    kill_step = random.Random(2026).randint(101, 299)  # fixed seed: a reproducible "random" step
    run_dir = tmp_path / "run"
    killed = run(run_dir, f"debug.kill_at_step={kill_step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "result.json").exists()

    # An unfinished run is never silently overwritten or resumed with other settings.
    refused = run(run_dir)
    assert refused.returncode == 2 and "resume=true" in refused.stderr
    changed = run(run_dir, "resume=true", "train.num_steps=400")
    assert changed.returncode == 2 and "train.num_steps: 300 -> 400" in changed.stderr

    resumed = run(run_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last_checkpoint = kill_step // 100 * 100
    assert f"resuming {run_dir} from step-{last_checkpoint:012d}.pt" in resumed.stderr
    assert_reproduces(run_dir, reference)
    # The last two checkpoints are kept, with the replay rows they need.
    manager = CheckpointManager(run_dir)
    assert [path.name for path in manager.checkpoint_paths()] == [
        "step-000000000200.pt", "step-000000000300.pt",
    ]
    assert manager.segments_on_disk()[0].start <= 200 - 120  # step 200 needs rows [80, 200)


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_loadable(
    reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    killed = run(run_dir, "debug.kill_during_checkpoint=2")  # halfway through step 200's file
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert list(checkpoints.glob(".step-000000000200.pt.*.tmp"))  # the torn temporary file
    assert not (checkpoints / "step-000000000200.pt").exists()
    latest = CheckpointManager(run_dir).latest()
    assert latest is not None and latest.step == 100

    resumed = run(run_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(checkpoints.glob(".*.tmp"))
    assert_reproduces(run_dir, reference)


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_episode_end_and_the_printed_command_resumes(
    reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "run_mt10.py", *SMOKE, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the first evaluation (step 100) is written
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    line = next(line for line in stderr.splitlines() if "interrupted by SIGTERM" in line)
    step = int(line.split("at step ")[1].split(";")[0])
    assert 100 <= step < 300 and step % 50 == 0  # at an episode end
    assert (run_dir / "checkpoints" / f"step-{step:012d}.pt").exists()

    resume_command = shlex.split(line.split("Resume with: ")[1])
    assert resume_command[:2] == ["python", "run_mt10.py"] and resume_command[-1] == "resume=true"
    resumed = subprocess.run(
        [sys.executable, *resume_command[1:]], cwd=REPOSITORY, capture_output=True, text=True,
        timeout=180, check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_reproduces(run_dir, reference)


@pytest.mark.slow
def test_a_nan_loss_is_skipped_and_reported_and_repeated_nans_stop_the_run(tmp_path: Path) -> None:
    once = run(tmp_path / "once", "debug.nan_at_step=120", "debug.nan_task=door-open-v3")
    assert once.returncode == 0, once.stderr[-3000:]
    assert "non-finite critic loss of task door-open-v3 (nan) at step 120: update skipped" in (
        once.stderr
    )
    rows = read_metrics(tmp_path / "once")
    assert [row["health/skipped_updates"] for row in rows] == [0, 1, 0]
    assert all(row["loss/critic"] is not None for row in rows)  # null would be a NaN

    again = run(tmp_path / "again", "debug.nan_at_step=120", "debug.nan_steps=50",
                "train.max_consecutive_skips=3")
    assert again.returncode == 1
    # Skips are read on the host at the next log (every 50 steps): 31 in a row by step 150.
    assert "stopped at step 150: 31 consecutive updates had a non-finite loss" in again.stderr
    assert "Traceback" not in again.stderr
    latest = CheckpointManager(tmp_path / "again").latest()
    assert latest is not None and latest.step == 100
    assert non_finite_entries(latest.state["agent"]) == []


def _mount_tiny_tmpfs(directory: Path, size: str) -> bool:
    directory.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True, check=False,
    )
    return mounted.returncode == 0


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """checkpoints/ is a real 800 KiB filesystem: the first checkpoint (agent ~0.2 MB, 100
    replay rows ~0.34 MB) fits, the second does not."""
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    if not _mount_tiny_tmpfs(checkpoints, "800k"):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); disk-full is untested here")
    try:
        completed = run(run_dir)
        assert completed.returncode == 1, completed.stderr[-3000:]
        assert "writing the checkpoint of step 200 failed" in completed.stderr
        assert "No space left on device" in completed.stderr
        assert "the previous checkpoint step-000000000100.pt is intact" in completed.stderr
        assert not list(checkpoints.rglob(".*.tmp"))
        manager = CheckpointManager(run_dir)
        assert [segment.stop for segment in manager.segments_on_disk()] == [100]
        latest = manager.latest()
        assert latest is not None and latest.step == 100
        assert torch.is_tensor(latest.state["obs"])
    finally:
        subprocess.run(["umount", str(checkpoints)], check=False)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_killed_environment_worker_stops_the_run_with_a_message_and_no_hang(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "run_mt10.py", *SMOKE, "env.vector_strategy=async",
               f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # training is under way: the first evaluation was written
        workers = _children(process.pid)  # training env's ten workers, then evaluation's ten
        assert len(workers) >= 10
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)  # stops; never hangs
    finally:
        process.kill()
    assert process.returncode == 1, stderr[-3000:]
    # The run's one-line message (the workers that were shut down may print gymnasium's
    # tracebacks before or after it on the shared stderr).
    (message,) = [line for line in stderr.splitlines() if "worker process(es) died" in line]
    assert "environment worker process(es) died during step: reach-v3 (pid" in message
    assert "exit code -9" in message and message.endswith("resume=true")
    time.sleep(1.0)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
