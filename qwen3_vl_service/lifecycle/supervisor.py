"""The supervisor: keeps the service serving through faults (RESTART=on-failure).

    .venv/bin/python -m qwen3_vl_service.lifecycle.supervised --deployment FILE --unit NAME [--config FILE]

Started by start_service.py (``--detach``: in the background; otherwise the
launcher execs it), never by hand: it expects the service tag in its
environment, which it keeps (so that stop_service.py finds it) but does not
pass to the media server.

The loop is short and boring, like uvicorn's ``supervisors/multiprocess.py``:
wait on an event with a timeout, handle what the signal handlers queued,
check each unit, restart a failed one after a backoff, give up loudly on a
crash loop. A *unit* is one thing kept up: vLLM (``VllmUnit``: its API
server exited, one of its ``VLLM::*`` processes is gone, or ``/health``
failed for HEALTH_FAIL_AFTER seconds) or the media server (``MediaUnit``).
A failed unit is cleaned up with the same orphan-safe stop as
stop_service.py, then started again; each restart and its cause go to the
log (our stdout, which is service.log) and to ``<RUN_DIR>/supervisor.json``,
which status_service.py shows. More than MAX_RESTARTS failures of a unit
within RESTART_WINDOW seconds end the supervisor with exit 1 and the cause.

SIGTERM, SIGINT or SIGHUP (stop_service.py, scancel, Ctrl+C) stop it for
good: no restart after that, vLLM gets SIGTERM (its in-flight requests
finish), then the supervisor exits. A unit is plain code with four methods,
so that other process kinds (a replica behind a router) can be kept up by
the same loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from qwen3_vl_service.core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from qwen3_vl_service.core.fileio import write_atomic
from qwen3_vl_service.core.names import RECORD_FILE
from qwen3_vl_service.core.signals import Inbox
from qwen3_vl_service.lifecycle.runstate import now_iso, this_node
from qwen3_vl_service.machine.processes import is_recorded

CHECK_S = 0.5  # how often processes are looked at
HEALTH_EVERY_S = 5.0  # how often /health is asked
HEALTH_TIMEOUT_S = 10.0
BACKOFF_CAP_S = 300.0
HISTORY = 20  # restarts kept in the record


@dataclass(frozen=True)
class Policy:
    max_restarts: int  # restarts allowed within WINDOW; the next failure gives up
    window: float
    backoff: float  # seconds before the first restart, doubled for each further one

    @classmethod
    def of(cls, cfg) -> Policy:
        return cls(cfg.max_restarts, float(cfg.restart_window), float(cfg.restart_backoff))


class Failures:
    """Failures of one unit within the policy's window (pure: the caller gives the time)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.times: deque[float] = deque()

    def add(self, now: float) -> float | None:
        """Count a failure at NOW: the delay before the restart, or None to give up."""
        self.times.append(now)
        while self.times and now - self.times[0] > self.policy.window:
            self.times.popleft()
        n = len(self.times)
        if n > self.policy.max_restarts:
            return None
        return min(BACKOFF_CAP_S, self.policy.backoff * 2 ** (n - 1))


class Finished(Exception):
    """Raised by a unit's check() when it ended cleanly by itself: nothing to restart (systemd's
    on-failure: a clean exit is no failure). The supervisor stops the rest and exits 0."""


class Unit(Protocol):
    name: str

    def start(self) -> None:
        """Start it; a failure to start is returned by the next check(), never raised."""

    def check(self, now: float) -> str | None:
        """None while it serves; else the cause of its failure, one line. May raise Finished.

        A unit may also have a ``condition`` attribute: "" while well, else a line short of a failure
        ("stalling: ...") or the state behind the failure ("hung: ..."), which the record shows."""

    def cleanup(self) -> None:
        """After a failure: stop what is left of it (orphans included)."""

    def stop(self) -> None:
        """On a stop request: stop it gracefully (in-flight requests finish), or leave it (shared)."""


# ---------------------------------------------------------------------------
# The record: <RUN_DIR>/supervisor.json, written by the supervisor only


def record_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / RECORD_FILE


