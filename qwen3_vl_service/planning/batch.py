"""MAX_NUM_SEQS and MAX_NUM_BATCHED_TOKENS as vLLM will run them: the user's numbers, or vLLM's own.

Pure. The launcher passes neither flag for auto (vllm_args.build), so these are
the numbers vLLM picks by itself; the plan shows them beside the full-length
sequences that fit and warns when preemption is likely (plan._concurrency).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen3_vl_service.machine.gpus import Gpu
    from qwen3_vl_service.planning.plan import Plan
    from qwen3_vl_service.settings.config import ServiceConfig

GiB = 1024**3

# MAX_NUM_SEQS=auto is vLLM's own default, and the launcher passes no --max-num-seqs at all: vLLM
# allocates KV blocks as tokens arrive and preempts (then recomputes) when they run out, so the
# full-length sequences that fit are information, not a limit. Capping at them (the earlier auto)
# left CUDA graphs uncaptured past twice the cap and queued the rest: 0.46 x bare vLLM at 128
# concurrent requests on an H200 (issue 22). vLLM's defaults for the API server, the same in 0.26.0
# and 0.32.0 (EngineArgs.get_batch_defaults, _set_default_max_num_seqs_and_batched_tokens_args):
# 1024 sequences on GPUs of at least 70 GiB that are not A100s, 256 on others, 128 per CPU rank;
# PERFORMANCE_MODE=throughput doubles what the user left to vLLM.
VLLM_SEQS_LARGE_GPU = 1024
VLLM_SEQS_OTHER_GPU = 256
VLLM_SEQS_PER_CPU_RANK = 128
VLLM_LARGE_GPU_BYTES = 70 * GiB
# Batched tokens per step (the API server's): 8192 on those large GPUs (0.32.0: 16384 from 160 GiB),
# 2048 on others, 2048 per CPU rank.
VLLM_TOKENS_LARGE_GPU = 8192
VLLM_TOKENS_HUGE_GPU = 16384  # vLLM 0.32 at >= 160 GiB (B200); 0.26.0 keeps 8192
VLLM_HUGE_GPU_BYTES = 160 * GiB
VLLM_TOKENS_OTHER_GPU = 2048
VLLM_TOKENS_PER_CPU_RANK = 2048


def vllm_defaults(device: str, gpu_name: str, gpu_bytes: int, world_size: int) -> tuple[int, int, str]:
    """vLLM's own (max_num_seqs, max_num_batched_tokens) for its API server on this device, and the
    device class in words (see VLLM_SEQS_LARGE_GPU above for the source)."""
    if device == "cpu":
        return VLLM_SEQS_PER_CPU_RANK * world_size, VLLM_TOKENS_PER_CPU_RANK * world_size, "CPU"
    if gpu_bytes >= VLLM_HUGE_GPU_BYTES:
        return VLLM_SEQS_LARGE_GPU, VLLM_TOKENS_HUGE_GPU, f"{gpu_name} (>= 160 GiB)"
    if gpu_bytes >= VLLM_LARGE_GPU_BYTES and "a100" not in gpu_name.lower():
        return VLLM_SEQS_LARGE_GPU, VLLM_TOKENS_LARGE_GPU, f"{gpu_name} (>= 70 GiB)"
    return VLLM_SEQS_OTHER_GPU, VLLM_TOKENS_OTHER_GPU, gpu_name or "this GPU"


def resolve_batch(cfg: ServiceConfig, plan: Plan, gpu: Gpu | None) -> None:
    """MAX_NUM_SEQS and MAX_NUM_BATCHED_TOKENS as vLLM will run them: the user's numbers as given,
    auto as vLLM's default for the device (doubled by PERFORMANCE_MODE=throughput, as vLLM does)."""
    name, total = (gpu.name, gpu.total_bytes) if gpu is not None else ("", 0)
    seqs, tokens, where = vllm_defaults(cfg.device, name, total, cfg.tensor_parallel_size)
    factor, mode = (
        (2, ", x2 for PERFORMANCE_MODE=throughput") if cfg.performance_mode == "throughput" else (1, "")
    )
    plan.max_num_seqs = cfg.max_num_seqs or seqs * factor
    plan.max_num_seqs_source = "MAX_NUM_SEQS" if cfg.max_num_seqs else f"vLLM's default on {where}{mode}"
    plan.max_num_batched_tokens = cfg.max_num_batched_tokens or tokens * factor
    plan.max_num_batched_tokens_source = (
        "MAX_NUM_BATCHED_TOKENS" if cfg.max_num_batched_tokens else f"vLLM's default on {where}{mode}"
    )


__all__ = ["resolve_batch", "vllm_defaults"]
