"""The one top-level handler shared by every command.

``run(body, log_path)`` calls ``body()`` and turns whatever it raises into an
exit code and at most one line on stderr: a ``ServiceError`` prints its
message, Ctrl+C gives 130, and anything unexpected prints one line while the
traceback goes to the command's log file (pre-commit's ``error_handler``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from qwen3_vl_service.core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, ServiceError, UsageError


def error(message: str) -> None:
    """Print one error line to stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def _log_traceback(log_path: Path | Callable[[], Path] | None) -> str | None:
    if callable(log_path):
        log_path = log_path()
    if log_path is None:
        return None
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {_dt.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}\n")
            fh.write(traceback.format_exc())
        return str(log_path)
    except OSError:
        return None


def run(body: Callable[[], int], log_path: Path | Callable[[], Path] | None = None) -> int:
    """Run a command's body under the one top-level handler.

    LOG_PATH may be a callable: the log's place is often known only once the
    config has been read inside BODY.
    """
    try:
        return int(body() or 0)
    except ServiceError as exc:
        error(exc.one_line())
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `start_service.py --dry-run | head` closed our stdout: not an error.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the one place that catches everything
        where = _log_traceback(log_path)
        tail = f" (traceback in {where})" if where else ""
        error(f"internal error: {type(exc).__name__}: {exc}{tail}; please report it")
        return EXIT_FAILED


def seconds(most: float, *, least: float = 0.0) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds in [LEAST, MOST] (no nan, no inf)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or not least <= value <= most:
            raise argparse.ArgumentTypeError(f"{text!r}: give seconds from {least:g} to {most:g}")
        return value

    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}", fix=f"see '{self.prog} --help'")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            print(message, file=sys.stderr, end="")
        raise SystemExit(status)

    def add_config(self, default: str = "./config.env") -> None:
        """--config FILE, the same in every command."""
        self.add_argument("--config", metavar="FILE", help=f"settings file (default {default})")


__all__ = ["EXIT_USAGE", "ArgumentParser", "error", "run", "seconds"]
