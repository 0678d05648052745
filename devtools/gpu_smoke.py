"""The smoke test a user runs on a new node before downloading 236 GB (scripts/gpu_smoke.sh).

    python -m devtools.gpu_smoke --out DIR [--layers 4] [--tp N] [--device gpu|cpu] [--bench]

On a GPU node (DEVICE=gpu, the CUDA build of vLLM): generates a checkpoint with
the published block-FP8 layout at the real widths, cut to --layers text
layers (tiny_model --fp8 --real-shapes); writes DIR/config.env with the
production settings (TP = the GPU count or --tp, EXPERT_PARALLEL=auto so the
plan decides, MM_ENCODER_TP_MODE=data, async scheduling, the reasoning parser,
the media server); starts the service with ``start_service.py --detach``; sends
every request kind and prints status and latency for each; prints vLLM's
block-FP8 kernel choice and its KV cache size next to the plan's prediction;
prints ``status_service.py``; stops with ``stop_service.py --all``; checks with
NVML that no process of ours holds a GPU. Exit 0 only if all of that worked.

With --crash, before the stop: ``kill -9`` of the service's VLLM::EngineCore;
the supervisor (RESTART=on-failure) must start vLLM again, the new one must
answer a text and an image request, and the status must show the restart with
the EngineCore as its cause. The processes of both runs count for the final
NVML check.

With --yarn F (2 or 3, the model card's factors) the service runs with
ROPE_SCALING=yarn, ROPE_FACTOR=F and MAX_MODEL_LEN = the model's native
positions x F, and one more request sends a prompt of token ids longer than the
native positions (--long-prompt N tokens, default native + 4,096) to
/v1/completions: it must answer 200 with N prompt tokens, and vLLM's log must
show the new max_seq_len.

With --device cpu it runs the same steps against the tiny bfloat16 model on
vLLM's CPU build (how CI tests this script).
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen3_vl_service.core import cli
from qwen3_vl_service.core.errors import CheckFailed, UsageError
from qwen3_vl_service.settings import config as service_config
from qwen3_vl_service.settings import scope

REPO = Path(__file__).resolve().parents[1]
# vLLM's log lines that show the block-FP8 path (0.26: linear kernel choice, MoE backend).
FP8_LINE = re.compile(r"Selected \w+ for \w*Fp8\w*|Fp8 MoE backend|Block FP8 kernel|BlockScaled\w*Kernel")
KV_LINE = re.compile(r"(\w+) KV cache size: ([\d,]+) tokens")
# vLLM's engine config line (config/vllm.py): the max length it serves, after any rope scaling.
MAX_SEQ_LINE = re.compile(r"Initializing a V1 LLM engine .*?max_seq_len=(\d+)")
PLAN_KV = re.compile(r"KV tokens\s.*=\s*([\d,]+)")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="gpu_smoke", description="Serve a real-shaped block-FP8 checkpoint and try every request kind."
    )
    p.add_argument("--out", type=Path, required=True, help="work folder: model, media, config, logs")
    p.add_argument(
        "--layers", type=int, default=4, help="text layers of the real-shape checkpoint (default 4)"
    )
    p.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the GPU count)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--model", type=Path, default=None, help="an existing model folder (no generation)")
    p.add_argument("--port", type=int, default=8010)
    p.add_argument("--media-port", type=int, default=8080)
    p.add_argument("--python", default=sys.executable, help="the Python with vLLM (VLLM_PYTHON)")
    p.add_argument("--bench", action="store_true", help="run bench/bench_gpu.py before stopping")
    p.add_argument("--bench-args", default="", help="extra arguments for bench_gpu.py (one string)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument(
        "--yarn",
        type=int,
        choices=(2, 3),
        default=None,
        help="serve with YaRN rope scaling of this factor and send a prompt past the native positions",
    )
    p.add_argument(
        "--long-prompt", type=int, default=None, help="tokens of that prompt (default: native + 4096)"
    )
    p.add_argument(
        "--crash",
        action="store_true",
        help="kill -9 the EngineCore before the stop; the supervisor must bring vLLM back",
    )
    return p


def _run(argv: list[str], *, timeout: float, env=None) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, text + f"\n(timed out after {timeout:.0f} s)", time.monotonic() - start
    return out.returncode, out.stdout + out.stderr, time.monotonic() - start


def gpu_count() -> int:
    from qwen3_vl_service.machine.processes import NvmlUnavailable, gpu_memory

    try:
        return len(gpu_memory())
    except NvmlUnavailable as exc:
        raise CheckFailed(
            f"no GPU visible through NVML: {exc}", fix="run on a GPU node, or --device cpu"
        ) from None


def write_config(args, model: Path, media: Path, tp: int) -> Path:
    """DIR/config.env: the production flags that apply (GPU), or the CPU demo's."""
    lines = [
        f"MODEL_PATH={model}",
        f"DEVICE={args.device}",
        "HOST=127.0.0.1",
        f"PORT={args.port}",
        f"TENSOR_PARALLEL_SIZE={tp}",
        "REASONING_PARSER=deepseek_r1",
        "MEDIA_SERVER=true",
        "MEDIA_HOST=127.0.0.1",
        f"MEDIA_PORT={args.media_port}",
        f"MEDIA_ROOT={media}",
        f"LOG_DIR={args.out / 'logs'}",
        f"RUN_DIR={args.out / 'run'}",
        f"MAX_TOKENS={max(args.max_tokens, 256)}",
        f"VLLM_PYTHON={args.python}",
        "SHUTDOWN_TIMEOUT=5",
    ]
    if args.device == "gpu":
        lines += [
            "EXPERT_PARALLEL=auto",  # the plan decides (the FP8 block rule)
            "MM_ENCODER_TP_MODE=data",  # used by vLLM when TP > 1
            "ASYNC_SCHEDULING=true",
            "MAX_MODEL_LEN=32768",  # MAX_NUM_SEQS is left at auto: vLLM's own default, as users get it
            "STARTUP_TIMEOUT=1500",
        ]
    else:
        lines += [
            "EXPERT_PARALLEL=off",
            "MAX_MODEL_LEN=4096",
            "MAX_NUM_SEQS=8",
            "DTYPE=bfloat16",
            "EXTRA_VLLM_ARGS=--skip-mm-profiling",
            "STARTUP_TIMEOUT=900",
            "VLLM_CPU_KVCACHE_SPACE=1",
            "OMP_NUM_THREADS=2",
        ]
    if getattr(args, "yarn", None):
        length = native_positions(model) * args.yarn
        lines = [ln for ln in lines if not ln.startswith("MAX_MODEL_LEN=")]
        lines += ["ROPE_SCALING=yarn", f"ROPE_FACTOR={args.yarn}", f"MAX_MODEL_LEN={length}"]
    path = args.out / "config.env"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def native_positions(model: Path) -> int:
    """The text model's max_position_embeddings from MODEL/config.json (262,144 for Qwen3-VL)."""
    import json

    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    return int(cfg.get("text_config", cfg)["max_position_embeddings"])


