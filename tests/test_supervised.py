"""supervised: a replica behind vllm-router leaves its rotation while it stalls or is down, joins again."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from lifecycle_helpers import free_port
from skips import installed, missing
from test_router import KEY, start_workers

from qwen3_vl_service.deployment import router_command
from qwen3_vl_service.deployment.deployment import ROUTER, VLLM, Deployment, Port, Unit
from qwen3_vl_service.lifecycle import router, stop
from qwen3_vl_service.lifecycle.supervised import rotation, rotation_call
from qwen3_vl_service.settings import config


def _unit(kind: str, name: str, port: int, argv=(), node_rank: int = 0, node: str = "") -> Unit:
    return Unit(
        kind,
        name,
        node_rank,
        node,
        tuple(argv),
        {},
        Path("/run") / name,
        Path("/logs") / name,
        (Port(port, "PORT", name),),
        f"http://127.0.0.1:{port}/health",
    )


@pytest.mark.unit
def test_a_replica_finds_the_router_and_its_own_url_in_the_recorded_deployment():
    urls = ["http://10.0.0.1:8010", "http://10.0.0.2:8011"]
    argv = [
        "python",
        "-m",
        "vllm_router.launch_router",
        "--port",
        "8040",
        "--worker-urls",
        *urls,
        "--policy",
        "x",
    ]
    head = _unit(ROUTER, "router", 8040, argv, node="gpu01")
    r0 = _unit(VLLM, "replica-0", 8010, node="gpu01")
    r1 = _unit(VLLM, "replica-1", 8011, node_rank=1, node="gpu02")
    dep = Deployment("svc", "router", Path("/run"), Path("/logs"), "http://127.0.0.1:8040", (r0, r1, head))
    assert rotation(dep, r0) == ("http://127.0.0.1:8040", urls[0])  # the head's own replica: loopback
    assert rotation(dep, r1) == ("http://10.0.0.1:8040", urls[1])  # another node's: the head's address
    single = Deployment("svc", "single", Path("/run"), Path("/logs"), "http://127.0.0.1:8010", (r0,))
    assert rotation(single, r0) == ("", "")


@pytest.mark.integration
def test_a_replica_out_of_the_rotation_gets_no_requests_until_it_joins_again(tmp_path):
    if not installed("vllm_router"):
        missing("vllm-router is not installed (pip install -e '.[router]')")
    ports = [free_port(), free_port()]
    workers = start_workers(ports, [subprocess.DEVNULL] * len(ports))
    path = tmp_path / "config.env"
    path.write_text(
        f"HOST=127.0.0.1\nAPI_KEY={KEY}\nROUTER_PORT={free_port()}\nSTARTUP_TIMEOUT=60\n"
        f"RUN_DIR={tmp_path / 'run'}\nLOG_DIR={tmp_path / 'logs'}\nMODEL_PATH={tmp_path / 'model'}\n",
        encoding="utf-8",
    )
    cfg = config.load(path, environ={})
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    cmd = router_command.build(cfg, urls)
    unit = dataclasses.replace(
        _unit(ROUTER, "router", cfg.router_port, cmd.argv),
        env=cmd.env,
        run_dir=tmp_path / "run" / "router",
        log_file=tmp_path / "logs" / "router.log",
    )
    base = f"http://127.0.0.1:{cfg.router_port}"

    def served(n: int) -> list[str]:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with requests.Session() as s:
            s.trust_env = False
            answers = [
                s.post(
                    f"{base}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=30,
                )
                for _ in range(n)
            ]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return [a.json()["choices"][0]["message"]["content"] for a in answers]

    try:
        router.start(cfg, unit, detached=True, wait=True, say=lambda _line: None)
        assert set(served(4)) == {f"from {p}" for p in ports}
        assert rotation_call(base, urls[0], join=False) == ""
        assert set(served(6)) == {f"from {ports[1]}"}  # replica-0 stalls or is down: none for it
        assert rotation_call(base, urls[0], join=True) == ""
        assert set(served(4)) == {f"from {p}" for p in ports}
        assert rotation_call(f"http://127.0.0.1:{free_port()}", urls[0], join=False) == "ConnectionError"
    finally:
        stop.stop_service(
            unit.run_dir, host=cfg.host, port=cfg.router_port, timeout=10, echo=lambda _line: None
        )
        for w in workers:
            w.terminate()
            w.wait(10)


# A stand-in API server: /health 200 on PORT until GO exists, then LINE (if any) into the start's log
# and exit 0, as vLLM's API server does after its engine died (or after a stop: no such line).
_EXITS_0 = """
import http.server, os, sys, threading, time
port, log, go, line = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
while not os.path.exists(go):
    time.sleep(0.05)
if line:
    with open(log, "a") as fh:
        fh.write(line + "\\n")
"""
ENGINE_DIED = "(APIServer pid=9) WARNING [shutdown] MPClient: engine core exited unexpectedly"


@pytest.mark.integration
@pytest.mark.parametrize(("line", "crash"), [(ENGINE_DIED, True), ("INFO: Finished server process", False)])
def test_an_api_server_that_exits_0_after_its_engine_died_is_a_crash_not_a_stop(tmp_path, line, crash):
    """Seen on an H100: the kill -9 of the EngineCore came before the supervisor's look found it
    gone, vLLM's API server exited with status 0 a second later, and the cause read "exited with
    status 0" (had it served, a clean exit: not restarted). Its log tells the two apart."""
    from lifecycle_helpers import wait_until, write_config

    from qwen3_vl_service.lifecycle.supervised import VllmUnit
    from qwen3_vl_service.lifecycle.supervisor import Finished

    port, go, log = free_port(), tmp_path / "go", tmp_path / "service.log"
    cfg = config.load(write_config(tmp_path, port=port), environ={})
    argv = (sys.executable, "-c", _EXITS_0, str(port), str(log), str(go), line)
    unit = dataclasses.replace(_unit(VLLM, "vllm", port, argv), run_dir=tmp_path / "run", log_file=log)
    said: list[str] = []
    vllm = VllmUnit(cfg, unit, tag="q3vl-exits0-1", detached=True, echo=said.append)
    vllm.start()
    try:
        assert vllm.proc is not None
        assert wait_until(lambda: vllm.check(time.monotonic()) is None and vllm.health.ok_once, 20), said
        go.touch()
        vllm.proc.wait(10)
        if crash:
            cause = vllm.check(time.monotonic()) or ""
            assert "is gone: killed or crashed" in cause and "engine core exited unexpectedly" in cause, cause
            assert cause.endswith(f"then vLLM's API server (pid {vllm.proc.pid}) exited with status 0"), cause
        else:
            with pytest.raises(Finished, match="exited by itself with status 0"):
                vllm.check(time.monotonic())
    finally:
        vllm.cleanup()
    assert not (tmp_path / "run" / "state.json").exists()
