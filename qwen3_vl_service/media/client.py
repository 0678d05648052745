"""The launcher's side of the media server: is it ours and healthy, and ensure_running().

Imports neither aiohttp nor the server modules: the launcher's path stays light.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qwen3_vl_service.core.childproc import with_package_path
from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.hosts import connect_host
from qwen3_vl_service.core.names import MEDIA_SERVICE_ID
from qwen3_vl_service.machine.processes import is_media_pid, read_pid_file
from qwen3_vl_service.media.policy import check_root


def probe(host: str, port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """The /health JSON if our media server answers on HOST:PORT, else None.

    http.client on purpose: urllib would route loopback through $http_proxy
    on nodes that set one.
    """
    conn = http.client.HTTPConnection(connect_host(host), port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read(65536)
        if resp.status != 200:
            return None
        info = json.loads(body)
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    return info if isinstance(info, dict) and info.get("service") == MEDIA_SERVICE_ID else None


def is_ours_healthy(
    host: str,
    port: int,
    timeout: float = 2.0,
    *,
    root: str | Path | None = None,
    pid_file: Path | None = None,
) -> bool:
    """True if our media server answers /health on HOST:PORT (and serves ROOT, and is the pid in PID_FILE)."""
    info = probe(host, port, timeout)
    if info is None:
        return False
    if root is not None and info.get("root") != os.path.realpath(root):
        return False
    return not (pid_file is not None and read_pid_file(pid_file) != info.get("pid"))


def command(
    host: str,
    port: int,
    root: str | Path,
    allowed_types: tuple[str, ...],
    log_file: str | Path,
    pid_file: str | Path,
    *,
    python: str = sys.executable,
    workers: int | None = None,
    log_max_mb: int = 100,
    log_backups: int = 5,
) -> list[str]:
    """The media server's command line (detached): what ensure_running starts, the Deployment shows."""
    cmd = [python, "-m", "qwen3_vl_service.media", "--detach", "--host", host, "--port", str(port)]
    cmd += ["--root", str(root), "--allowed-types", ",".join(allowed_types)]
    cmd += ["--log-file", str(log_file), "--pid-file", str(pid_file)]
    cmd += ["--workers", "auto" if workers is None else str(workers)]
    return [*cmd, "--log-max-mb", str(log_max_mb), "--log-backups", str(log_backups)]


def ensure_running(
    host: str,
    port: int,
    root: str | Path,
    allowed_types: tuple[str, ...],
    log_file: str | Path,
    pid_file: str | Path,
    *,
    python: str = sys.executable,
    timeout: float = 10.0,
    workers: int | None = None,
    log_max_mb: int = 100,
    log_backups: int = 5,
) -> tuple[int, bool]:
    """(pid, started_now): reuse our healthy server on HOST:PORT, or start a detached one.

    The values are config's, already validated (ALLOWED_TYPES: MEDIA_ALLOWED_TYPES;
    WORKERS: MEDIA_WORKERS, None for auto; LOG_MAX_MB, LOG_BACKUPS). Raises
    CheckFailed (one line with the fix) when the port belongs to someone
    else, when a server of ours serves another root or types, or when the new
    server does not come up within TIMEOUT seconds. A running server is
    reused whatever its number of workers.
    """
    real_root = str(check_root(root, "MEDIA_ROOT"))
    log_file, pid_file = Path(log_file).resolve(), Path(pid_file).resolve()
    info = probe(host, port, timeout=min(2.0, timeout))
    if info is None:
        info = _wait_for_recorded(host, port, pid_file, log_file, timeout)
    if info is not None:
        _check_reusable(info, host, port, pid_file, real_root, allowed_types)
        return info["pid"], False
    cmd = command(
        host,
        port,
        real_root,
        allowed_types,
        log_file,
        pid_file,
        python=python,
        workers=workers,
        log_max_mb=log_max_mb,
        log_backups=log_backups,
    )
    deadline = time.monotonic() + timeout
    _start_detached(cmd, log_file, timeout)
    info = _wait_healthy(host, port, pid_file, deadline)
    if info is None:
        raise CheckFailed(
            f"the media server did not answer /health on {host}:{port} within {timeout:.0f} s",
            fix=f"see {log_file}",
        )
    return info["pid"], True


def _wait_for_recorded(
    host: str, port: int, pid_file: Path, log_file: Path, timeout: float
) -> dict[str, Any] | None:
    """/health of the server in PID_FILE that is alive but silent (still starting, or stuck); None if none."""
    recorded = read_pid_file(pid_file)
    if not (recorded and is_media_pid(recorded)):
        return None
    info = _wait_healthy(host, port, pid_file, deadline=time.monotonic() + timeout)
    if info is None:
        raise CheckFailed(
            f"media server pid {recorded} (from {pid_file}) does not answer /health on {host}:{port}",
            fix=f"see {log_file}; stop it (kill {recorded}) and start again",
        )
    return info


def _check_reusable(
    info: dict[str, Any], host: str, port: int, pid_file: Path, root: str, types: tuple[str, ...]
) -> None:
    """CheckFailed unless the server that answered is the one in PID_FILE, serving ROOT and TYPES."""
    pid = info.get("pid")
    if pid != read_pid_file(pid_file):
        raise CheckFailed(
            f"port {port} on {host} is held by another media server (pid {pid}, root {info.get('root')}) "
            f"not recorded in {pid_file}",
            fix=f"stop it (kill {pid}) or set MEDIA_PORT to a free port",
        )
    if (info.get("root"), sorted(info.get("allowed_types", []))) != (root, sorted(types)):
        raise CheckFailed(
            f"the media server on {host}:{port} (pid {pid}) serves {info.get('root')} "
            f"types {','.join(info.get('allowed_types', []))}, not {root} types {','.join(types)}",
            fix=f"stop it (kill {pid}) so that it restarts with the new settings, or set MEDIA_PORT",
        )


def _start_detached(cmd: list[str], log_file: Path, timeout: float) -> None:
    """Run CMD (a --detach server) until its first process exits, right after the port is bound.

    Its startup output goes to LOG_FILE; a failure raises CheckFailed with its last line.
    """
    env = with_package_path(os.environ)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    except OSError as exc:
        raise CheckFailed(
            f"cannot run {cmd[0]}: {exc.strerror}", fix="check VLLM_PYTHON / the venv"
        ) from None
    try:
        # Returns once the first process exits and the daemon has moved its output to the log.
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CheckFailed(
            f"the media server did not start within {timeout:.0f} s", fix=f"see {log_file}"
        ) from None
    text = output.decode("utf-8", "replace").strip()
    if text:
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    if proc.returncode != 0:
        last = text.splitlines()[-1] if text else f"exit code {proc.returncode}"
        raise CheckFailed(f"the media server did not start: {last.removeprefix('error: ')}")


def _wait_healthy(host: str, port: int, pid_file: Path, deadline: float) -> dict[str, Any] | None:
    while True:
        info = probe(host, port, timeout=1.0)
        if info is not None and info.get("pid") == read_pid_file(pid_file):
            return info
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
