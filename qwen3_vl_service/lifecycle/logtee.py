"""Copy stdin to stdout and to a size-rotated log file: the tee between vLLM and logs/<service>/service.log.

    .venv/bin/python -m qwen3_vl_service.lifecycle.logtee LOGFILE --max-bytes N --backups K [--quiet]

The launcher starts it on a pipe, points its own stdout and stderr at the
pipe, then execs vLLM (``start_tee()`` does the first two steps). Hence:

- The bytes reach the terminal unchanged (tqdm bars keep their ``\\r``);
  the file gets one line per ``\\n`` or ``\\r`` segment, ANSI colours
  removed, flushed at once, rotated by ``logrotate.SizeRotatingHandler``.
- SIGINT, SIGTERM and SIGHUP are ignored: Ctrl+C at the terminal and
  ``scancel`` signal the whole process group, and the tee must outlive vLLM
  to record its shutdown lines (and vLLM must not get EPIPE while it shuts
  down). It ends at EOF, which comes when the last process that holds the
  pipe (vLLM, its EngineCore and workers) is gone.
- If the terminal goes away (EIO/EPIPE on stdout), it keeps writing the file.
- The log never stops the service: the pipe is read by one thread and
  written by another, through a bounded queue. A writer that blocks (a hung
  network file system, a terminal paused with Ctrl+S) makes the tee drop
  output instead of filling the pipe, which would block vLLM's next print. A
  full disk drops lines until writes work again; a log file removed by
  someone is created anew. Each is said once on stderr.
- With ``--end-of-run RUN_DIR TAG`` (a foreground vLLM, which has no
  supervisor to tidy up after it), at EOF, once no process carries TAG, the
  run's private temp folder (vLLM's IPC sockets, gloo's file) and its state
  file go: a Ctrl+C leaves nothing behind. A newer run's state stays.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from qwen3_vl_service.core.logrotate import rotating_handler
from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.lifecycle import runstate
from qwen3_vl_service.machine import processes

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]")
_SPLIT = re.compile(rb"[\r\n]")
_CHUNK = 65536
# A line longer than this is written in pieces rather than held in memory.
_MAX_PENDING = 1 << 20
# Chunks (up to _CHUNK bytes each) held while the writer is slow: 16 MiB at most.
_QUEUE_CHUNKS = 256
# How often the file is checked for having been removed or replaced (one stat).
_CHECK_S = 1.0
# At EOF, how long the writer may take to finish what is queued.
_FINISH_S = 10.0


def _handler(path: Path, max_bytes: int, backups: int) -> logging.Handler:
    handler = rotating_handler(path, max_bytes, backups)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


class _FileSink:
    """Splits bytes into lines and writes them through the rotating handler.

    Never raises for the file's sake: a write that fails (ENOSPC, EIO, the
    folder gone) drops the line and closes the file, which is opened again
    for the next line; NOTICE is told once per outage, and once when writing
    works again.
    """

    def __init__(self, handler: logging.Handler, notice: Callable[[str], None] = lambda _m: None) -> None:
        self.handler = handler
        self.pending = b""
        self.notice = notice
        self.path = Path(getattr(handler, "baseFilename", ""))
        self.failing: str | None = None  # why the last write failed
        self.lost = 0
        self.checked = 0.0
        handler.handleError = self._failed  # type: ignore[method-assign]

    def _failed(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        why = f"{type(exc).__name__}: {exc}" if exc else "unknown error"
        self._drop_stream()
        self.lost += 1
        if self.failing is None:
            self.notice(
                f"cannot write {self.path} ({why}); vLLM keeps running, "
                "its output is not logged until the file can be written again"
            )
        self.failing = why

    def _drop_stream(self) -> None:
        stream = getattr(self.handler, "stream", None)
        if stream is None:
            return
        # FileHandler opens it again at the next record.
        self.handler.stream = None  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            stream.close()

    def _check_file(self) -> None:
        """The file was removed or replaced behind our back: start a new one (WatchedFileHandler's test)."""
        now = time.monotonic()
        if now - self.checked < _CHECK_S:
            return
        self.checked = now
        stream = getattr(self.handler, "stream", None)
        if stream is None or not self.path.name:
            return
        try:
            on_disk = os.stat(self.path)
            mine = os.fstat(stream.fileno())
            same = (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)
        except (OSError, ValueError):
            same = False
        if not same:
            self._drop_stream()
            with contextlib.suppress(OSError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.notice(f"{self.path} was removed or replaced; writing a new file there")

    def _emit(self, raw: bytes) -> None:
        text = _ANSI.sub(b"", raw).decode("utf-8", "replace").rstrip()
        if not text:
            return
        self._check_file()
        record = logging.LogRecord("vllm", logging.INFO, "", 0, text, None, None)
        before = self.lost
        self.handler.handle(record)  # StreamHandler.emit flushes after each record
        if self.failing is not None and self.lost == before:
            self.notice(f"writing {self.path} again ({self.lost} line(s) were not logged)")
            self.failing, self.lost = None, 0

    def feed(self, data: bytes) -> None:
        parts = _SPLIT.split(self.pending + data)
        self.pending = parts.pop()
        for part in parts:
            self._emit(part)
        if len(self.pending) > _MAX_PENDING:
            self._emit(self.pending)
            self.pending = b""

    def close(self) -> None:
        if self.pending:
            self._emit(self.pending)
            self.pending = b""
        with contextlib.suppress(Exception):
            self.handler.close()


def _ignore_signals() -> None:
    # SIGXFSZ: a file size limit (ulimit -f) must fail the write (EFBIG), not kill the tee.
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGXFSZ"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def _notice(message: str) -> None:
    with contextlib.suppress(Exception):
        os.write(2, f"[logtee] {message}\n".encode("utf-8", "replace"))


def _write_loop(chunks: queue.Queue, sink: _FileSink, stdout_fd: int, to_terminal: bool) -> None:
    while True:
        data = chunks.get()
        if data is None:
            break
        if to_terminal:
            try:
                _write_all(stdout_fd, data)
            except OSError:
                to_terminal = False  # terminal closed: keep the file going
        # Whatever goes wrong with the file, the pipe's reader must live on (vLLM would get EPIPE).
        with contextlib.suppress(Exception):
            sink.feed(data)
    with contextlib.suppress(Exception):
        sink.close()


def end_of_run(run_dir: Path, tag: str) -> None:
    """A foreground run is over (its output's EOF): unless a process still carries TAG (then
    stop_service.py's sweep is what ends it), remove the run's private temp folder and its state
    file, if that still records TAG."""
    if processes.find_tagged(tag):
        return
    state = runstate.read(run_dir)
    if state is None or state.tag != tag:
        return
    runstate.remove_private_tmp(state.private_tmp)
    runstate.clear(run_dir, tag)


def run(
    log_file: Path,
    *,
    max_bytes: int,
    backups: int,
    quiet: bool,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    end: tuple[Path, str] | None = None,
) -> int:
    _ignore_signals()
    sink = _FileSink(_handler(log_file, max_bytes, backups), _notice)
    chunks: queue.Queue = queue.Queue(maxsize=_QUEUE_CHUNKS)
    writer = threading.Thread(
        target=_write_loop, args=(chunks, sink, stdout_fd, not quiet), name="logtee-writer", daemon=True
    )
    writer.start()
    dropped = 0
    while True:
        try:
            data = os.read(stdin_fd, _CHUNK)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        if not data:
            break
        try:
            chunks.put_nowait(data)
        except queue.Full:
            # Never wait for the writer: a full pipe would block vLLM's next print.
            if not dropped:
                _notice(
                    f"writing {log_file} (or the terminal) is stuck; dropping vLLM's output "
                    "so that vLLM never waits for it"
                )
            dropped += len(data)
    deadline = time.monotonic() + _FINISH_S
    with contextlib.suppress(queue.Full):
        chunks.put(None, timeout=_FINISH_S)
    writer.join(max(0.0, deadline - time.monotonic()))
    if dropped:
        _notice(f"{dropped} byte(s) of output were dropped while the writer was stuck")
    if end is not None:
        try:
            end_of_run(*end)
        except OSError as exc:  # the log is written; tidying up is stop_service.py's again
            _notice(f"could not tidy up after the run ({type(exc).__name__}: {exc}); stop_service.py will")
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def command(
    log_file: str | os.PathLike[str],
    *,
    max_bytes: int,
    backups: int,
    quiet: bool,
    python: str | None = None,
    end: tuple[str | os.PathLike[str], str] | None = None,
) -> list[str]:
    argv = [python or sys.executable, "-m", "qwen3_vl_service.lifecycle.logtee", str(log_file)]
    argv += ["--max-bytes", str(max_bytes), "--backups", str(backups)]
    if quiet:
        argv.append("--quiet")
    if end is not None:
        argv += ["--end-of-run", str(end[0]), end[1]]
    return argv


def start_tee(
    log_file: str | os.PathLike[str],
    *,
    max_bytes: int,
    backups: int,
    quiet: bool = False,
    env: dict[str, str] | None = None,
    end: tuple[str | os.PathLike[str], str] | None = None,
) -> subprocess.Popen:
    """Start the tee on a new pipe and point this process's stdout and stderr at it.

    Call it right before ``os.execvpe`` of vLLM: from then on everything
    this process (and what it becomes) prints goes through the tee. The tee
    is not given the service tag (ENV defaults to ours without it), so that
    ``stop`` waits for it to drain instead of signalling it. END, (run
    folder, tag): tidy up after the run at EOF (``--end-of-run``).
    """
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in (TAG_ENV, RUN_DIR_ENV)}
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            command(log_file, max_bytes=max_bytes, backups=backups, quiet=quiet, end=end),
            stdin=read_fd,
            close_fds=True,
            env=env,
        )
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    os.close(read_fd)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    return proc


