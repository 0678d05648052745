"""What the supervisor keeps up for one service: its vLLM and its media server (see supervisor.py).

Each unit starts, checks and cleans up through the functions the rest of the
service uses: vllm_args.build for the command, the launcher's run state and
media start, stop.stop_service for the orphan-safe cleanup, readiness for the
likely cause in the log. A replica behind a router is kept up by giving each
one its own VllmUnit (its own config: port, run folder).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from qwen3_vl_service.core import hosts
from qwen3_vl_service.core.errors import ServiceError
from qwen3_vl_service.deployment import scope
from qwen3_vl_service.lifecycle import readiness, runstate
from qwen3_vl_service.lifecycle.supervisor import HEALTH_EVERY_S, HEALTH_TIMEOUT_S, Finished
from qwen3_vl_service.machine import processes
from qwen3_vl_service.planning import vllm_args
from qwen3_vl_service.settings.config import ServiceConfig

# After a failure, what is left of vLLM gets this long after SIGTERM: its requests are lost anyway.
CLEANUP_TIMEOUT_S = 10.0
# The log read for the likely cause of a failure: at most this much of its end.
_DIAGNOSE_BYTES = 256 * 1024


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
        return f"signal {-returncode}"
    return f"status {returncode}"


def _health_error(url: str, timeout: float = HEALTH_TIMEOUT_S) -> str | None:
    """None when URL answers 200; else what went wrong, short."""
    import requests

    try:
        with requests.Session() as session:
            session.trust_env = False  # the server is on this node: never through a proxy
            resp = session.get(url, timeout=timeout)
    except requests.Timeout:
        return f"no answer within {timeout:g} s"
    except requests.ConnectionError:
        return "connection refused"
    except requests.RequestException as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if resp.status_code == 200 else f"answered {resp.status_code}"


class _HealthClock:
    """When /health last answered, and whether a failing one has failed for long enough."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.next_at = 0.0
        self.ok_once = False
        self.failing_since: float | None = None

    def due(self, now: float) -> bool:
        if now < self.next_at:
            return False
        self.next_at = now + HEALTH_EVERY_S
        return True

    def failed_for(self, now: float, error: str | None) -> float:
        """Record an answer (ERROR None: healthy); seconds it has been failing since the last 200."""
        if error is None:
            self.ok_once, self.failing_since = True, None
            return 0.0
        if self.failing_since is None:
            self.failing_since = now
        return now - self.failing_since


