"""Stopping vLLM's API server as fast as vLLM's own shutdown, without cutting a request short.

vLLM 0.32 with ``--shutdown-timeout N`` (our SHUTDOWN_TIMEOUT) handles SIGTERM
in drain mode: the EngineCore refuses new requests, finishes those in
flight, then tears down. That teardown is the slow part, also with nothing
in flight: the executor waits VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS (5 s) for
workers that do not leave ``dequeue(indefinite=True)`` when their death
pipe closes (vllm/v1/executor/multiproc_executor.py), then SIGTERMs them,
and the API server's process manager waits up to N s for the EngineCore
before it logs "force killing remaining processes" (vllm/v1/utils.py
``shutdown``). Measured on the CPU build: 7.5 s with N=5, 19 s with
N=30, idle, on two busy cores. Without the option (abort mode) vLLM kills the EngineCore's
tree right after SIGTERM (``shutdown(timeout=0)`` -> ``kill_process_tree``)
and stops in about 2 s, but aborts every request in flight.

So we keep drain mode and do vLLM's abort-mode kill ourselves once there is
nothing left to drain: after SIGTERM, ``/load`` (``--enable-server-load-
tracking``; the HTTP requests of the generating routes still open, streams
included, counted from arrival to the last byte) is polled, and when it reads
0 the ``VLLM::*`` processes of the API server's tree get SIGKILL, as vLLM's
own default would have done at once. A request that arrives after SIGTERM is
refused by the EngineCore either way. ``/metrics``' running+waiting would not
do: it is published once per engine step, so a request added just before
SIGTERM can be missing from it for a step.
"""

from __future__ import annotations

import contextlib
import signal
import time

import psutil
import requests

from qwen3_vl_service.core.hosts import local_url
from qwen3_vl_service.machine import processes

POLL_S = 0.05
_LOAD_TIMEOUT_S = 1.0


def load_url(host: str, port: int) -> str:
    return f"{local_url(host, port)}/load"


def in_flight(session, url: str) -> int | None:
    """The number of requests vLLM is serving, per /load; None when it does not say."""
    try:
        resp = session.get(url, timeout=_LOAD_TIMEOUT_S)
        return int(resp.json()["server_load"]) if resp.status_code == 200 else None
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return None


def engine_processes(api_server: psutil.Process) -> list[psutil.Process]:
    """The EngineCore and workers below the API server (their titles start with VLLM::)."""
    return [p for p in processes.tree(api_server.pid)[1:] if processes.cmdline_text(p).startswith("VLLM::")]


def stop_api_server(
    main: psutil.Process, url: str, timeout: float, *, kill_timeout: float
) -> processes.StopResult:
    """SIGTERM MAIN; once URL (/load) reads 0, SIGKILL its engine; SIGKILL MAIN itself after TIMEOUT."""
    start = time.monotonic()
    deadline = start + timeout
    engine = engine_processes(main)
    info = processes.info(main)
    try:
        main.send_signal(signal.SIGTERM)
    except psutil.Error:
        return processes.StopResult(elapsed=time.monotonic() - start)
    with requests.Session() as session:
        session.trust_env = False  # the server is on this node: never through a proxy
        while engine and processes.is_alive(main) and time.monotonic() < deadline:
            if in_flight(session, url) == 0:
                for p in engine:
                    with contextlib.suppress(psutil.Error):
                        p.kill()  # psutil refuses a pid reused meanwhile
                break
            processes.wait_gone([main], POLL_S)
    # What is left is vLLM's own exit (a second SIGTERM is a no-op for its handler).
    result = processes.terminate([main], max(0.0, deadline - time.monotonic()), kill_timeout=kill_timeout)
    if not result.stopped and not result.survivors:
        result.terminated = [info]  # it had already exited: by our SIGTERM
    result.elapsed = time.monotonic() - start
    return result


__all__ = ["engine_processes", "in_flight", "load_url", "stop_api_server"]
