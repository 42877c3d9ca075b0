"""``run_mt10.py`` end to end: real Hydra, real Meta-World MT10, real TensorBoard files.

The smoke preset (all ten tasks, 2x32 networks, 300 steps, three evaluations)
runs in a subprocess exactly as a user types it; bad input must stop within
seconds, before any environment starts, with one line and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtrl_ntk.combiners import available_combiners
from mtrl_ntk.envs import BENCHMARK_TASKS

REPOSITORY = Path(__file__).resolve().parents[2]
MT10_TASKS = BENCHMARK_TASKS["mt10"]
SMOKE_EVALUATION_STEPS = [100, 200, 300]


def run_cli(*overrides: str, runs_dir: Path | None = None, timeout: float = 180.0):
    env = dict(os.environ)
    if runs_dir is not None:
        env["MTRL_NTK_RUNS_DIR"] = str(runs_dir)
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "run_mt10.py", *overrides],
        cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    return completed, time.perf_counter() - started


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("combiner", ["ls", "ntkmtl", "nashmtl"])
def test_smoke_preset_trains_evaluates_and_logs_all_ten_tasks(
    combiner: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    completed, _ = run_cli("experiment=smoke", f"combiner={combiner}", f"hydra.run.dir={run_dir}")
    assert completed.returncode == 0, completed.stderr[-3000:]

    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == SMOKE_EVALUATION_STEPS
    for row in rows:
        success = [row[f"eval/success/{task}"] for task in MT10_TASKS]
        assert all(0.0 <= value <= 1.0 for value in success)
        assert row["eval/success_mean"] == pytest.approx(sum(success) / len(MT10_TASKS))
        assert row["transitions"] == row["step"] * len(MT10_TASKS)
        assert 0.0 <= row["train/success_mean"] <= 1.0  # 50-step episodes end before each eval
        assert row["health/finite_fraction"] == 1.0
        critic_weights = [row[f"combiner/critic/weight/{task}"] for task in MT10_TASKS]
        actor_weights = [row[f"combiner/actor/weight/{task}"] for task in MT10_TASKS]
        if combiner == "ls":  # the defining property of linear scalarisation: w_i = 1/T
            assert critic_weights == pytest.approx([0.1] * 10)
            assert actor_weights == pytest.approx([0.1] * 10)
        else:
            assert all(weight > 0 for weight in critic_weights + actor_weights)
    if combiner == "ntkmtl":
        eigenvalues = [rows[-1][f"combiner/critic/ntk_eigenvalue/{task}"] for task in MT10_TASKS]
        assert all(value > 0 for value in eigenvalues)

    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "finished"
    assert result["step"] == 300
    assert result["eval/success_mean"] == rows[-1]["eval/success_mean"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["combiner"]["name"] == combiner
    assert config["train"]["num_steps"] == 300
    assert (run_dir / "provenance.json").exists()

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    events.Reload()
    scalar_tags = set(events.Tags()["scalars"])
    for tag in ["eval/success_mean", *(f"eval/success/{task}" for task in MT10_TASKS)]:
        assert [event.step for event in events.Scalars(tag)] == SMOKE_EVALUATION_STEPS
    assert {"loss/critic", "loss/actor", "loss/temperature", "temperature",
            "time/steps_per_second", "train/success_mean"} <= scalar_tags
    assert {f"combiner/critic/weight/{task}" for task in MT10_TASKS} <= scalar_tags
    if combiner == "nashmtl":  # a Gramian method: the task-affinity image at every evaluation
        images = events.Images("combiner/critic/affinity")
        assert [image.step for image in images] == SMOKE_EVALUATION_STEPS


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["combiner=ntkmlt"], "Did you mean 'ntkmtl'?"),
        (["agent.arch=task_encodr"], "agent.arch 'task_encodr'. Did you mean 'task_encoder'?"),
        (["protocol=mwplsu"], "unknown protocol 'mwplsu'. Did you mean 'mwplus'?"),
        (["combiner=cagrad", "combiner.c=-1"], "invalid value -1 for parameter 'c'"),
        (["train.batch_size=1285"], "not divisible by the 10 tasks"),
    ],
    ids=["combiner", "arch", "protocol", "parameter", "batch"],
)
def test_bad_input_stops_before_any_environment_with_one_clear_line(
    overrides: list[str], expected: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    completed, seconds = run_cli(*overrides, f"hydra.run.dir={run_dir}", timeout=60.0)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr + completed.stdout
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    if overrides[0].startswith("combiner=ntkmlt"):
        assert all(name in lines[0] for name in available_combiners())
    # config.yaml is written right after validation, before the environments start.
    assert not (run_dir / "config.yaml").exists()
    assert seconds < 30.0
