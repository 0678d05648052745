"""Shared pytest hooks, and the one fixture several modules use (procs). Others live with their tests."""

from __future__ import annotations

import subprocess
import sys

import pytest
from lifecycle_helpers import PY, SLEEP, clean_env, environ_of, kill_pids, wait_until


@pytest.fixture
def procs():
    """procs(code=SLEEP, env=None, **popen_kw): a `python -c CODE` process of this test, killed afterwards.

    Returned once its environment is readable in /proc (right after exec the
    kernel may not show it yet), or once it has exited.
    """
    started: list[subprocess.Popen] = []

    def start(code: str = SLEEP, env=None, **kw) -> subprocess.Popen:
        p = subprocess.Popen([PY, "-c", code], env=env or clean_env(), **kw)
        started.append(p)
        wait_until(lambda: p.poll() is not None or environ_of(p.pid))
        return p

    yield start
    kill_pids([p.pid for p in started])
    for p in started:
        p.wait(5)


def pytest_terminal_summary(terminalreporter):
    """Print each end-to-end request with its status and latency (the e2e issue's note)."""
    e2e = sys.modules.get("test_e2e") or sys.modules.get("tests.test_e2e")
    timings = getattr(e2e, "TIMINGS", None)
    if not timings:
        return
    terminalreporter.section("end-to-end requests")
    for name, status, seconds in timings:
        terminalreporter.write_line(f"{status:>4}  {seconds:7.2f} s  {name}")