def ordinary_token_ids(model: Path, n: int) -> list[int]:
    """N token ids of MODEL's ordinary text: below every special id config.json names (bos, eos,
    vision start/end, image, video: one of those in a text prompt would make vLLM look for media)."""
    import json

    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    text = cfg.get("text_config", cfg)
    ids = [v for c in (cfg, text) for k, v in c.items() if k.endswith("token_id") and isinstance(v, int)]
    top = min([text["vocab_size"], *ids])
    return [10 + (i * 7919) % (top - 10) for i in range(n)]


def long_prompt_request(base: str, prompt: list[int]) -> Check:
    """/v1/completions with PROMPT (token ids): 200 with exactly that many prompt tokens."""
    import requests

    tokens = len(prompt)
    start = time.monotonic()
    try:
        with requests.Session() as s:
            s.trust_env = False
            model_name = s.get(base + "/v1/models", timeout=60).json()["data"][0]["id"]
            body = {"model": model_name, "prompt": prompt, "max_tokens": 8}
            r = s.post(base + "/v1/completions", json=body, timeout=1800)
        took = time.monotonic() - start
        got = r.json().get("usage", {}).get("prompt_tokens") if r.status_code == 200 else None
        ok = r.status_code == 200 and got == tokens
        note = f"{got:,} prompt tokens" if got is not None else r.text[:300]
        return Check(f"long prompt ({tokens:,} tokens)", ok, f"{r.status_code}  {took:8.1f} s  {note}")
    except Exception as exc:  # noqa: BLE001 - any failure of the request is its result
        took = time.monotonic() - start
        return Check(
            f"long prompt ({tokens:,} tokens)", False, f"---  {took:8.1f} s  {type(exc).__name__}: {exc}"
        )


