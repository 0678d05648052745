"""The media server's log: one file, rotated by size, written by one process.

With workers, each worker formats its records and sends them down a pipe of
its own (RelayHandler); the supervisor alone writes the file (workers.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from qwen3_vl_service.core.logrotate import rotating_handler
from qwen3_vl_service.core.names import MEDIA_SERVICE_ID

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOGGERS = (MEDIA_SERVICE_ID, "aiohttp.access", "aiohttp.server", "aiohttp.web", "asyncio")


class _LogFormatter(logging.Formatter):
    """LOG_FORMAT, with the date formatted once a second rather than once a
    line; and records relayed from workers (already formatted) as they are."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)
        self._second = -1
        self._date = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._date = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._date},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "relayed", False):
            return record.msg
        return super().format(record)


def setup_logging(log_file: Path, max_bytes: int, backups: int) -> logging.Handler:
    """Route the loggers to LOG_FILE, rotated at MAX_BYTES with BACKUPS kept (LOG_MAX_MB, LOG_BACKUPS)."""
    handler = rotating_handler(log_file, max_bytes, backups)
    handler.setFormatter(_LogFormatter())
    route_logs(handler)
    return handler


def route_logs(handler: logging.Handler) -> None:
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def lean_log_records() -> None:
    """Gather for each record only what LOG_FORMAT shows (the logging HOWTO,
    "Optimization"): no caller frame, thread, process or multiprocessing name.
    For the server process only: one access-log record per request."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # Python 3.12+


class RelayHandler(logging.Handler):
    """A worker's handler: each record, formatted as the log file has it and
    ended by a NUL byte, goes down this worker's own pipe to the supervisor,
    which alone writes and rotates the file (workers.Supervisor)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.setFormatter(_LogFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record).replace("\0", "\\0")
            data = memoryview((text + "\0").encode("utf-8", "backslashreplace"))
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            pass  # the supervisor is gone; this worker follows it (childproc.die_with_parent)
        except Exception:  # noqa: BLE001 - a bad log call, as logging reports it
            self.handleError(record)


def relay_to(log_fd: int) -> None:
    """In a forked worker: send every record down LOG_FD; the supervisor's file is never written from here."""
    file_handlers = {h for name in _LOGGERS for h in logging.getLogger(name).handlers}
    route_logs(RelayHandler(log_fd))
    for handler in file_handlers:
        with contextlib.suppress(Exception):
            handler.close()
