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
   With SIGTERM instead (SLURM's time limit; 64 lines) those in flight finish
   and are written: over both runs vLLM answers exactly 64 requests.
2. A batch through a kill of the EngineCore: one kill for it and the load
   clients, in tests/test_faults.py (a restart costs a vLLM start).

The dataset, the batch process and the count: tests/batch_job.py.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from batch_job import CONCURRENCY, LINES, answers, assert_complete, batch, dataset, finished, idle, out_lines
from lifecycle_helpers import wait_until
from served import Served

pytestmark = pytest.mark.e2e
TERM_LINES = 8 * CONCURRENCY


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
    over both runs vLLM answers exactly TERM_LINES requests (fewer than the kill's LINES: the same
    mix, in 8 waves of CONCURRENCY)."""
    src, out = dataset(tmp_path / "in.jsonl", demo, "term", TERM_LINES), tmp_path / "out.jsonl"
    before = finished(demo)
    proc = batch(demo, src, out, "--concurrency", str(CONCURRENCY), "--no-progress")
    try:
        assert wait_until(
            lambda: len(out_lines(out)) >= TERM_LINES // 2 or proc.poll() is not None, 600, 0.02
        )
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
    assert answers(finished(demo)) - answers(before) == written < TERM_LINES  # nothing in flight was lost
    rerun = batch(demo, src, out, "--concurrency", str(CONCURRENCY), "--no-progress")
    stdout, stderr = rerun.communicate(timeout=900)
    print(f"\nSIGTERM at {written} lines written; rerun:\n{stdout}")
    assert rerun.returncode == 0, stdout + stderr
    assert_complete(out, "term", TERM_LINES)
    assert answers(finished(demo)) - answers(before) == TERM_LINES  # none sent twice, none lost
