"""Provenance of a run: which code, which libraries, which machine, which command.

The trainer calls `write_provenance(run_dir)` when a run starts (and again when it
resumes); `python -m mtrl_ntk.provenance RUN_DIR` prints the record for a person.
Together with the run's `config.yaml` and seed it answers "can I rerun exactly this?".

Where the source commit comes from, first match wins:
1. `git` run in the package's own directory (a source checkout or an editable
   install): the commit of HEAD and whether the tree had uncommitted changes,
   untracked files included (an untracked module can change what runs).
2. The environment variable `MTRL_NTK_GIT_COMMIT`, for installs without a
   repository (the Docker image gets it from the build argument `GIT_COMMIT`):
   a 40-hex commit, optionally suffixed `-dirty`.
3. Neither: commit and dirty flag are null, and `reason` says why.

A resumed run keeps the records of its earlier sessions under
`earlier_sessions`, so a run continued on another machine or commit says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import mtrl_ntk
from mtrl_ntk.atomic import write_text_atomically

PROVENANCE_FILE = "provenance.json"
GIT_COMMIT_ENV = "MTRL_NTK_GIT_COMMIT"

# Distributions whose versions decide what a run computes (importlib.metadata names).
TRACKED_PACKAGES = (
    "torch", "numpy", "metaworld", "mujoco", "gymnasium", "envpool", "hydra-core",
)

_COMMIT_PATTERN = re.compile(r"[0-9a-f]{40}")
_GIT_TIMEOUT_S = 10.0


class ProvenanceError(Exception):
    """A provenance file that is missing, unreadable, or not a provenance record."""


def _run_git(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(directory), *args],
        capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False,
    )


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "(no message)"


def _git_from_repository(directory: Path) -> tuple[dict[str, Any] | None, str]:
    """(state, "") when `directory` is inside a repository with a commit, else (None, why)."""
    try:
        top = _run_git(directory, "rev-parse", "--show-toplevel")
        if top.returncode != 0:
            return None, f"not a git checkout: {_first_line(top.stderr)}"
        # A package installed into an ignored folder of some repository (a .venv inside
        # a project) is not that repository's code: its HEAD would be a false answer.
        ignored = _run_git(directory, "check-ignore", "-q", ".")
        if ignored.returncode == 0:
            return None, f"package lies in a git-ignored path of {top.stdout.strip()}"
        head = _run_git(directory, "rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return None, f"repository {top.stdout.strip()} has no commit yet"
        status = _run_git(directory, "status", "--porcelain")
    except FileNotFoundError:
        return None, "git executable not found"
    except subprocess.TimeoutExpired:
        return None, f"git did not answer within {_GIT_TIMEOUT_S:.0f} s"
    state = {
        "commit": head.stdout.strip(),
        "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
        "source": "git",
        "repository": top.stdout.strip(),
        "reason": None,
    }
    return state, ""


def git_state(directory: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the source tree holding `directory` (default: this package).

    Returns {"commit": 40-hex str | None, "dirty": bool | None, "source": "git" |
    "env:MTRL_NTK_GIT_COMMIT" | None, "repository": str | None, "reason": str | None};
    `reason` explains every null.
    """
    directory = Path(mtrl_ntk.__file__).resolve().parent if directory is None else directory
    state, why_not_git = _git_from_repository(directory)
    if state is not None:
        return state
    declared = os.environ.get(GIT_COMMIT_ENV, "").strip().lower()
    if declared:
        commit, dirty_suffix, rest = declared.partition("-dirty")
        if _COMMIT_PATTERN.fullmatch(commit) and not rest:
            return {
                "commit": commit, "dirty": bool(dirty_suffix), "source": f"env:{GIT_COMMIT_ENV}",
                "repository": None, "reason": why_not_git,
            }
        why_not_git += f"; {GIT_COMMIT_ENV}={declared!r} is not a 40-hex commit[-dirty]"
    else:
        why_not_git += f"; {GIT_COMMIT_ENV} is not set"
    return {"commit": None, "dirty": None, "source": None, "repository": None,
            "reason": why_not_git}


def package_versions(names: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_info() -> dict[str, Any]:
    """The accelerator a run would use: the first CUDA device, else the CPU model."""
    import torch  # deferred: reading or printing a record must not need torch

    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(),
                            "torch_cuda": torch.version.cuda}
    if info["cuda_available"]:
        info.update(type="cuda", name=torch.cuda.get_device_name(0),
                    count=torch.cuda.device_count())
    else:
        info.update(type="cpu", name=_cpu_model(), count=os.cpu_count())
    return info


