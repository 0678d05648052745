"""A model directory shaped like Qwen/Qwen3-VL-235B-A22B-Thinking-FP8, without its 236 GB.

``build(dir)`` writes the real config.json facts (/work/shared/model-facts.md),
the tokenizer, processor and chat-template files (small stand-ins), the
safetensors index and every shard under its real-style name. Each shard is a
valid safetensors file: an 8-byte header length, a JSON header whose data
offsets give the shard its real size, then a sparse hole (``truncate``), so
``stat`` sees ~4.9 GB per shard while the disk holds a few KiB.

The real checkpoint's shard count and exact total are not confirmed anywhere
we may read; TOTAL_SIZE (236 GB, the model card's "about 236 GB") over
SHARDS files is the stand-in. The vision tower's tensors (bf16, ~1.15 GB)
sit in the last shard under "model.visual.", as in the real layout.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

SHARDS = 48
TOTAL_SIZE = 236_000_000_000
VISION_BYTES = 1_152_790_496  # plan.vision_params(REAL_CONFIG["vision_config"]) * 2 bytes (bf16)

REAL_CONFIG = {
    "architectures": ["Qwen3VLMoeForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl_moe",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.visual"],
    },
    "text_config": {
        "attention_bias": False,
        "decoder_sparse_step": 1,
        "dtype": "bfloat16",
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "model_type": "qwen3_vl_moe_text",
        "moe_intermediate_size": 1536,
        "norm_topk_prob": True,
        "num_attention_heads": 64,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 94,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "vocab_size": 151936,
    },
    "tie_word_embeddings": False,
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "intermediate_size": 4304,
        "model_type": "qwen3_vl_moe",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}


def shard_name(i: int, n: int = SHARDS) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _dump(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _write_shard(path: Path, tensors: dict[str, tuple[str, int]]) -> int:
    """A safetensors file holding TENSORS {name: (dtype, bytes)}, data as a sparse hole. Returns its size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, nbytes) in tensors.items():
        elem = 2 if dtype == "BF16" else 1
        header[name] = {"dtype": dtype, "shape": [nbytes // elem], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    size = 8 + len(raw) + offset
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
    os.truncate(path, size)  # sparse: the size is real, the blocks are not
    return size


def build(
    root: str | Path,
    *,
    shards: int = SHARDS,
    total_size: int = TOTAL_SIZE,
    config: dict | None = None,
    missing: tuple[int, ...] = (),
    truncated: tuple[int, ...] = (),
    text_dtype: str = "F8_E4M3",
) -> Path:
    """Write the model directory at ROOT; MISSING / TRUNCATED are 1-based shard numbers to break."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _dump(root / "config.json", config or REAL_CONFIG)
    _dump(root / "generation_config.json", {"temperature": 1.0, "top_k": 20, "top_p": 0.95})
    _dump(root / "tokenizer.json", {"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}})
    _dump(root / "vocab.json", {})
    (root / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    _dump(
        root / "tokenizer_config.json",
        {"model_max_length": 262144, "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>"},
    )
    _dump(root / "chat_template.json", {"chat_template": "{{ messages }}"})
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}
    _dump(root / "preprocessor_config.json", {**common, "image_processor_type": "Qwen2VLImageProcessor"})
    _dump(
        root / "video_preprocessor_config.json", {**common, "video_processor_type": "Qwen3VLVideoProcessor"}
    )

    weight_map: dict[str, str] = {}
    text_bytes = total_size - VISION_BYTES
    per = text_bytes // shards
    for i in range(1, shards + 1):
        name = shard_name(i, shards)
        nbytes = per if i < shards else text_bytes - per * (shards - 1)
        tensors = {f"model.language_model.layers.{i}.mlp.experts.packed": (text_dtype, nbytes)}
        if i == shards:
            tensors["model.visual.blocks.packed"] = ("BF16", VISION_BYTES)
        weight_map.update(dict.fromkeys(tensors, name))
        if i in missing:
            continue
        size = _write_shard(root / name, tensors)
        if i in truncated:
            os.truncate(root / name, size // 2)  # a download cut short
    _dump(
        root / "model.safetensors.index.json",
        {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
    )
    return root


# Qwen/Qwen3-VL-235B-A22B-Thinking (BF16): the same architecture without quantization_config,
# about 472 GB (235B parameters x 2 bytes); its shard count is not confirmed here either.
BF16_TOTAL_SIZE = 472_000_000_000
BF16_SHARDS = 96
BF16_CONFIG = {k: v for k, v in REAL_CONFIG.items() if k != "quantization_config"}


def build_bf16(root: str | Path) -> Path:
    """A model directory shaped like the BF16 checkpoint (config.bf16.env's model)."""
    return build(root, shards=BF16_SHARDS, total_size=BF16_TOTAL_SIZE, config=BF16_CONFIG, text_dtype="BF16")


def write_config_env(path: Path, model_dir: Path, **settings: object) -> Path:
    """A config.env for tests: the model at MODEL_DIR, runtime folders next to it, plus SETTINGS."""
    base = {
        "MODEL_PATH": str(model_dir),
        "RUN_DIR": str(path.parent / "run"),
        "LOG_DIR": str(path.parent / "logs"),
        "MEDIA_ROOT": str(path.parent / "media"),
    }
    base.update({k: str(v) for k, v in settings.items()})
    path.write_text("".join(f"{k}={v}\n" for k, v in base.items()), encoding="utf-8")
    return path
