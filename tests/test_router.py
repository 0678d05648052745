"""vllm-router in front of replicas that require API_KEY: the client's bearer token reaches them.

The real router (router.start, the vllm-router 0.1.17 binary) in front of two
stand-in workers that answer /v1/* only with ``Authorization: Bearer <key>``,
as vLLM does with --api-key (its /health stays open, and the router checks it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from lifecycle_helpers import free_port, wait_until
from skips import installed, missing

from qwen3_vl_service.deployment import router_command
from qwen3_vl_service.deployment.deployment import Port, Unit
from qwen3_vl_service.lifecycle import router, stop
from qwen3_vl_service.machine.processes import port_free
from qwen3_vl_service.settings import config

KEY = "sk-router-test-0123456789"
WORKER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

key, port = sys.argv[1], int(sys.argv[2])


class Handler(BaseHTTPRequestHandler):
    def _answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        auth = self.headers.get("Authorization")
        print(json.dumps({"path": self.path, "auth": auth}), flush=True)
        if self.path.startswith("/v1") and auth != f"Bearer {key}":
            return self._answer(401, {"error": "Unauthorized"})
        if self.path == "/v1/models":
            return self._answer(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})
        if self.path == "/v1/chat/completions":
            message = {"role": "assistant", "content": f"from {port}"}
            return self._answer(200, {"id": "c", "object": "chat.completion",
                                      "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        return self._answer(200, {})

    do_GET = do_POST = _serve

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def start_workers(ports: list[int], outputs: list) -> list[subprocess.Popen]:
    """A WORKER on each port (its stdout to OUTPUTS), returned once each one listens: the router's
    first health check must not find one still starting (on a loaded machine it then routes every
    request to the other until its next check)."""
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, KEY, str(p)], stdout=out, stderr=subprocess.STDOUT)
        for p, out in zip(ports, outputs, strict=True)
    ]
    for p, w in zip(ports, workers, strict=True):
        assert wait_until(lambda p=p, w=w: w.poll() is not None or not port_free("127.0.0.1", p), 30), p
        assert w.poll() is None, f"the worker on port {p} exited with {w.returncode}"
    return workers


def _seen(log: Path, path: str) -> list[str | None]:
    lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
    return [ln["auth"] for ln in lines if ln["path"] == path]


@pytest.mark.integration
def test_the_clients_bearer_token_reaches_the_replicas_through_the_router(tmp_path):
    if not installed("vllm_router"):
        missing("vllm-router is not installed (pip install -e '.[router]')")
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"worker-{p}.log" for p in ports]
    workers = start_workers(ports, [log.open("w") for log in logs])
    path = tmp_path / "config.env"
    path.write_text(
        f"HOST=127.0.0.1\nAPI_KEY={KEY}\nROUTER_PORT={free_port()}\nSTARTUP_TIMEOUT=60\n"
        f"RUN_DIR={tmp_path / 'run'}\nLOG_DIR={tmp_path / 'logs'}\nMODEL_PATH={tmp_path / 'model'}\n",
        encoding="utf-8",
    )
    cfg = config.load(path, environ={})
    run_dir = cfg.run_dir / "router"
    cmd = router_command.build(cfg, [f"http://127.0.0.1:{p}" for p in ports])
    unit = Unit(
        "router",
        "router",
        0,
        "",
        cmd.argv,
        cmd.env,
        run_dir,
        tmp_path / "logs" / "router.log",
        (Port(cfg.router_port, "ROUTER_PORT", "the router"),),
        f"http://127.0.0.1:{cfg.router_port}/health",
    )
    try:
        router.start(
            cfg,
            unit,
            detached=True,
            wait=True,
            say=lambda _line: None,
        )
        base = f"http://127.0.0.1:{cfg.router_port}"
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with requests.Session() as s:
            s.trust_env = False
            with_key = [
                s.post(
                    f"{base}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=30,
                )
                for _ in range(4)
            ]
            without = s.post(f"{base}/v1/chat/completions", json=body, timeout=30)
        assert [r.status_code for r in with_key] == [200] * 4, [r.text for r in with_key]
        answered = {r.json()["choices"][0]["message"]["content"] for r in with_key}
        assert answered == {f"from {p}" for p in ports}, "both replicas served"
        assert without.status_code == 401, "the replica's refusal reaches the client"
        for log in logs:
            assert f"Bearer {KEY}" in _seen(log, "/v1/chat/completions"), log.read_text()
    finally:
        stop.stop_service(run_dir, host=cfg.host, port=cfg.router_port, timeout=10, echo=lambda _line: None)
        for w in workers:
            w.terminate()
            w.wait(10)
