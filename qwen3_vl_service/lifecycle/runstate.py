"""The run state of the service: ``<RUN_DIR>/service.json``, written atomically.

The launcher writes it just before it execs vLLM (so the recorded pid is
vLLM's own); ``stop`` and ``status`` read it. A state file is trusted only
while its process is alive *and* is still the process that was recorded:
same pid, same start time, and (where the environment is readable) the
service tag in its environment. Anything else (a pid gone, a pid reused by
another program, a corrupt file) makes the file stale, and a stale file is
replaced by the next start (gunicorn ``pidfile.py``).
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.fileio import write_atomic
from qwen3_vl_service.core.names import STATE_FILE
from qwen3_vl_service.machine import processes
from qwen3_vl_service.planning import vllm_args

if TYPE_CHECKING:
    from qwen3_vl_service.settings.config import ServiceConfig

# Private folder of one run for vLLM's IPC sockets (VLLM_RPC_BASE_PATH): made with this prefix, and
# only a directory with one of PRIVATE_TMP_PREFIXES is ever removed by
# remove_private_tmp() (the second is the launcher's own spelling).
PRIVATE_TMP_PREFIX = "qwen3-vl-service-"
PRIVATE_TMP_PREFIXES = (PRIVATE_TMP_PREFIX, "qwen3vl-")
STOP_HINT = "stop it with .venv/bin/python stop_service.py"


@dataclass(frozen=True)
class RunState:
    pid: int
    create_time: float
    tag: str
    host: str
    port: int
    media_host: str
    media_port: int
    model: str
    served_model_name: str
    started_at: str  # ISO 8601 with the local offset
    config_path: str
    log_file: str
    private_tmp: str
    detached: bool
    # Filled in by write(): RUN_DIR may sit on a file system shared by many nodes,
    # and a pid means nothing on another node.
    node: str = ""
    slurm_job_id: str = ""
    # Whether this service uses the media server on media_host:media_port (scope.media_users).
    media_server: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> RunState:
        """Build from parsed JSON; raises ValueError/TypeError/KeyError when malformed."""
        if not isinstance(data, dict):
            raise TypeError("state is not a JSON object")
        kinds = {
            "pid": int,
            "port": int,
            "media_port": int,
            "create_time": float,
            "detached": bool,
            "media_server": bool,
        }
        optional = {"node": "", "slurm_job_id": "", "media_server": True}
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = data.get(f.name, optional[f.name]) if f.name in optional else data[f.name]
            # Tolerated spellings: a Unix time for started_at, null for an optional path.
            if f.name == "started_at" and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = _dt.datetime.fromtimestamp(value).astimezone().isoformat(timespec="seconds")
            elif value is None and f.name in ("config_path", "log_file", "private_tmp"):
                value = ""
            want = kinds.get(f.name, str)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise TypeError(f"{f.name} is {type(value).__name__}, expected {want.__name__}")
            values[f.name] = value
        if values["pid"] <= 0:
            raise ValueError("pid must be positive")
        if not math.isfinite(values["create_time"]) or values["create_time"] < 0:
            raise ValueError("create_time must be a time")
        return cls(**values)


def state_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / STATE_FILE


def new_tag() -> str:
    """A tag unique to one start of the service (goes into every process's environment)."""
    return f"q3vl-{_dt.datetime.now().strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}"


def for_service(
    cfg: ServiceConfig,
    *,
    pid: int,
    tag: str,
    log_file: str | os.PathLike[str],
    detached: bool,
    private_tmp: str = "",
    port: int | None = None,
    media_server: bool = False,
) -> RunState:
    """The run state of a process this package started for CFG (vLLM, or the router on PORT)."""
    return RunState(
        pid=pid,
        create_time=psutil.Process(pid).create_time(),
        tag=tag,
        host=cfg.host,
        port=cfg.port if port is None else port,
        media_host=cfg.media_host,
        media_port=cfg.media_port,
        model=str(cfg.model_path),
        served_model_name=cfg.served_model_name,
        started_at=now_iso(),
        config_path=str(cfg.config_path) if cfg.config_path else "",
        log_file=str(log_file),
        private_tmp=private_tmp,
        detached=detached,
        media_server=media_server,
    )


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def this_node() -> str:
    return socket.gethostname()


def write(run_dir: str | os.PathLike[str], state: RunState) -> Path:
    """Write the state atomically: a temp file in the same folder, fsync, then rename over.

    The node and the SLURM job id are filled in when the caller left them empty.
    """
    if not state.node:
        state = replace(state, node=this_node())
    if not state.slurm_job_id:
        state = replace(state, slurm_job_id=os.environ.get("SLURM_JOB_ID", ""))
    # No secret lives in the state (the API key stays in the environment):
    # readable by others, so that a colleague's `status` works.
    return write_atomic(Path(run_dir) / STATE_FILE, state.to_json())


def read(run_dir: str | os.PathLike[str]) -> RunState | None:
    """The recorded state, or None when there is none or it is unreadable/corrupt (= stale)."""
    path = state_path(run_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError):
        return None
    try:
        return RunState.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError, OverflowError):  # OverflowError: a started_at of 1e20
        return None


