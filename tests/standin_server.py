"""A stand-in for vLLM's process tree, for tests with real processes (no vLLM, no GPU).

    python tests/standin_server.py --port P --pids-file F [--orphan] [--startup-delay S] ...

Roles (``--role``):
  api      (default) the "API server": prints vLLM-like startup lines, then
           serves /health, /metrics (Prometheus text with vLLM's metric
           names), /v1/models (Bearer VLLM_API_KEY when set) on 127.0.0.1:P.
           Starts an ``engine``; with --orphan also a ``spawner``. Writes
           {"api": pid, "engine": pid, "workers": [...], "spawner": pid,
           "orphan": pid} to --pids-file once everything runs. On SIGTERM it
           stops serving, TERMs the engine, waits for it, exits 0.
  engine   titled VLLM::EngineCore; starts Worker_TP0 (ignores SIGTERM) and
           Worker_TP1 (exits on SIGTERM); on SIGTERM it TERMs both, waits
           1 s and exits, leaving TP0 behind as vLLM's stuck workers do.
  spawner  starts Worker_TP2 and then idles: the test kills it with SIGKILL,
           which orphans TP2 (vLLM #55510, #34643).
  worker   titled VLLM::Worker_TP<n>; --ignore-term makes it ignore SIGTERM.
  decoy    only titled (--title); for "same name, not ours" checks.

Every child inherits the environment, so the tag the test sets reaches all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve()
STOP = threading.Event()


def _title(name: str) -> None:
    try:
        import setproctitle
    except ImportError:  # the tests that need titles skip without it
        return
    setproctitle.setproctitle(name)


def _spawn(role: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE), "--role", role, *extra], stdin=subprocess.DEVNULL)


def _on_term(_sig, _frame) -> None:
    STOP.set()


def _idle() -> None:
    while not STOP.is_set():
        STOP.wait(0.2)


def _say(line: str, end: str = "\n") -> None:
    sys.stdout.write(line + end)
    sys.stdout.flush()


# ---------------------------------------------------------------------------


# Each role takes its title only after its SIGTERM handler is in place: with setproctitle (the tests
# that signal them need it: needs_titles), the pids file is written once every child has its title
# (_wait_pids), so a test that signals them finds the handlers there.


def run_worker(args) -> int:
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, _on_term)
    _title(f"VLLM::Worker_TP{args.rank}")
    _idle()
    return 0


def run_engine(args) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    _title("VLLM::EngineCore")
    workers = [_spawn("worker", "--rank", "0", "--ignore-term"), _spawn("worker", "--rank", "1")]
    _idle()
    for w in workers:
        w.terminate()
    deadline = time.monotonic() + 1.0
    for w in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.wait(max(0.0, deadline - time.monotonic()))
    return 0


def run_spawner(args) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    _spawn("worker", "--rank", "2")
    _idle()
    return 0


def run_decoy(args) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    _title(args.title)
    _idle()
    return 0


class _State:
    started = time.monotonic()
    ready = False
    scrapes = 0
    api_key = os.environ.get("VLLM_API_KEY", "")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a) -> None:  # quiet
        pass

    def _send(self, code: int, body: str, ctype: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200 if _State.ready else 503, "")
        elif self.path == "/metrics":
            # The counters advance per scrape, not per second: the rate status computes is then
            # 100 (40) tokens over its own measured interval, whatever the machine's load.
            _State.scrapes += 1
            gen = 1000.0 + 100.0 * _State.scrapes
            prompt = 5000.0 + 40.0 * _State.scrapes
            labels = 'engine="0",model_name="standin"'
            body = (
                "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                f"vllm:num_requests_running{{{labels}}} 2.0\n"
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
                "# TYPE vllm:num_requests_waiting gauge\n"
                f"vllm:num_requests_waiting{{{labels}}} 1.0\n"
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f"vllm:kv_cache_usage_perc{{{labels}}} 0.25\n"
                "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
                "# TYPE vllm:generation_tokens_total counter\n"
                f"vllm:generation_tokens_total{{{labels}}} {gen}\n"
                f"vllm:generation_tokens_created{{{labels}}} 1.7e9\n"
                "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
                "# TYPE vllm:prompt_tokens_total counter\n"
                f"vllm:prompt_tokens_total{{{labels}}} {prompt}\n"
            )
            self._send(200, body, "text/plain; version=0.0.4")
        elif self.path == "/v1/models":
            if _State.api_key and self.headers.get("Authorization") != f"Bearer {_State.api_key}":
                self._send(401, json.dumps({"error": "Unauthorized"}), "application/json")
                return
            self._send(
                200, json.dumps({"object": "list", "data": [{"id": "standin-model"}]}), "application/json"
            )
        else:
            self._send(404, "")


def run_api(args) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    _say("INFO [api_server.py] vLLM server version 0.32.0, serving model standin")
    engine = None if args.no_children else _spawn("engine")
    spawner = _spawn("spawner") if args.orphan and not args.no_children else None
    # Startup, as vLLM logs it (tqdm bars end with \r on a pipe).
    if args.startup_delay:
        step = args.startup_delay / 4
        _say("(EngineCore pid=1) INFO [gpu_model_runner.py] Starting to load model standin...")
        for n in range(3):
            _say(
                f"\rLoading safetensors checkpoint shards: {n * 50:3d}% Completed | {n}/2 "
                f"[00:0{n}<00:01, 1.0it/s]",
                end="",
            )
            time.sleep(step)
        _say("")
        _say("(EngineCore pid=1) INFO [monitor.py] Starting torch.compile")
        time.sleep(step)
        _say(
            "(EngineCore pid=1) INFO [gpu_model_runner.py] "
            "Capturing CUDA graphs (decode, FULL):  50%|#####     | 1/2 [00:00<00:00]"
        )
        time.sleep(step)
    if args.fail_with:
        _say("Traceback (most recent call last):")
        _say(args.fail_with)
        if engine is not None:
            engine.terminate()
            engine.wait(5)
        return 1
    server = None
    if not args.never_listen:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _State.ready = not args.unhealthy
        _say("INFO:     Waiting for application startup.")
        _say("INFO:     Application startup complete.")

    if args.pids_file and engine is not None:
        pids = _wait_pids(engine, spawner)
        tmp = Path(args.pids_file + ".tmp")
        tmp.write_text(json.dumps(pids))
        os.replace(tmp, args.pids_file)

    _idle()
    _say("INFO:     Shutting down")
    if server is not None:
        server.shutdown()
    if engine is not None:
        engine.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            engine.wait(3)
    _say("INFO:     Finished server process")
    return 0


def _wait_pids(engine: subprocess.Popen, spawner: subprocess.Popen | None) -> dict:
    import psutil

    try:
        import setproctitle  # noqa: F401

        titled = True
    except ImportError:
        titled = False

    def ready(pid: int) -> bool:
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.Error:
            return False
        return not titled or bool(cmd and cmd[0].startswith("VLLM::"))

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = [c.pid for c in psutil.Process(engine.pid).children()]
        orphan = [c.pid for c in psutil.Process(spawner.pid).children()] if spawner else []
        if (
            len(workers) == 2
            and (spawner is None or len(orphan) == 1)
            and all(ready(pid) for pid in [engine.pid, *workers, *orphan])
        ):
            return {
                "api": os.getpid(),
                "engine": engine.pid,
                "workers": workers,
                "spawner": spawner.pid if spawner else None,
                "orphan": orphan[0] if orphan else None,
            }
        time.sleep(0.05)
    raise SystemExit("stand-in: children did not start")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--role", default="api", choices=["api", "engine", "spawner", "worker", "decoy"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--pids-file", default="")
    p.add_argument("--orphan", action="store_true")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--title", default="VLLM::EngineCore")
    p.add_argument("--startup-delay", type=float, default=0.0)
    p.add_argument("--fail-with", default="")
    p.add_argument("--never-listen", action="store_true")
    p.add_argument("--unhealthy", action="store_true")
    p.add_argument("--no-children", action="store_true", help="the API server alone (readiness tests)")
    args = p.parse_args()
    return {
        "api": run_api,
        "engine": run_engine,
        "spawner": run_spawner,
        "worker": run_worker,
        "decoy": run_decoy,
    }[args.role](args)


if __name__ == "__main__":
    raise SystemExit(main())
