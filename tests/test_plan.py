"""plan.make(): parallel layout and capacity maths, pure, on the real model's facts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import realmodel

from qwen3_vl_service.machine.gpus import Gpu, GpuProcess, Inventory, parse_spec
from qwen3_vl_service.planning import plan
from qwen3_vl_service.planning.model import ModelInfo
from qwen3_vl_service.settings import config

pytestmark = pytest.mark.unit

GiB = 1024**3
MiB = 1024**2
H100 = 81559 * MiB
VLLM_ERROR = (
    "ValueError: The output_size of gate's and up's weight = 192 is not divisible by "
    "weight quantization block_n = 128."
)


def real_info(**changes) -> ModelInfo:
    """The real checkpoint's facts (tests/realmodel.py), as model.inspect() reports them."""
    t = realmodel.REAL_CONFIG["text_config"]
    info = ModelInfo(
        path=Path("/models/Qwen3-VL-235B-A22B-Thinking-FP8"),
        exists=True,
        architectures=("Qwen3VLMoeForConditionalGeneration",),
        model_type="qwen3_vl_moe",
        num_hidden_layers=t["num_hidden_layers"],
        hidden_size=t["hidden_size"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"],
        num_experts=t["num_experts"],
        num_experts_per_tok=t["num_experts_per_tok"],
        moe_intermediate_size=t["moe_intermediate_size"],
        vocab_size=t["vocab_size"],
        max_position_embeddings=t["max_position_embeddings"],
        dtype="bfloat16",
        vision=realmodel.REAL_CONFIG["vision_config"],
        quant_method="fp8",
        quant_fmt="e4m3",
        weight_block_size=(128, 128),
        index_file="model.safetensors.index.json",
        index_total_size=realmodel.TOTAL_SIZE,
        vision_bytes=realmodel.VISION_BYTES,
        tokenizer_max_length=262144,
    )
    return replace(info, **changes)


def cfg(tmp_path: Path, **settings) -> config.ServiceConfig:
    path = realmodel.write_config_env(tmp_path / "config.env", tmp_path / "model", **settings)
    return config.load(path, environ={})


def levels(p: plan.Plan, check: str | None = None) -> list[str]:
    return [f.level for f in p.findings if check is None or f.check == check]


def text(p: plan.Plan, level: str) -> str:
    return "\n".join(f"{f.message} -> {f.fix}" for f in p.findings if f.level == level)


# -- parallel layout -------------------------------------------------------------


def test_tp8_auto_switches_expert_parallel_on_and_says_why(tmp_path):
    p = plan.make(cfg(tmp_path), parse_spec("8xH100-80GB"), real_info())
    assert p.expert_parallel is True
    ok = text(p, "ok")
    assert "switched on (EXPERT_PARALLEL=auto)" in ok
    assert "192" in ok and "128" in ok and "#17327" in ok and "#17569" in ok
    assert "error" not in levels(p)
    assert p.experts_per_gpu == "16 of 128 experts per GPU"


def test_tp8_off_refuses_and_quotes_the_vllm_error(tmp_path):
    p = plan.make(cfg(tmp_path, EXPERT_PARALLEL="off"), parse_spec("8xH100-80GB"), real_info())
    assert p.expert_parallel is False
    err = text(p, "error")
    assert VLLM_ERROR in err
    assert "#17327" in err and "EXPERT_PARALLEL=auto" in err and "TENSOR_PARALLEL_SIZE=4" in err


@pytest.mark.parametrize("tp, ep", [(1, "auto"), (1, "on"), (8, "auto"), (8, "off")])
def test_experts_narrower_than_whole_blocks_are_refused_at_any_tp(tmp_path, tp, ep):
    # A 192-wide expert: what each GPU holds of a 1536-wide one at TP 8. vLLM 0.26.0
    # on an H200 refused it at TP 1 ("... weight = 192 is not divisible by ... 128"):
    # expert parallelism keeps experts whole, so it cannot help here.
    p = plan.make(
        cfg(tmp_path, TENSOR_PARALLEL_SIZE=tp, EXPERT_PARALLEL=ep),
        parse_spec(f"{tp}xH100-80GB"),
        real_info(moe_intermediate_size=192),
    )
    assert p.expert_parallel is False
    err = text(p, "error")
    assert VLLM_ERROR in err and "no TP size and no expert parallelism" in err
    assert "switched on" not in text(p, "ok")


def test_tp8_on_is_on(tmp_path):
    p = plan.make(cfg(tmp_path, EXPERT_PARALLEL="on"), parse_spec("8xH100-80GB"), real_info())
    assert p.expert_parallel is True and "error" not in levels(p)


def test_tp4_needs_no_expert_parallelism(tmp_path):
    p = plan.make(cfg(tmp_path, TENSOR_PARALLEL_SIZE=4), parse_spec("4xH100-80GB"), real_info())
    assert p.expert_parallel is False
    assert "1536/4 = 384" in p.expert_parallel_reason
    assert "error" not in levels(p)


def test_tp4_may_still_ask_for_expert_parallelism(tmp_path):
    p = plan.make(
        cfg(tmp_path, TENSOR_PARALLEL_SIZE=4, EXPERT_PARALLEL="on"), parse_spec("4xH100-80GB"), real_info()
    )
    assert p.expert_parallel is True and p.experts_per_gpu == "32 of 128 experts per GPU"


def test_tp_must_divide_the_attention_heads(tmp_path):
    p = plan.make(cfg(tmp_path, TENSOR_PARALLEL_SIZE=3), parse_spec("3xH100-80GB"), real_info())
    err = text(p, "error")
    assert "does not divide the model's 64 attention heads" in err and "1, 2, 4, 8, 16" in err


def test_tp16_replicates_kv_heads_and_needs_expert_parallelism(tmp_path):
    p = plan.make(cfg(tmp_path, TENSOR_PARALLEL_SIZE=16), parse_spec("16xH100-80GB"), real_info())
    assert p.expert_parallel is True  # 1536 / 16 = 96
    assert p.kv_heads_per_gpu == 1
    assert "each replicated on 4 GPUs" in text(p, "ok")


def test_uneven_experts_under_expert_parallelism_warn(tmp_path):
    p = plan.make(cfg(tmp_path), parse_spec("8xH100-80GB"), real_info(num_experts=124))
    assert p.expert_parallel is True
    assert "124 experts do not split evenly" in text(p, "warn")
    assert p.experts_per_gpu == "16 or 15 of 124 experts per GPU"


def test_expert_parallel_on_for_a_dense_model_is_an_error(tmp_path):
    info = real_info(num_experts=None, moe_intermediate_size=None, quant_method="")
    p = plan.make(cfg(tmp_path, EXPERT_PARALLEL="on"), parse_spec("8xH100-80GB"), info)
    assert "has no experts" in text(p, "error") and p.expert_parallel is False


def test_max_model_len_beyond_the_positions(tmp_path):
    p = plan.make(cfg(tmp_path, MAX_MODEL_LEN=300000), parse_spec("8xH100-80GB"), real_info())
    assert "MAX_MODEL_LEN=300000 exceeds the model's 262144 positions" in text(p, "error")


def test_rope_scaling_factor_extends_the_limit():
    assert real_info(rope_scaling_factor=4.0, tokenizer_max_length=None).max_model_len_limit == 4 * 262144


def test_more_gpus_wanted_than_present(tmp_path):
    p = plan.make(cfg(tmp_path), parse_spec("4xH100-80GB"), real_info())
    err = text(p, "error")
    assert "Requested 8 GPUs but only 4 available" in err
    assert "TENSOR_PARALLEL_SIZE=4" in err
    assert p.kv_tokens is None  # no capacity maths on GPUs that are not there


# -- capacity --------------------------------------------------------------------


# The capacity numbers, worked out by hand from the inputs, not from plan.py's constants:
#   an H100 80GB reports 81,559 MiB = 85,520,809,984 B; GPU_MEMORY_UTIL 0.90 of it, rounded up:
#   budget 76,968,728,986 B. The checkpoint is 236,000,000,000 B, of which the vision tower
#   (kept whole on every GPU, MM_ENCODER_TP_MODE=data) is 1,152,790,496 B:
#     TP=8: (236,000,000,000 - 1,152,790,496) / 8 + 1,152,790,496 = 30,508,691,684 B weights
#     TP=4: (236,000,000,000 - 1,152,790,496) / 4 + 1,152,790,496 = 59,864,592,872 B weights
#   reserve 4 GiB activations + 1 GiB CUDA graphs = 5,368,709,120 B
#     TP=8: KV cache 76,968,728,986 - 30,508,691,684 - 5,368,709,120 = 41,091,328,182 B
#     TP=4: KV cache 76,968,728,986 - 59,864,592,872 - 5,368,709,120 = 11,735,426,994 B
#   KV per token: 94 layers x 1 KV head per GPU (4 heads, TP >= 4) x 128 x 2 (K, V) x 2 B = 48,128 B
#     TP=8: 41,091,328,182 / 48,128 = 853,792.56 -> 853,792 tokens (a multiple of 16)
#     TP=4: 11,735,426,994 / 48,128 = 243,837.83 -> 243,824 tokens (blocks of 16)
BUDGET_H100 = 76_968_728_986
WEIGHTS_TP8 = 30_508_691_684
WEIGHTS_TP4 = 59_864_592_872
KV_TP8 = 41_091_328_182
TOKENS_TP8 = 853_792
TOKENS_TP4 = 243_824


def test_capacity_8xh100_defaults(tmp_path):
    c = cfg(tmp_path)
    assert (c.gpu_memory_util, c.max_model_len, c.max_num_seqs) == (0.90, 32768, 0)  # 0: auto
    p = plan.make(c, parse_spec("8xH100-80GB"), real_info())
    tokens = TOKENS_TP8
    assert p.kv_bytes_per_token_per_gpu == 48_128
    assert p.weights_per_gpu_bytes == WEIGHTS_TP8
    assert p.budget_per_gpu_bytes == BUDGET_H100
    assert p.kv_bytes_per_gpu == KV_TP8
    assert p.kv_tokens == TOKENS_TP8
    assert p.max_concurrency == 26  # 853,792 // 32,768
    # The numbers the README quotes.
    assert f"{p.weights_per_gpu_bytes / GiB:.2f}" == "28.41"
    assert f"{p.kv_bytes_per_gpu / GiB:.2f}" == "38.27"
    # MAX_NUM_SEQS=auto: vLLM's own default on an H100 (1024, issue 22), the 26 full-length
    # sequences as information; 853,792 // 1024 = 833 tokens each at full load: no warning.
    assert levels(p, "Capacity") == ["ok"] and p.max_num_seqs == 1024
    assert p.max_num_batched_tokens == 8192
    ok = text(p, "ok")
    assert "26 sequences of MAX_MODEL_LEN=32,768 at once" in ok
    assert "MAX_NUM_SEQS=auto: 1024, vLLM's default on H100" in ok and "(833 tokens each" in ok
    # An explicit 64 above the 26 that fit whole is fine: vLLM adds KV blocks as tokens arrive.
    p64 = plan.make(cfg(tmp_path, MAX_NUM_SEQS=64), parse_spec("8xH100-80GB"), real_info())
    assert levels(p64, "Capacity") == ["ok"] and p64.max_num_seqs == 64
    assert [s.gpu_index for s in p.rank_map] == list(range(8)) == [s.rank for s in p.rank_map]
    assert all(s.kv_tokens == tokens for s in p.rank_map)
    lines = "\n".join(p.formula())
    assert "48,128 B" in lines and "853,792" in lines and "94 layers x 1 KV head(s)" in lines


def test_max_num_seqs_that_fits_is_ok(tmp_path):
    p = plan.make(cfg(tmp_path, MAX_NUM_SEQS=26), parse_spec("8xH100-80GB"), real_info())
    assert levels(p, "Capacity") == ["ok"]


def test_4xh100_at_262144_is_refused(tmp_path):
    c = cfg(tmp_path, TENSOR_PARALLEL_SIZE=4, MAX_MODEL_LEN=262144)
    p = plan.make(c, parse_spec("4xH100-80GB"), real_info())
    assert p.weights_per_gpu_bytes == WEIGHTS_TP4 and p.kv_tokens == TOKENS_TP4
    err = text(p, "error")
    assert "one sequence of MAX_MODEL_LEN=262,144 needs 11.75 GiB of KV cache per GPU" in err
    assert "only 10.93 GiB" in err
    assert "lower MAX_MODEL_LEN to 243824" in err and "KV_CACHE_DTYPE=fp8" in err and "use 8 GPUs" in err


def test_4xh100_at_262144_fits_once_with_fp8_kv_cache(tmp_path):
    c = cfg(tmp_path, TENSOR_PARALLEL_SIZE=4, MAX_MODEL_LEN=262144, KV_CACHE_DTYPE="fp8")
    p = plan.make(c, parse_spec("4xH100-80GB"), real_info())
    assert p.kv_dtype_bytes == 1 and p.kv_bytes_per_token_per_gpu == 24_064
    assert "error" not in levels(p)
    assert p.max_concurrency == 1 and p.max_num_seqs == 1024
    # 487,648 KV tokens over 1024 sequences: 476 each at full load, under a short chat turn (512).
    assert levels(p, "Capacity") == ["warn"]
    warn = text(p, "warn")
    assert "each gets 476 KV tokens" in warn and "preempt" in warn and "MAX_NUM_SEQS=952" in warn
    c2 = cfg(tmp_path, TENSOR_PARALLEL_SIZE=4, MAX_MODEL_LEN=262144, KV_CACHE_DTYPE="fp8", MAX_NUM_SEQS=512)
    explicit = plan.make(c2, parse_spec("4xH100-80GB"), real_info())
    assert levels(explicit, "Capacity") == ["ok"] and explicit.max_num_seqs == 512


def test_8xh200_holds_full_length_sequences(tmp_path):
    p = plan.make(cfg(tmp_path, MAX_MODEL_LEN=262144), parse_spec("8xH200-141GB"), real_info())
    assert "error" not in levels(p)
    assert p.max_concurrency >= 7


def test_enforce_eager_drops_the_cuda_graph_reserve(tmp_path):
    eager = plan.make(cfg(tmp_path, ENFORCE_EAGER="true"), parse_spec("8xH100-80GB"), real_info())
    graphs = plan.make(cfg(tmp_path), parse_spec("8xH100-80GB"), real_info())
    assert eager.cuda_graph_reserve_bytes == 0
    assert eager.kv_bytes_per_gpu - graphs.kv_bytes_per_gpu == plan.CUDA_GRAPH_RESERVE


def test_vision_split_by_weights_mode(tmp_path):
    p = plan.make(cfg(tmp_path, MM_ENCODER_TP_MODE="weights"), parse_spec("8xH100-80GB"), real_info())
    assert p.weights_per_gpu_bytes == realmodel.TOTAL_SIZE // 8


def test_vision_estimate_when_headers_are_unknown(tmp_path):
    p = plan.make(cfg(tmp_path), parse_spec("8xH100-80GB"), real_info(vision_bytes=None))
    assert p.vision_bytes == plan.vision_params(realmodel.REAL_CONFIG["vision_config"]) * 2
    assert "estimate" in p.vision_source


def test_weights_that_do_not_fit(tmp_path):
    p = plan.make(cfg(tmp_path, TENSOR_PARALLEL_SIZE=2), parse_spec("2xH100-80GB"), real_info())
    err = text(p, "error")
    assert "the model does not fit" in err and "use 8 GPUs" in err


def test_too_little_free_memory_names_the_holders(tmp_path):
    busy = Gpu(
        3, "NVIDIA H100 80GB HBM3", H100, 40 * GiB, (9, 0), processes=(GpuProcess(4321, "python", 39 * GiB),)
    )
    gpus = tuple(
        busy if i == 3 else Gpu(i, "NVIDIA H100 80GB HBM3", H100, H100 - GiB, (9, 0)) for i in range(8)
    )
    p = plan.make(cfg(tmp_path), Inventory(gpus, "nvml"), real_info())
    err = text(p, "error")
    assert "GPU 3 has 40.00 GiB free, vLLM asks for 71.68 GiB" in err
    assert "pid 4321 python 39,936 MiB" in err and "kill 4321" in err and "GPU_MEMORY_UTIL to 0.5" in err


def test_ampere_warns_about_the_fp8_fallback(tmp_path):
    a100 = Inventory(
        tuple(Gpu(i, "A100-SXM4-80GB", 81920 * MiB, 81920 * MiB, (8, 0)) for i in range(8)), "nvml"
    )
    p = plan.make(cfg(tmp_path), a100, real_info())
    assert "Marlin" in text(p, "warn")


def test_rank_map_follows_cuda_order(tmp_path):
    gpus = tuple(Gpu(i, "NVIDIA H100 80GB HBM3", H100, H100, (9, 0)) for i in (4, 5, 6, 7))
    p = plan.make(cfg(tmp_path, TENSOR_PARALLEL_SIZE=4), Inventory(gpus, "nvml"), real_info())
    assert [(s.rank, s.cuda_index, s.gpu_index) for s in p.rank_map] == [
        (0, 0, 4),
        (1, 1, 5),
        (2, 2, 6),
        (3, 3, 7),
    ]


def test_host_memory_and_load_time(tmp_path):
    p = plan.make(cfg(tmp_path), parse_spec("8xH100-80GB"), real_info())
    assert p.host_memory_bytes == plan.HOST_BASE + 8 * plan.HOST_PER_WORKER
    assert p.expected_load_s == pytest.approx(realmodel.TOTAL_SIZE / plan.LOAD_RATE + plan.LOAD_FIXED_S)


def test_cpu_device_plans_no_capacity(tmp_path):
    p = plan.make(cfg(tmp_path, DEVICE="cpu", TENSOR_PARALLEL_SIZE=1), None, real_info())
    assert p.kv_tokens is None and p.formula() == [] and "error" not in levels(p)


def test_no_config_no_maths(tmp_path):
    p = plan.make(cfg(tmp_path), parse_spec("8xH100-80GB"), ModelInfo(path=Path("/x")))
    assert levels(p) == ["warn"] and p.kv_tokens is None
    assert p.expert_parallel is False  # EXPERT_PARALLEL=auto with nothing to decide from


def test_vision_params_of_the_real_tower():
    n = plan.vision_params(realmodel.REAL_CONFIG["vision_config"])
    assert 550e6 < n < 600e6  # ~0.58 B parameters, 1.07 GiB in bf16


@pytest.mark.parametrize(
    ("space", "max_len", "seqs", "note"),
    [
        # 1 GiB / (94 layers x 4 KV heads x 128 x 2 (K, V) x 2 bytes) = 5,577 tokens, 5,568 in blocks of 16
        ("1", 1024, 5, "MAX_NUM_SEQS=auto: 128, vLLM's default on CPU)"),
        # 3 GiB = 16,720 tokens: 130 sequences of 128 fit; vLLM's CPU default is 128 either way
        ("3", 128, 130, "MAX_NUM_SEQS=auto: 128, vLLM's default on CPU)"),
    ],
)
def test_cpu_kv_space_shows_full_length_sequences_beside_vllms_default(tmp_path, space, max_len, seqs, note):
    c = cfg(
        tmp_path, DEVICE="cpu", TENSOR_PARALLEL_SIZE=1, VLLM_CPU_KVCACHE_SPACE=space, MAX_MODEL_LEN=max_len
    )
    p = plan.make(c, None, real_info())
    assert p.max_concurrency == seqs and p.max_num_seqs == 128
    (finding,) = [f for f in p.findings if f.check == "Capacity"]
    assert finding.message.endswith(note), finding.message
