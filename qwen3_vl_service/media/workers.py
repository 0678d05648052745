"""Several serving processes on one socket: a supervisor and its workers (MEDIA_WORKERS above 1).

Modelled on uvicorn's ``supervisors/multiprocess.py``: signal handlers only
queue, one loop waits on a selector, a worker that dies is replaced with a
limit, and the supervisor gives up loudly on a crash loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from qwen3_vl_service.core.childproc import die_with_parent
from qwen3_vl_service.core.names import MEDIA_SERVICE_ID
from qwen3_vl_service.media.app import SHUTDOWN_TIMEOUT_S, MediaSettings, run_serving, serve_socket
from qwen3_vl_service.media.logs import relay_to

# MEDIA_WORKERS=auto is min(CPUs, WORKERS_AUTO_MAX). 8, measured on a 32-core
# GPU host (bench/bench_media.py): 1 MiB files at 16 clients 0.87x nginx with
# 4 workers, 0.97x with 8; a 1 GiB file at 64 clients 0.80x and 1.08x. Idle
# workers cost only their memory (~30 MB each); the CPUs stay vLLM's unless
# media is being fetched.
WORKERS_AUTO_MAX = 8
# A worker that dies unexpectedly is replaced, up to this many times in this window.
RESTARTS_MAX = 5
RESTART_WINDOW_S = 60.0
# The supervisor writes the workers' log records at most this often (batches).
RELAY_BATCH_S = 0.02
# Blocked in the supervisor only around a worker's fork, and in the worker until it has its own
# dispositions (worker_main): a stop in between waits for them instead of being lost.
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

log = logging.getLogger(MEDIA_SERVICE_ID)


def auto_workers() -> int:
    """min(CPUs this process may use, WORKERS_AUTO_MAX): the 'auto' of --workers / MEDIA_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))  # a SLURM job's share, not the node's count
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, WORKERS_AUTO_MAX))


def worker_main(
    settings: MediaSettings, sock: socket.socket, parent: int, log_fd: int, close: list[int]
) -> None:
    """A worker, in the child of a fork: the supervisor's signal handling and
    descriptors off, logging through the pipe, then the same server as one process."""
    # SIGTERM when the supervisor dies, even by SIGKILL (elsewhere than Linux app.serve_socket()
    # looks at the parent pid once a second); not SIGKILL: downloads in flight still get their
    # SHUTDOWN_TIMEOUT_S, and the listening socket closes at once.
    die_with_parent(signal.SIGTERM, parent)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Forked with them blocked (Supervisor._spawn): a SIGTERM sent since the fork, which the
    # supervisor's inherited handler would have only noted, ends this worker now, before it serves.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    for fd in close:
        with contextlib.suppress(OSError):
            os.close(fd)
    relay_to(log_fd)
    try:
        code = run_serving(serve_socket(settings, sock, supervisor=parent, on_listening=_say_serving))
    except Exception:
        log.exception("worker pid %d failed", os.getpid())
        code = 1
    sys.exit(code)


def _say_serving() -> None:
    log.info("worker pid %d serving", os.getpid())


# After an error of the supervisor's own, how long its workers get to go after SIGTERM.
ABANDON_S = 5.0


