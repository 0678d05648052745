"""Load through the whole stack: concurrent image chats whose images vLLM fetches from the media server.

    .venv/bin/python bench/bench_load.py [--seconds 300] [--clients 16]

Starts the service on the CPU demo (a tiny Qwen3-VL-MoE generated here,
config.demo.env, free ports, private folders) with `start_service.py
--detach`, then runs CLIENTS threads that each send chat requests, one
after the other, for SECONDS: every request names an image by its URL on
the media server (http://127.0.0.1:MEDIA_PORT/sample.jpg or .png), so each
one goes client -> vLLM -> media server -> vision encoder -> tokens. Prints
the requests, the errors (expected: 0) and the p50/p99 latency, then stops
everything with `stop_service.py --all`. Exit 1 when a request failed.

``run_load`` is also what tests/test_faults.py runs (30 s in CI).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "qwen3-vl-fp8"
IMAGES = ("sample.jpg", "sample.png")


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic()
    ended: float
    status: int | None  # HTTP status, None when no answer came
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, o: Outcome) -> None:
        with self.lock:
            self.outcomes.append(o)

    def summary(self) -> str:
        done = list(self.outcomes)
        lat = sorted(o.latency for o in done if o.ok)
        errors = [o for o in done if not o.ok]
        p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
        span = (max(o.ended for o in done) - min(o.started for o in done)) if done else 0.0
        rate = len(lat) / span if span else 0.0
        text = (
            f"requests {len(done)}, errors {len(errors)}, p50 {p(0.50):.2f} s, p99 {p(0.99):.2f} s, "
            f"mean {statistics.fmean(lat) if lat else float('nan'):.2f} s, {rate:.2f} ok req/s"
        )
        if errors:
            kinds = sorted({o.error or f"HTTP {o.status}" for o in errors})
            text += f"; errors: {', '.join(kinds)[:300]}"
        return text


def chat_body(media: str, i: int, max_tokens: int) -> dict:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"{media}/{IMAGES[i % len(IMAGES)]}"}},
                    {"type": "text", "text": f"What is in this picture? ({i})"},
                ],
            }
        ],
    }


def run_load(
    base: str,
    media: str,
    *,
    clients: int = 16,
    seconds: float = 30.0,
    max_tokens: int = 8,
    timeout: float = 300.0,
    stop: threading.Event | None = None,
    pause_after_error: float = 0.5,
    load: Load | None = None,
) -> Load:
    """CLIENTS threads, each sending image chats back to back for SECONDS (or until STOP is set);
    their outcomes go into LOAD if given (a caller may watch it while they run)."""
    import requests

    load = load if load is not None else Load()
    stop = stop or threading.Event()
    end = time.monotonic() + seconds

    def client(n: int) -> None:
        with requests.Session() as session:
            session.trust_env = False
            i = n
            while time.monotonic() < end and not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = session.post(
                        f"{base}/v1/chat/completions", json=chat_body(media, i, max_tokens), timeout=timeout
                    )
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
                    load.add(Outcome(t0, time.monotonic(), r.status_code, "" if ok else r.text[:120]))
                except (requests.RequestException, ValueError, KeyError) as exc:
                    load.add(Outcome(t0, time.monotonic(), None, type(exc).__name__))
                    stop.wait(pause_after_error)  # a server that is down refuses at once: do not spin
                i += clients

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return load


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from devtools import sample_media, tiny_model
    from qwen3_vl_service.machine.processes import server_port

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        root = Path(tmp)
        tiny_model.generate(root / "model")
        (root / "media").mkdir()
        sample_media.write_samples(root / "media")
        port, media_port = server_port(), server_port()
        env = {
            **os.environ,
            "PORT": str(port),
            "MEDIA_PORT": str(media_port),
            "MODEL_PATH": str(root / "model"),
            "MEDIA_ROOT": str(root / "media"),
            "RUN_DIR": str(root / "run"),
            "LOG_DIR": str(root / "logs"),
        }

        def tool(name: str, *extra: str) -> subprocess.CompletedProcess:
            argv = [sys.executable, str(REPO / name), "--config", str(REPO / "config.demo.env"), *extra]
            return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)

        started = tool("start_service.py", "--detach", "--quiet")
        if started.returncode != 0:
            print(started.stdout[-2000:], started.stderr[-2000:], file=sys.stderr)
            tool("stop_service.py", "--all")
            return 1
        try:
            print(f"load: {args.clients} clients, {args.seconds:g} s, image chats through the media server")
            load = run_load(
                f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{media_port}",
                clients=args.clients,
                seconds=args.seconds,
                max_tokens=args.max_tokens,
            )
            print(load.summary())
        finally:
            tool("stop_service.py", "--all")
        return 0 if all(o.ok for o in load.outcomes) and load.outcomes else 1


if __name__ == "__main__":
    raise SystemExit(main())
