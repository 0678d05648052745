"""Shared pytest hooks. Fixtures live in the test modules (or tests/*.py helpers) that use them."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter):
    """Print each end-to-end request with its status and latency (the e2e issue's note)."""
    e2e = sys.modules.get("test_e2e") or sys.modules.get("tests.test_e2e")
    timings = getattr(e2e, "TIMINGS", None)
    if not timings:
        return
    terminalreporter.section("end-to-end requests")
    for name, status, seconds in timings:
        terminalreporter.write_line(f"{status:>4}  {seconds:7.2f} s  {name}")
