"""The Docker image, built with podman and trained in (scripts/check_image.py), checked from
the host: the build, ``experiment=smoke`` as the image's non-root user on a mounted runs
volume, the commit in provenance.json, the report, skip on a second run, SIGTERM and resume.

Skips where podman (or, without a cached base image, debootstrap) is not installed, or
without root (the check hands the runs volume to the image's user as root would).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_image.py"
_spec = importlib.util.spec_from_file_location("check_image", SCRIPT)
check_image = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_image)

MISSING = ", ".join(check_image.missing_tools())
pytestmark = [
    pytest.mark.system,
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"podman image check: {MISSING} not installed "
                       "(Debian: apt-get install podman runc debootstrap)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the image check runs podman as root"),
]


def test_the_image_builds_trains_reports_skips_and_resumes(tmp_path: Path) -> None:
    runs, summary = tmp_path / "runs", tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs-dir", str(runs), "--json",
         str(summary)], cwd=ROOT, capture_output=True, text=True, timeout=3000, check=False,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    numbers = json.loads(summary.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert numbers["commit"].removesuffix("-dirty") == head
    # What the host reads, independently of the script's own checks.
    for seed in (0, 1):
        run_dir = runs / "smoke" / "ls" / f"seed{seed}"
        provenance = json.loads((run_dir / "provenance.json").read_text())
        assert provenance["git"]["commit"] == head
        assert provenance["git"]["source"] == "env:MTRL_NTK_GIT_COMMIT"
        assert 0.0 <= json.loads((run_dir / "result.json").read_text())["eval/success_mean"] <= 1
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
        assert steps == [100, 200, 300]  # seed1 was stopped and resumed: no step twice
        assert list((run_dir / "tb").glob("events.out.tfevents.*"))
        assert run_dir.stat().st_uid == check_image.IMAGE_UID
    assert "interrupted by SIGTERM" in numbers["sigterm"]
    assert "| ls / " in done.stdout  # the report (summary.md), made in the image