class Supervisor:
    """Runs settings.workers serving processes on one listening socket, and nothing else.

    The socket is bound once, before the workers are forked, and inherited:
    one accept queue (a worker that dies takes no waiting connection with it)
    and no second bind (SO_REUSEPORT would let any process of this user join
    the port, an old media server of ours included). The supervisor answers
    no request; /health from any worker names the supervisor's pid, the one
    in the pid file, so that client.ensure_running() and stop_service.py see one
    server. SIGTERM (or SIGINT) here: the socket closes, each worker gets
    SIGTERM and its SHUTDOWN_TIMEOUT_S for downloads in flight, stragglers get
    SIGKILL, the pid file goes. A worker that dies otherwise is replaced
    (RESTARTS_MAX in RESTART_WINDOW_S, then the supervisor gives up: exit 1).

    Logging: one writer. Each worker formats its records (the access log
    line: as cheap as writing it) and sends them, NUL-terminated, down a pipe
    of its own; here whole records are written in batches through the one
    RotatingFileHandler, so that rotation is never raced, a record is never
    cut by another's, and each worker's order is kept. Pickled LogRecords
    through multiprocessing.Queue/QueueHandler cost twice as much per record
    in the worker (format, copy, pickle, a feeder thread) and once more here.
    """

    def __init__(self, settings: MediaSettings, sock: socket.socket, handler: logging.Handler) -> None:
        self.settings = settings
        self.sock = sock
        self.handler = handler
        self.pid = os.getpid()
        self.ctx = multiprocessing.get_context("fork")
        self.selector = selectors.DefaultSelector()
        self.procs: dict[int, Any] = {}  # slot -> multiprocessing.Process
        self.pipes: dict[int, bytearray] = {}  # read end of a worker's log pipe -> unfinished record
        self.failures: list[float] = []
        self.signals: list[int] = []
        self.deadline: float | None = None
        self.code = 0
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)

    def run(self, on_listening: Callable[[], None]) -> int:
        """Start the workers, call ON_LISTENING, supervise until SIGTERM/SIGINT; the exit code."""

        def on_signal(signum: int, frame: Any) -> None:
            self.signals.append(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        signal.set_wakeup_fd(self.wake_w)
        self.selector.register(self.wake_r, selectors.EVENT_READ, ("wake", -1))
        try:
            for slot in range(self.settings.workers):
                self._spawn(slot)
            on_listening()
            while self.procs or self.pipes:
                timeout = 1.0 if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                events = self.selector.select(timeout)
                # Signals first: a worker that stop_service.py stopped at the same time is no failure.
                with contextlib.suppress(OSError):
                    while os.read(self.wake_r, 512):
                        pass
                if self.signals and self.deadline is None:
                    self._stop(f"signal {self.signals[0]}")
                relayed = False
                for key, _ in events:
                    kind, slot = key.data
                    if kind == "log":
                        self._relay(key.fd)
                        relayed = True
                    elif kind == "exit":
                        self._reap(slot)
                if relayed and self.deadline is None:
                    # Let records gather: one wake-up and write per batch rather than per request.
                    time.sleep(RELAY_BATCH_S)
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    for proc in self.procs.values():
                        log.warning("worker pid %d still running: SIGKILL", proc.pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(proc.pid, signal.SIGKILL)
                    self.deadline = time.monotonic() + 5.0
        finally:
            self._end_left_workers()
        log.info("stopped")
        if self.code:
            return self.code
        return 130 if self.signals and self.signals[0] == signal.SIGINT else 0

    def _end_left_workers(self) -> None:
        """After an error of our own: TERM the workers still there, KILL those that outlive
        ABANDON_S, and reap them all, so that the exit never waits."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + ABANDON_S
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.warning("worker pid %d still running after SIGTERM: SIGKILL", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.join(5.0)

    def _spawn(self, slot: int) -> None:
        r, w = os.pipe()
        with contextlib.suppress(AttributeError, OSError):
            fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for bursts: a full pipe blocks the worker
        close = [r, self.wake_r, self.wake_w, self.selector.fileno(), *self.pipes]
        proc = self.ctx.Process(
            target=worker_main,
            args=(self.settings, self.sock, self.pid, w, close),
            name=f"media-worker-{slot}",
        )
        # The child starts with the supervisor's handlers, which only take a note in its own
        # memory: blocked, a SIGTERM to it waits until worker_main() has SIGTERM's default.
        # Ours wait the few milliseconds of the fork and arrive when the mask is restored.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(w)  # the worker's end: EOF here once it exits
        os.set_blocking(r, False)
        self.pipes[r] = bytearray()
        self.selector.register(r, selectors.EVENT_READ, ("log", slot))
        self.selector.register(proc.sentinel, selectors.EVENT_READ, ("exit", slot))
        self.procs[slot] = proc

    def _relay(self, fd: int) -> None:
        """Write the whole records that arrived on a worker's pipe; keep a partial one."""
        buf = self.pipes[fd]
        eof = False
        try:
            while len(buf) < (1 << 22):
                data = os.read(fd, 1 << 16)
                if not data:
                    eof = True
                    break
                buf += data
        except BlockingIOError:
            pass
        end = len(buf) if eof else buf.rfind(b"\0") + 1
        if end > 0:
            text = bytes(buf[:end]).decode("utf-8", "replace").rstrip("\0").replace("\0", "\n")
            del buf[:end]
            if text:
                record = logging.makeLogRecord({"msg": text, "relayed": True, "levelno": logging.INFO})
                self.handler.handle(record)
        if eof:
            self.selector.unregister(fd)
            os.close(fd)
            del self.pipes[fd]

    def _reap(self, slot: int) -> None:
        proc = self.procs.pop(slot)
        self.selector.unregister(proc.sentinel)
        proc.join()
        if self.deadline is not None:
            return
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        now = time.monotonic()
        self.failures = [t for t in self.failures if now - t < RESTART_WINDOW_S] + [now]
        if len(self.failures) > RESTARTS_MAX:
            log.error(
                "worker pid %d %s: %d failures in %.0f s, giving up",
                proc.pid,
                how,
                len(self.failures),
                RESTART_WINDOW_S,
            )
            self.code = 1
            self._stop("too many worker failures")
            return
        log.warning("worker pid %d %s; starting another", proc.pid, how)
        self._spawn(slot)

    def _stop(self, why: str) -> None:
        log.info("%s: stopping (in-flight requests get %.0f s)", why, SHUTDOWN_TIMEOUT_S)
        self.sock.close()  # our copy; the workers close theirs at SIGTERM
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        self.deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S + 5.0
