"""How the model is split over the GPUs: the tensor-parallel sizes vLLM accepts for its heads and
FP8 expert blocks, whether the experts go whole (expert parallelism), and the Parallel line. Pure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwen3_vl_service.core.findings import Finding

# The published vLLM error the FP8 check prevents (vLLM #17327, #17569).
VLLM_FP8_BLOCK_ERROR = (
    "ValueError: The output_size of gate's and up's weight = {per} is not divisible by "
    "weight quantization block_n = {block}."
)

if TYPE_CHECKING:
    from qwen3_vl_service.planning.model import ModelInfo
    from qwen3_vl_service.planning.plan import Plan
    from qwen3_vl_service.settings.config import ServiceConfig


def valid_tps(model: ModelInfo, limit: int) -> list[int]:
    """Tensor-parallel sizes up to LIMIT that the attention heads allow."""
    heads = model.num_attention_heads or 1
    return [t for t in range(1, limit + 1) if heads % t == 0]


def fp8_split(model: ModelInfo, tp: int) -> tuple[bool, int, int] | None:
    """(fits, columns per GPU, block) for FP8 block-quantized experts split TP ways; None: not FP8 blocks."""
    if not (
        model.quant_method == "fp8"
        and model.weight_block_size
        and model.is_moe
        and model.moe_intermediate_size
    ):
        return None
    block_n = model.weight_block_size[0]
    block_k = model.weight_block_size[-1]
    inter = model.moe_intermediate_size
    per = inter // tp
    fits = inter % tp == 0 and per % block_n == 0 and (tp == 1 or per % block_k == 0)
    return fits, per, block_n


def decide(cfg: ServiceConfig, model: ModelInfo, plan: Plan) -> None:
    """The parallel layout: what vLLM refuses for this TP, whether experts go whole, the summary line."""
    problems = _tp_problems(cfg, model, plan.findings)
    problems = _expert_parallel(cfg, model, plan) or problems
    _expert_spread(model, plan)
    if not problems:
        tp = cfg.tensor_parallel_size
        heads = model.num_attention_heads or 0
        kv = model.num_key_value_heads or heads
        kv_per = max(1, kv // tp)
        rep = f", each replicated on {tp // kv} GPUs" if tp > kv else ""
        ep = (
            "expert parallel on"
            if plan.expert_parallel
            else f"expert parallel off ({plan.expert_parallel_reason})"
        )
        plan.findings.append(
            Finding(
                "ok",
                "Parallel",
                f"TP={tp}: {heads // tp} attention heads and {kv_per} KV head(s) per GPU "
                f"({kv} KV heads{rep}); {ep}",
            )
        )


def _tp_problems(cfg: ServiceConfig, model: ModelInfo, out: list[Finding]) -> bool:
    """The tensor-parallel sizes vLLM refuses for this model's heads and experts. True if any."""
    tp = cfg.tensor_parallel_size
    heads = model.num_attention_heads or 0
    kv = model.num_key_value_heads or heads
    experts = model.num_experts or 0
    before = len(out)
    if heads % tp:
        valid = ", ".join(str(t) for t in valid_tps(model, 64) if t <= 16)
        out.append(
            Finding(
                "error",
                "Parallel",
                f"TENSOR_PARALLEL_SIZE={tp} does not divide the model's {heads} attention heads "
                f"(vLLM: 'Total number of attention heads ({heads}) must be divisible by "
                f"tensor parallel size ({tp})')",
                f"set TENSOR_PARALLEL_SIZE to one of {valid}",
            )
        )
    elif (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        out.append(
            Finding(
                "error",
                "Parallel",
                f"TENSOR_PARALLEL_SIZE={tp} and the model's {kv} KV heads: one must divide the other "
                "(vLLM asserts this when it builds the attention layers)",
                "set TENSOR_PARALLEL_SIZE to a divisor or a multiple of the KV heads",
            )
        )
    if experts and tp > experts:
        out.append(
            Finding(
                "error",
                "Parallel",
                f"TENSOR_PARALLEL_SIZE={tp} is greater than the model's {experts} experts "
                f"(vLLM: 'Tensor parallel size {tp} is greater than the number of experts {experts}.')",
                f"set TENSOR_PARALLEL_SIZE to at most {experts}",
            )
        )
    return len(out) > before


def _expert_parallel(cfg: ServiceConfig, model: ModelInfo, plan: Plan) -> bool:
    """Decide plan.expert_parallel from EXPERT_PARALLEL and the FP8 block split. True on a problem."""
    tp = cfg.tensor_parallel_size
    split = fp8_split(model, tp)
    if split is not None and not split[0]:
        _fp8_split_needs_ep(cfg, model, plan, split)
        return False
    experts = model.num_experts or 0
    inter = model.moe_intermediate_size
    if cfg.expert_parallel != "on":
        plan.expert_parallel = False
        if split is not None:
            plan.expert_parallel_reason = (
                f"not needed: {inter}/{tp} = {split[1]} columns per GPU, a multiple of {split[2]}"
            )
        elif experts:
            plan.expert_parallel_reason = "not needed: the experts are not block-quantized"
        else:
            plan.expert_parallel_reason = "not a mixture-of-experts model"
        return False
    if experts:
        plan.expert_parallel = True
        plan.expert_parallel_reason = "EXPERT_PARALLEL=on"
        return False
    plan.expert_parallel = False
    plan.findings.append(
        Finding(
            "error",
            "Parallel",
            "EXPERT_PARALLEL=on but the model has no experts "
            "(vLLM: 'Number of experts in the model "
            "must be greater than 0 when expert parallelism is enabled.')",
            "set EXPERT_PARALLEL=auto",
        )
    )
    return True


def _fp8_split_needs_ep(
    cfg: ServiceConfig, model: ModelInfo, plan: Plan, split: tuple[bool, int, int]
) -> None:
    """FP8 blocks that TP would cut: expert parallelism on (auto, on), or the error vLLM would raise (off)."""
    tp = cfg.tensor_parallel_size
    inter = model.moe_intermediate_size or 0
    _, per, block = split
    why = (
        f"FP8 block quantization ({block}x{block}) and TP={tp}: each expert's {inter} columns split "
        f"{tp} ways are {inter / tp:g}, not a multiple of {block}"
    )
    vllm_error = VLLM_FP8_BLOCK_ERROR.format(per=per, block=block)
    if inter % block:
        _fp8_expert_unsplittable(model, plan, block)
        return
    if cfg.expert_parallel == "off":
        plan.expert_parallel_reason = "EXPERT_PARALLEL=off"
        # Recent vLLM (the pinned 0.32: fused_moe/oracle/fp8.py, refine_fp8_moe_block_shape)
        # can refine the scales to 64x64 blocks for its Triton MoE kernels instead of
        # failing (source read, not run: FP8 needs a GPU); 0.26.0, the GPU build tested,
        # raised this ValueError on an H200 (a 192-wide expert at TP 1). Older releases
        # fail after minutes of loading, and the fast
        # DeepGEMM/CUTLASS kernels need the checkpoint's 128x128 blocks either way.
        plan.expert_parallel = False
        plan.findings.append(
            Finding(
                "error",
                "Parallel",
                f"{why}; with EXPERT_PARALLEL=off vLLM stops while loading with "
                f"'{vllm_error}' (vLLM #17327, #17569)",
                "set EXPERT_PARALLEL=auto (or on): each GPU then holds whole experts; "
                "or TENSOR_PARALLEL_SIZE=4",
            )
        )
        return
    plan.expert_parallel = True
    plan.expert_parallel_reason = f"{why}; with expert parallelism each GPU holds whole experts"
    how = "on" if cfg.expert_parallel == "on" else "switched on (EXPERT_PARALLEL=auto)"
    plan.findings.append(
        Finding(
            "ok",
            "Parallel",
            f"expert parallelism {how}: {why}, "
            f"which vLLM refuses ('{vllm_error}', vLLM #17327, #17569); "
            "with --enable-expert-parallel each GPU holds whole experts",
        )
    )


def _fp8_expert_unsplittable(model: ModelInfo, plan: Plan, block: int) -> None:
    """Experts whose whole width is not a multiple of the FP8 block: no TP or EP layout helps.

    Expert parallelism keeps experts whole, so it only helps when the whole
    width is block-aligned. Seen on an H200 with vLLM 0.26.0: a block-FP8
    checkpoint with 192-wide experts (the per-GPU width of TP 8 at 1536) fails
    at TP 1 with the same ValueError (validate_fp8_block_shape_moe checks the
    width whatever the TP size).
    """
    inter = model.moe_intermediate_size or 0
    plan.expert_parallel = False
    plan.expert_parallel_reason = f"experts {inter} wide, not a multiple of the FP8 block {block}"
    plan.findings.append(
        Finding(
            "error",
            "Parallel",
            f"FP8 block quantization ({block}x{block}): each expert is {inter} columns wide, not a "
            f"multiple of {block}, so no TP size and no expert parallelism gives vLLM whole blocks; "
            f"vLLM 0.26 stops while loading with "
            f"'{VLLM_FP8_BLOCK_ERROR.format(per=inter, block=block)}' (vLLM #17327, #17569)",
            "use a checkpoint quantized with a block that divides the expert width "
            "(or the BF16 weights with online FP8: EXTRA_VLLM_ARGS=--quantization fp8)",
        )
    )


def _expert_spread(model: ModelInfo, plan: Plan) -> None:
    """With expert parallelism: how many experts each GPU holds, and a warning when uneven."""
    experts = model.num_experts or 0
    tp = plan.tensor_parallel_size
    if not (plan.expert_parallel and experts and tp > 1):
        return
    base, extra = divmod(experts, tp)
    if not extra:
        plan.experts_per_gpu = f"{base} of {experts} experts per GPU"
        return
    plan.experts_per_gpu = f"{base + 1} or {base} of {experts} experts per GPU"
    plan.findings.append(
        Finding(
            "warn",
            "Parallel",
            f"expert parallelism over {tp} GPUs: {experts} experts do not split evenly; vLLM gives "
            f"{extra} GPU(s) {base + 1} experts and the others {base} (uneven load)",
            "choose TENSOR_PARALLEL_SIZE dividing the expert count",
        )
    )


__all__ = ["decide", "fp8_split", "valid_tps"]
