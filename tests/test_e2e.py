"""End to end: the real vLLM server (CPU build) serving a tiny Qwen3-VL-MoE through start_service.py.

One service for the whole module (a start costs 30-100 s on two cores),
started exactly as a user would: ``start_service.py --config config.demo.env
--detach`` with the ports, model, media root and run/log folders overridden
through the environment. Requests go through both ``requests`` and the
official ``openai`` client. The last two tests end it: ``kill -9`` of the API
server then ``stop_service.py`` (orphaned EngineCore/Worker found by their
tag), then ``stop_service.py --all`` (the media server too).

Each request's status and latency are printed in the terminal summary.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from skips import vllm_missing

from qwen3_vl_service.deployment import scope

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e
MODEL = "qwen3-vl-fp8"
TAG_ENV = "QWEN3_VL_SERVICE_TAG"
RUN_DIR_ENV = "QWEN3_VL_SERVICE_RUN_DIR"
TIMINGS: list[tuple[str, int, float]] = []


def _have_vllm() -> bool:
    code = "import importlib.util,sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether a server could listen on PORT now (SO_REUSEADDR, as servers bind: TIME_WAIT is no holder)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def alive(pid: int) -> bool:
    """PID runs (a zombie waiting for init to reap it holds nothing: no memory, no port, no GPU)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ours(run_dir: Path) -> list[psutil.Process]:
    """Every live process that carries this service's run directory in its environment."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(RUN_DIR_ENV) == str(run_dir):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Service:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.media_port = free_port()
        while self.media_port == self.port:
            self.media_port = free_port()
        self.media_root = root / "media"
        self.run_root = root / "run"
        self.log_root = root / "logs"
        # The service's own folders (scope.py: SERVICE_NAME auto is port-<PORT>).
        self.run_dir = self.run_root / f"port-{self.port}"
        self.log_dir = self.log_root / f"port-{self.port}"
        self.media_pid_file = self.run_root / scope.media_folder(self.media_port) / "media_server.pid"
        self.model = root / "model"
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "MEDIA_PORT": str(self.media_port),
            "MEDIA_ROOT": str(self.media_root),
            "MODEL_PATH": str(self.model),
            "RUN_DIR": str(self.run_root),
            "LOG_DIR": str(self.log_root),
            "PYTHONUNBUFFERED": "1",
            # vLLM alone (the foreground start execs it); the supervisor has tests/test_faults.py.
            "RESTART": "no",
        }
        self.base = f"http://127.0.0.1:{self.port}"
        self.media = f"http://127.0.0.1:{self.media_port}"

    def script(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / name), "--config", str(REPO / "config.demo.env"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def state(self) -> dict:
        return json.loads((self.run_dir / "service.json").read_text())


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    if not _have_vllm():
        vllm_missing("vLLM is not installed here: run scripts/setup_env.sh (scripts/test.sh does)")
    from devtools import sample_media, tiny_model

    s = Service(tmp_path_factory.mktemp("e2e"))
    tiny_model.generate(s.model)
    s.media_root.mkdir()
    sample_media.write_samples(s.media_root)
    (s.media_root / "clips").mkdir()
    shutil.copy(s.media_root / "sample.mp4", s.media_root / "clips" / "clip.mp4")
    outside = s.root / "outside"
    outside.mkdir()
    shutil.copy(s.media_root / "sample.png", outside / "secret.png")

    t0 = time.monotonic()
    try:
        proc = s.script("start_service.py", "--detach", "--quiet", timeout=900)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(
            [], returncode=-1, stdout="(start_service.py timed out)", stderr=""
        )
    TIMINGS.append(("start_service.py --detach (to /health 200)", proc.returncode, time.monotonic() - t0))
    if proc.returncode != 0:
        logs = "\n".join(p.read_text(errors="replace")[-4000:] for p in s.log_dir.glob("*.log"))
        s.script("stop_service.py", "--all")
        for p in ours(s.run_dir):
            p.kill()
        pytest.fail(
            f"start failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
        )
    assert "ready:" in proc.stdout
    yield s
    # Whatever the tests did, leave nothing running.
    s.script("stop_service.py", "--all")
    for p in ours(s.run_dir):
        p.kill()


def timed(name: str, fn):
    t0 = time.monotonic()
    resp = fn()
    TIMINGS.append((name, getattr(resp, "status_code", 200), time.monotonic() - t0))
    return resp


def chat(svc: Service, name: str, content, **extra) -> requests.Response:
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
        {"type": "image_url", "image_url": {"url": (svc.root / "outside" / "secret.png").as_uri()}},
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


# -- status, then the two ways of stopping ---------------------------------------------


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


def test_kill_9_of_the_api_server_then_stop_leaves_nothing(svc):
    state = svc.state()
    api = psutil.Process(state["pid"])
    children = api.children(recursive=True)
    titles = " ".join(" ".join(c.cmdline()) for c in children)
    assert "VLLM::EngineCore" in titles, titles
    api.send_signal(signal.SIGKILL)
    api.wait(timeout=30)
    time.sleep(1.0)
    orphans = [c for c in children if alive(c.pid)]
    assert orphans, "vLLM's engine should survive a SIGKILL of its API server (vLLM #55510)"

    t0 = time.monotonic()
    proc = svc.script("stop_service.py")
    TIMINGS.append(("stop_service.py after kill -9", proc.returncode, time.monotonic() - t0))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any(alive(c.pid) for c in orphans)
    vllm_left = [p for p in ours(svc.run_dir) if "media" not in " ".join(p.cmdline())]
    assert vllm_left == []
    assert port_free(svc.port)
    assert requests.get(f"{svc.media}/health", timeout=10).status_code == 200, (
        "without --all the media server stays"
    )
    assert not Path(state["private_tmp"]).exists(), "the run's IPC socket folder is removed"


def test_stop_all_stops_the_media_server_and_frees_both_ports(svc):
    media_pid = int(svc.media_pid_file.read_text().split()[0])
    assert alive(media_pid)
    proc = svc.script("stop_service.py", "--all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ours(svc.run_dir) == []
    assert not alive(media_pid)
    assert port_free(svc.port) and port_free(svc.media_port)
    again = svc.script("stop_service.py", "--all")
    assert again.returncode == 0 and "not running" in (again.stdout + again.stderr).lower()


def test_foreground_start_execs_vllm_and_ctrl_c_stops_it(svc):
    """`start_service.py` without --detach: the launcher's pid becomes vLLM, output is teed to
    service.log, and Ctrl+C (SIGINT to the terminal's process group) stops every process."""
    assert port_free(svc.port)
    log = svc.log_dir / "service.log"
    offset = log.stat().st_size if log.exists() else 0
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "start_service.py"),
            "--config",
            str(REPO / "config.demo.env"),
            "--quiet",
        ],
        env=svc.env,
        cwd=svc.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal would give it
    )
    try:
        t0 = time.monotonic()
        deadline = t0 + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            try:
                if requests.get(f"{svc.base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        TIMINGS.append(("start_service.py in the foreground (to /health 200)", 0, time.monotonic() - t0))
        # exec: the pid we started is vLLM's API server now.
        assert "vllm.entrypoints.openai.api_server" in " ".join(psutil.Process(proc.pid).cmdline())
        state = svc.state()
        assert state["pid"] == proc.pid
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        out = proc.stdout.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert ours(svc.run_dir) == [] or all(not alive(p.pid) for p in ours(svc.run_dir))
    assert port_free(svc.port)
    text = log.read_bytes()[offset:].decode(errors="replace")
    # The launcher's report, then vLLM's own lines, in the terminal and in the log alike.
    for where in (out, text):
        assert "Preflight" in where and "exec vLLM" in where
        # The command shown is the one that ran: its tag and IPC socket folder (issue 16, defect 4).
        assert f"QWEN3_VL_SERVICE_TAG={state['tag']}" in where
        assert f"VLLM_RPC_BASE_PATH={state['private_tmp']}" in where
        assert "Application startup complete" in where
