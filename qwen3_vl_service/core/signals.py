"""Signals received, queued for a loop to act on: the one signal handler of the service.

A Python signal handler runs in the main thread between two bytecodes, in the
middle of whatever that thread was doing. If it takes a lock that the
interrupted code holds (``threading.Event.set()`` takes its Condition's plain
Lock, which ``Event.wait()`` and ``clear()`` hold for a moment), the thread
waits for itself for ever: only SIGKILL ends it. So the handler here only
appends the signal number to a deque (atomic, lock-free under the GIL) and
writes one byte to a non-blocking self-pipe, which wakes a loop sleeping in
``wait()`` (gunicorn's arbiter does the same; design habit 7).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections import deque
from collections.abc import Iterable


class Inbox:
    """Signals received since install(), oldest first; wait() sleeps until one comes."""

    def __init__(self) -> None:
        self.received: deque[int] = deque()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def handler(self, signum: int, _frame: object = None) -> None:
        # Append and write a byte: no lock, no allocation beyond the deque's, nothing that can block.
        self.received.append(signum)
        if self._w >= 0:
            with contextlib.suppress(OSError):  # a full pipe already wakes the loop
                os.write(self._w, b"\0")

    def install(self, signums: Iterable[int]) -> None:
        for signum in signums:
            signal.signal(signum, self.handler)

    def wait(self, seconds: float) -> bool:
        """Sleep up to SECONDS or until a signal comes; True when one has come (now or before)."""
        if not self.received and seconds > 0 and self._r >= 0:
            with contextlib.suppress(InterruptedError):
                select.select([self._r], [], [], seconds)
        if self._r >= 0:
            self._drain()
        return bool(self.received)

    def first(self) -> int | None:
        return self.received[0] if self.received else None

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._r, 512):
                pass

    def close(self) -> None:
        """Close the pipe (a handler still installed then only queues: its fd number may be reused)."""
        fds, self._r, self._w = (self._r, self._w), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


__all__ = ["Inbox"]
