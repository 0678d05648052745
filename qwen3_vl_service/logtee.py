"""Copy stdin to stdout and to a size-rotated log file: the tee between vLLM and logs/service.log.

    python -m qwen3_vl_service.logtee LOGFILE --max-bytes N --backups K [--quiet]

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
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from .logrotate import rotating_handler

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]")
_SPLIT = re.compile(rb"[\r\n]")
_CHUNK = 65536
# A line longer than this is written in pieces rather than held in memory.
_MAX_PENDING = 1 << 20


def _handler(path: Path, max_bytes: int, backups: int) -> logging.Handler:
    handler = rotating_handler(path, max_bytes, backups)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


class _FileSink:
    """Splits bytes into lines and writes them through the rotating handler."""

    def __init__(self, handler: logging.Handler) -> None:
        self.handler = handler
        self.pending = b""

    def _emit(self, raw: bytes) -> None:
        text = _ANSI.sub(b"", raw).decode("utf-8", "replace").rstrip()
        if not text:
            return
        record = logging.LogRecord("vllm", logging.INFO, "", 0, text, None, None)
        self.handler.handle(record)  # StreamHandler.emit flushes after each record

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
        self.handler.close()


def _ignore_signals() -> None:
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def run(
    log_file: Path, *, max_bytes: int, backups: int, quiet: bool, stdin_fd: int = 0, stdout_fd: int = 1
) -> int:
    _ignore_signals()
    sink = _FileSink(_handler(log_file, max_bytes, backups))
    to_terminal = not quiet
    try:
        while True:
            try:
                data = os.read(stdin_fd, _CHUNK)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            if not data:
                break
            if to_terminal:
                try:
                    _write_all(stdout_fd, data)
                except OSError:
                    to_terminal = False  # terminal closed: keep the file going
            # A full disk must not kill the pipe's reader (vLLM would get EPIPE).
            with contextlib.suppress(Exception):
                sink.feed(data)
    finally:
        with contextlib.suppress(Exception):
            sink.close()
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def command(
    log_file: str | os.PathLike[str], *, max_bytes: int, backups: int, quiet: bool, python: str | None = None
) -> list[str]:
    argv = [python or sys.executable, "-m", "qwen3_vl_service.logtee", str(log_file)]
    argv += ["--max-bytes", str(max_bytes), "--backups", str(backups)]
    if quiet:
        argv.append("--quiet")
    return argv


def start_tee(
    log_file: str | os.PathLike[str],
    *,
    max_bytes: int,
    backups: int,
    quiet: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start the tee on a new pipe and point this process's stdout and stderr at it.

    Call it right before ``os.execvpe`` of vLLM: from then on everything
    this process (and what it becomes) prints goes through the tee. The tee
    is not given the service tag (ENV defaults to ours without it), so that
    ``stop`` waits for it to drain instead of signalling it.
    """
    from .vllm_args import RUN_DIR_ENV, TAG_ENV

    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in (TAG_ENV, RUN_DIR_ENV)}
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            command(log_file, max_bytes=max_bytes, backups=backups, quiet=quiet),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3_vl_service.logtee", description=__doc__.splitlines()[0]
    )
    parser.add_argument("log_file", type=Path)
    parser.add_argument(
        "--max-bytes", type=int, default=100 * 1024 * 1024, help="rotate at this size (0: never)"
    )
    parser.add_argument("--backups", type=int, default=5, help="rotated files to keep")
    parser.add_argument("--quiet", action="store_true", help="write the file only (for --detach)")
    args = parser.parse_args(argv)
    if args.max_bytes < 0 or args.backups < 0:
        parser.error("--max-bytes and --backups must be >= 0")
    return run(args.log_file, max_bytes=args.max_bytes, backups=args.backups, quiet=args.quiet)


if __name__ == "__main__":
    raise SystemExit(main())
