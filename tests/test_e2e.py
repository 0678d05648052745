"""End to end: the real vLLM server (CPU build) serving a tiny Qwen3-VL-MoE through start_service.py.

The requests go to the session's shared demo service (``demo`` in
tests/conftest.py: ``start_service.py --config config.demo.env --detach``
under its supervisor, with the ports, model, media root and run/log folders
overridden through the environment), through both ``requests`` and the
official ``openai`` client. The foreground start (the exec of vLLM, Ctrl+C) and
the stops (``kill -9`` then ``stop_service.py``, ``--all``) are in
tests/test_services_e2e.py, at the shared service's end.

Each request's status and latency are printed in the terminal summary.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import requests
from served import MODEL, Served

pytestmark = pytest.mark.e2e
TIMINGS: list[tuple[str, int, float]] = []


@pytest.fixture
def svc(demo: Served) -> Served:
    return demo


def timed(name: str, fn):
    t0 = time.monotonic()
    resp = fn()
    TIMINGS.append((name, getattr(resp, "status_code", 200), time.monotonic() - t0))
    return resp


def chat(svc: Served, name: str, content, **extra) -> requests.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 16, **extra}
    return timed(name, lambda: requests.post(f"{svc.base}/v1/chat/completions", json=body, timeout=300))


def ok_message(resp: requests.Response) -> dict:
    assert resp.status_code == 200, resp.text[:500]
    data = resp.json()
    assert data["model"] == MODEL and data["object"] == "chat.completion"
    assert data["usage"]["completion_tokens"] > 0
    return data["choices"][0]["message"]


# -- the endpoints ----------------------------------------------------------------


def test_models_and_health(svc):
    TIMINGS.append(("start_service.py --detach (to /health 200): the shared demo", 0, svc.start_seconds))
    r = timed("GET /v1/models", lambda: requests.get(f"{svc.base}/v1/models", timeout=30))
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    assert timed("GET /health", lambda: requests.get(f"{svc.base}/health", timeout=30)).status_code == 200


def test_media_server_is_ours_and_serves_the_samples(svc):
    r = requests.get(f"{svc.media}/sample.jpg", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert r.content == (svc.media_root / "sample.jpg").read_bytes()


def test_chat_text_only(svc):
    msg = ok_message(chat(svc, "chat: text only", "Say hello."))
    assert msg["role"] == "assistant"


def test_chat_image_as_base64_data_url(svc):
    b64 = base64.b64encode((svc.media_root / "sample.png").read_bytes()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        {"type": "text", "text": "What is in this picture?"},
    ]
    resp = chat(svc, "chat: image as base64 data URL", content)
    ok_message(resp)
    # The image really went through the vision encoder: many more prompt tokens than the text.
    assert resp.json()["usage"]["prompt_tokens"] > 40


def test_chat_image_and_video_by_url_from_the_media_server(svc):
    content = [
        {"type": "image_url", "image_url": {"url": f"{svc.media}/sample.jpg"}},
        {"type": "video_url", "video_url": {"url": f"{svc.media}/clips/clip.mp4"}},
        {"type": "text", "text": "Describe the picture and the clip."},
    ]
    ok_message(chat(svc, "chat: image + video by URL (media server)", content))


def test_chat_image_by_file_url_under_the_media_root(svc):
    content = [
        {"type": "image_url", "image_url": {"url": (svc.media_root / "sample.png").as_uri()}},
        {"type": "text", "text": "What is this?"},
    ]
    ok_message(chat(svc, "chat: image by file:// under MEDIA_ROOT", content))


def test_chat_two_images_and_a_video_in_one_message(svc):
    content = [
        {"type": "image_url", "image_url": {"url": f"{svc.media}/sample.jpg"}},
        {"type": "image_url", "image_url": {"url": (svc.media_root / "sample.png").as_uri()}},
        {"type": "video_url", "video_url": {"url": f"{svc.media}/sample.mp4"}},
        {"type": "text", "text": "Compare them."},
    ]
    ok_message(chat(svc, "chat: two images + a video", content))


def test_chat_multi_turn_with_an_earlier_assistant_turn(svc):
    body = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"{svc.media}/sample.jpg"}},
                    {"type": "text", "text": "What colour is the square?"},
                ],
            },
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "And the sky?"},
        ],
    }
    r = timed(
        "chat: multi-turn", lambda: requests.post(f"{svc.base}/v1/chat/completions", json=body, timeout=300)
    )
    ok_message(r)


def test_chat_without_the_model_field(svc):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    r = timed(
        "chat: no model field",
        lambda: requests.post(f"{svc.base}/v1/chat/completions", json=body, timeout=300),
    )
    ok_message(r)


def test_chat_streaming_with_the_openai_client(svc):
    from openai import OpenAI

    client = OpenAI(base_url=f"{svc.base}/v1", api_key="unused", timeout=300)
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=12,
        stream=True,
    )
    chunks = list(stream)
    TIMINGS.append(("chat: streaming (openai client)", 200, time.monotonic() - t0))
    assert len(chunks) >= 3
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason in ("length", "stop")
    pieces = [
        (getattr(c.choices[0].delta, "reasoning", None) or "") + (c.choices[0].delta.content or "")
        for c in chunks
        if c.choices
    ]
    assert "".join(pieces)


def test_openai_client_image_by_media_url(svc):
    from openai import OpenAI

    client = OpenAI(base_url=f"{svc.base}/v1", api_key="unused", timeout=300)
    t0 = time.monotonic()
    out = client.chat.completions.create(
        model=MODEL,
        max_tokens=8,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"{svc.media}/sample.png"}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    )
    TIMINGS.append(("chat: image by URL (openai client)", 200, time.monotonic() - t0))
    assert out.model == MODEL and out.usage.completion_tokens > 0


def _think_end_id(model_dir: Path) -> int:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    return next(t["id"] for t in tok["added_tokens"] if t["content"] == "</think>")


def test_reasoning_arrives_separated_from_the_content(svc):
    """The Thinking template opens <think> in the prompt; the model closes it with </think>.

    Random weights never choose </think> on their own, so a logit bias makes it
    likely; with a fixed seed the answer is reproducible. The reasoning parser
    must put what comes before </think> in `reasoning` and the rest in `content`.
    """
    end_id = _think_end_id(svc.model)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Think, then answer."}],
        "max_tokens": 24,
        "temperature": 1.0,
        "seed": 7,
        "logit_bias": {str(end_id): 3.0},
    }
    r = timed(
        "chat: reasoning separated",
        lambda: requests.post(f"{svc.base}/v1/chat/completions", json=body, timeout=300),
    )
    msg = ok_message(r)
    assert msg.get("reasoning"), msg
    assert "</think>" not in msg["reasoning"]
    assert msg.get("content") is not None, msg
    # Without the bias, no </think> is produced: all of it is reasoning, no content.
    plain = ok_message(chat(svc, "chat: reasoning only (no </think>)", "Think.", temperature=0))
    assert plain.get("reasoning") and not plain.get("content")


def test_completions(svc):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8}
    r = timed(
        "POST /v1/completions", lambda: requests.post(f"{svc.base}/v1/completions", json=body, timeout=300)
    )
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "text_completion" and data["usage"]["completion_tokens"] > 0


# -- refusals -----------------------------------------------------------------------


def test_file_url_outside_the_media_root_is_refused(svc):
    content = [
        {
            "type": "image_url",
            "image_url": {"url": (svc.media_root.parent / "outside" / "secret.png").as_uri()},
        },
        {"type": "text", "text": "What is this?"},
    ]
    r = chat(svc, "refused: file:// outside MEDIA_ROOT", content)
    assert 400 <= r.status_code < 500, r.text[:300]
    assert requests.get(f"{svc.base}/health", timeout=30).status_code == 200


@pytest.mark.parametrize(
    "path", ["%2e%2e/outside/secret.png", "%252e%252e/outside/secret.png", ".hidden.png"]
)
def test_media_url_outside_the_media_root_is_refused(svc, path):
    content = [
        {"type": "image_url", "image_url": {"url": f"{svc.media}/{path}"}},
        {"type": "text", "text": "What is this?"},
    ]
    r = chat(svc, f"refused: media URL /{path}", content)
    assert 400 <= r.status_code < 500, r.text[:300]
    assert requests.get(f"{svc.base}/health", timeout=30).status_code == 200


def test_media_url_from_another_host_is_refused(svc):
    content = [
        {
            "type": "image_url",
            "image_url": {"url": f"http://localhost.localdomain:{svc.media_port}/sample.png"},
        },
        {"type": "text", "text": "What is this?"},
    ]
    r = chat(svc, "refused: media URL on a host not allowed", content)
    assert r.status_code == 400 and "allowed domains" in r.text


# -- status ---------------------------------------------


def test_status_reports_healthy_with_metrics(svc):
    proc = svc.script("status_service.py", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(proc.stdout)
    assert status["running"] is True and status["healthy"] is True
    metrics = status["metrics"]
    assert "error" not in metrics, metrics
    assert metrics["requests_running"] == 0 and metrics["requests_waiting"] == 0
    assert 0.0 <= metrics["kv_cache_usage"] <= 1.0
    # The requests above generated tokens: the counters saw them.
    assert metrics["generation_tokens_total"] > 0 and metrics["prompt_tokens_total"] > 0
    assert status["served_models"] == [MODEL]
    human = svc.script("status_service.py")
    assert human.returncode == 0 and str(svc.port) in human.stdout
