"""The service against bare vLLM, side by side on the same checkpoint and GPU: output tok/s, TPOT, TTFT.

    python bench/bench_side_by_side.py --model DIR [--profiles balanced,throughput,low-latency]
        [--concurrency 1,8,32,64,128,256] [--kinds text,image] [--rounds 2] [--device gpu|cpu]
    python bench/bench_side_by_side.py --model DIR --service http://127.0.0.1:8010 [...]

The peer is bare ``python -m vllm.entrypoints.openai.api_server`` with the flags of
vLLM's Qwen3-VL recipe (``--mm-encoder-tp-mode data --enable-expert-parallel
--async-scheduling``) and the same --max-model-len. Each service is this
project's ``start_service.py --detach`` with ``PROFILE=<name>`` (or a --variant's
settings), so it runs exactly what a user's start runs: the plan, the launcher's
flags, the supervisor. ``--service URL`` measures a service that is already
running instead (as it runs: its settings, its KV cache; it must serve --model,
and bare vLLM takes its max_model_len); no profile is started then unless
--profiles names some.

All of them are up at once, each on its own port, and the measurements alternate
between them (bare, service 1, service 2, ..., then the same again: A B A B), so
drift of the machine shows as a difference between rounds instead of as a
difference between servers. Sharing one GPU, every server gets the same
``--gpu-memory-utilization`` and the same ``--kv-cache-memory-bytes`` (sized for
the largest concurrency's requests, so no run is cut by preemption): KV sizing
by profiling would depend on the start order. A benchmark that is not running
leaves the other servers idle.

Each measurement is vLLM's own ``vllm bench serve`` (vllm.benchmarks.serve, run
in-process by one helper in VLLM_PYTHON so that vLLM is imported once): the
openai-chat backend on /v1/chat/completions, streaming, --ignore-eos; ``text`` is
the random dataset (--input-len / --output-len tokens), ``image`` is random-mm
with one --image-size image per request. Sampling is left to the servers
(vLLM's bench sends none): bare vLLM takes the checkpoint's generation_config,
the service its profile's TEMPERATURE/TOP_P/TOP_K: top-k/top-p on both sides.
One unmeasured wave per server and kind comes first on a GPU (Triton compiles
kernels the first time a batch shape appears).

The table gives, per kind and concurrency, each server's output tok/s of every
round, mean TPOT and TTFT, and the ratio service / bare: the mean of the
per-round ratios (each service run beside the bare run of its round).
--json writes every number. Works on the CPU build too (--device cpu: the tiny
bfloat16 model, small numbers; CI runs it as a smoke test, bare vLLM beside the
suite's running demo service through --service, no timed assertion).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_gpu import concurrency_levels  # noqa: E402 - the path above makes it importable
from vllm_bench import VllmBench  # noqa: E402

from qwen3_vl_service.core import cli  # noqa: E402
from qwen3_vl_service.core.errors import CheckFailed, UsageError  # noqa: E402

SERVED = "qwen3-vl-fp8"
RECIPE_FLAGS = ("--mm-encoder-tp-mode", "data", "--enable-expert-parallel", "--async-scheduling")
KINDS = ("text", "image")


@dataclass
class Server:
    """One server under test: bare vLLM (settings empty) or the service with these settings."""

    name: str
    settings: dict[str, str]
    port: int = 0
    config: Path | None = None
    proc: subprocess.Popen | None = None  # bare vLLM: its process (its own session)
    url: str = ""  # a running service (--service): measured as it is, never started or stopped
    ipc_dir: str = ""  # bare vLLM: its private folder for vLLM's IPC sockets, removed at its stop
    served: str = SERVED  # the model name its API serves
    log: Path | None = None
    started_s: float = 0.0
    argv: list[str] = field(default_factory=list)

    @property
    def bare(self) -> bool:
        return not self.settings and not self.url

    @property
    def base(self) -> str:
        return self.url or f"http://127.0.0.1:{self.port}"


def parse_args(argv: list[str] | None):
    p = cli.ArgumentParser(prog="bench_side_by_side.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="the checkpoint both sides serve")
    p.add_argument(
        "--profiles",
        default=None,
        help="services started, by profile (default: balanced,throughput,low-latency; none with --service)",
    )
    p.add_argument(
        "--service",
        default="",
        metavar="URL",
        help="a running service to measure as it is (e.g. http://127.0.0.1:8010), beside bare vLLM",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="one more service with these settings (e.g. 'bt16k:MAX_NUM_BATCHED_TOKENS=16384')",
    )
    p.add_argument("--concurrency", default="1,8,32,64,128,256")
    p.add_argument("--kinds", default="text,image", help="text, image (one image per request), or both")
    p.add_argument("--rounds", type=int, default=2, help="measurements per server and level (A B A B)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--image-size", type=int, default=512, help="side of the random image, pixels")
    p.add_argument("--prompts-per-slot", type=int, default=2, help="requests per run = concurrency x this")
    p.add_argument("--min-prompts", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=32768, help="the same for every server")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of every server")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--gpu-memory-util", type=float, default=0.2, help="every server's (GPU)")
    p.add_argument(
        "--kv-cache-gib", type=float, default=None, help="every server's KV cache (GPU; default: sized)"
    )
    p.add_argument("--port", type=int, default=8100, help="first port; the servers take the next ones")
    p.add_argument("--python", default=sys.executable, help="the Python with vLLM (VLLM_PYTHON)")
    p.add_argument(
        "--work", type=Path, default=None, help="folder for configs and logs (default: a temp one)"
    )
    p.add_argument("--startup-timeout", type=int, default=1500)
    p.add_argument("--json", type=Path, default=None, help="write every result here")
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds: then stop measuring and show what was measured",
    )
    return p.parse_args(argv)


def servers_from(args) -> list[Server]:
    """Bare vLLM first, then a service per profile and per --variant."""
    from qwen3_vl_service.settings import profiles

    if args.profiles is None:
        args.profiles = "" if args.service else "balanced,throughput,low-latency"
    names = [p.strip() for p in args.profiles.split(",") if p.strip()]
    unknown = [n for n in names if n not in profiles.PROFILES]
    if unknown:
        raise UsageError(
            f"--profiles {args.profiles!r}: unknown {', '.join(unknown)}",
            fix=f"allowed: {', '.join(profiles.PROFILES)}",
        )
    out = [Server("bare vLLM", {})] + [Server(n, {"PROFILE": n}) for n in names]
    if args.service:
        if not args.service.startswith(("http://", "https://")):
            raise UsageError(
                f"--service {args.service!r}: give its URL", fix="e.g. --service http://127.0.0.1:8010"
            )
        out.append(Server("service", {}, url=args.service.rstrip("/")))
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        pairs = [kv.partition("=") for kv in rest.split(",") if kv.strip()]
        if not name.strip() or not pairs or any(not k.strip() or not sep for k, sep, _ in pairs):
            raise UsageError(
                f"--variant {spec!r}: give NAME:KEY=VALUE[,KEY=VALUE...]",
                fix="e.g. --variant bt16k:MAX_NUM_BATCHED_TOKENS=16384",
            )
        out.append(Server(name.strip(), {k.strip(): v.strip() for k, _, v in pairs}))
    for i, s in enumerate(out):
        s.port = 0 if s.url else args.port + i
    return out


def running_service(args, s: Server) -> None:
    """Check that the running service S answers and serves --model; take its name and max_model_len."""
    import requests

    try:
        with requests.Session() as session:
            session.trust_env = False
            models = session.get(f"{s.base}/v1/models", timeout=30).json()["data"]
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        raise CheckFailed(
            f"--service {s.base}: no answer from /v1/models ({type(exc).__name__})",
            fix="start it first (start_service.py --detach), or give its URL",
        ) from None
    served = next((m for m in models if Path(str(m.get("root", ""))).resolve() == args.model), None)
    if served is None:
        roots = ", ".join(str(m.get("root")) for m in models) or "nothing"
        raise CheckFailed(
            f"--service {s.base} serves {roots}, not --model {args.model}",
            fix="give --model the checkpoint that service serves",
        )
    s.served = str(served["id"])
    if served.get("max_model_len"):
        args.max_model_len = int(served["max_model_len"])  # bare vLLM gets the same


def kv_cache_bytes(args, model_cfg: dict, levels: list[int]) -> int:
    """KV cache for every request of the largest level at once (prompt, image, answer), with a margin."""
    if args.kv_cache_gib:
        return int(args.kv_cache_gib * 1024**3)
    t = model_cfg.get("text_config", model_cfg)
    kv_heads = max(1, t["num_key_value_heads"] // args.tp)
    per_token = t["num_hidden_layers"] * kv_heads * t["head_dim"] * 2 * 2  # K and V, bfloat16
    image_tokens = (args.image_size // 32) ** 2  # 16-pixel patches merged 2 x 2
    tokens = max(levels) * (args.input_len + args.output_len + image_tokens + 64)
    return int(tokens * per_token * 1.5) + 256 * 1024**2


# -- starting and stopping ----------------------------------------------------------


def service_config(args, s: Server, work: Path, kv_bytes: int) -> Path:
    """The service's settings file: the profile decides everything these lines leave open."""
    lines = [
        f"MODEL_PATH={args.model}",
        f"SERVED_MODEL_NAME={SERVED}",
        f"DEVICE={args.device}",
        "HOST=127.0.0.1",
        f"PORT={s.port}",
        f"SERVICE_NAME=bench-{s.port}",
        f"TENSOR_PARALLEL_SIZE={args.tp}",
        f"MAX_MODEL_LEN={args.max_model_len}",  # the same as bare vLLM's
        "MEDIA_SERVER=false",
        # vLLM 0.26 refuses every chat request (400) when --allowed-local-media-path does not exist.
        f"MEDIA_ROOT={work / 'media'}",
        f"LOG_DIR={work / 'logs'}",
        f"RUN_DIR={work / 'run'}",
        f"VLLM_PYTHON={args.python}",
        f"STARTUP_TIMEOUT={args.startup_timeout}",
        "SHUTDOWN_TIMEOUT=5",
    ]
    if args.device == "gpu":
        lines += [
            f"GPU_MEMORY_UTIL={args.gpu_memory_util}",
            f"EXTRA_VLLM_ARGS=--kv-cache-memory-bytes {kv_bytes}",
        ]
    else:
        lines += [
            "EXPERT_PARALLEL=off",
            "DTYPE=bfloat16",
            "EXTRA_VLLM_ARGS=--skip-mm-profiling",
            "VLLM_CPU_KVCACHE_SPACE=1",
        ]
    lines += [f"{k}={v}" for k, v in s.settings.items()]
    (work / "media").mkdir(exist_ok=True)
    path = work / f"service-{s.port}.env"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bare_command(args, s: Server, kv_bytes: int) -> tuple[list[str], dict[str, str]]:
    """Bare vLLM with the recipe's flags; the environment the installed vLLM needs, as the service's."""
    from qwen3_vl_service.lifecycle import runstate
    from qwen3_vl_service.planning import vllm_versions

    argv = [
        args.python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(args.model), "--served-model-name", SERVED,
        "--host", "127.0.0.1", "--port", str(s.port),
        "--max-model-len", str(args.max_model_len), "--tensor-parallel-size", str(args.tp),
    ]  # fmt: skip
    if args.device == "gpu":
        argv += [*RECIPE_FLAGS, "--gpu-memory-utilization", str(args.gpu_memory_util)]
        argv += ["--kv-cache-memory-bytes", str(kv_bytes)]
    else:
        # The CPU build: no expert parallelism on one CPU rank; the demo's dtype and profiling skip.
        argv += [
            "--mm-encoder-tp-mode",
            "data",
            "--async-scheduling",
            "--dtype",
            "bfloat16",
            "--skip-mm-profiling",
        ]
    # What vLLM leaves in the temp folder (IPC sockets, gloo's file store) goes to a private folder
    # that the stop removes, as the service's launcher does (runstate.temp_env).
    s.ipc_dir = tempfile.mkdtemp(prefix="sbs-ipc-")
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    env.update(runstate.temp_env(s.ipc_dir, os.environ))
    if args.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    # What the launcher's probe sets for the same vLLM (VLLM_USE_FLASHINFER_SAMPLER=0 without flashinfer).
    found = vllm_versions.probe(args.python)
    env.update(vllm_versions.assess(found, device=args.device, user_env=os.environ).env)
    return argv, env


