"""Time to stop: `stop_service.py` against a bare vLLM's SIGTERM on the same arguments, idle and busy.

    .venv/bin/python bench/bench_stop.py [--modes idle,busy] [--busy-requests 4]

On vLLM's CPU build with the demo settings (config.demo.env: SHUTDOWN_TIMEOUT=5)
and the tiny Qwen3-VL-MoE generated here, for each mode:

- ours: the service started by `start_service.py --detach` (the supervisor,
  RESTART=on-failure, as users get it); timed: the wall time of
  `stop_service.py`, which returns once every process is gone, the port is
  free and the state is cleared.
- bare: `python -m vllm.entrypoints.openai.api_server` with the argv and
  environment the launcher uses (vllm_args.build: --shutdown-timeout 5,
  drain mode); timed: SIGTERM to its pid until every process of its tree is
  gone.
- bare-abort: the same without --shutdown-timeout (vLLM's default: it kills
  its engine right after SIGTERM and aborts what is in flight), the fastest
  vLLM stops by itself.

busy: BUSY_REQUESTS chats (max_tokens 48) are in flight when the stop
begins; each peer's line says how many of them finished with 200 (drain
mode lets them finish; abort mode does not). Prints each time and the ratios
ours / bare and ours / bare-abort.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_load import chat_body  # noqa: E402

from qwen3_vl_service.machine.processes import server_port  # noqa: E402


def _wait_health(base: str, alive, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise SystemExit("the server exited before it was healthy")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not become healthy in time")


def _busy(base: str, media: str, n: int) -> tuple[list[threading.Thread], list[int]]:
    """N chats in flight: returns the threads and the list their status codes go into."""
    codes: list[int] = []

    def one(i: int) -> None:
        try:
            r = requests.post(f"{base}/v1/chat/completions", json=chat_body(media, i, 48), timeout=120)
            codes.append(r.status_code)
        except requests.RequestException:
            codes.append(0)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # all of them reached the engine
    return threads, codes


def _finish(threads, codes, n: int) -> str:
    for t in threads:
        t.join(130)
    return f", in flight: {sum(c == 200 for c in codes)}/{n} finished with 200" if n else ""


class Setup:
    def __init__(self, root: Path) -> None:
        from devtools import sample_media, tiny_model
        from qwen3_vl_service.settings import config

        self.root = root
        tiny_model.generate(root / "model")
        (root / "media").mkdir()
        sample_media.write_samples(root / "media")
        self.env = {
            **os.environ,
            "MODEL_PATH": str(root / "model"),
            "MEDIA_ROOT": str(root / "media"),
            "RUN_DIR": str(root / "run"),
            "LOG_DIR": str(root / "logs"),
            "PORT": str(server_port()),
            "MEDIA_PORT": str(server_port()),
        }
        self.cfg = config.load(REPO / "config.demo.env", environ=self.env)
        self.base = f"http://127.0.0.1:{self.cfg.port}"
        self.media = f"http://127.0.0.1:{self.cfg.media_port}"

    def tool(self, name: str, *extra: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, str(REPO / name), "--config", str(REPO / "config.demo.env"), *extra]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=1500)


def ours(s: Setup, busy: int) -> float:
    started = s.tool("start_service.py", "--detach", "--quiet")
    if started.returncode != 0:
        raise SystemExit(f"start_service.py failed:\n{started.stdout[-2000:]}{started.stderr[-2000:]}")
    threads, codes = _busy(s.base, s.media, busy) if busy else ([], [])
    t0 = time.monotonic()
    stopped = s.tool("stop_service.py")
    took = time.monotonic() - t0
    if stopped.returncode != 0:
        raise SystemExit(f"stop_service.py failed:\n{stopped.stdout}{stopped.stderr}")
    print(f"  ours (stop_service.py)          {took:6.2f} s{_finish(threads, codes, busy)}", flush=True)
    return took


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie: no title to read
        return ""


def bare(s: Setup, busy: int, *, abort: bool) -> float:
    from qwen3_vl_service.lifecycle import runstate
    from qwen3_vl_service.planning import vllm_args

    cmd = vllm_args.build(s.cfg, expert_parallel=False)
    argv = list(cmd.argv)
    if abort:
        i = argv.index("--shutdown-timeout")
        del argv[i : i + 2]
    # vLLM's temp files (IPC sockets, gloo's vllm_dist_*) in a folder of this run, as the service's.
    ipc = s.root / f"ipc-{'abort' if abort else 'drain'}"
    ipc.mkdir(exist_ok=True)
    tmp_env = runstate.temp_env(str(ipc), os.environ)
    env = vllm_args.with_inherited({**cmd.env, **tmp_env}, os.environ)
    log = open(s.root / f"bare-{'abort' if abort else 'drain'}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_health(s.base, lambda: proc.poll() is None)
        threads, codes = _busy(s.base, s.media, busy) if busy else ([], [])
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        # Timed: the API server, the EngineCore and the workers; a helper that outlives them
        # (multiprocessing's resource tracker) is named after 5 s, not waited for. Their titles
        # are read before the signal: afterwards they may already be zombies.
        core = [p for p in tree[1:] if _title(p).startswith("VLLM::")]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)  # reap the API server: a zombie holds nothing
        _, alive = psutil.wait_procs(core, timeout=max(0.0, 120 - (time.monotonic() - t0)))
        took = time.monotonic() - t0
        _, alive = psutil.wait_procs([p for p in tree[1:] if p not in core], timeout=5)
        left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        note = f", left running after {took:.0f} s: {[p.pid for p in left]}" if left else ""
        name = "bare-abort (no --shutdown-timeout)" if abort else "bare (same argv, SIGTERM)"
        print(f"  {name:<32}{took:6.2f} s{_finish(threads, codes, busy)}{note}", flush=True)
        return took
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: what the tree left behind too
        proc.wait()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="idle,busy")
    ap.add_argument("--busy-requests", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stop-") as tmp:
        s = Setup(Path(tmp))
        s.tool("start_service.py", "--dry-run")  # warm the page cache of the launcher
        try:
            for mode in args.modes.split(","):
                n = args.busy_requests if mode == "busy" else 0
                print(f"{mode}: {n} request(s) in flight when the stop begins", flush=True)
                b = bare(s, n, abort=False)
                a = bare(s, n, abort=True)
                o = ours(s, n)
                print(f"  ratio ours / bare {o / b:.2f}, ours / bare-abort {o / a:.2f}", end="")
                print(f" (ours - bare-abort: {o - a:+.2f} s)", flush=True)
        finally:
            s.tool("stop_service.py", "--all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