def prepare(args) -> tuple[Path, Path]:
    """The model (generated unless given) and the sample media, under DIR."""
    media = args.out / "media"
    code, out, took = _run([args.python, "-m", "devtools.sample_media", str(media)], timeout=300)
    if code != 0:
        raise CheckFailed(f"sample media failed: {out.strip()[-300:]}")
    if args.model is not None:
        return args.model.resolve(), media
    model = args.out / "model"
    gen = [args.python, "-m", "devtools.tiny_model", str(model)]
    if args.device == "gpu":
        gen += ["--fp8", "--real-shapes", "--layers", str(args.layers)]
    code, out, took = _run(gen, timeout=3600)
    last = out.strip().splitlines()[-1:] or [""]
    print(f"checkpoint  {' '.join(shlex.quote(a) for a in gen[1:])}\n            {last[0]} ({took:.0f} s)")
    if code != 0:
        raise CheckFailed(f"generating the checkpoint failed: {out.strip()[-500:]}")
    return model, media


# -- the requests ---------------------------------------------------------------


def _chat(content, max_tokens: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


def request_kinds(
    base: str, media: str, model_name: str, image_b64: str, n: int
) -> list[tuple[str, str, dict]]:
    """(kind, path, body) of every request kind the service must answer; body {} means GET."""
    img = {"type": "image_url", "image_url": {"url": f"{media}/sample.jpg"}}
    data = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}}
    video = {"type": "video_url", "video_url": {"url": f"{media}/sample.mp4"}}
    turns = [
        {"role": "user", "content": [img, {"type": "text", "text": "What is in this picture?"}]},
        {"role": "assistant", "content": "A field with a red square and the sun."},
        {"role": "user", "content": "What colour is the square?"},
    ]
    chat = "/v1/chat/completions"
    return [
        ("health", "/health", {}),
        ("models", "/v1/models", {}),
        ("text", chat, _chat("Why is the sky blue?", n)),
        ("image (media URL)", chat, _chat([img, {"type": "text", "text": "Describe this image."}], n)),
        ("image (base64)", chat, _chat([data, {"type": "text", "text": "Describe this image."}], n)),
        ("video (media URL)", chat, _chat([video, {"type": "text", "text": "What happens?"}], n)),
        ("multi-turn", chat, {"messages": turns, "max_tokens": n}),
        ("streaming", chat, _chat("Count to five.", n, stream=True)),
        ("completions", "/v1/completions", {"prompt": "The capital of France is", "max_tokens": n}),
    ]


