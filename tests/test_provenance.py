"""Provenance records: real values, a commit that identifies the code, an exact command line."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pytest
import torch

import mtrl_ntk
from mtrl_ntk.provenance import (
    GIT_COMMIT_ENV,
    PROVENANCE_FILE,
    TRACKED_PACKAGES,
    collect_provenance,
    format_provenance,
    git_state,
    read_provenance,
    write_provenance,
)

PACKAGE_DIR = Path(mtrl_ntk.__file__).resolve().parent
HEX40 = re.compile(r"[0-9a-f]{40}")
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com",
         "-c", "init.defaultBranch=main", *args],
        capture_output=True, text=True, check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory git cannot walk up from, with no commit declared in the environment."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.fixture
def repository(isolated: Path) -> Path:
    """A git repository with one commit and a clean tree."""
    _git(isolated, "init", "-q")
    (isolated / "module.py").write_text("x = 1\n")
    _git(isolated, "add", "module.py")
    _git(isolated, "commit", "-q", "-m", "first")
    return isolated


def test_record_holds_the_installed_versions() -> None:
    record = collect_provenance(["run_mt10.py"])
    assert record["mtrl_ntk_version"] == mtrl_ntk.__version__
    assert record["python"] == platform.python_version()
    assert {"torch", "numpy", "metaworld", "mujoco", "gymnasium"} <= set(TRACKED_PACKAGES)
    for name in TRACKED_PACKAGES:
        assert record["packages"][name] == metadata.version(name)
    assert record["hostname"] == socket.gethostname()
    assert record["cwd"] == os.getcwd()
    json.dumps(record)  # the whole record is JSON-serialisable


def test_record_names_the_device_torch_would_use() -> None:
    device = collect_provenance([])["device"]
    if torch.cuda.is_available():
        assert device["type"] == "cuda"
        assert device["name"] == torch.cuda.get_device_name(0)
    else:
        assert device["type"] == "cpu"
        assert isinstance(device["name"], str) and device["name"].strip()


def test_timestamp_is_now_in_utc() -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    stamp = collect_provenance([])["timestamp_utc"]
    after = datetime.now(timezone.utc)
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert before <= moment <= after


def test_command_line_round_trips_through_the_shell() -> None:
    argv = ["run_mt10.py", "combiner=ntkmtl", "seed=0..9", "name=it's a $HOME \"test\"",
            "hydra.run.dir=runs/α β", ""]
    command = collect_provenance(argv)["command"]
    assert shlex.split(command) == [sys.executable, *argv]


def test_command_line_defaults_to_this_process() -> None:
    assert shlex.split(collect_provenance()["command"]) == [sys.executable, *sys.argv]


@needs_git
def test_commit_of_this_source_tree_is_its_head() -> None:
    checkout = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=False)
    if checkout.returncode != 0:
        pytest.skip(f"mtrl_ntk is not imported from a git checkout with a commit: "
                    f"{checkout.stderr.strip()}")
    git = collect_provenance([])["git"]
    assert HEX40.fullmatch(git["commit"])
    assert git["commit"] == checkout.stdout.strip()
    assert git["source"] == "git"
    assert isinstance(git["dirty"], bool)


@needs_git
def test_clean_tree_then_edits_then_untracked_files(repository: Path) -> None:
    state = git_state(repository)
    assert state["commit"] == _git(repository, "rev-parse", "HEAD")
    assert HEX40.fullmatch(state["commit"])
    assert state["dirty"] is False and state["reason"] is None

    (repository / "module.py").write_text("x = 2\n")
    assert git_state(repository)["dirty"] is True
    _git(repository, "checkout", "-q", "--", "module.py")
    assert git_state(repository)["dirty"] is False

    (repository / "new_module.py").write_text("y = 1\n")  # untracked code changes what runs
    assert git_state(repository)["dirty"] is True


@needs_git
def test_repository_without_a_commit_gives_null_and_reason(isolated: Path) -> None:
    _git(isolated, "init", "-q")
    state = git_state(isolated)
    assert state["commit"] is None and state["dirty"] is None
    assert "no commit" in state["reason"]


@needs_git
def test_package_in_an_ignored_folder_is_not_that_repositorys_code(repository: Path) -> None:
    (repository / ".gitignore").write_text(".venv/\n")
    installed = repository / ".venv" / "site-packages" / "mtrl_ntk"
    installed.mkdir(parents=True)
    state = git_state(installed)
    assert state["commit"] is None
    assert "ignored" in state["reason"]


def test_outside_a_repository_the_commit_is_null_with_a_reason(isolated: Path) -> None:
    state = git_state(isolated)
    assert state["commit"] is None and state["dirty"] is None and state["source"] is None
    assert GIT_COMMIT_ENV in state["reason"]


@pytest.mark.parametrize(("declared", "dirty"), [("ab" * 20, False), ("AB" * 20 + "-dirty", True)])
def test_outside_a_repository_the_declared_commit_is_used(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, declared: str, dirty: bool
) -> None:
    monkeypatch.setenv(GIT_COMMIT_ENV, declared)
    state = git_state(isolated)
    assert state["commit"] == "ab" * 20
    assert state["dirty"] is dirty
    assert state["source"] == f"env:{GIT_COMMIT_ENV}"


@pytest.mark.parametrize("declared", ["unknown", "abc123", "ab" * 20 + "-dirty-x"])
def test_a_malformed_declared_commit_is_rejected(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, declared: str
) -> None:
    monkeypatch.setenv(GIT_COMMIT_ENV, declared)
    state = git_state(isolated)
    assert state["commit"] is None
    assert "not a 40-hex commit" in state["reason"]


def test_without_git_the_declared_commit_still_counts(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(isolated))  # no git executable on PATH
    assert git_state(isolated)["reason"].startswith("git executable not found")
    monkeypatch.setenv(GIT_COMMIT_ENV, "cd" * 20)
    state = git_state(isolated)
    assert state["commit"] == "cd" * 20
    assert state["reason"].startswith("git executable not found")


def test_write_is_complete_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    path = write_provenance(run_dir, ["run_mt10.py", "seed=3"])
    assert path == run_dir / PROVENANCE_FILE
    assert [entry.name for entry in run_dir.iterdir()] == [PROVENANCE_FILE]
    record = json.loads(path.read_text())
    assert record["command"] == shlex.join([sys.executable, "run_mt10.py", "seed=3"])
    assert record == read_provenance(run_dir)
    assert "earlier_sessions" not in record


def test_a_resumed_run_keeps_its_earlier_sessions(tmp_path: Path) -> None:
    write_provenance(tmp_path, ["run_mt10.py", "seed=3"])
    write_provenance(tmp_path, ["run_mt10.py", "seed=3", "resume=true"])
    write_provenance(tmp_path, ["run_mt10.py", "seed=3", "resume=true", "again"])
    record = read_provenance(tmp_path)
    assert shlex.split(record["command"])[-1] == "again"
    earlier = [shlex.split(session["command"])[-1] for session in record["earlier_sessions"]]
    assert earlier == ["seed=3", "resume=true"]
    assert "earlier sessions of this run (resumed 2 time(s))" in format_provenance(record)


def test_a_corrupt_earlier_record_is_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / PROVENANCE_FILE).write_text("{half a rec")
    record = read_provenance(write_provenance(tmp_path, ["run_mt10.py"]))
    assert "not valid JSON" in record["earlier_sessions"][0]["unreadable_record"]


def test_format_shows_commit_versions_and_command() -> None:
    record = collect_provenance(["run_mt10.py", "combiner=ntkmtl"])
    text = format_provenance(record)
    assert record["command"] in text
    for name in TRACKED_PACKAGES:
        assert re.search(rf"^{re.escape(name)}\s+{re.escape(metadata.version(name))}$", text,
                         re.MULTILINE)
    if record["git"]["commit"]:
        assert record["git"]["commit"] in text
    assert ("WARNING: the source tree had uncommitted changes" in text) == bool(
        record["git"]["dirty"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtrl_ntk.provenance", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_prints_the_record_of_a_run_directory(tmp_path: Path) -> None:
    write_provenance(tmp_path, ["run_mt10.py", "combiner=ntkmtl", "seed=3"])
    done = _cli(str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == format_provenance(read_provenance(tmp_path))
    assert "run_mt10.py combiner=ntkmtl seed=3" in done.stdout


def test_cli_fails_clearly_when_the_record_is_missing(tmp_path: Path) -> None:
    done = _cli(str(tmp_path))
    assert done.returncode == 1
    assert f"no {PROVENANCE_FILE} in run directory {tmp_path}" in done.stderr
    assert done.stdout == ""

    done = _cli(str(tmp_path / "no-such-run"))
    assert done.returncode == 1
    assert "does not exist" in done.stderr


@pytest.mark.parametrize(("content", "message"), [
    ("{\"mtrl_ntk_version\": ", "not valid JSON"),
    ("[1, 2]", "not a provenance record"),
    ("\udcff", "cannot read"),
])
def test_cli_fails_clearly_when_the_record_is_corrupt(
    tmp_path: Path, content: str, message: str
) -> None:
    (tmp_path / PROVENANCE_FILE).write_bytes(content.encode("utf-8", "surrogateescape"))
    done = _cli(str(tmp_path))
    assert done.returncode == 1
    assert message in done.stderr
