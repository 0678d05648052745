"""batch_service.py against the real vLLM CPU server: the session's supervised demo service (``demo``).

Both scenarios send 200 lines that mix a text chat, a local image (a path
under MEDIA_ROOT), an image by media-server URL and a local video; they count
what vLLM itself finished with its own counter, ``vllm:request_success_total``
by ``finished_reason`` (stop and length are answers; abort is a request whose
client went away), less the supervisor's 1-token liveness probes (told apart
by ``vllm:request_params_max_tokens``: ours ask for 8).

1. The batch process is killed (SIGKILL) halfway and rerun: OUT ends with
   exactly 200 lines, one per custom_id, all status 200; the rerun makes vLLM
   answer exactly the lines the killed run had not written (none already
   answered is sent again); the killed run lost at most its requests in flight
   (answers vLLM made that died with the process: those lines are sent again).
   With SIGTERM instead (SLURM's time limit) those in flight finish and are
   written: over both runs vLLM answers exactly 200 requests.
2. (``disrupts``: runs after the tests that leave the service alone) the
   EngineCore is killed (SIGKILL) mid-run: the supervisor starts a new vLLM,
   the batch waits for it and finishes with the same 200 lines; the new
   vLLM's counter equals the lines whose answers it made (the ``created``
   time of an answer tells which vLLM made it), so nothing answered before
   the kill was sent again.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from lifecycle_helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families
from served import DEMO_CONFIG, Served

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
pytestmark = pytest.mark.e2e
LINES = 200
CONCURRENCY = 8
ANSWERS = ("stop", "length")  # finished reasons of an answered request


def dataset(path: Path, demo: Served, prefix: str) -> Path:
    """LINES requests: text, local image, image by media-server URL, local video, in turn."""
    kinds = [
        [],
        [{"type": "image_url", "image_url": {"url": "sample.png"}}],
        [{"type": "image_url", "image_url": {"url": f"{demo.media}/sample.jpg"}}],
        [{"type": "video_url", "video_url": {"url": str(demo.media_root / "clips" / "clip.mp4")}}],
    ]
    with open(path, "w") as fh:
        for i in range(LINES):
            content = [*kinds[i % 4], {"type": "text", "text": f"Line {i}: what do you see?"}]
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8}
            line = {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            fh.write(json.dumps(line) + "\n")
    return path


def finished(demo: Served) -> dict[str, float]:
    """vLLM's vllm:request_success_total by finished_reason, and under "probe" the finished requests
    that asked for one token: the supervisor's liveness probe (lifecycle/liveness.py, a 1-token
    completion), which vLLM counts too; ours ask for max_tokens 8."""
    text = requests.get(f"{demo.base}/metrics", timeout=30).text
    out: dict[str, float] = {"probe": 0.0}
    for fam in text_string_to_metric_families(text):
        if fam.name == "vllm:request_success":
            for s in fam.samples:
                if s.name == "vllm:request_success_total":
                    reason = s.labels.get("finished_reason", "")
                    out[reason] = out.get(reason, 0.0) + s.value
        elif fam.name == "vllm:request_params_max_tokens":
            for s in fam.samples:
                if s.name.endswith("_bucket") and float(s.labels.get("le", "nan")) == 1.0:
                    out["probe"] += s.value
    return out


def answers(counts: dict[str, float]) -> int:
    """Requests vLLM answered for us (the probes, 1 token, finish by length: not ours)."""
    return int(sum(counts.get(r, 0.0) for r in ANSWERS) - counts["probe"])


def idle(demo: Served) -> bool:
    """No request running or waiting in vLLM."""
    text = requests.get(f"{demo.base}/metrics", timeout=30).text
    busy = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            busy += sum(s.value for s in fam.samples)
    return busy == 0


def out_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def batch(demo: Served, src: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, str(REPO / "batch_service.py"), "--config", str(DEMO_CONFIG), str(src), str(out), *args],
        env=demo.env,
        cwd=demo.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_complete(out: Path, prefix: str) -> list[dict]:
    lines = out_lines(out)
    assert len(lines) == LINES, len(lines)
    assert sorted(x["custom_id"] for x in lines) == sorted(f"{prefix}-{i}" for i in range(LINES))
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in lines)
    assert all(x["response"]["body"]["usage"]["completion_tokens"] > 0 for x in lines)
    return lines


def test_a_batch_killed_halfway_and_rerun_answers_every_line_once(demo: Served, tmp_path: Path):
    src, out = dataset(tmp_path / "in.jsonl", demo, "kill"), tmp_path / "out.jsonl"
    before = finished(demo)
    proc = batch(demo, src, out, "--concurrency", str(CONCURRENCY), "--no-progress")
    try:
        assert wait_until(lambda: len(out_lines(out)) >= LINES // 2 or proc.poll() is not None, 600, 0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert wait_until(lambda: idle(demo), 60, 0.2), "vLLM still busy after the batch died"
    written = len(out_lines(out))
    killed = finished(demo)
    lost = answers(killed) - answers(before) - written  # answered by vLLM, not yet written at the kill
    aborted = killed.get("abort", 0.0) - before.get("abort", 0.0)

    t0 = time.monotonic()
    rerun = batch(demo, src, out)  # the default concurrency: the plan's MAX_NUM_SEQS
    stdout, stderr = rerun.communicate(timeout=900)
    print(f"\nkilled at {written} lines written ({lost} answered but not written, {aborted:.0f} aborted)")
    print(f"rerun ({time.monotonic() - t0:.1f} s):\n{stdout}{stderr[-2000:]}")
    assert rerun.returncode == 0, stdout + stderr
    assert f"{written} already answered" in stdout and "the plan's" in stdout
    assert_complete(out, "kill")
    after = finished(demo)
    assert answers(after) - answers(killed) == LINES - written  # each missing line once, none again
    assert 0 <= lost <= CONCURRENCY


def test_a_batch_stopped_with_sigterm_halfway_and_rerun_makes_vllm_answer_each_line_exactly_once(
    demo: Served, tmp_path: Path
):
    """SIGTERM (what SLURM sends at the time limit) lets the requests in flight finish and be written:
    over both runs vLLM answers exactly LINES requests."""
    src, out = dataset(tmp_path / "in.jsonl", demo, "term"), tmp_path / "out.jsonl"
    before = finished(demo)
    proc = batch(demo, src, out, "--concurrency", str(CONCURRENCY), "--no-progress")
    try:
        assert wait_until(lambda: len(out_lines(out)) >= LINES // 2 or proc.poll() is not None, 600, 0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stdout + stderr
    assert "SIGTERM: sending no more" in stderr
    written = len(out_lines(out))
    assert wait_until(lambda: idle(demo), 60, 0.2)
    assert answers(finished(demo)) - answers(before) == written < LINES  # nothing in flight was lost
    rerun = batch(demo, src, out, "--concurrency", str(CONCURRENCY), "--no-progress")
    stdout, stderr = rerun.communicate(timeout=900)
    print(f"\nSIGTERM at {written} lines written; rerun:\n{stdout}")
    assert rerun.returncode == 0, stdout + stderr
    assert_complete(out, "term")
    assert answers(finished(demo)) - answers(before) == LINES  # none sent twice, none lost


@pytest.mark.disrupts
def test_a_batch_through_an_engine_kill_finishes_once_the_supervisor_restarted_vllm(
    demo: Served, tmp_path: Path
):
    src, out = dataset(tmp_path / "in.jsonl", demo, "engine"), tmp_path / "out.jsonl"
    old_pid = demo.state()["pid"]
    restarts = demo.status()["supervisor"]["restarts"]
    proc = batch(demo, src, out, "--concurrency", str(CONCURRENCY), "--no-progress")
    try:
        assert wait_until(lambda: len(out_lines(out)) >= LINES // 3 or proc.poll() is not None, 600, 0.02)
        assert proc.poll() is None, proc.communicate()
        engine = demo.engine_core()
        engine.send_signal(signal.SIGKILL)
        killed_at = time.time()
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"\nbatch through the engine kill:\n{stdout}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout + stderr
    lines = assert_complete(out, "engine")
    state = demo.state()
    assert state["pid"] != old_pid, "the supervisor did not start a new vLLM"
    status = demo.status()
    assert (
        status["supervisor"]["restarts"] == restarts + 1
        and "EngineCore" in status["supervisor"]["last_cause"]
    )
    # Which vLLM made an answer: `created` is its request's arrival (whole seconds) at that API server;
    # the new one started at least RESTART_BACKOFF (1 s) after the kill.
    assert state["create_time"] - killed_at >= 1.0  # so whole seconds tell the two vLLMs apart
    new_since = math.floor(state["create_time"])
    by_new = [x for x in lines if x["response"]["body"]["created"] >= new_since]
    new_answers = answers(finished(demo))
    print(
        f"new vLLM started {state['create_time'] - killed_at:.1f} s after the kill; "
        f"{LINES - len(by_new)} lines answered before it, {len(by_new)} by it; its count: {new_answers}"
    )
    assert 0 < len(by_new) < LINES
    assert new_answers == len(by_new)  # the new vLLM answered each of them once
