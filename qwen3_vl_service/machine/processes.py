"""Finding the service's processes, stopping a set of them, and what still holds the port or a GPU.

A process is *ours* when its environment carries our run directory
(``RUN_DIR_ENV``) or our tag (``TAG_ENV``): the launcher puts both into
vLLM's environment and every process vLLM starts inherits them. Names are
never trusted: vLLM's children rename themselves ``VLLM::EngineCore`` and
``VLLM::Worker_TP<n>`` (setproctitle), and so may anybody else's. The
environment survives the death of the parent, which is how the orphans of a
``kill -9``-ed API server are found (vLLM #55510, #34643).

Stopping is TERM, wait, KILL, reap (gunicorn ``arbiter.py``, systemd).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from qwen3_vl_service.core.hosts import WILDCARDS
from qwen3_vl_service.core.names import LOGTEE_MARKER, MEDIA_MARKERS, MEDIA_PID_FILE, RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.machine.gpus import NvmlUnavailable, nvml_processes, nvml_session

# For vLLM's environment: keeps /proc/<pid>/environ readable after vLLM's
# EngineCore and workers call setproctitle (which otherwise overwrites it with
# the title, and with it our tag). The title is then limited to the length of
# the original command line, which is far longer than "VLLM::Worker_TP7".
TITLE_ENV = {"SPT_NOENV": "1"}
_CREATE_TIME_TOLERANCE_S = 2.0
_POLL_S = 0.05


# ---------------------------------------------------------------------------
# Describing processes


@dataclass(frozen=True)
class ProcInfo:
    """What we knew of a process before signalling it (afterwards it may be gone)."""

    pid: int
    name: str
    cmdline: str
    label: str = ""  # short: "VLLM::Worker_TP0", "python -m vllm.entrypoints.openai.api_server"

    def short(self, width: int = 80) -> str:
        text = self.cmdline or self.name
        return text if len(text) <= width else text[: width - 1] + "…"


def _argv(proc: psutil.Process) -> list[str]:
    try:
        # setproctitle pads the title with empty arguments.
        return [p for p in proc.cmdline() if p]
    except (psutil.Error, OSError):
        return []


def cmdline_text(proc: psutil.Process) -> str:
    parts = _argv(proc)
    if not parts:
        with contextlib.suppress(psutil.Error, OSError):
            return proc.name()
        return ""
    return " ".join(parts)


def label_of(argv: list[str], name: str = "") -> str:
    """A short label: the title, "python -m MODULE", or "python SCRIPT"."""
    if not argv:
        return name
    if len(argv) == 1:
        return argv[0] if len(argv[0]) <= 60 else argv[0][:59] + "…"
    exe = os.path.basename(argv[0])
    for i, arg in enumerate(argv[1:-1], start=1):
        if arg == "-m":
            return f"{exe} -m {argv[i + 1]}"
        if arg == "-c":
            code = "; ".join(line.strip() for line in argv[i + 1].splitlines() if line.strip())
            return f"{exe} -c {code[:40]}…" if len(code) > 40 else f"{exe} -c {code}"
        if not arg.startswith("-"):
            return f"{exe} {os.path.basename(arg)}"
    return exe


def describe(proc: psutil.Process, width: int = 80) -> str:
    """A short human description, at most WIDTH characters: the process title, or a short command line."""
    label = info(proc).label
    return label if len(label) <= width else label[: width - 1] + "…"


def info(proc: psutil.Process) -> ProcInfo:
    name = ""
    with contextlib.suppress(psutil.Error, OSError):
        name = proc.name()
    argv = _argv(proc)
    return ProcInfo(pid=proc.pid, name=name, cmdline=" ".join(argv) or name, label=label_of(argv, name))


def is_media_server(proc: psutil.Process) -> bool:
    text = cmdline_text(proc)
    return any(m in text for m in MEDIA_MARKERS)


def is_media_pid(pid: int) -> bool:
    """PID is a live (not zombie) process whose command line is the media server's."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and is_media_server(proc)
    except psutil.Error:
        return False


def is_logtee(proc: psutil.Process) -> bool:
    return LOGTEE_MARKER in cmdline_text(proc)


def is_drainer(proc: psutil.Process) -> bool:
    """A helper that ignores SIGTERM on purpose and ends by itself once its writers are gone.

    Our log tee, and Python's multiprocessing resource tracker (vLLM starts
    one): the tracker ignores SIGINT and SIGTERM and, when its pipe closes,
    removes the shared memory and semaphores its users leaked. Killing it
    first would leave those in /dev/shm.
    """
    text = cmdline_text(proc)
    return LOGTEE_MARKER in text or "multiprocessing.resource_tracker" in text


# ---------------------------------------------------------------------------
# Finding ours


def _environ(proc: psutil.Process) -> dict[str, str] | None:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return None


