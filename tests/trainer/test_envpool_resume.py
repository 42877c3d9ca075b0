"""env.backend=envpool end to end: the smoke run on mwplus, killed and resumed, reproduces
the uninterrupted run exactly (as tests/trainer/test_resume.py does for Meta-World)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest.importorskip(
    "envpool", reason="envpool is not installed (pip install -r requirements.lock or '.[rl]')"
)

from tests.trainer.test_resume import EVALUATION_STEPS, assert_reproduces, run  # noqa: E402
from tests.trainer.test_run_mt10 import read_metrics  # noqa: E402

ENVPOOL = ["env.backend=envpool", "protocol=mwplus"]


@pytest.mark.slow
def test_envpool_smoke_run_killed_and_resumed_reproduces_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    reference = tmp_path / "reference"
    completed = run(reference, *ENVPOOL)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [row["step"] for row in read_metrics(reference)] == EVALUATION_STEPS

    run_dir = tmp_path / "run"
    killed = run(run_dir, *ENVPOOL, "debug.kill_at_step=237")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # A checkpoint of one backend is never resumed on the other.
    refused = run(run_dir, "protocol=mwplus", "resume=true")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "env.backend: 'envpool' -> 'metaworld'" in refused.stderr, refused.stderr[-3000:]
    resumed = run(run_dir, *ENVPOOL, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} from step-{200:012d}.pt" in resumed.stderr
    assert "first observation differs" not in resumed.stderr
    assert_reproduces(run_dir, reference)
