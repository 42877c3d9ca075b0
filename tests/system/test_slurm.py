"""Sweeps through a real SLURM cluster (tests/system/slurm_cluster.py): sbatch via submitit,
job arrays and seed groups, a preempted job and a time-limit warning, resumed by submitting
the sweep again.

What the cluster showed (configs/hydra/launcher/slurm.yaml says the same):
- submitit installs its handlers first (SIGUSR2: checkpoint-and-requeue, SIGTERM: logged and
  ignored); the trainer's StopSignals replaces them while it trains, so SIGUSR2 (SLURM's
  warning ``signal_delay_s`` before the time limit) and SIGTERM (preemption, ``scontrol
  requeue``) make the run checkpoint at its next episode end and exit with 128 + signal and
  the resume hint in the job's log; submitit's requeue (``max_num_timeout``) never runs
  during training;
- after SIGUSR2 the job ends FAILED (sacct ExitCode 12:0: srun reports the signal of the
  task's status 140) and the sweep command names it; ``scontrol requeue`` (REQUEUED) runs the
  job again, after SLURM's hold (Reason=BeginTime), with the sweep's own overrides, which
  continue the run only if the sweep was submitted with ``resume=true``;
- the sweep command returns once every job wrote its result, before SLURM and its
  accounting saw the last job end;
- submitting the sweep again with ``resume=true`` continues the stopped runs and skips the
  finished ones.

Skips without root or without slurm-wlm, slurmdbd, munge and mariadb-server installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.system.slurm_cluster import PARTITION, LocalSlurm, why_not_available

ROOT = Path(__file__).resolve().parents[2]
EVALUATION_STEPS = [100, 200, 300]  # experiment=smoke
# What this cluster has: no GPU, 1 CPU and 1 GB per job (two jobs at a time on two cores).
RESOURCES = ["hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}",
             "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=30"]
SMOKE = ["experiment=smoke", "seed=0..1", "train.progress_bar=false"]
COMBINERS = ["ls", "ntkmtl"]  # the seed-group sweep's job order
COMBINERS_SWEPT = "combiner=" + ",".join(COMBINERS)

UNAVAILABLE = why_not_available()
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no local SLURM cluster: {UNAVAILABLE}"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as started:
        yield started


def sweep_env(cluster: LocalSlurm, runs: Path) -> dict[str, str]:
    return {**cluster.env, "MTRL_NTK_RUNS_DIR": str(runs), "PYTHONPATH": str(ROOT)}


def submit(cluster: LocalSlurm, runs: Path, *overrides: str,
           timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """The sweep command; it returns once every job of the sweep has ended."""
    return subprocess.run(
        [sys.executable, "run_mt10.py", "-m", *RESOURCES, *SMOKE, *overrides], cwd=ROOT,
        env=sweep_env(cluster, runs), capture_output=True, text=True, timeout=timeout,
        check=False,
    )


def job_ids(runs: Path) -> list[str]:
    """The sweep's SLURM job ids (<array>_<task>), in the sweep's job order."""
    folders = [path.name for path in (runs / "smoke" / ".submitit").glob("*_*")
               if re.fullmatch(r"\d+_\d+", path.name)]
    return sorted(folders, key=lambda name: [int(part) for part in name.split("_")])


def states(cluster: LocalSlurm, jobs: list[str]) -> dict[str, list[str]]:
    """Every state each job went through (a requeued job has one row per run)."""
    rows = cluster._run("sacct", "--duplicates", "-X", "-n", "-P", "-o", "JobID,State,ExitCode",
                        "-j", ",".join(jobs)).stdout.split()
    found: dict[str, list[str]] = {}
    for row in rows:
        job, state, exit_code = row.split("|")
        found.setdefault(job, []).append(f"{state.split()[0]} {exit_code}")
    return found


def wait_for_jobs_to_end(cluster: LocalSlurm, runs: Path, timeout: float = 600) -> None:
    """Until no job is queued and accounting (slurmdbd, updated asynchronously) agrees."""
    deadline = time.monotonic() + timeout
    running = {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD"}
    while (cluster._run("squeue", "-h").stdout.strip()
           or any(history[-1].split()[0] in running
                  for history in states(cluster, job_ids(runs)).values())):
        assert time.monotonic() < deadline, cluster._run("squeue").stdout
        time.sleep(1)


def release_when_held(cluster: LocalSlurm, job: str, timeout: float = 300) -> None:
    """SLURM holds a requeued job (Reason=BeginTime) for a while before it may start again; a
    test does not wait: while it is held, its start time becomes now (again: the hold is set
    anew once the stopped run has ended)."""
    deadline = time.monotonic() + timeout
    restarted = False
    while time.monotonic() < deadline:
        shown = cluster._run("scontrol", "show", "job", job).stdout
        if "JobState=PENDING" in shown and "Reason=BeginTime" in shown:
            cluster._run("scontrol", "update", f"JobId={job}", "StartTime=now")
            restarted = True
        elif restarted and "JobState=PENDING" not in shown:
            return  # running again (or done)
        time.sleep(1)
    raise AssertionError(f"{job} was not requeued and started again:\n{shown}")


def read_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]


def tensorboard_steps(run_dir: Path, tag: str = "eval/success_mean") -> list[int]:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def assert_finished_once(run_dir: Path) -> None:
    """result.json, and every evaluation step logged exactly once (file and TensorBoard)."""
    assert json.loads((run_dir / "result.json").read_text())["step"] == EVALUATION_STEPS[-1]
    assert read_steps(run_dir) == EVALUATION_STEPS
    assert tensorboard_steps(run_dir) == EVALUATION_STEPS


def job_log(runs: Path, job: str) -> str:
    return "".join(path.read_text(errors="replace")
                   for path in (runs / "smoke" / ".submitit" / job).glob("*_log.err"))


@pytest.mark.slow
def test_a_job_array_sweep_runs_through_sbatch_into_the_local_sweeps_directories(
    cluster: LocalSlurm, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    done = submit(cluster, runs, "combiner=ls", "seed_group=false")  # one job per seed
    assert done.returncode == 0, done.stderr[-4000:] + cluster.logs()
    wait_for_jobs_to_end(cluster, runs)  # submitit returns once a job wrote its result
    jobs = job_ids(runs)
    assert len(jobs) == 2 and len({job.split("_")[0] for job in jobs}) == 1  # one array
    assert all(history == ["COMPLETED 0:0"] for history in states(cluster, jobs).values())
    for seed in (0, 1):
        assert_finished_once(runs / "smoke" / "ls" / f"seed{seed}")

    # The same run, launched locally: same directory, same files, same numbers.
    local = tmp_path / "local"
    done_locally = subprocess.run(
        [sys.executable, "run_mt10.py", "experiment=smoke", "combiner=ls", "seed=1",
         "train.progress_bar=false"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "MTRL_NTK_RUNS_DIR": str(local)}, timeout=600, check=False)
    assert done_locally.returncode == 0, done_locally.stderr[-3000:]
    slurm_run, local_run = runs / "smoke/ls/seed1", local / "smoke/ls/seed1"

    def files(run_dir: Path) -> set[str]:
        return {str(path.relative_to(run_dir)) for path in run_dir.rglob("*")
                if "tfevents" not in path.name and path.parts[-2:-1] != (".hydra",)}

    assert files(slurm_run) == files(local_run)
    assert ([{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
             for line in (slurm_run / "metrics.jsonl").open()]
            == [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                for line in (local_run / "metrics.jsonl").open()])

    report = subprocess.run([sys.executable, "scripts/summarize.py", str(runs)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "2 runs, 1 methods" in report.stdout + report.stderr
    assert "| ls / " in (runs / "report" / "summary.md").read_text()


@pytest.mark.slow
def test_a_preempted_and_a_warned_seed_group_checkpoint_and_the_resubmitted_sweep_finishes(
    cluster: LocalSlurm, tmp_path: Path
) -> None:
    """Job 0 gets SIGUSR2 as SLURM sends it ``signal_delay_s`` before the time limit (to the
    job step's processes: ``scancel --signal=USR2``); job 1 is requeued (``scontrol
    requeue``: SIGTERM, then the job runs again)."""
    runs = tmp_path / "runs"
    sweep = subprocess.Popen(
        [sys.executable, "run_mt10.py", "-m", *RESOURCES, *SMOKE, COMBINERS_SWEPT, "resume=true"],
        cwd=ROOT,
        env=sweep_env(cluster, runs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        signalled: dict[str, str] = {}
        deadline = time.monotonic() + 600
        while len(signalled) < 2 and time.monotonic() < deadline:
            jobs = job_ids(runs)
            for job, combiner in zip(jobs, COMBINERS):
                if job in signalled or not (runs / "smoke" / combiner / "seed0" /
                                            "metrics.jsonl").exists():
                    continue  # signal each job once its first evaluation is written
                command = (["scancel", "--signal=USR2", job] if combiner == "ls"
                           else ["scontrol", "requeue", job])
                done = cluster._run(*command)
                assert done.returncode == 0, done.stderr
                signalled[job] = command[0]
            time.sleep(0.1)
        assert len(signalled) == 2, "the jobs never reached their first evaluation"
        requeued = next(job for job, command in signalled.items() if command == "scontrol")
        release_when_held(cluster, requeued)
        _, stderr = sweep.communicate(timeout=900)
    finally:
        sweep.kill()
    wait_for_jobs_to_end(cluster, runs)
    warned, requeued = job_ids(runs)
    history = states(cluster, [warned, requeued])
    # The warned job checkpointed and stopped: FAILED (srun's exit code of a task that exited
    # with 128 + SIGUSR2 is the signal's number, 12), the resume hint in its log.
    assert history[warned] == ["FAILED 12:0"], history
    log = job_log(runs, warned)
    assert "interrupted by SIGUSR2" in log and "Resume with: " in log, log[-3000:]
    assert sweep.returncode != 0 and warned in stderr  # the sweep command names it
    for seed in (0, 1):
        run_dir = runs / "smoke" / "ls" / f"seed{seed}"
        assert not (run_dir / "result.json").exists()
        assert list((run_dir / "checkpoints").glob("step-*.pt")), "no checkpoint"
    # The requeued job checkpointed on SIGTERM, ran again and (resume=true) finished the runs.
    assert history[requeued][0].startswith("REQUEUED") and history[requeued][-1] == "COMPLETED 0:0"
    log = job_log(runs, requeued)
    assert "interrupted by SIGTERM" in log, log[-3000:]
    for seed in (0, 1):
        assert_finished_once(runs / "smoke" / "ntkmtl" / f"seed{seed}")

    again = submit(cluster, runs, COMBINERS_SWEPT, "resume=true")
    assert again.returncode == 0, again.stderr[-4000:]
    wait_for_jobs_to_end(cluster, runs)
    resubmitted = [job for job in job_ids(runs) if job not in (warned, requeued)]
    assert all(states(cluster, resubmitted)[job] == ["COMPLETED 0:0"] for job in resubmitted)
    assert "already holds a finished run: skipped" in job_log(runs, resubmitted[1])
    for combiner in COMBINERS:
        for seed in (0, 1):
            assert_finished_once(runs / "smoke" / combiner / f"seed{seed}")
    print(cluster.sacct(*(job.split("_")[0] for job in job_ids(runs))))
