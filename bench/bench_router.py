"""Requests/s through vllm-router with 2 replicas against 1 replica asked directly, same load.

    .venv/bin/python bench/bench_router.py [--requests 48] [--concurrency 8] [--max-tokens 16]

Both setups serve the tiny Qwen3-VL-MoE (generated here) on vLLM's CPU build
with the demo settings (config.demo.env), started by the project's own
commands: `start_service.py --detach` with REPLICAS=1 (peer: clients talk to
the one replica's port) and with REPLICAS=2 (ours: clients talk to the
router's port, round_robin over the two replicas). The same load runs
against each: REQUESTS chat requests (text, and an image from the media
server in every fourth), CONCURRENCY at a time, after a warm-up of one
request per replica. Each setup is stopped with `stop_service.py --all`
before the next. Prints requests/s of each, the ratio, the machine's core
count and the cores each engine computed on (from its log): one replica
binds its OpenMP threads to one core and keeps the other for its scheduler;
two replicas get a core each (VLLM_CPU_OMP_THREADS_BIND) and share both
for their schedulers. On a 2-core machine the ratio is expected near 1; on a
GPU node each replica has its own GPUs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen3_vl_service.machine.processes import port_free, server_port  # noqa: E402

MODEL = "qwen3-vl-fp8"


def free_pair() -> int:
    """PORT with PORT and PORT+1 free (two replicas), outside the ephemeral range (processes.server_port)."""
    for _ in range(200):
        port = server_port()
        if port_free("127.0.0.1", port + 1):
            return port
    raise SystemExit("no two consecutive free ports")


def run(root: Path, env: dict, script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), "--config", str(REPO / "config.demo.env"), *args],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cores(log_dir: Path) -> list[str]:
    """Each replica: the cores vLLM bound its OpenMP threads to, as its engine logged them
    (vllm/utils/ompmultiprocessing.py: "core ids=[...]", "reserved_cpus=[...]")."""
    out = []
    for log in sorted(log_dir.glob("**/service.log")):
        text = log.read_text(errors="replace")
        bound = re.findall(r"local_rank=\d+, core ids=(\[[^\]]*\])", text)
        reserved = re.findall(r"reserved_cpus=(\[[^\]]*\])", text)
        name = log.parent.name if log.parent != log_dir else "service"
        out.append(
            f"{name}: OpenMP threads on cores {bound[-1] if bound else '?'}, "
            f"reserved for its scheduler {reserved[-1] if reserved else '?'}"
        )
    return out


def load(url: str, media: str, n: int, concurrency: int, max_tokens: int) -> tuple[float, int]:
    def one(i: int) -> int:
        content: object = f"Request {i}: say something."
        if i % 4 == 0:
            content = [
                {"type": "image_url", "image_url": {"url": f"{media}/sample.jpg"}},
                {"type": "text", "text": f"Request {i}: what is this?"},
            ]
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "ignore_eos": True,  # every request generates the same number of tokens
        }
        return requests.post(f"{url}/v1/chat/completions", json=body, timeout=600).status_code

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        codes = list(pool.map(one, range(n)))
    return time.monotonic() - t0, sum(1 for c in codes if c != 200)


def measure(root: Path, replicas: int, args) -> tuple[float, int, list[str]]:
    port, router_port, media_port = free_pair(), free_pair(), free_pair()
    env = {
        **os.environ,
        "REPLICAS": str(replicas),
        "ROUTER_POLICY": "round_robin",
        "PORT": str(port),
        "ROUTER_PORT": str(router_port),
        "MEDIA_PORT": str(media_port),
        "MODEL_PATH": str(root / "model"),
        "MEDIA_ROOT": str(root / "media"),
        "RUN_DIR": str(root / f"run{replicas}"),
        "LOG_DIR": str(root / f"logs{replicas}"),
    }
    started = run(root, env, "start_service.py", "--detach", "--quiet")
    if started.returncode != 0:
        run(root, env, "stop_service.py", "--all")
        raise SystemExit(
            f"start with REPLICAS={replicas} failed:\n{started.stdout[-2000:]}{started.stderr[-2000:]}"
        )
    try:
        url = f"http://127.0.0.1:{router_port if replicas > 1 else port}"
        media = f"http://127.0.0.1:{media_port}"
        load(url, media, replicas, replicas, args.max_tokens)  # warm-up: one request per replica
        seconds, errors = load(url, media, args.requests, args.concurrency, args.max_tokens)
        return seconds, errors, cores(root / f"logs{replicas}")
    finally:
        stopped = run(root, env, "stop_service.py", "--all")
        if stopped.returncode != 0:
            print(stopped.stdout, stopped.stderr, file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    from devtools import sample_media, tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        root = Path(tmp)
        tiny_model.generate(root / "model")
        (root / "media").mkdir()
        sample_media.write_samples(root / "media")
        print(
            f"machine: {os.cpu_count()} CPU cores; load: {args.requests} chat requests, "
            f"{args.concurrency} at a time, {args.max_tokens} tokens each (1 in 4 with an image)"
        )
        one_s, one_err, one_cores = measure(root, 1, args)
        print(
            f"1 replica, direct:         {args.requests / one_s:6.2f} req/s ({one_s:.1f} s, {one_err} errors)"
        )
        for line in one_cores:
            print(f"    {line}")
        two_s, two_err, two_cores = measure(root, 2, args)
        print(
            f"2 replicas, vllm-router:   {args.requests / two_s:6.2f} req/s ({two_s:.1f} s, {two_err} errors)"
        )
        for line in two_cores:
            print(f"    {line}")
        print(f"ratio (2 via router / 1 direct): {one_s / two_s:.2f}")
    return 0 if one_err == two_err == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
