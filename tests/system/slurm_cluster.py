"""A real single-node SLURM cluster on localhost, for the sweep tests (and by hand).

    python tests/system/slurm_cluster.py start /tmp/slurm   # prints: export SLURM_CONF=...
    python tests/system/slurm_cluster.py stop /tmp/slurm

Everything lives in one directory: configuration, state, logs, the munge key and socket,
the accounting database; munged uses munge's own key and default socket (a munged already
running there is used as it is). The daemons run in the foreground as children of this process
(``munged -F``, ``mariadbd``, ``slurmdbd -D``, ``slurmctld -D``, ``slurmd -D``), listen on
free ports of 127.0.0.1, and are stopped by their process ids, newest first. Nothing is
written to /etc: clients find the cluster through ``SLURM_CONF``.

Accounting (slurmdbd on MariaDB) is not optional: submitit, which the launcher
``hydra/launcher=slurm`` submits through, asks ``sacct`` for the state of every job, and a
job that ends without a result (failed, preempted) is otherwise never seen to end.

One partition ``debug`` holds the node with the machine's cores and memory. Processes are
tracked without cgroups (``proctrack/linuxproc``, ``task/none``), so the cluster also runs
in a container. Root only (``SlurmUser=root``): CI and the tests run as root; others skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PARTITION = "debug"
CLUSTER = "mtrlntk"
KILL_WAIT_S = 30  # SLURM's default: SIGTERM, then SIGKILL this much later
DEBIAN_PACKAGES = ["slurm-wlm", "slurmdbd", "munge", "mariadb-server"]
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")  # munge's default, compiled into libmunge
MUNGE_KEY = Path("/etc/munge/munge.key")


def missing_programs() -> list[str]:
    programs = ["munged", "munge", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld",
                "slurmd", "sbatch", "sacct", "sacctmgr"]
    return [program for program in programs if shutil.which(program) is None]


def why_not_available() -> str | None:
    """Why no cluster can be started here (None: it can)."""
    if sys.platform != "linux":
        return "a local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    missing = missing_programs()
    if missing:
        return (f"{', '.join(missing)} not installed "
                f"(Debian: apt-get install {' '.join(DEBIAN_PACKAGES)})")
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 9 // 10  # leave 10% to the system
    raise RuntimeError("no MemTotal in /proc/meminfo")


class LocalSlurm:
    """Start with ``start()``, stop with ``stop()`` (also a context manager)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory).resolve()
        self.conf = self.directory / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.memory_mb = _memory_mb()
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client (sbatch, sacct, the launcher)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- files ----------------------------------------------------------------------------

    def _write_config(self) -> None:
        d = self.directory
        for sub in ("state", "spool", "log", "db"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        ports = {name: _free_port() for name in ("ctld", "slurmd", "dbd", "mysql")}
        (d / "ports.json").write_text(json.dumps(ports))
        self.conf.write_text(f"""\
ClusterName={CLUSTER}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ports["ctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={d / "log" / "slurmctld.log"}
SlurmdLogFile={d / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports["dbd"]}
JobRequeue=1
KillWait={KILL_WAIT_S}
MinJobAge=60
ReturnToService=2
MailProg=/bin/true
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        dbd = d / "slurmdbd.conf"
        dbd.write_text(f"""\
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports["dbd"]}
SlurmUser=root
PidFile={d / "slurmdbd.pid"}
LogFile={d / "log" / "slurmdbd.log"}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["mysql"]}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)

    # -- daemons --------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.directory / "log" / f"{name}.out").open("ab")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env=self.env, start_new_session=True)
        self.processes.append(process)
        (self.directory / "pids").write_text(
            "\n".join(str(p.pid) for p in self.processes) + "\n")

    def _wait(self, what: str, ready, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"a daemon died while waiting for {what}: "
                                   f"see {self.directory / 'log'}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def _run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(command), capture_output=True, text=True, env=self.env,
                              timeout=timeout, check=False)

    def _mysql(self, sql: str) -> subprocess.CompletedProcess[str]:
        return self._run("mariadb", f"--socket={self.directory / 'db' / 'mysql.sock'}",
                         "--user=root", "-e", sql)

    def _start_munge(self) -> None:
        """munged at its default socket, which every SLURM client and daemon asks (a slurm.conf
        ``AuthInfo=socket=`` reaches the daemons but not sacctmgr's connection to slurmdbd).
        A munged already serving it (a machine's own) is used as it is."""
        if self._run("munge", "-n").returncode == 0:
            return
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        if not MUNGE_KEY.exists():  # the Debian package makes one; a fresh random one if not
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(128))
            MUNGE_KEY.chmod(0o400)
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={MUNGE_KEY}",
                               f"--socket={MUNGE_SOCKET}",
                               f"--pid-file={self.directory / 'munged.pid'}",
                               f"--log-file={self.directory / 'log' / 'munged.log'}",
                               f"--seed-file={self.directory / 'munged.seed'}"])
        self._wait("munged", lambda: self._run("munge", "-n").returncode == 0)

    def start(self) -> LocalSlurm:
        reason = why_not_available()
        if reason:
            raise RuntimeError(f"no local SLURM cluster: {reason}")
        d = self.directory
        self._write_config()
        ports = json.loads((d / "ports.json").read_text())
        try:
            self._start_munge()
            datadir = d / "db" / "data"
            if not datadir.exists():
                done = self._run("mariadb-install-db", f"--datadir={datadir}", "--user=root",
                                 "--auth-root-authentication-method=socket", timeout=300)
                if done.returncode != 0:
                    raise RuntimeError(f"mariadb-install-db failed:\n{done.stdout}{done.stderr}")
            self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={datadir}",
                                     "--user=root", f"--socket={d / 'db' / 'mysql.sock'}",
                                     "--bind-address=127.0.0.1", f"--port={ports['mysql']}",
                                     f"--pid-file={d / 'db' / 'mariadbd.pid'}",
                                     "--innodb-buffer-pool-size=64M"])
            self._wait("mariadbd", lambda: self._mysql("SELECT 1").returncode == 0)
            # the anonymous ''@localhost of a fresh database would shadow a 'slurm'@'%'
            users = ("'slurm'@'localhost'", "'slurm'@'127.0.0.1'")
            done = self._mysql(" ".join(
                f"CREATE USER IF NOT EXISTS {user} IDENTIFIED BY 'slurm'; "
                f"GRANT ALL ON slurm_acct_db.* TO {user};" for user in users))
            if done.returncode != 0:
                raise RuntimeError(f"creating the accounting user failed: {done.stderr}")

            self._spawn("slurmdbd", ["slurmdbd", "-D"])
            # slurmdbd reads SLURM_CONF's directory for slurmdbd.conf
            self._wait("slurmdbd", lambda: self._run("sacctmgr", "-n", "list", "cluster")
                       .returncode == 0)
            if CLUSTER not in self._run("sacctmgr", "-n", "list", "cluster").stdout:
                self._run("sacctmgr", "-i", "add", "cluster", CLUSTER)

            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait("slurmctld", lambda: self._run("scontrol", "ping").returncode == 0
                       and "UP" in self._run("scontrol", "ping").stdout)
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._wait("an idle node", lambda: "idle" in self._run(
                "sinfo", "-h", "-o", "%T").stdout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job (a job's processes outlive slurmd), then SIGTERM to every daemon,
        newest first; SIGKILL to one that does not end in 30 s."""
        if any(p.poll() is None for p in self.processes) and self.conf.exists():
            self._run("scancel", "--full", f"--partition={PARTITION}")
            deadline = time.monotonic() + KILL_WAIT_S + 30
            while self._run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
                time.sleep(1)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)
        self.processes.clear()
        (self.directory / "pids").unlink(missing_ok=True)

    def logs(self) -> str:
        """The tail of every daemon's log, for a failure message."""
        tails = []
        for log in sorted((self.directory / "log").glob("*")):
            tails.append(f"--- {log.name}\n" + "\n".join(
                log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(tails)

    def sacct(self, *job_ids: str) -> str:
        """The job table of these jobs (all steps, requeues included)."""
        fields = "JobID,JobName%12,State,ExitCode,Start,End,Elapsed"
        selection = ["-j", ",".join(job_ids)] if job_ids else ["-a"]
        return self._run("sacct", "--duplicates", "-X", "-o", fields, *selection).stdout

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def stop_from_pid_file(directory: Path) -> None:
    """Stop the daemons a `start` from the command line left running (pids, newest first)."""
    pids = directory / "pids"
    if not pids.exists():
        return
    for pid in reversed([int(line) for line in pids.read_text().split()]):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(60):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.kill(pid, signal.SIGKILL)
    pids.unlink()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    directory = Path(argv[1]).resolve()
    if argv[0] == "stop":
        stop_from_pid_file(directory)
        return 0
    cluster = LocalSlurm(directory)
    cluster.start()
    cluster.processes.clear()  # leave them running; `stop` ends them by their ids
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
