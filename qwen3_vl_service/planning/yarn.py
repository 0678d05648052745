"""ROPE_SCALING=yarn: the context beyond the model's native positions, for plan.make (pure).

The Qwen3-VL model card extends the native 262,144 positions with YaRN,
factor 2 or 3 (not 4: its interleaved MRoPE positions grow more slowly than
plain RoPE's), with the text model's own ``mrope_section`` and
``mrope_interleaved``. This module decides the ``--hf-overrides`` that carry
it to vLLM, the positions it covers, whether vLLM needs
``VLLM_ALLOW_LONG_MAX_MODEL_LEN``, and what to say about MAX_MODEL_LEN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwen3_vl_service.core.findings import Finding
from qwen3_vl_service.core.units import count

if TYPE_CHECKING:
    from qwen3_vl_service.planning.model import ModelInfo
    from qwen3_vl_service.planning.plan import Plan
    from qwen3_vl_service.settings.config import ServiceConfig

# The model card's mrope_section for head_dim 128, when config.json does not say.
DEFAULT_MROPE_SECTION = (24, 20, 20)
# Beyond native x this, no factor the model card allows (2 or 3) is meant to reach.
YARN_MAX_FACTOR = 4
# The factors the model card allows, smallest first.
YARN_FACTORS = (2, 3)


def plan_yarn(cfg: ServiceConfig, model: ModelInfo, plan: Plan) -> None:
    """ROPE_SCALING=yarn: the --hf-overrides that vLLM 0.26-0.32 apply, and the context it allows.

    ``--rope-scaling`` is gone from vLLM (PR #28006); ``--hf-overrides`` with a
    nested ``text_config`` updates the loaded text config in place
    (ModelConfig._apply_dict_overrides -> _update_nested), and the Qwen3-VL
    text model reads ``rope_parameters`` (transformers 5). vLLM's YaRN cos/sin
    cache covers original_max_position_embeddings x factor positions
    (YaRNScalingRotaryEmbedding). Neither version raises its length limit for
    yarn (0.32 leaves max_position_embeddings as it is; 0.26 reads rope
    parameters from the top-level config, which Qwen3-VL keeps in text_config),
    and tokenizer_config.json's model_max_length caps it too: a MAX_MODEL_LEN
    beyond the native positions needs VLLM_ALLOW_LONG_MAX_MODEL_LEN=1.
    """
    out = plan.findings
    native = model.max_position_embeddings
    if native is None:
        return
    factor = cfg.rope_factor
    positions = int(native * factor)
    section = model.mrope_section or DEFAULT_MROPE_SECTION
    rope = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": native,
        "mrope_section": list(section),
        "mrope_interleaved": model.mrope_interleaved if model.mrope_section else True,
    }
    plan.hf_overrides = {"text_config": {"rope_parameters": rope}}
    plan.rope_positions = positions
    limit = model.max_model_len_limit or native
    plan.allow_long_max_model_len = cfg.max_model_len > limit
    n = cfg.max_model_len
    head = f"YaRN factor {factor:g}: {native:,} native positions -> {positions:,}"
    if n <= native:
        out.append(
            Finding(
                "warn",
                "Context",
                f"{head}, but MAX_MODEL_LEN={n:,} is within the native {native:,}: YaRN changes "
                "every request's attention for nothing (the model card: only for longer contexts)",
                f"set ROPE_SCALING=none, or raise MAX_MODEL_LEN above {native:,}",
            )
        )
    elif n <= positions:
        out.append(
            Finding(
                "ok",
                "Context",
                f"{head}; MAX_MODEL_LEN={n:,} (vLLM told with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1: "
                f"it does not raise its {limit:,}-token limit for yarn)",
            )
        )
    elif n <= native * YARN_MAX_FACTOR:
        out.append(
            Finding(
                "warn",
                "Context",
                f"{head}; MAX_MODEL_LEN={n:,} passes them: vLLM serves a text longer than "
                f"{positions:,} tokens (0.26 on an H200 answered one of 790,000), but its positions "
                "past them are outside what the scaling covers and vLLM warns they can turn to NaN; "
                "images and video take fewer positions than tokens, which is what the model card's 1M "
                "context at factor 3 relies on",
                f"keep MAX_MODEL_LEN at {positions:,} or less for long text",
            )
        )
    else:
        out.append(
            Finding(
                "error",
                "Context",
                f"MAX_MODEL_LEN={n:,} exceeds what YaRN on {native:,} positions is meant to reach "
                f"({native * YARN_MAX_FACTOR:,})",
                f"lower MAX_MODEL_LEN to {positions:,} or less",
            )
        )


def native_overrun(cfg: ServiceConfig, model: ModelInfo, plan: Plan) -> None:
    """ROPE_SCALING=none and MAX_MODEL_LEN past the model's positions: the error, and the YaRN way.

    The original service's reason for a 1M context was YaRN, so the fix names
    the factor that reaches MAX_MODEL_LEN and what these GPUs then hold (the
    plan's KV tokens: the rope does not change the KV cache per token). Runs
    after the capacity maths; the finding goes before the Capacity lines.
    """
    limit = model.max_model_len_limit
    native = model.max_position_embeddings
    n = cfg.max_model_len
    if limit is None or native is None or n <= limit:
        return
    fixes = []
    factor = next((f for f in YARN_FACTORS if native * f >= n), None)
    if model.mrope_section is not None and n <= native * YARN_MAX_FACTOR:
        top = factor or YARN_FACTORS[-1]
        covers = f"{native * top:,} positions"
        if factor is None:
            covers += (
                "; text past them is outside the scaling, the model card's 1M relies on images and video "
                "taking fewer positions than tokens"
            )
        fixes.append(f"set ROPE_SCALING=yarn ROPE_FACTOR={top} ({covers}){_held(plan, n)}")
    fixes.append(f"lower MAX_MODEL_LEN to {limit} or less")
    finding = Finding(
        "error",
        "Context",
        f"MAX_MODEL_LEN={n} exceeds the model's {limit} positions",
        ", or ".join(fixes),
    )
    at = next((i for i, f in enumerate(plan.findings) if f.check == "Capacity"), len(plan.findings))
    plan.findings.insert(at, finding)


def _held(plan: Plan, n: int) -> str:
    """What the planned GPUs hold of N-token sequences, and the KV dtype that fits one ("": unplanned)."""
    tokens = plan.kv_tokens
    if tokens is None:
        return ""
    if tokens >= n:
        return f"; these GPUs then hold {count(tokens // n, 'sequence')} of {n:,} ({tokens:,} KV tokens)"
    held = f"; these GPUs hold {tokens:,} KV tokens, not one sequence of {n:,}"
    per_element = plan.kv_dtype_bytes or 1
    if per_element > 1 and tokens * per_element >= n:
        fp8 = tokens * per_element
        return f"{held}: add KV_CACHE_DTYPE=fp8 ({fp8:,} tokens: {count(fp8 // n, 'sequence')})"
    return f"{held} (see Capacity)"


__all__ = ["DEFAULT_MROPE_SECTION", "YARN_FACTORS", "YARN_MAX_FACTOR", "native_overrun", "plan_yarn"]