def is_recorded(proc: psutil.Process, tag: str, create_time: float) -> bool:
    """Whether PROC is the process recorded with TAG and CREATE_TIME (not a reused pid).

    The tag in its environment decides when the environment can be read. Only
    where it cannot (another user's process, or wiped by setproctitle) does the
    start time decide, within a tolerance: psutil derives it from the boot
    time, which the kernel reports as wall clock minus uptime, so two readers
    may see it a second apart.
    """
    env = _environ(proc)
    if env:
        return env.get(TAG_ENV) == tag
    try:
        return (
            proc.uids().real == os.getuid()
            and abs(proc.create_time() - create_time) <= _CREATE_TIME_TOLERANCE_S
        )
    except psutil.Error:
        return False


def _self_and_ancestors() -> set[int]:
    pids = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        pids.update(p.pid for p in psutil.Process().parents())
    return pids


def find_ours(
    run_dir: str | os.PathLike[str] | None = None,
    tag: str | None = None,
    *,
    group: int | None = None,
    group_started: float = 0.0,
    exclude_media: bool = False,
    exclude: Iterable[int] = (),
) -> list[psutil.Process]:
    """Our processes: RUN_DIR (as RUN_DIR_ENV) or TAG (as TAG_ENV) in their environment.

    GROUP (the recorded vLLM pid, started at GROUP_STARTED with TAG) adds
    the members of that process group whose environment cannot be read:
    setproctitle, which vLLM calls in EngineCore and its workers, wipes
    ``/proc/<pid>/environ`` unless SPT_NOENV is set (see TITLE_ENV). Linux
    does not reuse a pid while a process group of that number exists, so a
    leaderless group P is still the group our vLLM P made; a live P that is
    not the recorded process (is_recorded) means the pid was reused, and the
    group is ignored.

    Only our user's processes are looked at (another user's environment is
    unreadable, and they are not ours to stop). This process and its
    ancestors are never returned. With EXCLUDE_MEDIA, the media server (and
    its children) are left out: it has its own lifetime. Zombies are left
    out: they hold nothing but a pid.
    """
    if run_dir is None and not tag and group is None:
        raise ValueError("find_ours needs a run_dir, a tag or a group")
    want_dir = str(Path(run_dir)) if run_dir is not None else None
    if group is not None and not _group_is_ours(group, tag, group_started):
        group = None
    skip = _self_and_ancestors() | set(exclude)
    uid = os.getuid()
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "uids", "status", "create_time"]):
        try:
            if proc.pid in skip or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except (KeyError, AttributeError):
            continue
        env = _environ(proc)
        if env:
            if (want_dir is not None and env.get(RUN_DIR_ENV) == want_dir) or (
                tag and env.get(TAG_ENV) == tag
            ):
                found.append(proc)
            continue
        # Environment wiped by setproctitle (or unreadable): only the process group can tell.
        if group is not None and _pgid(proc.pid) == group:
            found.append(proc)
    if exclude_media:
        media_pids: set[int] = set()
        for proc in found:
            if is_media_server(proc):
                media_pids.add(proc.pid)
                media_pids.update(c.pid for c in children(proc))
        if run_dir is not None:
            media = media_server(run_dir)
            if media is not None:
                media_pids.add(media.pid)
                media_pids.update(c.pid for c in children(media))
        found = [p for p in found if p.pid not in media_pids]
    return found


def find_tagged(tag: str) -> list[psutil.Process]:
    """The processes of one start (TAG in their environment); see find_ours."""
    return find_ours(None, tag)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _group_is_ours(group: int, tag: str | None, started: float) -> bool:
    try:
        leader = psutil.Process(group)
    except psutil.NoSuchProcess:
        return True  # leaderless: the pid cannot have been reused while the group exists
    except psutil.Error:
        return False
    if leader.status() == psutil.STATUS_ZOMBIE:
        return True  # dead, not yet reaped: still the recorded process's number
    return is_recorded(leader, tag or "", started)


