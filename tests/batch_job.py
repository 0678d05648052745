"""The batch job of the end-to-end tests: batch_service.py against a running demo service, and vLLM's
own count of what it answered (tests/test_batch_e2e.py, and the engine kill of tests/test_faults.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families
from served import DEMO_CONFIG, Served

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
LINES = 200  # issue 26: the e2e tests send 200 lines
CONCURRENCY = 8
ANSWERS = ("stop", "length")  # finished reasons of an answered request


def dataset(path: Path, demo: Served, prefix: str, lines: int = LINES) -> Path:
    """LINES requests (or LINES=lines): text, local image, image by media-server URL, local video, in turn."""
    kinds = [
        [],
        [{"type": "image_url", "image_url": {"url": "sample.png"}}],
        [{"type": "image_url", "image_url": {"url": f"{demo.media}/sample.jpg"}}],
        [{"type": "video_url", "video_url": {"url": str(demo.media_root / "clips" / "clip.mp4")}}],
    ]
    with open(path, "w") as fh:
        for i in range(lines):
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
    """OUT's whole lines: the batch may be writing the last one as it is read."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(x) for x in text.split("\n")[:-1]]


def batch(demo: Served, src: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, str(REPO / "batch_service.py"), "--config", str(DEMO_CONFIG), str(src), str(out), *args],
        env=demo.env,
        cwd=demo.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_complete(out: Path, prefix: str, count: int = LINES) -> list[dict]:
    lines = out_lines(out)
    assert len(lines) == count, len(lines)
    assert sorted(x["custom_id"] for x in lines) == sorted(f"{prefix}-{i}" for i in range(count))
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in lines)
    assert all(x["response"]["body"]["usage"]["completion_tokens"] > 0 for x in lines)
    return lines