def spawn_logged(
    argv: list[str],
    env: dict[str, str],
    *,
    log_file: Path,
    max_bytes: int,
    backups: int,
    header: str,
) -> subprocess.Popen[bytes]:
    """ARGV in its own session, its output through a detached tee into LOG_FILE after HEADER.

    The tee has its own session too (closing the terminal must not end the log) and none of our
    stdout/stderr: a caller that reads the launcher's output (a test, `ssh node start_service.py
    --detach`) must see EOF when the launcher exits. Untagged, like the foreground tee:
    stop_service.py lets it drain, then exit at EOF. Raises OSError when ARGV cannot be executed.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tee_env = {k: v for k, v in os.environ.items() if k not in (TAG_ENV, RUN_DIR_ENV)}
    tee = subprocess.Popen(
        command(log_file, max_bytes=max_bytes, backups=backups, quiet=True),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=tee_env,
        start_new_session=True,
    )
    assert tee.stdin is not None
    tee.stdin.write((header + "\n").encode())
    tee.stdin.flush()
    try:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=tee.stdin,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        tee.stdin.close()  # the child holds its own copy of the pipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=".venv/bin/python -m qwen3_vl_service.lifecycle.logtee", description=__doc__.splitlines()[0]
    )
    parser.add_argument("log_file", type=Path)
    parser.add_argument(
        "--max-bytes", type=int, default=100 * 1024 * 1024, help="rotate at this size (0: never)"
    )
    parser.add_argument("--backups", type=int, default=5, help="rotated files to keep")
    parser.add_argument("--quiet", action="store_true", help="write the file only (for --detach)")
    parser.add_argument(
        "--end-of-run",
        nargs=2,
        metavar=("RUN_DIR", "TAG"),
        help="at EOF, once no process carries TAG, remove the run's private temp folder and state file",
    )
    args = parser.parse_args(argv)
    if args.max_bytes < 0 or args.backups < 0:
        parser.error("--max-bytes and --backups must be >= 0")
    end = (Path(args.end_of_run[0]), args.end_of_run[1]) if args.end_of_run else None
    return run(args.log_file, max_bytes=args.max_bytes, backups=args.backups, quiet=args.quiet, end=end)


if __name__ == "__main__":
    raise SystemExit(main())
