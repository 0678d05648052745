"""End to end: two services of one checkout at once (vLLM's CPU build), one with YaRN past its native length.

Service A is the demo (config.demo.env); service B differs in model and port:
the tiny model with only 1024 native positions, served with ROPE_SCALING=yarn,
ROPE_FACTOR=2 and MAX_MODEL_LEN=2048. Both share RUN_DIR, LOG_DIR and one media
server (same MEDIA_PORT and MEDIA_ROOT). B answers a prompt longer than its
native 1024 positions, and vLLM's own log shows the 2048 it serves. Then
`stop_service.py --all` of A stops A only: the media server stays for B, and B
keeps answering; B's own `--all` then takes the media server down too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from skips import vllm_missing
from test_e2e import MODEL, _have_vllm, alive, free_port, ours, port_free
from test_yarn import short_context_copy

from qwen3_vl_service.deployment import scope

REPO = Path(__file__).resolve().parents[1]
# Two vLLM starts: minutes each on two shared cores.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


class Svc:
    def __init__(self, root: Path, port: int, media_port: int, **env: str) -> None:
        self.port = port
        self.run_dir = root / "run" / f"port-{port}"
        self.log = root / "logs" / f"port-{port}" / "service.log"
        self.base = f"http://127.0.0.1:{port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("PROFILE", "SERVICE_NAME")},
            "PORT": str(port),
            "MEDIA_PORT": str(media_port),
            "MEDIA_ROOT": str(root / "media"),
            "RUN_DIR": str(root / "run"),
            "LOG_DIR": str(root / "logs"),
            "PYTHONUNBUFFERED": "1",
            **env,
        }

    def script(self, name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        argv = [sys.executable, str(REPO / name), "--config", str(REPO / "config.demo.env"), *args]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def chat(self, content, max_tokens: int = 8) -> requests.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        return requests.post(f"{self.base}/v1/chat/completions", json=body, timeout=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    if not _have_vllm():
        vllm_missing("vLLM is not installed here: run scripts/setup_env.sh (scripts/test.sh does)")
    from devtools import sample_media, tiny_model

    root = tmp_path_factory.mktemp("pair")
    tiny = tiny_model.generate(root / "model")
    short = short_context_copy(tiny, root / "model-1k", 1024)
    sample_media.write_samples(root / "media")
    media_port = free_port()
    a = Svc(root, free_port(), media_port, MODEL_PATH=str(tiny))
    b = Svc(
        root,
        free_port(),
        media_port,
        MODEL_PATH=str(short),
        ROPE_SCALING="yarn",
        ROPE_FACTOR="2",
        MAX_MODEL_LEN="2048",
    )
    started = []
    try:
        for s in (a, b):
            t0 = time.monotonic()
            r = s.script("start_service.py", "--detach", "--quiet", timeout=900)
            log = s.log.read_text(errors="replace")[-4000:] if s.log.exists() else ""
            assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}\n{log}"
            started.append(s)
            print(f"started service on {s.port} in {time.monotonic() - t0:.0f} s")
        yield a, b, root, media_port
    finally:
        for s in reversed(started or [a, b]):
            s.script("stop_service.py", "--all")
            for p in ours(s.run_dir):
                p.kill()


def media_pid(root: Path, media_port: int) -> int:
    return int((root / "run" / scope.media_folder(media_port) / "media_server.pid").read_text().split()[0])


def test_each_service_has_its_own_state_and_log_and_they_share_one_media_server(pair):
    a, b, root, media_port = pair
    states = [json.loads((s.run_dir / "service.json").read_text()) for s in (a, b)]
    assert states[0]["pid"] != states[1]["pid"] and {st["port"] for st in states} == {a.port, b.port}
    assert a.log.exists() and b.log.exists() and a.log != b.log
    assert ours(a.run_dir) and ours(b.run_dir)
    assert not {p.pid for p in ours(a.run_dir)} & {p.pid for p in ours(b.run_dir)}
    assert alive(media_pid(root, media_port))
    for s in (a, b):
        st = s.script("status_service.py")
        assert st.returncode == 0 and f"service port-{s.port}: running, healthy" in st.stdout, st.stdout


def test_yarn_serves_a_prompt_longer_than_the_native_positions(pair):
    _, b, _, _ = pair
    from tokenizers import Tokenizer

    # Sized with the model's own tokenizer (about 15 tokens a sentence): ~1,500 tokens, past
    # the 1,024 native positions and inside the 2,048 that YaRN (factor 2) allows.
    tok = Tokenizer.from_file(str(Path(b.env["MODEL_PATH"]) / "tokenizer.json"))
    sentence = "the cat sat on the mat near a blue door"

    def prompt_of(tokens: int) -> str:
        reps = tokens // len(tok.encode(" " + sentence).ids)
        return " ".join([sentence] * reps)

    r = b.chat(prompt_of(1500))
    assert r.status_code == 200, r.text[:500]
    used = r.json()["usage"]["prompt_tokens"]
    assert 1024 < used < 2048, used  # past the model's own 1024 positions
    log = b.log.read_text(errors="replace")
    assert "max_seq_len=2048" in log, "vLLM's engine config shows the length YaRN allows"
    # The same request to a length past 2048 is refused by vLLM, not crashed.
    too_long = b.chat(prompt_of(3000))
    assert too_long.status_code == 400 and b.chat("hi").status_code == 200


def test_stop_all_of_one_leaves_the_other_and_the_shared_media_server(pair):
    a, b, root, media_port = pair
    pid = media_pid(root, media_port)
    r = a.script("stop_service.py", "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"the media server stays: still used by port-{b.port}" in r.stdout
    assert ours(a.run_dir) == [] and port_free(a.port)
    assert alive(pid)
    image = [
        {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{media_port}/sample.png"}},
        {"type": "text", "text": "What is in this picture?"},
    ]
    assert b.chat(image).status_code == 200, "B answers, with an image through the shared media server"
    assert a.script("status_service.py").returncode == 1
    r = b.script("stop_service.py", "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not alive(pid) and port_free(media_port) and port_free(b.port)
