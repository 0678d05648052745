"""A private one-node SLURM cluster for the tests: munged, slurmctld and slurmd of this machine's packages.

Everything it uses lives in one temporary folder: the munge key and socket,
slurm.conf (free ports for slurmctld and slurmd), state, spool, logs and pid
files. Clients reach it through SLURM_CONF (``Cluster.env``); nothing under
/etc is read or written. ``stop()`` ends the jobs, then the three daemons it
started, by pid, and removes the folder.

Needs Debian's slurm-wlm and munge (scripts/test.sh installs them where it can)
and root: slurmd starts jobs as their owner.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from lifecycle_helpers import free_port

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")


def missing() -> str:
    """Why a private cluster cannot run here; empty when it can."""
    absent = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a private SLURM cluster needs root (slurmd runs jobs as their owner)"
    return ""


def _user() -> str:
    """The user this process runs as (not $USER, which sudo -E keeps)."""
    return pwd.getpwuid(os.geteuid()).pw_name


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class Cluster:
    def __init__(self, nodes: int = 1) -> None:
        """NODES > 1: that many node entries on this one machine (node0, node1, ...), one slurmd
        each (``slurmd -N name``) on its own port, all reached at 127.0.0.1. Debian's 22.05
        accepts several NodeName lines with one NodeHostname without a multiple-slurmd build."""
        # Short: the munge socket path must fit a Unix socket address (108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-"))
        self.nodes = (
            [socket.gethostname().split(".")[0]] if nodes == 1 else [f"node{i}" for i in range(nodes)]
        )
        self.node = self.nodes[0]
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    # -- start / stop ------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Cluster:
        """Up and idle, or everything started so far stopped again and the error raised."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        key = d / "munge.key"
        subprocess.run([_exe("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        sock = d / "munge.sock"
        self._spawn(
            [
                _exe("munged"),
                "--foreground",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={d / 'munged.pid'}",
                f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
            "munged",
        )
        self._wait(lambda: sock.exists(), timeout, "munged did not create its socket")
        cpus = os.cpu_count() or 1
        mem_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        user = _user()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=qwen3test",
                    f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    *([f"SlurmdPort={free_port()}"] if len(self.nodes) == 1 else []),
                    f"SlurmUser={user}",
                    f"SlurmdUser={user}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={sock}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/backfill",
                    "JobAcctGatherType=jobacct_gather/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "KillWait=30",
                    # An ended job stays visible to scontrol for an hour (default 300 s): a test
                    # that submits early and checks the end last (test_slurm_e2e) reads its state.
                    "MinJobAge=3600",
                    f"PlugStackConfig={d / 'plugstack.conf'}",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={d / 'spool'}{'' if len(self.nodes) == 1 else '-%n'}",
                    f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                    f"SlurmdPidFile={d / 'slurmd'}{'' if len(self.nodes) == 1 else '-%n'}.pid",
                    f"SlurmctldLogFile={d / 'slurmctld.log'}",
                    f"SlurmdLogFile={d / 'slurmd'}{'' if len(self.nodes) == 1 else '-%n'}.log",
                    *self._node_lines(cpus, mem_mib),
                    f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        (d / "plugstack.conf").write_text("")
        self._spawn([_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for node in self.nodes:
            if len(self.nodes) > 1:
                (d / f"spool-{node}").mkdir()
            self._spawn([_exe("slurmd"), "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
        self._wait(
            lambda: self.cli("sinfo", "-h", "-N", "-o", "%T").stdout.split() == ["idle"] * len(self.nodes),
            timeout,
            "the node(s) did not come up idle",
        )

    def _node_lines(self, cpus: int, mem_mib: int) -> list[str]:
        if len(self.nodes) == 1:
            mem = mem_mib * 8 // 10
            return [f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN"]
        host = socket.gethostname().split(".")[0]
        share = mem_mib * 8 // 10 // len(self.nodes)
        return [
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} "
            f"RealMemory={share} State=UNKNOWN"
            for n in self.nodes
        ]

    def stop(self) -> None:
        """Cancel the jobs and wait until SLURM has ended them (KillWait=30), then stop the daemons."""
        if len(self.procs) == 2 + len(self.nodes) and all(p.poll() is None for p in self.procs):
            with contextlib.suppress(Exception):
                self.cli("scancel", "--full", "--user", _user(), timeout=10)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and self.cli("squeue", "-h", timeout=10).stdout.strip():
                    time.sleep(1)
        for proc in reversed(self.procs):  # the slurmd(s), slurmctld, munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- use ---------------------------------------------------------------------

    def cli(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM command against this cluster."""
        return subprocess.run(
            [_exe(argv[0]), *argv[1:]], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def job_state(self, job_id: str) -> str:
        out = self.cli("scontrol", "show", "job", job_id).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return ""

    def logs(self) -> str:
        """The daemons' logs and what they printed before their logs were open."""
        files = sorted([*self.dir.glob("*.log"), *self.dir.glob("*.stdout")])
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in files)

    # -- inside ------------------------------------------------------------------

    def _spawn(self, argv: list[str], name: str) -> None:
        with open(self.dir / f"{name}.stdout", "wb") as out:  # the daemon keeps its own copy of the fd
            proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.procs.append(proc)

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                if predicate():
                    return
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.logs()}")
