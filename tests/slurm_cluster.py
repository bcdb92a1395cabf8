"""A real single-node SLURM for tests: munged, slurmctld and slurmd in a temporary folder.

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` packages (22.05 on bookworm), started as
root with a ``slurm.conf`` naming this host with 2 CPUs. The daemons' state, spool, log and pid files,
the munge key and socket all live in the temporary folder, on free ports, so nothing of a system SLURM is
touched. Plugins that need cgroups or a database are replaced by ones that do not (``proctrack/linuxproc``,
``task/none``, ``jobacct_gather/none``, ``accounting_storage/none``): a container's cgroup tree is not
SLURM's to manage. Finished jobs are written by ``jobcomp/filetxt`` to ``jobcomp.txt``, so tests can see
how each job ended (``COMPLETED``, ``CANCELLED``, ``TIMEOUT``) without an accounting database.

Where SLURM cannot start (not root, packages missing), tests using :func:`slurm_cluster` skip with the
reason, and fail under ``CI=true`` (``.ci/run`` installs the packages).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from tests._ci import unavailable

T = TypeVar("T")

#: Programs the fixture runs; the daemons are in /usr/sbin, which a non-login PATH may lack.
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")
PACKAGES = "slurmctld slurmd slurm-client munge"
#: How long the daemons may take to start, and the queue to empty after scancel, s.
START_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 30.0
#: CPUs and memory the node offers (SLURM counts a job's --mem in MiB: two jobs of "4GB" need 8192 MB).
NODE_CPUS = 2
NODE_MEMORY_MB = 16000
PARTITION = "debug"

SLURM_CONF = """\
ClusterName=pytest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no accounting database: neither exists in a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
# quick start and quick ends: the node serves at once, a cancelled job is killed 2 s after SIGTERM
ReturnToService=2
SlurmdTimeout=30
SlurmctldTimeout=30
MessageTimeout=10
KillWait=2
OverTimeLimit=0
InactiveLimit=0
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def unavailable_reason() -> str | None:
    """Why a SLURM cannot be started here, or None if it can."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    missing = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing): apt-get install {PACKAGES}"
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue not installed: pip install 'bloodsmear-pipeline[slurm]'"
    return None


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SlurmCluster:
    """A running single-node SLURM; ``env`` points SLURM's commands (and dask-jobqueue's) at it."""

    root: Path
    env: dict[str, str]
    daemons: dict[str, int] = field(default_factory=dict)
    munge_dir: Path | None = None

    # ---------------------------------------------------------------------------------- commands
    def command(self, *argv: str, check: bool = True, timeout: float = 30.0) -> str:
        """Run a SLURM command against this cluster; its stdout."""
        done = subprocess.run(
            [_which(argv[0]) or argv[0], *argv[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def queue(self) -> list[dict[str, str]]:
        """Jobs in the queue: id, name, state (``PENDING``, ``RUNNING``, ...)."""
        out = self.command("squeue", "--noheader", "--format=%i|%j|%T")
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        return [{"id": r[0], "name": r[1], "state": r[2]} for r in rows]

    def running(self) -> list[dict[str, str]]:
        return [job for job in self.queue() if job["state"] == "RUNNING"]

    def finished(self) -> dict[str, dict[str, str]]:
        """Jobs that ended, by id: the ``jobcomp/filetxt`` record (``JobState``, ``Name``, times...)."""
        path = self.root / "log" / "jobcomp.txt"
        if not path.exists():
            return {}
        jobs: dict[str, dict[str, str]] = {}
        for line in path.read_text().splitlines():
            record = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if "JobId" in record:
                jobs[record["JobId"]] = record
        return jobs

    def wait_until(
        self, what: str, test: Callable[[], T], timeout_s: float = DRAIN_TIMEOUT_S, every_s: float = 0.2
    ) -> T:
        """Poll ``test()`` until it is truthy; its value. Fails naming ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = test()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(every_s)

    def clear(self) -> None:
        """Cancel every job and wait until the queue is empty (between tests)."""
        if self.queue():
            self.command("scancel", "--full", "--user=root", check=False)
            self.wait_until("an empty queue", lambda: not self.queue())

    def logs(self, lines: int = 15) -> str:
        """The last lines of the daemons' logs, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # --------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged wants every folder above its socket searchable by all users, which pytest's
        # temporary folders are not: the socket gets a folder of its own in /tmp
        munge = Path(tempfile.mkdtemp(prefix="pytest-munge-", dir="/tmp"))
        munge.chmod(0o755)
        self.munge_dir = munge
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.socket"
        self._spawn(
            "munged",
            [
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            munge / "munged.pid",
        )
        conf = self.root / "slurm.conf"
        conf.write_text(
            SLURM_CONF.format(
                host=host,
                root=self.root,
                munge_socket=socket_path,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                cpus=NODE_CPUS,
                memory_mb=NODE_MEMORY_MB,
                partition=PARTITION,
            )
        )
        self.env["SLURM_CONF"] = str(conf)
        # -i: ignore any saved state (there is none: a fresh folder); -f: this conf, also for leftovers()
        self._spawn("slurmctld", ["-i", "-f", str(conf)], self.root / "run" / "slurmctld.pid")
        self._spawn("slurmd", ["-f", str(conf), "-N", host], self.root / "run" / "slurmd.pid")
        self.wait_until(
            "the node to be idle in sinfo",
            lambda: self.command("sinfo", "--noheader", "--format=%T", check=False).split() == ["idle"],
            timeout_s=START_TIMEOUT_S,
            every_s=0.1,
        )

    def _spawn(self, name: str, args: list[str], pid_file: Path) -> None:
        """Start a daemon (it forks into the background) and remember its pid."""
        done = subprocess.run(
            [_which(name) or name, *args], env=self.env, capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{name} did not start ({done.returncode}): {done.stderr.strip()}\n{self.logs()}"
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file {pid_file}\n{self.logs()}")
            time.sleep(0.05)
        self.daemons[name] = int(pid_file.read_text().split()[0])

    def stop(self) -> list[str]:
        """Cancel every job, stop the daemons (SIGTERM, then SIGKILL); the processes still left."""
        with contextlib.suppress(Exception):
            self.clear()
        for name in ("slurmd", "slurmctld", "munged"):  # clients of munge first
            pid = self.daemons.get(name)
            if pid is not None:
                _terminate(pid)
        left = self.leftovers()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
        return left

    def leftovers(self) -> list[str]:
        """Live processes of this cluster: its daemons (by pid, and by their folders on the command
        line, as ``pgrep -f`` would find them), and every process started with its ``SLURM_CONF``
        (slurmctld's helper, job step daemons, the jobs' processes). Zombies are dead, only waiting
        for init to collect them."""
        folders = [str(p) for p in (self.root, self.munge_dir) if p is not None]
        conf = f"SLURM_CONF={self.env.get('SLURM_CONF')}".encode()
        found = {pid: name for name, pid in self.daemons.items()}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:  # /proc, not pgrep: procps may not be installed
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:  # ended meanwhile
                continue
            if any(folder in command for folder in folders) or conf in environ:
                found[int(proc.name)] = command
        return [f"{pid} {what}" for pid, what in sorted(found.items()) if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead: it only waits for its parent (init) to collect it
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _terminate(pid: int, timeout_s: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real single-node SLURM (2 CPUs, partition ``debug``) for the session; stopped afterwards,
    and the teardown fails if any of its processes is left."""
    reason = unavailable_reason()
    if reason is not None:
        unavailable(f"SLURM tests: {reason}")
    root = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
    cluster = SlurmCluster(root, env)
    try:
        try:
            cluster.start()
        except (RuntimeError, AssertionError) as exc:
            unavailable(f"SLURM did not start: {exc}")
        yield cluster
    finally:
        left = cluster.stop()
        assert not left, f"SLURM processes left behind: {left}"