def healthy(where: int | str) -> bool:
    """Whether the server on this port of 127.0.0.1 (or at this base URL) answers /health with 200."""
    import requests

    base = where if isinstance(where, str) else f"http://127.0.0.1:{where}"
    try:
        with requests.Session() as session:
            session.trust_env = False
            return session.get(f"{base}/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def start(args, s: Server, work: Path, kv_bytes: int) -> str:
    """Start S; '' once it answers /health, else what went wrong."""
    t0 = time.monotonic()
    if s.url:
        return "" if healthy(s.base) else f"the running service {s.base} does not answer /health"
    if s.bare:
        s.argv, env = bare_command(args, s, kv_bytes)
        s.log = work / f"bare-{s.port}.log"
        with s.log.open("w") as log:
            # Its own session: the stop ends exactly this process group, by its id.
            s.proc = subprocess.Popen(
                s.argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = t0 + args.startup_timeout
        while time.monotonic() < deadline:
            if s.proc.poll() is not None:
                return f"bare vLLM exited {s.proc.returncode}: " + " | ".join(
                    s.log.read_text(errors="replace").strip().splitlines()[-5:]
                )
            if healthy(s.port):
                s.started_s = time.monotonic() - t0
                return ""
            time.sleep(2)
        return f"bare vLLM not healthy after {args.startup_timeout} s (log: {s.log})"
    s.config = service_config(args, s, work, kv_bytes)
    cmd = [sys.executable, str(REPO / "start_service.py"), "--config", str(s.config), "--detach", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.startup_timeout + 120, check=False)
    s.started_s = time.monotonic() - t0
    if r.returncode != 0:
        return f"start of {s.name} failed (exit {r.returncode}): " + (r.stdout + r.stderr).strip()[-1500:]
    return ""


def stop(s: Server) -> None:
    """Stop S: the service through stop_service.py, bare vLLM by its process group (we started it);
    a running service (--service) stays as it was."""
    if s.url:
        return
    if s.bare:
        if s.proc is not None and s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGTERM)
            try:
                s.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait(timeout=30)
        if s.ipc_dir:
            shutil.rmtree(s.ipc_dir, ignore_errors=True)
        return
    if s.config is not None:
        subprocess.run(
            [sys.executable, str(REPO / "stop_service.py"), "--config", str(s.config)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip


def command_of(s: Server) -> str:
    """The vLLM command the server runs (the service's from its dry run), for the report."""
    if s.url:
        return f"(running at {s.base}: its own settings)"
    if s.bare:
        return " ".join(s.argv[1:])
    r = subprocess.run(
        [sys.executable, str(REPO / "start_service.py"), "--config", str(s.config), "--dry-run"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    text = r.stdout.split("vLLM command", 1)[-1]
    flags = [ln.strip().rstrip("\\").strip() for ln in text.splitlines() if ln.strip().startswith("--")]
    return " ".join(flags)


# -- measuring ------------------------------------------------------------------------


def bench_argv(args, s: Server, kind: str, c: int, prompts: int) -> list[str]:
    argv = [
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", s.base, "--model", s.served, "--tokenizer", str(args.model),
        "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot", "--disable-tqdm",
        "--ready-check-timeout-sec", "30", "--num-prompts", str(prompts), "--max-concurrency", str(c),
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
    ]  # fmt: skip
    if kind == "text":
        return [*argv, "--dataset-name", "random"]
    size = args.image_size
    return [
        *argv, "--dataset-name", "random-mm",
        "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--random-mm-bucket-config", f"{{({size}, {size}, 1): 1.0}}",
    ]  # fmt: skip


def plan_jobs(args, servers: list[Server], kinds: list[str], levels: list[int]) -> list[dict]:
    """Every run in order: per kind, a warm-up wave per server (on a GPU: Triton compiles kernels the
    first time a batch shape appears; the CPU build compiles at its start, if at all), then per level
    the rounds of bare, service, service, ... (A B A B)."""
    jobs = []
    for kind in kinds:
        for s in servers if args.device == "gpu" else []:
            top = max(levels)
            jobs.append({"id": ["warm", kind, s.name, top, 0], "argv": bench_argv(args, s, kind, top, top)})
        for c in levels:
            prompts = max(args.min_prompts, c * args.prompts_per_slot)
            for r in range(args.rounds):
                for s in servers:
                    jobs.append(
                        {"id": ["run", kind, s.name, c, r], "argv": bench_argv(args, s, kind, c, prompts)}
                    )
    return jobs


def run_jobs(args, jobs: list[dict], on_result, deadline: float | None) -> bool:
    """Run JOBS in order in one benchmark child; False when DEADLINE (monotonic) ended it early."""
    with VllmBench(args.python, deadline=deadline) as bench:
        for job in jobs:
            result = bench.run(job["argv"])
            if result is None:
                return False
            on_result({"id": job["id"], **result})
    return True


# -- the table ------------------------------------------------------------------------


def table(results: list[dict], servers: list[Server], kinds: list[str], levels: list[int]) -> list[str]:
    by = {(r["kind"], r["server"], r["concurrency"], r["round"]): r for r in results}
    bare = servers[0].name
    lines = []
    head = (
        f"{'kind':<5} {'conc':>4} | {'server':<14} | {'out tok/s per round':>24} | {'TPOT ms':>7} "
        f"{'TTFT ms':>8} | {'ratio tok/s':>11} {'TPOT':>5} {'TTFT':>5}"
    )
    lines += [head, "-" * len(head)]
    for kind in kinds:
        for c in levels:
            for s in servers:
                runs = [by[k] for k in sorted(by) if k[:3] == (kind, s.name, c)]
                peers = [by.get((kind, bare, c, r["round"])) for r in runs]
                if not runs:
                    continue
                tps = " / ".join(f"{r['output_throughput']:,.0f}" for r in runs)
                tpot = sum(r["mean_tpot_ms"] for r in runs) / len(runs)
                ttft = sum(r["mean_ttft_ms"] for r in runs) / len(runs)
                ratio = ""
                if s.name != bare and all(peers):
                    rt = _mean(
                        [
                            r["output_throughput"] / p["output_throughput"]
                            for r, p in zip(runs, peers, strict=True)
                        ]
                    )
                    rp = _mean(
                        [r["mean_tpot_ms"] / p["mean_tpot_ms"] for r, p in zip(runs, peers, strict=True)]
                    )
                    rf = _mean(
                        [r["mean_ttft_ms"] / p["mean_ttft_ms"] for r, p in zip(runs, peers, strict=True)]
                    )
                    ratio = f"{rt:>11.3f} {rp:>5.2f} {rf:>5.2f}"
                lines.append(
                    f"{kind:<5} {c:>4} | {s.name[:14]:<14} | {tps:>24} | {tpot:>7.2f} {ttft:>8.1f} | {ratio}"
                )
    return lines


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    # A TERM (a timeout around the run) unwinds through the finally below: every server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    levels = concurrency_levels(args.concurrency)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        raise UsageError(f"--kinds {args.kinds!r}: allowed text, image", fix="e.g. --kinds text,image")
    if args.rounds < 1:
        raise UsageError(f"--rounds {args.rounds}: at least 1", fix="e.g. --rounds 2")
    args.model = args.model.resolve()
    try:
        model_cfg = json.loads((args.model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckFailed(
            f"--model {args.model}: cannot read config.json ({exc})", fix="give a model folder"
        ) from None
    servers = servers_from(args)
    for s in servers:
        if s.url:
            running_service(args, s)
    busy = [s for s in servers if not s.url and healthy(s.port)]
    if busy:
        raise CheckFailed(
            f"port {busy[0].port} already answers /health: the benchmark starts its own servers there",
            fix="stop it, or choose other ports with --port",
        )
    work = (args.work or Path(tempfile.mkdtemp(prefix="side-by-side-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    kv_bytes = kv_cache_bytes(args, model_cfg, levels)
    t = model_cfg.get("text_config", model_cfg)
    print(
        f"# side by side: {args.model.name} ({t['num_hidden_layers']} layers), TP {args.tp}, {args.device}; "
        f"MAX_MODEL_LEN {args.max_model_len}"
        + (
            f"; each server: GPU_MEMORY_UTIL {args.gpu_memory_util}, KV cache {kv_bytes / 1024**3:.2f} GiB"
            if args.device == "gpu"
            else ""
        ),
        flush=True,
    )
    results: list[dict] = []
    try:
        # All at once: with --kv-cache-memory-bytes vLLM sizes nothing by profiling, and its one
        # check at start (free memory >= GPU_MEMORY_UTIL x total) holds while the others load.
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            problems = list(pool.map(lambda s: start(args, s, work, kv_bytes), servers))
        for s in servers:
            print(
                f"# {s.name:<14} {s.base}, healthy after {s.started_s:.0f} s: {command_of(s)}",
                flush=True,
            )
        failed = [p for p in problems if p]
        if failed:
            raise CheckFailed(failed[0], fix=f"see the logs under {work}")
        jobs = plan_jobs(args, servers, kinds, levels)

        def on_result(r: dict) -> None:
            phase, kind, name, c, rnd = r["id"]
            if r.get("failed"):
                raise CheckFailed(f"{r['failed']} requests failed on {name} ({kind}, concurrency {c})")
            if phase == "run":
                results.append({"kind": kind, "server": name, "concurrency": c, "round": rnd, **r})
                print(
                    f"  {kind:<5} c={c:<4} {name:<14} round {rnd + 1}: {r['output_throughput']:,.1f} tok/s, "
                    f"TPOT {r['mean_tpot_ms']:.2f} ms, TTFT {r['mean_ttft_ms']:.1f} ms",
                    flush=True,
                )

        deadline = t0 + args.time_limit if args.time_limit else None
        if not run_jobs(args, jobs, on_result, deadline):
            print(
                f"# stopped at --time-limit {args.time_limit:g} s: {len(results)} of {len(jobs)} runs",
                flush=True,
            )
    finally:
        for s in servers:
            stop(s)
    print(
        f"\n# input {args.input_len} / output {args.output_len} tokens, "
        f"image {args.image_size}x{args.image_size}; "
        f"{args.rounds} round(s) A B A B; ratio = service / bare vLLM (mean of the per-round ratios)"
    )
    print("\n".join(table(results, servers, kinds, levels)))
    if args.json:
        args.json.write_text(json.dumps({"servers": [s.name for s in servers], "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