def send(session, base: str, model_name: str, kind: str, path: str, body: dict) -> Check:
    start = time.monotonic()
    try:
        if not body:
            r = session.get(base + path, timeout=60)
            ok, note = r.status_code == 200, ""
        else:
            r = session.post(
                base + path, json={"model": model_name, **body}, timeout=900, stream=bool(body.get("stream"))
            )
            if body.get("stream"):
                chunks = [ln for ln in r.iter_lines(decode_unicode=True) if ln and ln.startswith("data: ")]
                ok = r.status_code == 200 and bool(chunks) and chunks[-1] == "data: [DONE]"
                note = f"{len(chunks)} events"
            else:
                ok = r.status_code == 200
                usage = r.json().get("usage", {}) if ok else {}
                note = f"{usage.get('completion_tokens', '?')} tokens" if ok else r.text[:200]
        took = time.monotonic() - start
        return Check(kind, ok, f"{r.status_code}  {took * 1000:8.0f} ms  {note}")
    except Exception as exc:  # noqa: BLE001 - any failure of one request is that request's result
        return Check(kind, False, f"---  {time.monotonic() - start:8.1f} s  {type(exc).__name__}: {exc}")


def run_requests(cfg_port: int, media_port: int, media_dir: Path, max_tokens: int) -> list[Check]:
    import requests

    base = f"http://127.0.0.1:{cfg_port}"
    media = f"http://127.0.0.1:{media_port}"
    session = requests.Session()
    session.trust_env = False  # loopback only, never through a proxy
    model_name = session.get(base + "/v1/models", timeout=60).json()["data"][0]["id"]
    image_b64 = base64.b64encode((media_dir / "sample.png").read_bytes()).decode()
    checks = []
    for kind, path, body in request_kinds(base, media, model_name, image_b64, max_tokens):
        c = send(session, base, model_name, kind, path, body)
        print(f"  {'ok  ' if c.ok else 'FAIL'} {kind:<18} {c.detail}", flush=True)
        checks.append(c)
    return checks


# -- what vLLM reported ------------------------------------------------------------


def log_facts(log_text: str, plan_kv: int | None) -> list[str]:
    """The block-FP8 kernel lines and the KV cache size, beside the plan's KV tokens."""
    lines = []
    fp8 = [ln.strip() for ln in log_text.splitlines() if FP8_LINE.search(ln)]
    lines += [f"  fp8 kernel  {ln[-200:]}" for ln in dict.fromkeys(fp8)] or [
        "  fp8 kernel  (no block-FP8 line)"
    ]
    seq = MAX_SEQ_LINE.findall(log_text)
    if seq:
        lines.append(f"  max length  vLLM max_seq_len={int(seq[-1]):,}")
    kv = KV_LINE.findall(log_text)
    if kv:
        where, tokens = kv[-1]
        got = int(tokens.replace(",", ""))
        ratio = f", plan/vLLM = {plan_kv / got:.3f}" if plan_kv else ""
        plan = f"{plan_kv:,}" if plan_kv else "n/a (no capacity plan for this device)"
        lines.append(f"  KV cache    vLLM {where} {got:,} tokens; plan {plan}{ratio}")
    else:
        lines.append("  KV cache    (no 'KV cache size' line in the log)")
    return lines


def dry_run(python: str, config: Path) -> tuple[int | None, str]:
    """The plan's KV tokens and the preflight section, from start_service.py --dry-run."""
    _code, out, _ = _run(
        [python, str(REPO / "start_service.py"), "--config", str(config), "--dry-run", "--quiet"], timeout=120
    )
    m = PLAN_KV.search(out)
    section = out.split("vLLM command")[0].strip()
    return (int(m.group(1).replace(",", "")) if m else None), section


def our_pids(tag: str | None) -> set[int]:
    from qwen3_vl_service.machine.processes import find_tagged

    return {p.pid for p in find_tagged(tag)} if tag else set()