class VllmUnit:
    """vLLM's API server with its EngineCore and workers; writes the run state of each start."""

    name = "vLLM"

    def __init__(
        self,
        cfg: ServiceConfig,
        *,
        tag: str,
        expert_parallel: bool,
        detached: bool,
        echo: Callable[[str], None],
        log_file: Path,
        plan_decisions: str = "{}",
        name: str = "vLLM",
    ) -> None:
        self.name = name  # the supervisor's log and record name the unit by it (a replica's too)
        self.cfg, self.tag, self.expert_parallel, self.detached = cfg, tag, expert_parallel, detached
        # The launcher's MAX_NUM_SEQS=auto and YaRN decisions: every restart runs its command.
        self.plan = vllm_args.plan_from_decisions(cfg, plan_decisions)
        self.echo, self.log_file = echo, log_file
        self.proc: subprocess.Popen | None = None
        self.start_error: str | None = None
        self.engine: list = []  # (process, title) of the VLLM::* processes seen at the first healthy answer
        self.health = _HealthClock()
        self.started = 0.0
        self.log_offset = 0
        self.health_url = f"{hosts.local_url(cfg.host, cfg.port)}/health"

    def start(self) -> None:
        from qwen3_vl_service.lifecycle.launcher import _state

        self.start_error, self.engine, self.proc = None, [], None
        self.health.reset()
        self.started = time.monotonic()
        self.log_offset = readiness.log_size(self.log_file)
        private_tmp = ""
        try:
            # Named by the tag, as the launcher's report showed it; the last start's is gone by now
            # (cleanup), unless something held it: then it goes the way stop_service.py removes it.
            private_tmp = runstate.private_tmp_path(self.tag)
            runstate.remove_private_tmp(private_tmp)
            runstate.make_private_tmp(self.tag)
            cmd = vllm_args.build(
                self.cfg,
                expert_parallel=self.expert_parallel,
                tag=self.tag,
                private_tmp=private_tmp,
                plan=self.plan,
            )
            env = vllm_args.with_inherited(cmd.env, os.environ)
            # Its own process group, as a detached start always had: stop's group fallback finds
            # children whose environment was wiped, and Ctrl+C reaches us, who stop it in order.
            self.proc = subprocess.Popen(
                list(cmd.argv), env=env, stdin=subprocess.DEVNULL, start_new_session=True
            )
            state = _state(
                self.cfg, pid=self.proc.pid, tag=self.tag, private_tmp=private_tmp, detached=self.detached
            )
            runstate.write(scope.paths(self.cfg).run_dir, state)
        except (OSError, ServiceError) as exc:
            self.start_error = f"cannot start vLLM: {exc}"
            return
        self.echo(f"started vLLM: pid {self.proc.pid}")

    def check(self, now: float) -> str | None:
        if self.start_error:
            return self.start_error
        assert self.proc is not None
        rc = self.proc.poll()
        if rc == 0 and self.health.ok_once:
            # A clean exit of a vLLM that served: someone stopped it (kill PID, SIGTERM). After an
            # engine crash it exits too, but its VLLM:: processes are found gone first (below).
            raise Finished(f"vLLM (pid {self.proc.pid}) exited by itself with status 0")
        if rc is not None:
            return f"vLLM's API server (pid {self.proc.pid}) exited with {describe_exit(rc)}{self._likely()}"
        for p, label in self.engine:
            if not processes.is_alive(p):
                return f"{label} (pid {p.pid}) is gone: killed or crashed{self._likely()}"
        if not self.health.due(now):
            return None
        error = _health_error(self.health_url)
        was_ok = self.health.ok_once
        failing = self.health.failed_for(now, error)
        if error is None:
            if not was_ok:
                self.engine = self._engine_processes()
                self.echo(f"vLLM is healthy after {now - self.started:.0f} s")
            return None
        if not was_ok:
            if now - self.started > self.cfg.startup_timeout:
                return f"no healthy /health within STARTUP_TIMEOUT={self.cfg.startup_timeout} s ({error})"
            return None
        if failing >= self.cfg.health_fail_after:
            limit = self.cfg.health_fail_after
            return f"/health failing for {failing:.0f} s (HEALTH_FAIL_AFTER={limit}): {error}"
        return None

    def _engine_processes(self) -> list:
        """(process, title) of the EngineCore and workers: losing one is vLLM's end, even if its API lives."""
        assert self.proc is not None
        from qwen3_vl_service.lifecycle.drain import engine_processes

        try:
            return [(p, processes.info(p).label) for p in engine_processes(psutil.Process(self.proc.pid))]
        except psutil.Error:
            return []  # it just exited: the next check says so

    def _likely(self) -> str:
        """'; likely: ...' from this start's part of the log, when readiness recognises the cause."""
        try:
            size = self.log_file.stat().st_size
            start = self.log_offset if self.log_offset <= size else 0  # rotated meanwhile
            with open(self.log_file, "rb") as fh:
                fh.seek(max(start, size - _DIAGNOSE_BYTES))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        cause = readiness.diagnose(text)
        return f"; likely: {cause}" if cause else ""

    def cleanup(self) -> None:
        """After a failure: stop_service.py's orphan-safe stop (tree, orphans by tag, IPC folder, state)."""
        self._stop(CLEANUP_TIMEOUT_S)

    def _stop(self, timeout: float) -> None:
        from qwen3_vl_service.lifecycle import stop

        report = stop.stop_service(
            scope.paths(self.cfg).run_dir,
            host=self.cfg.host,
            port=self.cfg.port,
            timeout=timeout,
            grace=min(timeout, stop.ORPHAN_GRACE_S),
            echo=self.echo,
        )
        for line in stop.render(report, include_media=False):
            if not line.startswith("note:"):  # other users' vLLM processes: not the supervisor's business
                self.echo(line)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1)  # reap our child

    def stop(self) -> None:
        """stop_service.py's stop: in-flight requests finish within SHUTDOWN_TIMEOUT, then nothing is left."""
        from qwen3_vl_service.lifecycle import stop

        self._stop(self.cfg.shutdown_timeout + stop.SHUTDOWN_GRACE_S)


class MediaUnit:
    """The media server of the config, started (or reused) the launcher's way; shared: never stopped here."""

    name = "media server"

    def __init__(self, cfg: ServiceConfig, *, echo: Callable[[str], None]) -> None:
        self.cfg, self.echo = cfg, echo
        self.proc: psutil.Process | None = None
        self.start_error: str | None = None
        self.health = _HealthClock()

    def start(self) -> None:
        from qwen3_vl_service.lifecycle.launcher import _ensure_media

        self.start_error = None
        self.health.reset()
        try:
            _ensure_media(self.cfg, self.echo)
        except ServiceError as exc:
            self.start_error = f"cannot start the media server: {exc.one_line()}"
            return
        self.proc = processes.media_server(scope.paths(self.cfg).media_dir)
        if self.proc is None:
            self.start_error = "the media server started but its pid file names no media server"

    def check(self, now: float) -> str | None:
        if self.start_error:
            return self.start_error
        if self.proc is None or not processes.is_alive(self.proc):
            return f"the media server (pid {self.proc.pid if self.proc else '?'}) is gone"
        if not self.health.due(now):
            return None
        from qwen3_vl_service.media import client

        cfg = self.cfg
        ok = client.is_ours_healthy(
            cfg.media_host, cfg.media_port, HEALTH_TIMEOUT_S, pid_file=scope.paths(cfg).media_pid_file
        )
        error = None if ok else "no answer from our media server"
        failing = self.health.failed_for(now, error)
        if error is not None and failing >= cfg.health_fail_after:
            return f"the media server's /health failing for {failing:.0f} s: {error}"
        return None

    def cleanup(self) -> None:
        if self.proc is not None and processes.is_alive(self.proc):
            with contextlib.suppress(Exception):
                kids = self.proc.children(recursive=True)
                processes.terminate([self.proc, *kids], 5.0)
        self.proc = None

    def stop(self) -> None:
        """Left running: other services may use it; stop_service.py --all stops it."""


__all__ = ["MediaUnit", "VllmUnit", "describe_exit"]