def exists(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a state file is present at all (readable or not)."""
    return state_path(run_dir).exists()


def live_process(state: RunState) -> psutil.Process | None:
    """The recorded process if it is still the one that was recorded, else None.

    The tag in its environment decides (it is unique to one start, and it
    survives a wall-clock step that would shift psutil's start times). Where
    the environment cannot be read or was wiped, the start time must match
    and the process must be our user's. A zombie is not live. A state
    written on another node never has a live process here.
    """
    if other_node(state) is not None:
        return None  # a pid of another node means nothing here
    try:
        proc = psutil.Process(state.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return proc if processes.is_recorded(proc, state.tag, state.create_time) else None


def describe_since(state: RunState) -> str:
    return state.started_at or "an unknown time"


def other_node(state: RunState) -> str | None:
    """The node the state was written on, if it is not this one (its pid means nothing here)."""
    return state.node if state.node and state.node != this_node() else None


def job_gone(state: RunState, timeout: float = 5.0) -> bool | None:
    """Whether the SLURM job recorded in the state has ended: True, False, or None (cannot tell)."""
    if not state.slurm_job_id:
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", state.slurm_job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue answers "Invalid job id specified" for a job that left its memory.
        return True if "invalid job id" in out.stderr.lower() else None
    states = out.stdout.split()
    return not any(s in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "PENDING") for s in states)


def elsewhere(state: RunState) -> str | None:
    """The other node where the recorded service may still run; None if it is here or surely gone."""
    node = other_node(state)
    if node is None or job_gone(state) is True:
        return None
    return node


def elsewhere_error(state: RunState, node: str, run_dir: str | os.PathLike[str]) -> CheckFailed:
    job = f", SLURM job {state.slurm_job_id}" if state.slurm_job_id else ""
    return CheckFailed(
        f"service recorded as running on node {node} (pid {state.pid}{job}, since {describe_since(state)}); "
        "it cannot be checked from this node",
        fix=f"run this command on {node}, or give this node its own RUN_DIR; if that service is gone, "
        f"remove {state_path(run_dir)}",
    )


@dataclass(frozen=True)
class ServiceState:
    """What the run state says about the service of one RUN_DIR, judged on this node.

    The one assessment that start (the double-start check), stop and status
    share: the recorded state, whether its process still runs here, and why a
    state file is stale. ``ours()`` finds this run's processes (also orphans
    that lost their state file) the same way for all three.
    """

    run_dir: Path
    state: RunState | None  # None: no state file, or an unreadable one
    process: psutil.Process | None  # the recorded process, alive and still the recorded one
    node: str | None  # the other node the state was written on, if not this one
    elsewhere: bool  # written on another node whose SLURM job may still run: cannot be judged here
    stale: str  # why the state file is stale; "" when there is none or it is live

    @property
    def running(self) -> bool:
        return self.process is not None

    @property
    def tag(self) -> str | None:
        return self.state.tag if self.state is not None else None

    def ours(self, *, exclude_media: bool = True) -> list[psutil.Process]:
        """This run's processes: by RUN_DIR or tag in their environment, or by the recorded pid's group.

        The process group stands in for children whose environment setproctitle wiped;
        a pid recorded on another node names nothing here.
        """
        local = self.state is not None and self.node is None
        return processes.find_ours(
            self.run_dir,
            self.tag,
            exclude_media=exclude_media,
            group=self.state.pid if local and self.state is not None else None,
            group_started=self.state.create_time if local and self.state is not None else 0.0,
        )

    def elsewhere_error(self) -> CheckFailed:
        assert self.state is not None and self.node is not None
        return elsewhere_error(self.state, self.node, self.run_dir)


def assess(run_dir: str | os.PathLike[str]) -> ServiceState:
    """The service state of RUN_DIR (see ServiceState); asks squeue only for a state of another node."""
    run_dir = Path(run_dir)
    state = read(run_dir)
    node = other_node(state) if state is not None else None
    process = live_process(state) if state is not None else None
    away = state is not None and node is not None and elsewhere(state) is not None
    stale = ""
    if state is None and exists(run_dir):
        stale = "the state file is unreadable"
    elif state is not None and node is not None and not away:
        stale = f"written on node {node} by SLURM job {state.slurm_job_id}, which has ended"
    elif state is not None and node is None and process is None:
        stale = f"pid {state.pid} of the recorded start is gone"
    return ServiceState(run_dir, state, process, node, away, stale)


def check_not_running(run_dir: str | os.PathLike[str]) -> None:
    """Raise CheckFailed if the service of RUN_DIR runs, or left processes behind.

    A stale state file is no obstacle: the caller writes the new state over it.
    Processes of an earlier run that lost their state file (orphans of a
    crashed or ``kill -9``-ed API server still holding GPU memory, vLLM
    #55510, #34643) also refuse the start: a new vLLM would fail with out of
    memory minutes later.
    """
    current = assess(run_dir)
    if current.elsewhere:
        raise current.elsewhere_error()
    if current.state is not None and current.running:
        raise CheckFailed(
            f"service already running (pid {current.state.pid}, since {describe_since(current.state)})",
            fix=STOP_HINT,
        )
    leftovers = current.ours()
    if leftovers:
        shown = ", ".join(f"{p.pid} {processes.describe(p)}" for p in leftovers[:5])
        more = f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else ""
        raise CheckFailed(
            f"{len(leftovers)} process(es) of an earlier run are still running ({shown}{more})",
            fix="stop them with .venv/bin/python stop_service.py",
        )


def clear(run_dir: str | os.PathLike[str], tag: str) -> bool:
    """Remove the state file only if it still records TAG (its owner). True if removed."""
    path = state_path(run_dir)
    current = read(run_dir)
    if current is None or current.tag != tag:
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def clear_corrupt(run_dir: str | os.PathLike[str]) -> bool:
    """Remove a state file that exists but cannot be parsed. True if removed."""
    path = state_path(run_dir)
    if not path.exists() or read(run_dir) is not None:
        return False
    try:
        path.unlink()
    except OSError:
        return False
    return True


def private_tmp_path(tag: str, base: str | os.PathLike[str] | None = None) -> str:
    """The private folder for one run's IPC sockets (VLLM_RPC_BASE_PATH), under BASE or the system temp dir.

    Named by the tag, so that the command the report shows is the one that runs.
    Kept short on purpose: vLLM puts ZMQ IPC sockets there, and a Unix socket
    path is limited to 107 bytes, so it does not go under a deep RUN_DIR.
    """
    short = tag.rsplit("-", 1)[-1][:12] or "run"
    return os.path.join(base if base is not None else tempfile.gettempdir(), f"{PRIVATE_TMP_PREFIX}{short}")


def compile_cache_dir(environ: Mapping[str, str]) -> str:
    """Where torch's compile caches go for a start whose TMPDIR is its private folder: "" when
    ENVIRON (the one the start inherits) names a folder (TORCHINDUCTOR_CACHE_DIR: the user's); else
    torch's default for this process's temp folder and user, as
    torch/_inductor/runtime/cache_dir_utils.py names it: <tmp>/torchinductor_<user>."""
    if environ.get(vllm_args.INDUCTOR_CACHE_ENV):
        return ""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def temp_env(folder: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment that puts vLLM's temp files in FOLDER (vllm_args.private_tmp_env) and keeps
    torch's compile caches where they would be without it (compile_cache_dir of ENVIRON, the
    environment the start inherits): the service's starts and the benchmarks' bare vLLM alike."""
    return vllm_args.private_tmp_env(folder, compile_cache_dir(environ))


def make_private_tmp(tag: str, base: str | os.PathLike[str] | None = None) -> str:
    """Make private_tmp_path(TAG, BASE), readable by this user only (0700); returns its path."""
    path = private_tmp_path(tag, base)
    os.mkdir(path, 0o700)
    return path


def remove_private_tmp(path: str) -> bool:
    """Remove a private folder made by make_private_tmp (ours, a real directory); anything else stays."""
    if not path:
        return False
    p = Path(path)
    try:
        st = p.lstat()
    except OSError:
        return False
    if (
        not p.name.startswith(PRIVATE_TMP_PREFIXES)
        or not stat.S_ISDIR(st.st_mode)
        or p.is_symlink()
        or st.st_uid != os.getuid()
    ):
        return False
    shutil.rmtree(p, ignore_errors=True)
    return not p.exists()


__all__ = [
    "RunState",
    "ServiceState",
    "assess",
    "check_not_running",
    "clear",
    "clear_corrupt",
    "elsewhere",
    "job_gone",
    "live_process",
    "make_private_tmp",
    "new_tag",
    "now_iso",
    "other_node",
    "private_tmp_path",
    "read",
    "remove_private_tmp",
    "state_path",
    "write",
]
