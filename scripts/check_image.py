"""Build the training image with podman and train in it: the README's Docker section, run for real.

    python scripts/check_image.py                       # build, smoke run, checks; prints timings
    python scripts/check_image.py --runs-dir /tmp/runs  # keep the runs somewhere to look at
    python scripts/check_image.py --base-only           # only make the base image available

Steps, each checked from the host (any failure exits with status 1 and says which):

1. the base image ``python:3.11-slim-bookworm``: used if podman has it; else, since this
   machine reaches no registry, a local stand-in is made once and kept in podman's storage
   (a Debian bookworm root file system by ``debootstrap`` from the Debian archive, with
   Python 3.11 and pip set up as the official image has them: ``python`` and ``pip`` on the
   PATH, pip allowed to install as root, no apt lists), imported under the same name;
2. the image, from the repository's Dockerfile, with the commit as ``GIT_COMMIT``. By default
   with the CPU lock (``--build-arg REQUIREMENTS=requirements.lock``) and a CPU build of
   torch 2.13.0 from pip's ``find-links`` (mounted into the build): the CUDA lock's wheels
   (~4 GB) make the default CUDA image impractical to build on every CI run. ``--cuda``
   builds the users' default instead. Where the host's pip trusts a CA of its own (pip's
   ``cert`` setting, e.g. a TLS-inspecting proxy), that bundle is mounted for the build;
3. ``experiment=smoke`` in a container as the image's non-root user, a host directory as the
   ``/runs`` volume: the run directory, ``result.json``, ``provenance.json`` with the commit,
   the TensorBoard files, files owned by the image's user and usable by the host's;
4. the report (``scripts/summarize.py``) inside the image on those runs;
5. the same command again: it skips the finished run;
6. a second run stopped by SIGTERM (``podman kill``) after its first evaluation: it
   checkpoints, exits with status 143 and the resume hint; ``resume=true`` finishes it with
   every evaluation step logged once.

podman runs rootful here with runtime ``runc`` when installed (``crun`` refuses hybrid
cgroups v1/v2 hosts), the host's network (no bridge or slirp needed) and file and process
limits of 1024 and 4096 within the host's hard limits (podman's defaults can exceed a machine's
hard limits, and then nothing starts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"  # the Dockerfile's FROM, fully named
STAND_IN_LABEL = "org.mtrl-ntk.stand-in"  # set on a local stand-in, never on the real image
DEFAULT_IMAGE = "localhost/mtrl-ntk:check"
IMAGE_UID = 1000  # the Dockerfile's USER
DEBIAN_MIRROR = os.environ.get("MTRL_NTK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TORCH_CPU_WHEEL = "torch-2.13.0+cpu-cp311-*.whl"
SMOKE = ["experiment=smoke", "train.progress_bar=false"]
EVALUATION_STEPS = [100, 200, 300]  # experiment=smoke
EXIT_SIGTERM = 128 + signal.SIGTERM

# The official image's apt sources (deb822), which debootstrap does not write.
DEBIAN_SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# The official image's metadata (docker inspect python:3.11-slim-bookworm).
BASE_CHANGES = [
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "ENV PYTHON_VERSION=3.11",
    'CMD ["python3"]',
    f"LABEL {STAND_IN_LABEL}=debootstrap",
]
# Debian's Python 3.11 made to look like the official image's /usr/local one.
PYTHON_LIKE_THE_OFFICIAL_IMAGE = """
set -e
rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED          # pip installs as root, as in the image
ln -sf /usr/bin/python3 /usr/local/bin/python
ln -sf /usr/bin/python3 /usr/local/bin/python3
ln -sf /usr/bin/pip3 /usr/local/bin/pip
ln -sf /usr/bin/pip3 /usr/local/bin/pip3
rm -f /etc/apt/sources.list
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/*
"""


class CheckFailed(RuntimeError):
    """A step of the check failed; the message says which and why."""


def log(message: str) -> None:
    print(f"check_image: {message}", file=sys.stderr, flush=True)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def missing_tools() -> list[str]:
    """The host programs the check needs and does not find (empty: it can run)."""
    tools = ["podman"] + ([] if podman_has_base() else ["debootstrap"])
    return [tool for tool in tools if shutil.which(tool) is None]


def podman() -> list[str]:
    """podman with this machine's runtime: runc where installed (crun fails on hybrid cgroups)."""
    runtime = os.environ.get("MTRL_NTK_PODMAN_RUNTIME") or ("runc" if shutil.which("runc") else "")
    return ["podman", *(["--runtime", runtime] if runtime else [])]


def container_limits() -> list[str]:
    """File and process limits within the host's hard limits (podman's defaults can exceed them,
    and then runc cannot start a container: "error setting rlimits")."""
    options = []
    for name, limit, wanted in (("nofile", resource.RLIMIT_NOFILE, 1024),
                                ("nproc", resource.RLIMIT_NPROC, 4096)):
        hard = resource.getrlimit(limit)[1]
        value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        options += ["--ulimit", f"{name}={value}:{value}"]
    return options


def run(command: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                          check=False, **kwargs)


def podman_has_base() -> bool:
    if shutil.which("podman") is None:
        return False
    return run(["podman", "image", "exists", BASE_IMAGE], timeout=60).returncode == 0


def make_base_stand_in() -> None:
    """debootstrap bookworm + Python 3.11 and pip, imported as python:3.11-slim-bookworm."""
    with tempfile.TemporaryDirectory(prefix="mtrl-ntk-base-") as work:
        rootfs = Path(work) / "rootfs"
        done = run(["debootstrap", "--variant=minbase",
                    "--include=python3,python3-pip,ca-certificates",
                    "bookworm", str(rootfs), DEBIAN_MIRROR], timeout=1800)
        require(done.returncode == 0, f"debootstrap failed:\n{done.stdout[-3000:]}{done.stderr}")
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(DEBIAN_SOURCES)
        done = run(["chroot", str(rootfs), "/bin/sh", "-c", PYTHON_LIKE_THE_OFFICIAL_IMAGE],
                   timeout=300)
        require(done.returncode == 0, f"setting up Python in the stand-in failed:\n{done.stderr}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                               stdout=subprocess.PIPE)
        changes = [argument for change in BASE_CHANGES for argument in ("--change", change)]
        done = run(["podman", "import", *changes, "-", BASE_IMAGE], timeout=600, stdin=tar.stdout)
        tar.wait()
        require(done.returncode == 0 and tar.returncode == 0,
                f"podman import of the stand-in failed:\n{done.stderr}")


def ensure_base() -> str:
    """Make the base image available; says which one the build uses."""
    if podman_has_base():
        labels = run(["podman", "image", "inspect", "--format", "{{json .Labels}}", BASE_IMAGE],
                     timeout=60).stdout
        return "local stand-in (cached)" if STAND_IN_LABEL in labels else "the official image"
    log(f"{BASE_IMAGE} not in podman's storage and no registry assumed: making a stand-in "
        f"with debootstrap from {DEBIAN_MIRROR}")
    make_base_stand_in()
    return "local stand-in (made now)"


def pip_setting(name: str) -> list[str]:
    """A setting of the host's pip configuration (environment, then config files)."""
    values = os.environ.get(f"PIP_{name.upper().replace('-', '_')}", "").split()
    listed = run([sys.executable, "-m", "pip", "config", "list"], timeout=60).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(f".{name}"):
            values += value.strip("'\"").split()
    return [value.removeprefix("file://") for value in values if value]


def pip_find_links() -> list[Path]:
    return [Path(value) for value in pip_setting("find-links")]


def host_ca_bundle() -> Path | None:
    """The CA bundle the host's pip is told to trust (``cert``: a TLS-inspecting proxy's CA),
    which the build's pip then needs as well."""
    bundles = [Path(value) for value in pip_setting("cert") if Path(value).is_file()]
    return bundles[0] if bundles else None


def torch_cpu_wheels() -> Path | None:
    """A directory holding the CPU build of torch 2.13.0 for CPython 3.11, if one is at hand."""
    explicit = os.environ.get("MTRL_NTK_TORCH_WHEELS")
    for directory in ([Path(explicit)] if explicit else pip_find_links()):
        if directory.is_dir() and list(directory.glob(TORCH_CPU_WHEEL)):
            return directory
    return None


def git_commit() -> str:
    """The commit as the Dockerfile asks for it: 40 hex, "-dirty" for uncommitted changes."""
    head = run(["git", "rev-parse", "HEAD"], timeout=60, cwd=ROOT)
    require(head.returncode == 0, f"not a git checkout: {head.stderr}")
    dirty = run(["git", "status", "--porcelain"], timeout=60, cwd=ROOT).stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def build(image: str, commit: str, cuda: bool) -> None:
    """podman build of the repository's Dockerfile (the layer cache makes a rebuild quick)."""
    arguments = ["--build-arg", f"GIT_COMMIT={commit}"]
    if not cuda:
        arguments += ["--build-arg", "REQUIREMENTS=requirements.lock"]
        wheels = torch_cpu_wheels()
        if wheels is not None:  # no download of torch: mounted for the RUN steps only
            arguments += ["--volume", f"{wheels}:/wheels:ro",
                          "--build-arg", "PIP_FIND_LINKS=/wheels"]
        else:
            arguments += ["--build-arg",
                          "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"]
    bundle = host_ca_bundle()
    if bundle is not None:  # Debian's pip (the stand-in's) trusts the system bundle
        arguments += ["--volume", f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro"]
    command = [*podman(), "build", "--pull=never", "--network", "host", *container_limits(),
               *arguments, "--tag", image, "--file", str(ROOT / "Dockerfile"), str(ROOT)]
    previous = image_id(image)
    log("+ " + " ".join(command))
    done = subprocess.run(command, timeout=3600, check=False)
    require(done.returncode == 0, f"podman build failed (status {done.returncode})")
    if previous and previous != image_id(image):  # the last check's image, now untagged
        run(["podman", "image", "rm", previous], timeout=300)  # its shared layers stay


def image_id(image: str) -> str:
    """The image's id ("" when podman has none of that name)."""
    found = run(["podman", "image", "inspect", "--format", "{{.Id}}", image], timeout=60)
    return found.stdout.strip() if found.returncode == 0 else ""


def container(image: str, runs_dir: Path, arguments: Sequence[str], *, entrypoint: str = "",
              detach_name: str = "") -> list[str]:
    """The podman run command: image's user, runs_dir as /runs, host network and limits."""
    command = [*podman(), "run", "--network", "host", *container_limits(),
               "--volume", f"{runs_dir}:/runs"]
    command += ["--name", detach_name, "--detach"] if detach_name else ["--rm"]
    command += ["--entrypoint", entrypoint] if entrypoint else []
    return [*command, image, *arguments]


def run_in_image(image: str, runs_dir: Path, arguments: Sequence[str], timeout: float,
                 entrypoint: str = "") -> subprocess.CompletedProcess[str]:
    command = container(image, runs_dir, arguments, entrypoint=entrypoint)
    log("+ " + " ".join(command))
    return run(command, timeout=timeout)


def read_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def check_run_dir(run_dir: Path, commit: str) -> dict:
    """What the host sees of a finished run; returns its result.json."""
    require(run_dir.is_dir(), f"no run directory {run_dir}")
    result = json.loads((run_dir / "result.json").read_text())
    provenance = json.loads((run_dir / "provenance.json").read_text())
    require(provenance["git"]["commit"] == commit.removesuffix("-dirty"),
            f"provenance.json records commit {provenance['git']} instead of {commit}")
    require(provenance["git"]["source"] == "env:MTRL_NTK_GIT_COMMIT",
            f"provenance.json did not take the commit from the image: {provenance['git']}")
    require(provenance["git"]["dirty"] == commit.endswith("-dirty"),
            f"provenance.json's dirty flag {provenance['git']} does not match {commit}")
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    require(bool(events) and all(event.stat().st_size > 0 for event in events),
            f"no TensorBoard event file in {run_dir / 'tb'}")
    require(read_steps(run_dir) == EVALUATION_STEPS,
            f"metrics.jsonl steps {read_steps(run_dir)} instead of {EVALUATION_STEPS}")
    for path in [run_dir, *run_dir.rglob("*")]:
        status = path.stat()
        require(status.st_uid == IMAGE_UID, f"{path} belongs to uid {status.st_uid}, "
                f"not the image's user {IMAGE_UID}")
        require(os.access(path, os.R_OK | os.W_OK), f"the host user cannot use {path}")
    return result


def prepare_runs_dir(runs_dir: Path) -> None:
    """The volume the image's user writes: as root, hand it to that user (as `chown` would for
    a service account); a non-root host user runs rootless podman, which maps its own uid."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(runs_dir, IMAGE_UID, IMAGE_UID)


def check(image: str, runs_dir: Path, commit: str, summary: dict[str, object]) -> None:
    """Steps 3-6 of the module docstring; the numbers go to ``summary``."""
    prepare_runs_dir(runs_dir)
    started = time.monotonic()
    first = run_in_image(image, runs_dir, [*SMOKE, "combiner=ls", "seed=0"], timeout=900)
    summary["smoke_run_s"] = round(time.monotonic() - started, 1)
    require(first.returncode == 0, f"experiment=smoke failed in the image:\n{first.stderr[-4000:]}")
    run_dir = runs_dir / "smoke" / "ls" / "seed0"
    result = check_run_dir(run_dir, commit)
    summary["smoke_result"] = {key: value for key, value in sorted(result.items())
                               if key.startswith("eval/success")}

    report = run_in_image(image, runs_dir, ["scripts/summarize.py", "/runs", "--out",
                                            "/runs/report"], timeout=300, entrypoint="python")
    require(report.returncode == 0, f"summarize.py failed in the image:\n{report.stderr[-3000:]}")
    table = runs_dir / "report" / "summary.md"
    require(table.exists() and "| ls / " in table.read_text(),
            f"the report made in the image does not list the run:\n{report.stderr[-3000:]}")
    summary["report"] = table.read_text()

    again = run_in_image(image, runs_dir, [*SMOKE, "combiner=ls", "seed=0"], timeout=300)
    require(again.returncode == 0 and "already holds a finished run: skipped" in again.stderr,
            f"the second identical run did not skip the finished one:\n{again.stderr[-3000:]}")
    require(read_steps(run_dir) == EVALUATION_STEPS, "the skipped run changed metrics.jsonl")

    started = time.monotonic()
    summary["sigterm"] = sigterm_then_resume(image, runs_dir, commit)
    summary["sigterm_and_resume_s"] = round(time.monotonic() - started, 1)


def sigterm_then_resume(image: str, runs_dir: Path, commit: str) -> str:
    """Step 6: SIGTERM to the container after its first evaluation, then resume=true."""
    name = f"mtrl-ntk-check-{os.getpid()}"
    arguments = [*SMOKE, "combiner=ls", "seed=1"]
    run_dir = runs_dir / "smoke" / "ls" / "seed1"
    started = run(container(image, runs_dir, arguments, detach_name=name), timeout=120)
    require(started.returncode == 0, f"podman run --detach failed:\n{started.stderr}")
    try:
        deadline = time.monotonic() + 600
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # the first evaluation (step 100) is written
        require((run_dir / "metrics.jsonl").exists(), "the run never reached its first evaluation")
        run([*podman(), "kill", "--signal", "TERM", name], timeout=60)
        status = run([*podman(), "wait", name], timeout=600).stdout.strip()
        logs = run([*podman(), "logs", name], timeout=60).stderr
    finally:
        run([*podman(), "rm", "--force", name], timeout=120)
    require(status == str(EXIT_SIGTERM), f"the stopped run exited with {status}, not "
            f"{EXIT_SIGTERM}:\n{logs[-3000:]}")
    line = next((line for line in logs.splitlines() if "interrupted by SIGTERM" in line), "")
    require("Resume with: " in line, f"no resume hint in the log:\n{logs[-3000:]}")
    step = int(line.split("at step ")[1].split(";")[0])
    require((run_dir / "checkpoints" / f"step-{step:012d}.pt").exists(),
            f"no checkpoint at step {step}")
    resumed = run_in_image(image, runs_dir, [*arguments, "resume=true"], timeout=900)
    require(resumed.returncode == 0, f"resume=true failed in the image:\n{resumed.stderr[-3000:]}")
    check_run_dir(run_dir, commit)  # every evaluation step exactly once
    return line.strip()


def image_size(image: str) -> str:
    return run(["podman", "image", "inspect", "--format", "{{.Size}}", image], timeout=60).stdout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="tag of the image built")
    parser.add_argument("--runs-dir", type=Path, help="host directory mounted as /runs "
                        "(default: a temporary one, removed afterwards)")
    parser.add_argument("--cuda", action="store_true", help="build the default CUDA image "
                        "(requirements-cuda.lock, ~4 GB of wheels) instead of the CPU one")
    parser.add_argument("--base-only", action="store_true", help="only make the base available")
    parser.add_argument("--build-only", action="store_true", help="build, do not run")
    parser.add_argument("--json", type=Path, help="write the timings and results here")
    args = parser.parse_args(argv)
    missing = missing_tools()
    if missing:
        log(f"cannot run: {', '.join(missing)} not installed "
            "(Debian: apt-get install podman runc debootstrap)")
        return 2
    summary: dict[str, object] = {}
    try:
        started = time.monotonic()
        summary["base"] = ensure_base()
        summary["base_s"] = round(time.monotonic() - started, 1)
        if args.base_only:
            return 0
        commit = git_commit()
        started = time.monotonic()
        build(args.image, commit, args.cuda)
        summary["build_s"] = round(time.monotonic() - started, 1)
        summary["image_size_bytes"] = int(image_size(args.image) or 0)
        summary["commit"] = commit
        if not args.build_only:
            with tempfile.TemporaryDirectory(prefix="mtrl-ntk-runs-") as temporary:
                runs_dir = (args.runs_dir or Path(temporary) / "runs").resolve()
                check(args.image, runs_dir, commit, summary)
    except (CheckFailed, subprocess.TimeoutExpired) as error:
        log(f"FAILED: {error}")
        return 1
    finally:
        report = summary.pop("report", "")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        log(json.dumps(summary, indent=2))
        if report:
            print(report)
    log("image built and trained in: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