class Record:
    """What status shows: pid, state, restarts and their causes. Written atomically."""

    def __init__(
        self,
        path: Path,
        *,
        tag: str,
        policy: Policy,
        restart: str = "on-failure",
        port: int = 0,
        media: tuple[str, int] | None = None,
    ) -> None:
        self.path = path
        self.write_failed = False
        me = psutil.Process()
        self.data: dict[str, Any] = {
            "pid": me.pid,
            "create_time": me.create_time(),
            "tag": tag,
            "node": this_node(),
            "started_at": now_iso(),
            "restart": restart,
            "policy": {"max_restarts": policy.max_restarts, "window_s": policy.window},
            "state": "starting",
            "restarts": 0,
            "last_cause": "",
            "last_restart_at": "",
            "gave_up": "",
            "history": [],
            "conditions": {},  # unit name -> "stalling: ..." / "hung: ..." (liveness.py), while it lasts
            # The service's port and media server: while vLLM restarts, service.json is gone,
            # and scope.media_users still has to count this service as the media server's user.
            "port": port,
            "media": list(media) if media else None,
        }

    def update(self, **changes: Any) -> None:
        self.data.update(changes)
        try:
            write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            # A full disk, a removed folder: the record is what status shows, not what keeps vLLM
            # up. Supervising goes on (an exception here once left vLLM running unsupervised), the
            # next update tries again, and the log says so once.
            if not self.write_failed:
                print(
                    f"warning: cannot write the supervisor's record {self.path}: {exc.strerror or exc}; "
                    "supervising goes on, status shows the last record written",
                    file=sys.stderr,
                    flush=True,
                )
            self.write_failed = True
        else:
            self.write_failed = False

    def restarted(self, unit: str, cause: str) -> None:
        at = now_iso()
        history = [*self.data["history"], {"at": at, "unit": unit, "cause": cause}][-HISTORY:]
        self.update(
            restarts=self.data["restarts"] + 1,
            last_cause=f"{unit}: {cause}",
            last_restart_at=at,
            history=history,
            state="restarting",
        )


