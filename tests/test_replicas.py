"""replicas: a foreground start of several replicas (start_service.py with REPLICAS=2) and its signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import realmodel
from lifecycle_helpers import clean_env, free_port, gone, kill_pids, run_tool, wait_until

REPO = Path(__file__).resolve().parents[1]

# Stands in for VLLM_PYTHON: asked by the launcher's probe (-c ...) it names a vLLM; started as a
# replica's vLLM it never answers /health (a replica that loads for a long time), and writes its pid.
FAKE_VLLM_PYTHON = """#!/bin/sh
if [ "$1" = "-c" ]; then echo "vllm 0.0.0-fake"; exit 0; fi
echo $$ >> "{out}/pids"
exec sleep 600
"""


def _pids(out: Path) -> list[int]:
    try:
        return [int(p) for p in (out / "pids").read_text().split()]
    except (OSError, ValueError):
        return []


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_foreground_start_stops_the_replicas_at_once(tmp_path: Path, sig) -> None:
    """Ctrl+C or SIGTERM while the replicas load was looked at only once each replica was healthy
    (up to STARTUP_TIMEOUT each): now at the next poll of /health, and every replica is stopped."""
    out = tmp_path / "seen"
    out.mkdir()
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_VLLM_PYTHON.format(out=out))
    fake.chmod(0o755)
    cfg = realmodel.write_config_env(
        tmp_path / "config.env",
        realmodel.build(tmp_path / "model"),
        DEVICE="cpu",
        TENSOR_PARALLEL_SIZE=1,
        EXPERT_PARALLEL="off",
        HOST="127.0.0.1",
        PORT=free_port(),
        ROUTER_PORT=free_port(),
        MEDIA_SERVER="false",
        REPLICAS=2,
        RESTART="no",
        STARTUP_TIMEOUT=600,
        VLLM_PYTHON=fake,
    )
    start = subprocess.Popen(
        [sys.executable, str(REPO / "start_service.py"), "--config", str(cfg), "--quiet"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pids: list[int] = [start.pid]
    try:

        def both_started() -> bool:
            return start.poll() is not None or len(_pids(out)) == 2

        assert wait_until(both_started, 120) and start.poll() is None, start.stdout.read()
        pids += _pids(out)
        time.sleep(1.0)  # both replicas polled: the start is waiting for replica-0's /health
        t0 = time.monotonic()
        start.send_signal(sig)
        try:
            rc = start.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("the signal was not acted on while the replicas loaded")
        took = time.monotonic() - t0
        text = start.stdout.read()
        assert rc != 0, text
        assert took < 30, f"{took:.1f} s"
        assert "stopping what was started" in text, text
        assert all(gone(p) for p in pids[1:]), "a replica is still running"
    finally:
        kill_pids(pids)
        run_tool("stop_service.py", "--config", str(cfg))