def collect_provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """Everything needed to tell how a run was produced (a JSON-serialisable dict).

    `argv` defaults to `sys.argv`; `command` is `sys.executable` followed by it,
    quoted with `shlex.join`, so `shlex.split(command)` gives the exact argument list
    back; it is meant to be run from `cwd`.
    """
    argv = list(sys.argv if argv is None else argv)
    return {
        "mtrl_ntk_version": mtrl_ntk.__version__,
        "git": git_state(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "device": device_info(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cwd": os.getcwd(),
        "command": shlex.join([sys.executable, *argv]),
    }


def read_provenance(path: Path | str) -> dict[str, Any]:
    """The record in `path` (a run directory or the provenance file itself).

    Raises ProvenanceError with a message for a person when it is missing or corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise ProvenanceError(f"{path} does not exist (expected a run directory)")
    file = path / PROVENANCE_FILE if path.is_dir() else path
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProvenanceError(
            f"no {PROVENANCE_FILE} in run directory {path} (the trainer writes it when a run "
            "starts)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ProvenanceError(f"cannot read {file}: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProvenanceError(f"{file} is not valid JSON ({error}); the file is corrupt") from None
    missing = [key for key in ("mtrl_ntk_version", "git", "command")
               if not isinstance(data, dict) or key not in data]
    if missing:
        raise ProvenanceError(f"{file} is not a provenance record (missing {', '.join(missing)})")
    return data


def write_provenance(run_dir: Path | str, argv: list[str] | None = None) -> Path:
    """Write `collect_provenance(argv)` to RUN_DIR/provenance.json atomically; return its path.

    Atomic: written to a temporary file in the same directory, fsynced, then renamed
    over the old file, so a crash leaves the old record or the new one, never half.
    An existing record (a resumed run) moves into `earlier_sessions`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / PROVENANCE_FILE
    record = collect_provenance(argv)
    earlier: list[dict[str, Any]] = []
    if target.exists():
        try:
            previous = read_provenance(target)
            earlier = list(previous.pop("earlier_sessions", []))
            earlier.append(previous)
        except ProvenanceError as error:
            earlier.append({"unreadable_record": str(error)})
    if earlier:
        record["earlier_sessions"] = earlier
    write_text_atomically(target, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return target


def _describe_git(git: dict[str, Any]) -> str:
    if not git.get("commit"):
        return f"unknown ({git.get('reason') or 'no reason recorded'})"
    tree = {True: "uncommitted changes", False: "clean", None: "state unknown"}[git.get("dirty")]
    return f"{git['commit']} ({tree}; from {git.get('source')})"


def format_provenance(data: dict[str, Any]) -> str:
    """A human-readable summary of a provenance record."""
    git = data.get("git") or {}
    device = data.get("device") or {}
    rows = [
        ("mtrl_ntk", str(data.get("mtrl_ntk_version"))),
        ("commit", _describe_git(git)),
        ("started", f"{data.get('timestamp_utc')} on {data.get('hostname')}"),
        ("device", f"{device.get('type', '?')}: {device.get('name', '?')}"
                   + (f" (CUDA {device['torch_cuda']})" if device.get("type") == "cuda" else "")),
        ("platform", str(data.get("platform"))),
        ("python", str(data.get("python"))),
    ]
    rows += [(name, version or "not installed")
             for name, version in (data.get("packages") or {}).items()]
    rows += [("cwd", str(data.get("cwd"))), ("command", str(data.get("command")))]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    if git.get("dirty"):
        lines.append("WARNING: the source tree had uncommitted changes; "
                     "its commit alone does not reproduce this run.")
    earlier = data.get("earlier_sessions") or []
    if earlier:
        lines.append(f"earlier sessions of this run (resumed {len(earlier)} time(s)):")
        for session in earlier:
            if "unreadable_record" in session:
                lines.append(f"  - unreadable record: {session['unreadable_record']}")
                continue
            lines.append(f"  - {session.get('timestamp_utc')} on {session.get('hostname')}, "
                         f"commit {_describe_git(session.get('git') or {})}")
        if {(s.get("git") or {}).get("commit") for s in earlier} != {git.get("commit")}:
            lines.append("WARNING: sessions of this run ran different (or unknown) commits.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtrl_ntk.provenance",
        description="Print the provenance record (provenance.json) of a run directory.",
    )
    parser.add_argument("run_dir", type=Path, help="a run directory, or a provenance.json file")
    args = parser.parse_args(argv)
    try:
        data = read_provenance(args.run_dir)
    except ProvenanceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_provenance(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