def read_record(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(record_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("pid"), int) and isinstance(data.get("tag"), str)
    return data if ok else None


def live(run_dir: str | os.PathLike[str]):
    """The recorded supervisor's process (psutil), if it still runs here and is the one recorded."""
    data = read_record(run_dir)
    if data is None or data.get("node", this_node()) != this_node():
        return None
    try:
        proc = psutil.Process(data["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return proc if is_recorded(proc, data["tag"], float(data.get("create_time", 0.0))) else None


def status(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record for status_service.py, with whether the supervisor still runs."""
    data = read_record(run_dir)
    if data is None:
        return None
    running = live(run_dir) is not None
    state = data.get("state", "?")
    if not running and state not in ("gave up", "stopped"):
        state = "gone (killed?)"
    keys = ("pid", "started_at", "restarts", "last_cause", "last_restart_at", "gave_up", "policy")
    # A unit's condition holds while the supervisor watches it; a gone supervisor watches nothing.
    conditions = (data.get("conditions") or {}) if running else {}
    return {"running": running, "state": state, **{k: data.get(k) for k in keys}, "conditions": conditions}


def request_stop(run_dir: str | os.PathLike[str]):
    """SIGTERM the recorded supervisor (a user's stop): it restarts nothing after this.

    Returns its process (to wait for), or None when none runs. Never signals
    the calling process itself (the supervisor calls stop_service() too).
    """
    proc = live(run_dir)
    if proc is None or proc.pid == os.getpid():
        return None
    with contextlib.suppress(Exception):
        proc.send_signal(signal.SIGTERM)
    return proc


# ---------------------------------------------------------------------------
# The loop


class Supervisor:
    def __init__(
        self,
        units: Sequence[Unit],
        policy: Policy,
        record: Record,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.units = list(units)
        self.failures = {u.name: Failures(policy) for u in units}
        self.policy = policy
        self.record = record
        self.echo = echo
        # The handler only queues the signal and writes a byte to a self-pipe (core/signals.py: why
        # not Event.set()); the loop acts.
        self.inbox = Inbox()
        self.signals = self.inbox.received
        self._on_signal = self.inbox.handler
        self.started: list[Unit] = []  # what stop-on-error must stop

    def _wait(self, seconds: float) -> bool:
        """Sleep up to SECONDS; True when a stop signal came."""
        return self.inbox.wait(seconds)

    def run(self) -> int:
        self.inbox.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        try:
            return self._loop()
        except BaseException as exc:
            # Anything unexpected (a bug, a failed write): never leave vLLM running unsupervised in
            # its own session. Stop what was started, then let cli.run report it (exit 1).
            self._stop_after_error(exc)
            raise

    def _stop_after_error(self, exc: BaseException) -> None:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        with contextlib.suppress(Exception):
            self.echo(f"internal error in the supervisor ({what}): stopping what it started")
        for unit in reversed(self.started):
            try:
                unit.stop()
            except Exception as again:  # noqa: BLE001 - the next unit must still be stopped
                with contextlib.suppress(Exception):
                    self.echo(f"{unit.name}: stop failed too: {type(again).__name__}: {again}")
        with contextlib.suppress(Exception):
            self.record.update(state="stopped", last_cause=f"supervisor: internal error: {what}")

    def _start(self, unit: Unit) -> None:
        if unit not in self.started:
            self.started.append(unit)
        unit.start()

    def _loop(self) -> int:
        self.echo(
            f"supervising {', '.join(u.name for u in self.units)} (pid {os.getpid()}): restart on failure, "
            f"at most {self.policy.max_restarts} restart(s) within {self.policy.window:g} s"
        )
        for unit in self.units:
            if self.signals:
                return self._stop()  # a stop during the start: start nothing more
            self._start(unit)
        self.record.update(state="running")
        while not self._wait(CHECK_S):
            for unit in self.units:
                try:
                    cause = unit.check(time.monotonic())
                except Finished as done:
                    self.echo(f"{unit.name}: {done}; not restarted")
                    return self._stop(signal.SIGTERM)
                self._note_condition(unit)
                if cause is None:
                    continue
                if not self._restart(unit, cause):
                    return self._give_up(unit, cause)
                if self.signals:
                    break
        return self._stop()

    def _note_condition(self, unit: Unit) -> None:
        """A unit's condition short of a failure ("stalling: ...", "hung: ...", liveness.py) goes to
        the record when it changes: status shows it with its evidence."""
        text = getattr(unit, "condition", "")
        conditions = dict(self.record.data.get("conditions") or {})
        if conditions.get(unit.name, "") == text:
            return
        if text:
            conditions[unit.name] = text
        else:
            conditions.pop(unit.name, None)
        self.record.update(conditions=conditions)

    def _restart(self, unit: Unit, cause: str) -> bool:
        """Clean up after UNIT's failure and start it again; False when the policy says give up."""
        self.echo(f"{unit.name} failed: {cause}")
        delay = self.failures[unit.name].add(time.monotonic())
        if delay is None:
            return False
        unit.cleanup()
        self.record.restarted(unit.name, cause)
        n = len(self.failures[unit.name].times)
        self.echo(
            f"restarting {unit.name} in {delay:g} s (restart {n} of at most "
            f"{self.policy.max_restarts} within {self.policy.window:g} s)"
        )
        if self._wait(delay):
            return True  # stopped during the cleanup or the backoff: the loop ends, nothing is started
        self._start(unit)
        self._note_condition(unit)  # a new start: what the last one showed is history (last_cause)
        self.record.update(state="running")
        return True

    def _give_up(self, unit: Unit, cause: str) -> int:
        n = len(self.failures[unit.name].times)
        why = (
            f"{unit.name} failed {n} time{'' if n == 1 else 's'} within {self.policy.window:g} s "
            f"(MAX_RESTARTS={self.policy.max_restarts}); last cause: {cause}"
        )
        self.echo(f"giving up: {why}")
        unit.cleanup()
        for u in reversed(self.units):
            if u is not unit:
                u.stop()  # as on a stop request: a shared media server stays
        self.record.update(state="gave up", gave_up=why, last_cause=f"{unit.name}: {cause}")
        print(f"error: the supervisor gave up: {why}", file=sys.stderr, flush=True)
        return EXIT_FAILED

    def _stop(self, sig: int | None = None) -> int:
        if sig is None:
            sig = self.signals[0] if self.signals else signal.SIGTERM
            self.echo(f"{signal.Signals(sig).name}: stopping, no restart from now on")
        self.record.update(state="stopping")
        for unit in reversed(self.units):
            unit.stop()
        self.record.update(state="stopped")
        return EXIT_INTERRUPTED if sig == signal.SIGINT else EXIT_OK


# ---------------------------------------------------------------------------
# The command


__all__ = [
    "Failures",
    "Finished",
    "Policy",
    "Record",
    "Supervisor",
    "Unit",
    "live",
    "read_record",
    "record_path",
    "request_stop",
    "status",
]