def no_gpu_process_left(tag: str | None, run_pids: set[int]) -> Check:
    """NVML, after the stop: no GPU process is one of the service's (recorded while it ran, or
    still carrying its tag). stop_service.py checks too; this is the independent look."""
    from qwen3_vl_service.machine.processes import NvmlUnavailable, gpu_pids

    try:
        on_gpu = gpu_pids()
    except NvmlUnavailable as exc:
        return Check("no GPU process left", False, f"NVML unavailable: {exc}")
    ours = run_pids | our_pids(tag)
    held = [f"GPU {i}: pid {pid}" for i, pid in on_gpu if pid in ours]
    detail = "; ".join(held) or (
        f"{len(on_gpu)} GPU process(es) on the node, none of the {len(run_pids)} that the service ran"
    )
    return Check("no GPU process left", not held, detail)


def _step(name: str, fn: Callable[[], tuple[bool, str]]) -> Check:
    ok, detail = fn()
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return Check(name, ok, detail)


def smoke(args) -> int:
    args.out = args.out.resolve()
    # VLLM_PYTHON must be absolute; abspath, not resolve: a venv's python is a symlink to the base one
    args.python = os.path.abspath(shutil.which(args.python) or args.python)
    args.out.mkdir(parents=True, exist_ok=True)
    tp = args.tp or (gpu_count() if args.device == "gpu" else 1)
    model, media = prepare(args)
    config = write_config(args, model, media, tp)
    py = sys.executable
    cfgargs = ["--config", str(config)]
    print(f"config      {config} (DEVICE={args.device}, TP={tp})")
    plan_kv, preflight = dry_run(py, config)
    print(preflight)
    checks: list[Check] = []
    code, out, took = _run([py, str(REPO / "start_service.py"), *cfgargs, "--detach"], timeout=1800)
    print(out.rstrip())
    checks.append(_step("start", lambda: (code == 0, f"exit {code} after {took:.0f} s")))
    tag, run_pids = None, set()
    try:
        if code == 0:
            checks += run_requests(args.port, args.media_port, media, args.max_tokens)
            if args.yarn:
                n = args.long_prompt or native_positions(model) + 4096
                c = long_prompt_request(f"http://127.0.0.1:{args.port}", ordinary_token_ids(model, n))
                print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<18} {c.detail}", flush=True)
                checks.append(c)
            where = scope.paths(service_config.load(config))  # the service's own folders
            log = where.service_log.read_text(errors="replace")
            print("\n".join(log_facts(log, plan_kv)))
            tag = _tag(where.run_dir)
            run_pids = our_pids(tag)  # vLLM's API server, EngineCore and workers, while they run
            scode, sout, _ = _run([py, str(REPO / "status_service.py"), *cfgargs], timeout=120)
            print("status_service.py:\n" + sout.rstrip())
            checks.append(Check("status", scode == 0, f"exit {scode}"))
            if args.bench:
                bench = [py, str(REPO / "bench" / "bench_gpu.py"), *cfgargs, *shlex.split(args.bench_args)]
                bcode, bout, btook = _run(bench, timeout=3600)
                print(bout.rstrip())
                checks.append(_step("bench", lambda: (bcode == 0, f"exit {bcode} after {btook:.0f} s")))
            if args.crash:
                checks += crash_and_recover(config, args, tag)
                tag = _tag(where.run_dir) or tag  # a restart keeps the tag: the same, read again
                run_pids |= our_pids(tag)
    finally:
        stop_code, stop_out, stook = _run([py, str(REPO / "stop_service.py"), *cfgargs, "--all"], timeout=600)
        print(stop_out.rstrip())
        checks.append(_step("stop", lambda: (stop_code == 0, f"exit {stop_code} after {stook:.0f} s")))
    if args.device == "gpu":
        checks.append(no_gpu_process_left(tag, run_pids))
        print(f"{'ok  ' if checks[-1].ok else 'FAIL'} {checks[-1].name}: {checks[-1].detail}")
    failed = [c.name for c in checks if not c.ok]
    print(
        f"\ngpu_smoke: {len(checks) - len(failed)}/{len(checks)} ok"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


# -- a crash -------------------------------------------------------------------------


def engine_core(tag: str | None):
    """The run's VLLM::EngineCore (vLLM titles the process so), or None."""
    import psutil

    from qwen3_vl_service.machine.processes import find_tagged

    for proc in find_tagged(tag) if tag else []:
        try:
            if " ".join(proc.cmdline()).startswith("VLLM::EngineCore"):
                return proc
        except psutil.Error:
            continue
    return None


def crash_and_recover(config: Path, args, tag: str | None) -> list[Check]:
    """kill -9 of the EngineCore; the supervisor's restart, the new vLLM's answers, the status."""
    import json
    import signal

    import psutil
    import requests

    from qwen3_vl_service.lifecycle import runstate
    from qwen3_vl_service.lifecycle.readiness import poll_until

    cfg = service_config.load(config)
    run_dir = scope.paths(cfg).run_dir
    engine = engine_core(tag)
    if engine is None:
        return [_step("crash", lambda: (False, f"no VLLM::EngineCore carries tag {tag}"))]
    old = runstate.read(run_dir)
    old_pid = old.pid if old else None
    base = f"http://127.0.0.1:{args.port}"

    def healthy() -> bool:
        try:
            with requests.Session() as s:
                s.trust_env = False
                return s.get(base + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def new_run() -> bool:
        state = runstate.read(run_dir)
        return state is not None and state.pid != old_pid

    killed = time.monotonic()
    try:
        engine.send_signal(signal.SIGKILL)
    except psutil.Error as exc:  # it ended by itself between the lookup and the kill
        why = f"kill -9 of VLLM::EngineCore pid {engine.pid}: {exc}"
        return [_step("crash", lambda: (False, why))]
    print(f"crash       kill -9 of VLLM::EngineCore pid {engine.pid}", flush=True)
    restarted = poll_until(new_run, 300, step=1.0)
    back = restarted and poll_until(healthy, cfg.startup_timeout, step=1.0)
    took = time.monotonic() - killed
    checks = [
        _step(
            "restart",
            lambda: (
                back,
                f"vLLM answered {took:.0f} s after the kill" if back else f"not back after {took:.0f} s",
            ),
        )
    ]
    if not back:
        return checks
    media = args.out / "media"
    image_b64 = base64.b64encode((media / "sample.png").read_bytes()).decode()
    kinds = request_kinds(base, f"http://127.0.0.1:{args.media_port}", "", image_b64, args.max_tokens)
    with requests.Session() as session:
        session.trust_env = False
        for kind, path, body in kinds:
            if kind in ("text", "image (media URL)"):
                c = send(session, base, cfg.served_model_name, f"{kind} after the restart", path, body)
                print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}", flush=True)
                checks.append(c)
    code, out, _ = _run(
        [sys.executable, str(REPO / "status_service.py"), "--config", str(config), "--json", "--sample", "0"],
        timeout=120,
    )
    try:
        sup = json.loads(out).get("supervisor") or {}
    except ValueError:
        sup = {}
    cause = str(sup.get("last_cause", ""))
    recorded = (
        code == 0 and (sup.get("restarts") or 0) >= 1 and "EngineCore" in cause and str(engine.pid) in cause
    )
    checks.append(
        _step(
            "restart recorded",
            lambda: (recorded, f"{sup.get('restarts', 0)} restart(s); last cause: {cause[:160]}"),
        )
    )
    return checks


def _tag(run_dir: Path) -> str | None:
    from qwen3_vl_service.lifecycle import runstate

    try:
        state = runstate.read(run_dir)
    except Exception:  # noqa: BLE001 - no state is "no tag"; the check then finds nothing to match
        return None
    return getattr(state, "tag", None)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = _parser().parse_args(argv)
        if args.layers < 1 or (args.tp is not None and args.tp < 1):
            raise UsageError(
                f"--layers {args.layers} / --tp {args.tp} must be at least 1", fix="e.g. --layers 4"
            )
        return smoke(args)

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
