"""End to end: two replicas of the real vLLM CPU server behind vllm-router, through the project's commands.

``start_service.py --detach`` with REPLICAS=2 starts two services (each in
its own RUN_DIR/replica-<i>, on PORT and PORT+1) and vllm-router on
ROUTER_PORT in front of them. Every request kind of the README goes through
the router's one endpoint; each replica's own /metrics shows that it served
some. Then ``kill -9`` of one replica's engine: the router keeps answering
from the other, while replica-1's supervisor restarts it on its port (status
shows the restart and its cause) and the router sends it requests again.
``stop_service.py --all`` leaves no process of either replica
nor of the router.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
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

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e
MODEL = "qwen3-vl-fp8"
RUN_DIR_ENV = "QWEN3_VL_SERVICE_RUN_DIR"


def _importable(module: str) -> bool:
    code = f"import importlib.util,sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_pair() -> int:
    """A port P with P and P+1 free (two replicas; the router and its metrics)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000 and _free(port + 1):
            return port
    raise RuntimeError("no two consecutive free ports")


def ours(run_dir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(RUN_DIR_ENV) == str(run_dir) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def done_requests(port: int) -> float:
    """vllm:request_success_total of the replica on PORT, summed over finish reasons."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "vllm:request_success":
            total += sum(s.value for s in fam.samples if s.name == "vllm:request_success_total")
    return total


class Group:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_pair()
        self.router_port = free_pair()
        while abs(self.router_port - self.port) < 2:
            self.router_port = free_pair()
        self.media_port = free_pair()
        while self.media_port in (self.port, self.port + 1, self.router_port, self.router_port + 1):
            self.media_port = free_pair()
        self.media_root = root / "media"
        self.run_dir = root / "run"
        self.log_dir = root / "logs"
        self.model = root / "model"
        self.env = {
            **os.environ,
            "REPLICAS": "2",
            "ROUTER_POLICY": "round_robin",
            "ROUTER_PORT": str(self.router_port),
            "PORT": str(self.port),
            "MEDIA_PORT": str(self.media_port),
            "MEDIA_ROOT": str(self.media_root),
            "MODEL_PATH": str(self.model),
            "RUN_DIR": str(self.run_dir),
            "LOG_DIR": str(self.log_dir),
            # Two CPU engines share this machine's cores.
            "OMP_NUM_THREADS": "1",
            # Each replica under its own supervisor: a dead one comes back after 1 s.
            "RESTART": "on-failure",
            "RESTART_BACKOFF": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.base = f"http://127.0.0.1:{self.router_port}"
        self.media = f"http://127.0.0.1:{self.media_port}"

    def script(self, name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / name), "--config", str(REPO / "config.demo.env"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def scopes(self) -> list[Path]:
        return [self.run_dir / "replica-0", self.run_dir / "replica-1", self.run_dir / "router"]

    def everything(self) -> list[psutil.Process]:
        return [p for d in self.scopes() for p in ours(d)]


@pytest.fixture(scope="module")
def grp(tmp_path_factory):
    if not _importable("vllm"):
        vllm_missing("vLLM is not installed here: run scripts/setup_env.sh (scripts/test.sh does)")
    if not _importable("vllm_router"):
        vllm_missing("vllm-router is not installed here: run scripts/setup_env.sh (the [router] extra)")
    from devtools import sample_media, tiny_model

    g = Group(tmp_path_factory.mktemp("replicas"))
    tiny_model.generate(g.model)
    g.media_root.mkdir()
    sample_media.write_samples(g.media_root)
    try:
        proc = g.script("start_service.py", "--detach", "--quiet", timeout=900)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess([], returncode=-1, stdout="(timed out)", stderr="")
    if proc.returncode != 0:
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in g.log_dir.rglob("*.log"))
        g.script("stop_service.py", "--all")
        for p in g.everything():
            p.kill()
        pytest.fail(
            f"start failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
        )
    assert "through vllm-router" in proc.stdout, proc.stdout
    yield g
    g.script("stop_service.py", "--all")
    for p in g.everything():
        p.kill()


def post(grp: Group, path: str, body: dict) -> requests.Response:
    return requests.post(f"{grp.base}{path}", json=body, timeout=300)


def chat_body(content, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def test_status_shows_the_router_and_both_replicas_healthy(grp):
    proc = grp.script("status_service.py", "--json", "--sample", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(proc.stdout)
    assert status["router"]["healthy"] is True
    assert [r["name"] for r in status["replicas"]] == ["replica-0", "replica-1"]
    assert all(r["healthy"] for r in status["replicas"])
    assert {r["urls"]["api"] for r in status["replicas"]} == {
        f"http://127.0.0.1:{grp.port}/v1",
        f"http://127.0.0.1:{grp.port + 1}/v1",
    }
    human = grp.script("status_service.py", "--sample", "0")
    assert human.returncode == 0 and "replica-1" in human.stdout and "router" in human.stdout


def test_every_request_kind_answers_200_through_the_router_and_both_replicas_serve(grp):
    before = [done_requests(grp.port), done_requests(grp.port + 1)]
    png = base64.b64encode((grp.media_root / "sample.png").read_bytes()).decode()
    image_url = {"type": "image_url", "image_url": {"url": f"{grp.media}/sample.jpg"}}
    kinds = {
        "text": chat_body("Say hello."),
        "image by media URL": chat_body([image_url, {"type": "text", "text": "What is this?"}]),
        "image as base64": chat_body(
            [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                {"type": "text", "text": "What is this?"},
            ]
        ),
        "video by media URL": chat_body(
            [
                {"type": "video_url", "video_url": {"url": f"{grp.media}/sample.mp4"}},
                {"type": "text", "text": "Describe the clip."},
            ]
        ),
        "multi-turn": {
            "model": MODEL,
            "max_tokens": 8,
            "messages": [
                {"role": "user", "content": [image_url, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And the sky?"},
            ],
        },
    }
    for name, body in kinds.items():
        r = post(grp, "/v1/chat/completions", body)
        assert r.status_code == 200, f"{name}: {r.status_code} {r.text[:300]}"
        assert r.json()["usage"]["completion_tokens"] > 0, name
    with requests.post(
        f"{grp.base}/v1/chat/completions", json=chat_body("Count.", stream=True), stream=True, timeout=300
    ) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]" and len(events) >= 3
    r = post(grp, "/v1/completions", {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    r = requests.get(f"{grp.base}/v1/models", timeout=30)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]
    assert requests.get(f"{grp.base}/health", timeout=30).status_code == 200

    after = [done_requests(grp.port), done_requests(grp.port + 1)]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 7, served  # five chats, the stream, the completion
    assert all(n >= 2 for n in served), f"round_robin should spread the 7 requests: {served}"


def test_kill_9_of_one_replicas_engine_the_router_keeps_answering_and_it_is_restarted(grp):
    state = json.loads((grp.run_dir / "replica-1" / "service.json").read_text())
    api = psutil.Process(state["pid"])
    engines = [c for c in api.children(recursive=True) if "EngineCore" in " ".join(c.cmdline())]
    assert engines, "replica-1 should have a VLLM::EngineCore"
    for e in engines:
        e.send_signal(signal.SIGKILL)
    survivor_before = done_requests(grp.port)
    codes = []
    for i in range(6):
        r = post(grp, "/v1/chat/completions", chat_body(f"Request {i} after the kill."))
        codes.append(r.status_code)
    assert codes == [200] * 6, codes
    assert done_requests(grp.port) - survivor_before == 6, "replica-0 answered them all"

    # Its supervisor restarts it on the same port: a new API server, /health 200 again.
    deadline = time.monotonic() + 600
    new_pid = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = json.loads((grp.run_dir / "replica-1" / "service.json").read_text())["pid"]
            if pid != api.pid and _health(grp.port + 1) == 200:
                new_pid = pid
                break
        time.sleep(1)
    assert new_pid is not None, (
        "replica-1 was not restarted:\n"
        + (grp.log_dir / "replica-1" / "service.log").read_text(errors="replace")[-4000:]
    )
    assert not api.is_running() or api.status() == psutil.STATUS_ZOMBIE
    direct = requests.post(
        f"http://127.0.0.1:{grp.port + 1}/v1/chat/completions", json=chat_body("Back?"), timeout=300
    )
    assert direct.status_code == 200, direct.text[:300]

    # A long --http-timeout: this machine is shared, a 3 s /health can miss under load.
    status = json.loads(
        grp.script("status_service.py", "--json", "--sample", "0", "--http-timeout", "30").stdout
    )
    by_name = {r["name"]: r for r in status["replicas"]}
    assert by_name["replica-1"]["healthy"] is True, by_name["replica-1"]
    assert by_name["replica-0"]["healthy"] is True, by_name["replica-0"]
    sup = by_name["replica-1"]["supervisor"]
    assert sup["running"] is True and sup["restarts"] == 1, sup
    assert sup["last_cause"].startswith("replica-1 vLLM: "), sup
    assert "EngineCore" in sup["last_cause"] or "exited" in sup["last_cause"], sup
    assert by_name["replica-0"]["supervisor"]["restarts"] == 0
    assert status["router"]["running"] is True, status["router"]
    human = grp.script("status_service.py", "--sample", "0").stdout
    assert "1 restart(s)" in human and "replica-1 vLLM:" in human, human
    log = (grp.log_dir / "replica-1" / "service.log").read_text(errors="replace")
    assert "restarting replica-1 vLLM" in log, log[-3000:]

    # The router's health checks take it back: replica-1 serves requests through the router again.
    served_before = done_requests(grp.port + 1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and done_requests(grp.port + 1) == served_before:
        assert post(grp, "/v1/chat/completions", chat_body("Round robin.")).status_code == 200
        time.sleep(1)
    assert done_requests(grp.port + 1) > served_before, "the router never sent replica-1 a request again"


def _health(port: int) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
    except requests.RequestException:
        return 0


def test_stop_all_leaves_no_process_of_either_replica_nor_the_router(grp):
    router_pid = json.loads((grp.run_dir / "router" / "service.json").read_text())["pid"]
    assert psutil.pid_exists(router_pid)
    proc = grp.script("stop_service.py", "--all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "router:" in proc.stdout and "replica-0:" in proc.stdout
    assert grp.everything() == []
    assert not psutil.pid_exists(router_pid) or psutil.Process(router_pid).status() == psutil.STATUS_ZOMBIE
    for port in (grp.port, grp.port + 1, grp.router_port, grp.router_port + 1, grp.media_port):
        assert _free(port), port
    assert not any(d.exists() for d in grp.scopes()), "stop removes the emptied run folders"
    again = grp.script("status_service.py", "--sample", "0")
    assert again.returncode == 1 and "not running" in again.stdout
