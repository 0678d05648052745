"""The supervisor: keeps the service serving through faults (RESTART=on-failure).

    python -m qwen3_vl_service.lifecycle.supervisor [--config FILE] --expert-parallel on|off

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
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qwen3_vl_service.core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from qwen3_vl_service.core.names import RECORD_FILE

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
        """None while it serves; else the cause of its failure, one line. May raise Finished."""

    def cleanup(self) -> None:
        """After a failure: stop what is left of it (orphans included)."""

    def stop(self) -> None:
        """On a stop request: stop it gracefully (in-flight requests finish), or leave it (shared)."""


# ---------------------------------------------------------------------------
# The record: <RUN_DIR>/supervisor.json, written by the supervisor only


def record_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / RECORD_FILE


def _now_iso() -> str:
    from qwen3_vl_service.lifecycle.runstate import now_iso

    return now_iso()


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
        import psutil

        from qwen3_vl_service.lifecycle.runstate import this_node

        self.path = path
        me = psutil.Process()
        self.data: dict[str, Any] = {
            "pid": me.pid,
            "create_time": me.create_time(),
            "tag": tag,
            "node": this_node(),
            "started_at": _now_iso(),
            "restart": restart,
            "policy": {"max_restarts": policy.max_restarts, "window_s": policy.window},
            "state": "starting",
            "restarts": 0,
            "last_cause": "",
            "last_restart_at": "",
            "gave_up": "",
            "history": [],
            # The service's port and media server: while vLLM restarts, service.json is gone,
            # and scope.media_users still has to count this service as the media server's user.
            "port": port,
            "media": list(media) if media else None,
        }

    def update(self, **changes: Any) -> None:
        self.data.update(changes)
        _write_json(self.path, self.data)

    def restarted(self, unit: str, cause: str) -> None:
        at = _now_iso()
        history = [*self.data["history"], {"at": at, "unit": unit, "cause": cause}][-HISTORY:]
        self.update(
            restarts=self.data["restarts"] + 1,
            last_cause=f"{unit}: {cause}",
            last_restart_at=at,
            history=history,
            state="restarting",
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_record(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(record_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("pid"), int) and isinstance(data.get("tag"), str)
    return data if ok else None


def live(run_dir: str | os.PathLike[str]):
    """The recorded supervisor's process (psutil), if it still runs here and is the one recorded."""
    import psutil

    from qwen3_vl_service.lifecycle.runstate import this_node
    from qwen3_vl_service.machine.processes import is_recorded

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
    return {"running": running, "state": state, **{k: data.get(k) for k in keys}}


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
        self.wakeup = threading.Event()
        self.signals: deque[int] = deque()

    def _on_signal(self, signum: int, _frame) -> None:
        # Only queue it: the loop acts (a handler may run in the middle of anything).
        self.signals.append(signum)
        self.wakeup.set()

    def _wait(self, seconds: float) -> bool:
        """Sleep up to SECONDS; True when a stop signal came."""
        if not self.signals:
            self.wakeup.wait(seconds)
            self.wakeup.clear()
        return bool(self.signals)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.echo(
            f"supervising {', '.join(u.name for u in self.units)} (pid {os.getpid()}): restart on failure, "
            f"at most {self.policy.max_restarts} restart(s) within {self.policy.window:g} s"
        )
        for unit in self.units:
            unit.start()
        self.record.update(state="running")
        while not self._wait(CHECK_S):
            for unit in self.units:
                try:
                    cause = unit.check(time.monotonic())
                except Finished as done:
                    self.echo(f"{unit.name}: {done}; not restarted")
                    return self._stop(signal.SIGTERM)
                if cause is None:
                    continue
                if not self._restart(unit, cause):
                    return self._give_up(unit, cause)
                if self.signals:
                    break
        return self._stop()

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
            return True  # stopped during the backoff: the loop ends
        unit.start()
        self.record.update(state="running")
        return True

    def _give_up(self, unit: Unit, cause: str) -> int:
        n = len(self.failures[unit.name].times)
        why = (
            f"{unit.name} failed {n} times within {self.policy.window:g} s "
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


def _echo(message: str) -> None:
    """A line into the log (our stdout is the tee into service.log)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[supervisor {stamp}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from qwen3_vl_service.core import cli
    from qwen3_vl_service.core.errors import UsageError
    from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
    from qwen3_vl_service.deployment import scope
    from qwen3_vl_service.settings.config import load

    log_holder: list[Path | None] = [None]

    def body() -> int:
        parser = cli.ArgumentParser(
            prog="python -m qwen3_vl_service.lifecycle.supervisor",
            description="Keep vLLM and the media server up (run by start_service.py).",
        )
        parser.add_config()
        parser.add_argument("--expert-parallel", choices=("on", "off"), required=True)
        parser.add_argument("--detached", action="store_true", help="started by start_service.py --detach")
        parser.add_argument(
            "--plan", default="{}", help="the launcher's plan decisions (vllm_args.plan_decisions)"
        )
        parser.add_argument("--replica", type=int, metavar="INDEX", help="keep up this replica (router mode)")
        parser.add_argument("--replica-port", type=int, metavar="PORT", help="the replica's port")
        args = parser.parse_args(argv)
        if (args.replica is None) != (args.replica_port is None) or (args.replica or 0) < 0:
            raise UsageError(
                f"--replica {args.replica} --replica-port {args.replica_port}: give both, INDEX >= 0",
                fix="start the replicas with start_service.py",
            )
        tag = os.environ.get(TAG_ENV, "")
        if not tag:
            raise UsageError(f"{TAG_ENV} is not set", fix="start the service with start_service.py")
        cfg = load(args.config)
        log_holder[0] = scope.paths(cfg).launcher_log
        replica = args.replica is not None
        if replica:
            # A replica behind the router: its own port, run and log folders; its GPUs (or
            # cores) come in our environment (replicas._spawn), which vLLM inherits.
            from qwen3_vl_service.deployment.cluster import router_replica_config

            cfg = router_replica_config(cfg, args.replica, args.replica_port)
        # The tag stays in /proc/<pid>/environ (what stop_service.py reads, set at exec) but
        # leaves os.environ: the media server we may start is not a process of this run.
        os.environ.pop(TAG_ENV, None)
        os.environ.pop(RUN_DIR_ENV, None)
        from qwen3_vl_service.lifecycle.supervised import MediaUnit, VllmUnit

        policy = Policy.of(cfg)
        record = Record(
            record_path(scope.paths(cfg).run_dir),
            tag=tag,
            policy=policy,
            restart=cfg.restart,
            port=cfg.port,
            media=(cfg.media_host, cfg.media_port) if cfg.media_server else None,
        )
        # The media server is shared by the replicas: start_service.py starts it, not a replica's supervisor.
        units: list[Unit] = [MediaUnit(cfg, echo=_echo)] if cfg.media_server and not replica else []
        units.append(
            VllmUnit(
                cfg,
                tag=tag,
                expert_parallel=args.expert_parallel == "on",
                plan_decisions=args.plan,
                detached=args.detached,
                echo=_echo,
                log_file=scope.paths(cfg).service_log,
                name=f"replica-{args.replica} vLLM" if replica else "vLLM",
            )
        )
        return Supervisor(units, policy, record, echo=_echo).run()

    return cli.run(body, log_path=lambda: log_holder[0] or Path("logs") / "launcher.log")


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "RECORD_FILE",
    "Failures",
    "Finished",
    "Policy",
    "Record",
    "Supervisor",
    "Unit",
    "live",
    "main",
    "read_record",
    "record_path",
    "request_stop",
    "status",
]
