"""Helpers for the lifecycle tests (runstate, processes, stop, status, readiness, logtee).

Everything here works with real processes and sockets. Tests end only the
processes they started, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.lifecycle import readiness, runstate
from qwen3_vl_service.machine.processes import TITLE_ENV, server_port
from qwen3_vl_service.settings import scope

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "standin_server.py"
PY = sys.executable
# Settings a developer may have exported that would override the test config.
_CONFIG_KEYS = (
    "RUN_DIR",
    "LOG_DIR",
    "PORT",
    "HOST",
    "MEDIA_PORT",
    "MEDIA_HOST",
    "MEDIA_SERVER",
    "API_KEY",
    "SERVICE_NAME",
    "PROFILE",
)
# The service name write_config gives (its folders: run/<name>/, logs/<name>/; scope.py).
SERVICE = "svc"


def free_port() -> int:
    """A port for a server of this test, free now, outside the ephemeral range (processes.server_port),
    from this run's share of it: TEST_PORT_SHARD=i/n (scripts/test.sh runs the e2e group beside the
    others, each with its own), split again between pytest-xdist's workers."""
    part, parts = (int(x) for x in os.environ.get("TEST_PORT_SHARD", "0/1").split("/"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return server_port(shard=part * workers + worker, shards=parts * workers)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (TAG_ENV, RUN_DIR_ENV, *_CONFIG_KEYS)}
    env.update(extra)
    return env


def write_config(tmp: Path, *, port: int, media_port: int | None = None, **settings: str) -> Path:
    """A config.env for TMP: run and log dirs inside it, the given ports."""
    media_port = media_port or free_port()
    lines = {
        "RUN_DIR": str(tmp / "run"),
        "LOG_DIR": str(tmp / "logs"),
        "SERVICE_NAME": SERVICE,
        "MODEL_PATH": str(tmp / "model"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MEDIA_PORT": str(media_port),
        "MEDIA_ROOT": str(tmp / "media"),
        "SHUTDOWN_TIMEOUT": "2",
    }
    lines.update(settings)
    path = tmp / "config.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return path


SLEEP = "import time; time.sleep(120)"


def start_fake_media_server() -> subprocess.Popen:
    """A process that our tools take for the media server by its command line
    (processes.MEDIA_MARKERS) and that exits 0 on SIGTERM. Returned once its handler is in
    place: a SIGTERM before that (a loaded machine can take seconds to start Python) would
    end it with SIGTERM's default, -15."""
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
        "print('ready', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [PY, "-c", code, "-m", "qwen3_vl_service.media"], env=clean_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    with proc.stdout:  # it writes nothing more
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"the fake media server did not start: {line!r}")
    return proc


def make_state(
    pid: int = 12345, create_time: float = 1000.0, tag: str = "q3vl-test-1", **kw
) -> runstate.RunState:
    """A RunState with plausible values; KW overrides any field."""
    values = dict(
        pid=pid,
        create_time=create_time,
        tag=tag,
        host="127.0.0.1",
        port=8010,
        media_host="127.0.0.1",
        media_port=8080,
        model="/models/Qwen3-VL-235B-A22B-Thinking-FP8",
        served_model_name="qwen3-vl-fp8",
        started_at="2025-11-29T10:00:00+00:00",
        config_path="/work/config.env",
        log_file="/work/logs/service.log",
        private_tmp="",
        detached=False,
    )
    values.update(kw)
    return runstate.RunState(**values)


def run_dir_of(tmp: Path) -> Path:
    """The run folder of write_config(TMP)'s service (scope.paths)."""
    return (tmp / "run" / SERVICE).resolve()


def media_dir_of(tmp: Path, media_port: int) -> Path:
    """Where write_config(TMP)'s media server keeps its pid file (scope.paths)."""
    return (tmp / "run" / scope.media_folder(media_port)).resolve()


def gone(pid: int) -> bool:
    """The pid is gone or a zombie (a zombie holds nothing but its pid)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate, timeout: float = 30.0, step: float = 0.05) -> bool:
    return readiness.poll_until(predicate, timeout, step)


def kill_pids(pids) -> None:
    """SIGKILL the given pids (the test's own processes) if they still run."""
    for pid in pids:
        if pid and not gone(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class Standin:
    """A running stand-in server tree, tagged as ours."""

    def __init__(
        self,
        tmp: Path,
        *,
        port: int,
        tag: str,
        orphan: bool = False,
        extra_env=None,
        args=(),
        keep_environ: bool = True,
        new_session: bool = False,
    ) -> None:
        """KEEP_ENVIRON: set SPT_NOENV as the launcher does; without it the titled children's
        /proc/<pid>/environ is wiped by setproctitle. NEW_SESSION: the tree gets its own
        process group (as a detached start, or a start from an interactive shell)."""
        self.tmp = tmp
        self.port = port
        self.tag = tag
        self.pids_file = tmp / f"pids-{tag}.json"
        env = clean_env(**{TAG_ENV: tag, RUN_DIR_ENV: str(run_dir_of(tmp))}, **(extra_env or {}))
        env.pop("SPT_NOENV", None)
        if keep_environ:
            env.update(TITLE_ENV)
        argv = [PY, str(STANDIN), "--port", str(port), "--pids-file", str(self.pids_file), *args]
        if orphan:
            argv.append("--orphan")
        self.log = tmp / f"standin-{tag}.log"
        self._log_fh = open(self.log, "wb")  # noqa: SIM115 - closed in cleanup()
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log_fh, stderr=subprocess.STDOUT, start_new_session=new_session
        )
        self.pids: dict = {}

    def wait_ready(self, timeout: float = 20.0) -> dict:
        assert wait_until(lambda: self.pids_file.exists() or self.proc.poll() is not None, timeout), (
            "stand-in slow"
        )
        assert self.proc.poll() is None, f"stand-in exited: {self.log.read_text()}"
        self.pids = json.loads(self.pids_file.read_text())
        return self.pids

    def all_pids(self) -> list[int]:
        p = self.pids
        return [
            x
            for x in [p.get("api"), p.get("engine"), *p.get("workers", []), p.get("spawner"), p.get("orphan")]
            if x
        ]

    def write_state(self, *, private_tmp: str = "", detached: bool = False) -> runstate.RunState:
        proc = psutil.Process(self.proc.pid)
        state = make_state(
            pid=self.proc.pid,
            create_time=proc.create_time(),
            tag=self.tag,
            port=self.port,
            media_port=1,
            model=str(self.tmp / "model"),
            served_model_name="standin-model",
            started_at=runstate.now_iso(),
            config_path=str(self.tmp / "config.env"),
            log_file=str(self.log),
            private_tmp=private_tmp,
            detached=detached,
        )
        runstate.write(run_dir_of(self.tmp), state)
        return state

    def cleanup(self) -> None:
        from qwen3_vl_service.machine import processes

        # Also whatever carries this test's unique tag (started by this test, whatever its state).
        tagged = [p.pid for p in processes.find_ours(None, self.tag)]
        kill_pids([*self.all_pids(), *tagged])
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(5)
        self._log_fh.close()


def start_decoy(title: str, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([PY, str(STANDIN), "--role", "decoy", "--title", title], env=env)
    # Wait for the title to be set.
    wait_until(lambda: _cmd(proc.pid).startswith(title) or proc.poll() is not None, 10)
    return proc


def _cmd(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def run_tool(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, str(REPO / script), *args],
        cwd=REPO,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def environ_of(pid: int) -> dict:
    """PID's environment, or {} when it is gone or unreadable."""
    try:
        return psutil.Process(pid).environ()
    except psutil.Error:
        return {}
