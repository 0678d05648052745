"""Faults against the real vLLM CPU server under its supervisor (RESTART=on-failure), and a load test.

They use the session's shared demo service (``demo`` in tests/conftest.py:
supervised, its log folder on a small tmpfs mounted as root; elsewhere the
full-disk test skips, never under CI=true):

1. load: 16 clients send image chats (images fetched from the media server)
   for LOAD_SECONDS (5 by default; ``-m load`` with LOAD_SECONDS=300 for the
   5-minute run): every request succeeds; requests and p50/p99 printed.
2. the log's file system full: requests keep succeeding.
3. ``kill -9`` of our VLLM::EngineCore (found by pid through the service
   tag) under 4 such clients and a batch job: every request in flight ends, with
   an error, within IN_FLIGHT_BOUND_S of the kill (none hangs); the supervisor
   restarts vLLM, which answers again; status shows the restart and its
   cause; the batch finishes every line once (tests/batch_job.py).
4. ``kill -9`` of the media server: back, serving, restart recorded.
The stop that ends the supervisor, never undone by a restart, is in
tests/test_services_e2e.py (the shared service's end). Then, a service of its
own: a setting that makes vLLM fail at start gives up after MAX_RESTARTS+1
tries (one here) with the cause and exit 1 (the batch job's path: the foreground start
execs the supervisor).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time

import batch_job
import pytest
import requests
from batch_job import LINES
from lifecycle_helpers import wait_until
from served import Served, alive, bench_load
from skips import in_ci, require

pytestmark = pytest.mark.e2e
LOAD_SECONDS = float(os.environ.get("LOAD_SECONDS", "5"))
# A request in flight when the EngineCore dies must end (with an error) within this many seconds.
IN_FLIGHT_BOUND_S = 15.0
# The restart: cleanup, backoff (RESTART_BACKOFF=1) and a new vLLM start (30 s on two idle cores).
RECOVERY_S = 900


def _wait(predicate, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return True
        time.sleep(step)
    return False


def _healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def sup(demo: Served) -> Served:
    return demo


@pytest.mark.load
def test_load_16_clients_image_chats_through_the_media_server(sup):
    load = bench_load().run_load(sup.base, sup.media, clients=16, seconds=LOAD_SECONDS)
    print(f"\nload ({LOAD_SECONDS:g} s): {load.summary()}")
    assert load.outcomes, "no request finished"
    failed = [o for o in load.outcomes if not o.ok]
    assert failed == [], load.summary()


@pytest.mark.disrupts
def test_kill_9_of_the_engine_core_during_load_and_a_batch_restarts_vllm(sup, tmp_path):
    """One kill, two kinds of client: 4 load clients (their in-flight requests end at once, with an
    error; new ones succeed after the restart) and a batch job (it waits for the new vLLM and finishes
    every line once: test_batch_e2e's accounting, less the load's answers)."""
    bench = bench_load()
    old_pid = sup.state()["pid"]
    restarts = sup.status()["supervisor"]["restarts"]
    engine = sup.engine_core()
    src, out = batch_job.dataset(tmp_path / "in.jsonl", sup, "engine"), tmp_path / "out.jsonl"
    stop = threading.Event()
    load = bench.Load()
    runner = threading.Thread(
        target=lambda: bench.run_load(
            sup.base, sup.media, clients=4, seconds=RECOVERY_S, stop=stop, load=load
        ),
        daemon=True,
    )
    runner.start()
    proc = batch_job.batch(sup, src, out, "--concurrency", str(batch_job.CONCURRENCY), "--no-progress")
    try:
        time.sleep(5)  # requests in flight
        # Early in the batch: most of its lines go through the new vLLM, and the load clients (which
        # share the engine with it until then) have sent fewer requests.
        assert wait_until(
            lambda: len(batch_job.out_lines(out)) >= LINES // 10 or proc.poll() is not None, 600
        )
        assert proc.poll() is None, proc.communicate()
        killed_at, killed_wall = time.monotonic(), time.time()
        engine.send_signal(signal.SIGKILL)
        assert _wait(lambda: sup.state()["pid"] != old_pid, 120), "the supervisor did not start a new vLLM"
        assert _wait(lambda: _healthy(sup.base), RECOVERY_S), "vLLM did not answer again"
        recovered_at = time.monotonic()

        def answered_after_the_restart() -> bool:
            with load.lock:
                return any(o.ok and o.started > recovered_at for o in load.outcomes)

        # Requests on the new vLLM (beside the batch, on loaded cores, one may take seconds).
        assert _wait(answered_after_the_restart, 300), "no request succeeded after the restart"
        stop.set()
        runner.join(600)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"\nunder kill -9 of the EngineCore: {load.summary()}; back after {recovered_at - killed_at:.0f} s")
    in_flight = [o for o in load.outcomes if o.started < killed_at < o.ended]
    assert in_flight, "no request was in flight at the kill"
    late = max(o.ended for o in in_flight) - killed_at
    print(f"{len(in_flight)} request(s) in flight at the kill ended within {late:.1f} s of it")
    assert late <= IN_FLIGHT_BOUND_S, f"an in-flight request hung {late:.1f} s after the kill"

    # The batch: every line once, in OUT; the new vLLM answered exactly the lines it made (their
    # `created`, whole seconds at its API server, tells which vLLM made them) and the load's
    # successes after the kill, so nothing answered before the kill was sent again.
    print(f"batch through the engine kill:\n{stdout}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout + stderr
    lines = batch_job.assert_complete(out, "engine")
    state = sup.state()
    assert state["create_time"] - killed_wall >= 1.0  # RESTART_BACKOFF: whole seconds tell them apart
    by_new = [x for x in lines if x["response"]["body"]["created"] >= math.floor(state["create_time"])]
    # The load's requests the new vLLM answered: those sent after its API server started (an answer
    # of the old one may end a moment after the kill).
    new_started = state["create_time"] + (time.monotonic() - time.time())
    load_new = sum(1 for o in load.outcomes if o.ok and o.started > new_started)
    new_answers = batch_job.answers(batch_job.finished(sup))
    print(f"{LINES - len(by_new)} lines answered before the kill, {len(by_new)} by the new vLLM, "
          f"which also answered {load_new} load request(s); its count: {new_answers}")  # fmt: skip
    assert 0 < len(by_new) < LINES
    assert new_answers == len(by_new) + load_new

    status = sup.status()
    assert status["running"] and status["healthy"], status
    rec = status["supervisor"]
    assert rec["running"] and rec["restarts"] == restarts + 1, rec
    assert "EngineCore" in rec["last_cause"] and str(engine.pid) in rec["last_cause"], rec
    human = sup.script("status_service.py", "--sample", "0").stdout
    assert "restart(s)" in human and "EngineCore" in human, human
    assert "EngineCore" in (sup.log_dir / "service.log").read_text(errors="replace")


@pytest.mark.disrupts
def test_kill_9_of_the_media_server_brings_it_back(sup):
    from qwen3_vl_service.machine.processes import read_pid_file

    old = read_pid_file(sup.media_pid_file)
    assert old and alive(old)
    before = sup.status()["supervisor"]["restarts"]
    os.kill(old, signal.SIGKILL)

    def back() -> bool:
        r = requests.get(f"{sup.media}/health", timeout=5)
        return r.status_code == 200 and r.json().get("pid") not in (None, old)

    assert _wait(back, 120), "the media server did not come back"
    r = requests.get(f"{sup.media}/sample.jpg", timeout=30)
    assert r.status_code == 200 and r.content == (sup.media_root / "sample.jpg").read_bytes()
    load = bench_load().run_load(sup.base, sup.media, clients=2, seconds=3)
    assert load.outcomes and all(o.ok for o in load.outcomes), load.summary()
    rec = sup.status()["supervisor"]
    assert rec["restarts"] == before + 1 and "media server" in rec["last_cause"], rec


def test_requests_keep_succeeding_while_the_log_file_system_is_full(sup):
    if not sup.tmpfs:
        if in_ci():
            pytest.fail("CI=true: the log folder should be on a tmpfs (root mounts one)")
        pytest.skip("mounting a tmpfs needs root")
    filler = sup.log_dir / "filler"
    log = sup.log_dir / "service.log"
    with open(filler, "wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * (1 << 20))
            fh.flush()
    try:
        assert os.statvfs(sup.log_dir).f_bavail == 0
        load = bench_load().run_load(sup.base, sup.media, clients=4, seconds=4)
        print(f"\nwith the log's disk full: {load.summary()}")
        assert load.outcomes and all(o.ok for o in load.outcomes), load.summary()
        assert _healthy(sup.base)
        full_size = log.stat().st_size
    finally:
        filler.unlink()
    # Once there is room again, the log goes on (vLLM logs each request).
    load = bench_load().run_load(sup.base, sup.media, clients=1, seconds=2)
    assert all(o.ok for o in load.outcomes)
    assert _wait(lambda: log.stat().st_size > full_size, 10), "the log did not resume"


def test_a_crash_loop_gives_up_after_the_set_tries_with_the_cause(tmp_path, tiny_model, demo_media):
    require("vllm")
    s = Served(
        tmp_path,
        model=tiny_model,
        media_root=demo_media,
        RESTART="on-failure",
        # One try: each costs a vLLM import (about 15 s of CPU on two cores). The count of tries past
        # MAX_RESTARTS, with backoff, is tests/test_supervisor.py's (stand-in vLLMs, real processes).
        MAX_RESTARTS="0",
        RESTART_BACKOFF="1",
        MEDIA_SERVER="false",
        # Past the preflight (vLLM's parser takes it), refused by vLLM's config at start: every try
        # fails the same way, seconds in (an unknown flag is the preflight's error now, issue 24).
        EXTRA_VLLM_ARGS="--skip-mm-profiling --max-logprobs -2",
    )
    try:
        # The foreground start execs the supervisor: what slurm/serve.sbatch waits for.
        proc = s.script("start_service.py", "--quiet", timeout=900)
    finally:
        s.stop_all()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert out.count("started vLLM: pid") == 1, out[-3000:]  # MAX_RESTARTS=0: one try, no restart
    assert "gave up" in out and "failed 1 time within" in out and "MAX_RESTARTS=0" in out, out[-3000:]
    assert "exited with status 1" in out and "max_logprobs" in out, out[-3000:]
    rec = json.loads((s.run_dir / "supervisor.json").read_text())
    assert rec["state"] == "gave up" and "exited with status 1" in rec["gave_up"], rec
    status = s.status()
    assert not status["running"] and "gave up" in json.dumps(status["supervisor"])
    assert s.ours() == []
