"""A hung engine is a dead engine: SIGSTOP of the real vLLM CPU server's EngineCore under load.

The session's shared demo service (``demo``, supervised, config.demo.env's
STALL_AFTER=30). ``kill -STOP`` of its ``VLLM::EngineCore`` while 8 clients
send image chats: vLLM's API server keeps answering /health (200) and
/metrics, so only the liveness check (lifecycle/liveness.py) can tell. The
supervisor must find it hung (status and its record say "hung" with the
evidence), SIGKILL the tree (a stopped process holds SIGTERM pending) and
start vLLM again: the service answers again within STALL_AFTER + its start
time (plus the supervisor's 5 s check cadence and its 1 s backoff).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import sys
import threading
import time

import psutil
import pytest
import requests
from served import DEMO_CONFIG, REPO, Served

from qwen3_vl_service.settings import config

pytestmark = pytest.mark.e2e
# Beyond STALL_AFTER + the start: the supervisor looks every 5 s, waits RESTART_BACKOFF (1 s) and
# SIGKILLs the tree (seconds), on a machine that other sessions load.
SLACK_S = 30.0


def _bench_load():
    spec = importlib.util.spec_from_file_location("bench_load", REPO / "bench" / "bench_load.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = mod
    spec.loader.exec_module(mod)
    return mod


def _answers(s: Served) -> bool:
    with contextlib.suppress(requests.RequestException, ValueError, KeyError):
        r = s.chat("Say hi.", max_tokens=2)
        return r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    return False


def _hung_in(sup: dict | None) -> str:
    """What the supervisor says of a hang: a unit's condition now, or the last restart's cause."""
    sup = sup or {}
    for text in (sup.get("conditions") or {}).values():
        if text.startswith("hung"):
            return text
    cause = sup.get("last_cause") or ""
    return cause if ": hung:" in cause else ""


@pytest.mark.disrupts
def test_sigstop_of_the_engine_core_under_load_is_found_hung_and_restarted(demo: Served):
    stall_after = config.load(DEMO_CONFIG, environ=demo.env).stall_after
    assert stall_after, "config.demo.env should set STALL_AFTER"
    old_pid = demo.state()["pid"]
    restarts_before = demo.status()["supervisor"]["restarts"]
    engine = demo.engine_core()
    stop = threading.Event()
    result: dict = {}
    bench = _bench_load()

    def load() -> None:
        result["load"] = bench.run_load(demo.base, demo.media, clients=8, seconds=900, timeout=120, stop=stop)

    runner = threading.Thread(target=load, daemon=True)
    runner.start()
    seen: list[tuple[float, str, str]] = []  # (seconds after the stop, status's verdict line, hung text)
    try:
        time.sleep(5)  # requests in flight
        stopped_at = time.monotonic()
        engine.send_signal(signal.SIGSTOP)
        deadline = stopped_at + stall_after + demo.start_seconds + SLACK_S + 120
        recovered_at = None
        while time.monotonic() < deadline:
            human = demo.script("status_service.py", "--sample", "0", timeout=60)
            hung = _hung_in(demo.status()["supervisor"])
            head = human.stdout.splitlines()[0] if human.stdout else ""
            seen.append((time.monotonic() - stopped_at, head, hung))
            with contextlib.suppress(OSError, ValueError, KeyError):
                if demo.state()["pid"] != old_pid and _answers(demo):
                    recovered_at = time.monotonic()
                    break
            time.sleep(2)
        time.sleep(10)  # the clients on the new vLLM
    finally:
        stop.set()
        with contextlib.suppress(psutil.Error):
            if engine.is_running():  # the supervisor did not end it: neither leave it stopped
                engine.kill()
        runner.join(300)
    for t, head, hung in seen:
        print(f"  +{t:5.1f} s  {head}  {hung[:100]}")
    assert recovered_at is not None, "the service did not answer again"
    back = recovered_at - stopped_at
    bound = stall_after + demo.start_seconds + SLACK_S
    print(
        f"\nSIGSTOP of the EngineCore under 8 clients: answering again after {back:.1f} s "
        f"(STALL_AFTER={stall_after} + start {demo.start_seconds:.1f} s + slack {SLACK_S:g} s "
        f"= {bound:.1f} s)"
    )
    assert back <= bound, f"{back:.1f} s > {bound:.1f} s"
    assert not psutil.pid_exists(engine.pid) or engine.status() == psutil.STATUS_ZOMBIE

    # The evidence: status said hung, and the record keeps the cause.
    assert any(hung for _, _, hung in seen), seen
    rec = json.loads((demo.run_dir / "supervisor.json").read_text())
    assert rec["restarts"] == restarts_before + 1, rec
    assert rec["last_cause"].startswith("vLLM: hung: no engine progress"), rec["last_cause"]
    human = demo.script("status_service.py", "--sample", "0").stdout
    assert "hung: no engine progress" in human, human
    log = (demo.log_dir / "service.log").read_text(errors="replace")
    assert "is hung: SIGKILL" in log

    load = result["load"]
    print(f"load: {load.summary()}")
    in_flight = [o for o in load.outcomes if o.started < stopped_at < o.ended]
    assert in_flight, "no request was in flight at the SIGSTOP"
    # Every request ended: those on the stopped engine with an error once it was killed, none hung on.
    assert max(o.ended for o in load.outcomes) - stopped_at <= back + 60
    assert any(o.ok and o.started > recovered_at for o in load.outcomes), "nothing succeeded after it"
