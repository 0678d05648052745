"""The one exception family of the service, and its exit codes.

Exit codes (documented in the README):
    0   ok
    1   a check failed, or the service failed
    2   bad usage or bad configuration
    130 interrupted (Ctrl+C)

Every error carries a message that says what is wrong, shows the value and
gives the fix, so that the top-level handler can print it as one line.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class ServiceError(Exception):
    """Base class: an expected failure, shown to the user as one line."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        if self.fix:
            return f"{self.message}; {self.fix}"
        return self.message


class ConfigError(ServiceError):
    """A setting is malformed, out of range or unknown (exit 2)."""

    exit_code = EXIT_USAGE


class UsageError(ServiceError):
    """A command-line argument is wrong (exit 2)."""

    exit_code = EXIT_USAGE


class CheckFailed(ServiceError):
    """A preflight check or a runtime step failed (exit 1)."""

    exit_code = EXIT_FAILED