def unidentified_vllm(exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """Our user's processes titled ``VLLM::...`` whose environment was wiped: maybe ours, maybe not.

    Never signalled; listed so that the user can decide (vLLM leftovers of a
    run started without SPT_NOENV, or another checkout's).
    """
    skip = _self_and_ancestors() | set(exclude)
    uid = os.getuid()
    out = []
    for proc in psutil.process_iter(["pid", "uids", "status", "name"]):
        try:
            if proc.pid in skip or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            if proc.info["status"] == psutil.STATUS_ZOMBIE or not (proc.info["name"] or "").startswith(
                "VLLM::"
            ):
                continue
        except (KeyError, AttributeError):
            continue
        if not _environ(proc):
            out.append(proc)
    return out


def children(proc: psutil.Process | None) -> list[psutil.Process]:
    """Every descendant of PROC ([] when it is None or gone)."""
    if proc is None:
        return []
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def tree(pid: int) -> list[psutil.Process]:
    """PID and all its descendants, the root first; [] if PID is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def media_server(run_dir: str | os.PathLike[str]) -> psutil.Process | None:
    """The media server recorded in ``<RUN_DIR>/media_server.pid``, if it is one.

    The pid file holds the bare pid (read_pid_file). The process must be ours
    (same user) and look like the media server by its command line: a pid
    reused by another program is never returned.
    """
    pid = read_pid_file(Path(run_dir) / MEDIA_PID_FILE)
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.uids().real != os.getuid() or proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return proc if is_media_server(proc) else None


def read_pid_file(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    # One format, what media.server.write_pid_file writes: the pid and a newline.
    try:
        pid = int(text, 10)
    except ValueError:
        return None
    return pid if pid > 0 else None


# ---------------------------------------------------------------------------
# Stopping


@dataclass
class StopResult:
    """What happened to each process: exited after TERM, needed KILL, or survived both."""

    terminated: list[ProcInfo] = field(default_factory=list)
    killed: list[ProcInfo] = field(default_factory=list)
    survivors: list[ProcInfo] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def stopped(self) -> list[ProcInfo]:
        return [*self.terminated, *self.killed]

    def merge(self, other: StopResult) -> StopResult:
        return StopResult(
            terminated=[*self.terminated, *other.terminated],
            killed=[*self.killed, *other.killed],
            survivors=[*self.survivors, *other.survivors],
            elapsed=self.elapsed + other.elapsed,
        )


def is_alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie is reaped here if it is our child)."""
    try:
        if not proc.is_running():  # also False when the pid was reused
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(psutil.Error, ChildProcessError, OSError):
                proc.wait(timeout=0)
            return False
        return True
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to TIMEOUT for PROCS to end; return those still alive (zombies count as ended)."""
    alive = [p for p in procs if is_alive(p)]
    deadline = time.monotonic() + max(0.0, timeout)
    while alive:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        # wait_procs reaps our own children; others are polled.
        _, alive = psutil.wait_procs(alive, timeout=min(0.2, remaining))
        alive = [p for p in alive if is_alive(p)]
        if alive:
            time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
    return alive


def _signal(proc: psutil.Process, sig: int) -> bool:
    try:
        proc.send_signal(sig)  # psutil refuses if the pid was reused meanwhile
        return True
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return False


def terminate(
    procs: Iterable[psutil.Process],
    timeout: float,
    *,
    kill_after: bool = True,
    kill_timeout: float = 5.0,
) -> StopResult:
    """SIGTERM each of PROCS, wait up to TIMEOUT, then SIGKILL what is left and reap it.

    With KILL_AFTER False, the survivors of TERM are reported and left alone.
    """
    start = time.monotonic()
    procs = [p for p in dict.fromkeys(procs) if is_alive(p)]
    infos = {p.pid: info(p) for p in procs}
    for p in procs:
        _signal(p, signal.SIGTERM)
    alive = wait_gone(procs, timeout)
    result = StopResult()
    alive_pids = {p.pid for p in alive}
    result.terminated = [infos[p.pid] for p in procs if p.pid not in alive_pids]
    if alive and kill_after:
        for p in alive:
            _signal(p, signal.SIGKILL)
        still = wait_gone(alive, kill_timeout)
        still_pids = {p.pid for p in still}
        result.killed = [infos[p.pid] for p in alive if p.pid not in still_pids]
        result.survivors = [infos[p.pid] for p in still]
    else:
        result.survivors = [infos[p.pid] for p in alive]
    result.elapsed = time.monotonic() - start
    return result


# ---------------------------------------------------------------------------
# Port and GPUs


def _host_matches(bound_ip: str, host: str) -> bool:
    return host in WILDCARDS or bound_ip in WILDCARDS or bound_ip == host or host == "localhost"


@dataclass(frozen=True)
class PortHolder:
    """A process listening on a port, as far as this user may see."""

    pid: int | None  # None: the kernel does not say (another user's process)
    cmdline: str = ""
    user: str = ""
    label: str = ""  # short: "python -m http.server"

    def describe(self) -> str:
        """'pid 123 (python3 -m http.server 8080, user ana)', on one line."""
        if self.pid is None:
            return "a process this user cannot see (another user's?)"
        cmd = " ".join(self.cmdline.split())  # one line, even for `python -c "...\n..."`
        cmd = cmd if len(cmd) <= 100 else cmd[:97] + "..."
        who = f", user {self.user}" if self.user else ""
        return f"pid {self.pid} ({cmd or '?'}{who})"


def port_holders(host: str, port: int) -> list[PortHolder]:
    """Who listens on HOST:PORT (a wildcard HOST: any address), one entry per process; [] if nobody.

    Connections in TIME_WAIT do not count (vLLM binds with SO_REUSEADDR). A
    socket that is bound but does not listen yet (vLLM binds its port long
    before it listens) is invisible in the kernel's connection tables and is
    not reported. Without a connection table (no permission), a bind attempt
    tells whether someone holds the port, not who.
    """
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.Error, OSError):
        return [] if port_free(host, port) else [PortHolder(None)]
    pids: list[int | None] = []
    for c in conns:
        if c.status != psutil.CONN_LISTEN or not c.laddr or c.laddr.port != port or c.raddr:
            continue
        if _host_matches(c.laddr.ip, host) and c.pid not in pids:
            pids.append(c.pid)
    return [_port_holder(pid) for pid in pids]


def _port_holder(pid: int | None) -> PortHolder:
    if pid is None:
        return PortHolder(None)
    try:
        proc = psutil.Process(pid)
        return PortHolder(pid, cmdline_text(proc), proc.username(), info(proc).label)
    except psutil.Error:
        return PortHolder(pid)


def port_holder(host: str, port: int) -> tuple[int | None, str] | None:
    """The first of port_holders() as (pid, short label), or None when nothing listens."""
    holders = port_holders(host, port)
    if not holders:
        return None
    first = holders[0]
    return first.pid, first.label if first.pid is not None else "a process of another user"


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on HOST:PORT now (with SO_REUSEADDR, as servers bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("" if host in WILDCARDS else host, port))
    except OSError:
        return False
    return True


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default if unreadable)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def server_port(host: str = "127.0.0.1", *, shard: int = 0, shards: int = 1) -> int:
    """A port free now for a server that may restart on it, outside the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` is also one it hands to outgoing connections: while a
    server on it restarts, any client connection (or vLLM's own rendezvous) may take it as its local
    port and the restart's bind fails. Ports below the ephemeral range are only ever taken by name.
    SHARD of SHARDS splits that range so parallel callers (test workers) never draw the same port.
    """
    low, high = ephemeral_ports()
    first, last = (10_000, low - 1) if low > 12_000 else (high + 1, 65_535)
    width = (last - first + 1) // max(shards, 1)
    first += width * shard
    ports = list(range(first, first + width))
    random.shuffle(ports)
    for port in ports[:2000]:
        if port_free(host, port):
            return port
    raise OSError(f"no free port in {first}-{first + width - 1}")


@dataclass(frozen=True)
class GpuHolder:
    gpu_index: int
    pid: int
    used_bytes: int | None  # None when the driver does not say


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    used_bytes: int
    total_bytes: int
    ours_bytes: int  # by the given pids (0 if none or not reported)


def gpu_holders(pids: Iterable[int]) -> list[GpuHolder]:
    """Which of PIDS hold memory on a GPU, per NVML. Raises NvmlUnavailable.

    Inside a container NVML may report host pids, which then match nothing:
    the caller should say that the check saw no process of ours, not that
    there is none.
    """
    wanted = set(pids)
    with nvml_session() as nv:
        holders = []
        for i in range(nv.nvmlDeviceGetCount()):
            for pid, used in nvml_processes(nv, nv.nvmlDeviceGetHandleByIndex(i)):
                if pid in wanted:
                    holders.append(GpuHolder(gpu_index=i, pid=pid, used_bytes=used))
        return holders


def gpu_pids() -> list[tuple[int, int]]:
    """(GPU index, pid) of every process NVML reports on any GPU. Raises NvmlUnavailable."""
    with nvml_session() as nv:
        return [
            (i, pid)
            for i in range(nv.nvmlDeviceGetCount())
            for pid, _used in nvml_processes(nv, nv.nvmlDeviceGetHandleByIndex(i))
        ]


def gpu_memory(pids: Iterable[int] = ()) -> list[GpuMemory]:
    """Used and total memory of every GPU, and how much of it PIDS hold. Raises NvmlUnavailable."""
    wanted = set(pids)
    with nvml_session() as nv:
        out = []
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            name = nv.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            ours = sum(used or 0 for pid, used in nvml_processes(nv, handle) if pid in wanted)
            out.append(
                GpuMemory(
                    index=i,
                    name=str(name),
                    used_bytes=int(mem.used),
                    total_bytes=int(mem.total),
                    ours_bytes=ours,
                )
            )
        return out


__all__ = [
    "TITLE_ENV",
    "GpuHolder",
    "GpuMemory",
    "NvmlUnavailable",
    "PortHolder",
    "ProcInfo",
    "StopResult",
    "describe",
    "find_ours",
    "find_tagged",
    "gpu_holders",
    "gpu_memory",
    "gpu_pids",
    "is_alive",
    "is_drainer",
    "is_logtee",
    "is_media_server",
    "is_recorded",
    "media_server",
    "port_holder",
    "port_holders",
    "terminate",
    "tree",
    "unidentified_vllm",
    "wait_gone",
]
