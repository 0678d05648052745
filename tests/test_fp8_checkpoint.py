"""The block-FP8 checkpoint layout against the published Qwen3-VL-235B-A22B-Thinking-FP8.

The expected layout below is written out from the published facts, not from
the generator's constants:

- tensor names and dtypes: the published FP8 releases of Qwen's MoE models
  keep the experts per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``,
  F8_E4M3) with a bfloat16 ``weight_scale_inv`` each, and the router
  (``mlp.gate``), norms, embeddings, ``lm_head`` and the vision tower in BF16
  (Qwen3-235B-A22B-FP8's ``modules_to_not_convert`` quoted in
  vllm-project/llm-compressor#1758; the ``ignored_layers`` of Qwen3-VL FP8
  config.json linked from HabanaAI/vllm-fork#2107);
- shapes: hidden 4096, 64 query / 4 KV heads of 128, 128 experts of width
  1536, vocabulary 151,936 (the model card and config.json, model-facts.md);
- ``weight_scale_inv``: one per 128x128 block, ``[ceil(out/128), ceil(in/128)]``
  (``weight_block_size: [128, 128]``).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import warm_vllm
from skips import vllm_missing

from devtools import fp8_checkpoint, tiny_model

# -- the published facts, one text layer at real shapes ---------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 64, 4, 128
EXPERTS, MOE_WIDTH, VOCAB = 128, 1536, 151936


def published_layer(i: int, experts: int, hidden: int, heads: int, kv: int, hd: int, width: int):
    """name -> (dtype, shape) of one decoder layer of the published FP8 checkpoint."""
    p = f"model.language_model.layers.{i}"
    q, k = heads * hd, kv * hd

    def fp8(name, out, inp):
        return {
            f"{name}.weight": ("F8_E4M3", [out, inp]),
            f"{name}.weight_scale_inv": ("BF16", [math.ceil(out / 128), math.ceil(inp / 128)]),
        }

    layer = {
        f"{p}.input_layernorm.weight": ("BF16", [hidden]),
        f"{p}.post_attention_layernorm.weight": ("BF16", [hidden]),
        f"{p}.self_attn.q_norm.weight": ("BF16", [hd]),
        f"{p}.self_attn.k_norm.weight": ("BF16", [hd]),
        f"{p}.mlp.gate.weight": ("BF16", [experts, hidden]),
        **fp8(f"{p}.self_attn.q_proj", q, hidden),
        **fp8(f"{p}.self_attn.k_proj", k, hidden),
        **fp8(f"{p}.self_attn.v_proj", k, hidden),
        **fp8(f"{p}.self_attn.o_proj", hidden, q),
    }
    for e in range(experts):
        layer.update(fp8(f"{p}.mlp.experts.{e}.gate_proj", width, hidden))
        layer.update(fp8(f"{p}.mlp.experts.{e}.up_proj", width, hidden))
        layer.update(fp8(f"{p}.mlp.experts.{e}.down_proj", hidden, width))
    return layer


DTYPE_OF_KIND = {"fp8": "F8_E4M3", "scale": "BF16", "bf16": "BF16", "norm": "BF16", "bias": "BF16"}


def _real_config(layers: int = 1) -> dict:
    ids = tiny_model.token_ids(tiny_model.REAL_ADDED_BASE)
    text = {**tiny_model.TEXT_REAL, "num_hidden_layers": layers}
    return tiny_model.build_config(ids, tiny_model.REAL_VOCAB, text, tiny_model.vision_cut(3))


@pytest.mark.unit
def test_real_shape_layer_matches_the_published_layout():
    tensors = fp8_checkpoint.layout(_real_config(layers=1), fp8=True)
    got = {t.name: (DTYPE_OF_KIND[t.kind], list(t.shape)) for t in tensors}
    want = published_layer(0, EXPERTS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MOE_WIDTH)
    layer0 = {k: v for k, v in got.items() if k.startswith("model.language_model.layers.0.")}
    assert layer0 == want
    assert len(layer0) == 5 + 4 * 2 + 128 * 3 * 2  # 781: norms, gate, 4 attention and 384 expert linears
    assert got["model.language_model.layers.0.self_attn.q_proj.weight_scale_inv"] == ("BF16", [64, 32])
    assert got["model.language_model.layers.0.mlp.experts.127.down_proj.weight_scale_inv"] == (
        "BF16",
        [32, 12],
    )
    assert got["model.language_model.embed_tokens.weight"] == ("BF16", [VOCAB, HIDDEN])
    assert got["lm_head.weight"] == ("BF16", [VOCAB, HIDDEN])
    assert got["model.language_model.norm.weight"] == ("BF16", [HIDDEN])
    vision = {k: v for k, v in got.items() if k.startswith("model.visual.")}
    assert vision and {d for d, _ in vision.values()} == {"BF16"}
    assert got["model.visual.blocks.0.attn.qkv.weight"] == ("BF16", [3 * 1152, 1152])
    assert got["model.visual.merger.linear_fc2.weight"] == ("BF16", [HIDDEN, 1152 * 4])


@pytest.mark.unit
def test_scale_grid_rounds_up_partial_blocks():
    assert fp8_checkpoint.scale_shape((1536, 4096)) == (12, 32)
    assert fp8_checkpoint.scale_shape((129, 127)) == (2, 1)


@pytest.mark.unit
def test_quantization_config_as_published():
    config = _real_config(layers=2)
    qc = fp8_checkpoint.quantization_config(config)
    assert {k: v for k, v in qc.items() if k != "ignored_layers"} == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    ignored = qc["ignored_layers"]
    assert "lm_head" in ignored
    assert {"model.language_model.layers.0.mlp.gate", "model.language_model.layers.1.mlp.gate"} <= set(
        ignored
    )
    assert "model.visual.blocks.2.attn.qkv" in ignored and "model.visual.blocks.3.attn.qkv" not in ignored
    assert "model.visual.deepstack_merger_list.2.linear_fc1" in ignored
    assert not any("self_attn" in n or "experts" in n for n in ignored)


@pytest.mark.unit
def test_vision_cut_keeps_deepstack_inside_the_depth():
    assert tiny_model.vision_cut(27)["deepstack_visual_indexes"] == [8, 16, 24]
    for depth in range(3, 28):
        taps = tiny_model.vision_cut(depth)["deepstack_visual_indexes"]
        assert len(taps) == 3 and taps == sorted(set(taps)) and taps[-1] < depth
    with pytest.raises(ValueError):
        tiny_model.vision_cut(2)


# -- the generated files ------------------------------------------------------------------------


def _headers(model_dir: Path) -> dict[str, dict]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    headers: dict[str, dict] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with open(model_dir / shard, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            headers.update({k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"})
    assert set(headers) == set(index["weight_map"])
    return headers


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    return tiny_model.generate(tmp_path_factory.mktemp("fp8") / "model", seed=0, fp8=True)


@pytest.mark.integration
def test_generated_fp8_files_have_the_published_layout(fp8_dir):
    config = json.loads((fp8_dir / "config.json").read_text())
    t = config["text_config"]
    headers = _headers(fp8_dir)
    got = {k: (v["dtype"], v["shape"]) for k, v in headers.items()}
    want = published_layer(
        0,
        t["num_experts"],
        t["hidden_size"],
        t["num_attention_heads"],
        t["num_key_value_heads"],
        t["head_dim"],
        t["moe_intermediate_size"],
    )
    assert {k: v for k, v in got.items() if k.startswith("model.language_model.layers.0.")} == want
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert {d for k, (d, _) in got.items() if k.startswith("model.visual.")} == {"BF16"}
    for name in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
        assert got[name][0] == "BF16"


@pytest.mark.integration
def test_fp8_weights_dequantize_to_finite_small_values(fp8_dir):
    import torch
    from safetensors import safe_open

    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())
    name = "model.language_model.layers.1.mlp.experts.3.down_proj.weight"
    with safe_open(str(fp8_dir / index["weight_map"][name]), "pt") as f:
        w = f.get_tensor(name)
    with safe_open(str(fp8_dir / index["weight_map"][name + "_scale_inv"]), "pt") as f:
        s = f.get_tensor(name + "_scale_inv")
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.bfloat16
    full = (
        w.float() * s.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    )
    assert torch.isfinite(full).all()
    assert 0.005 < full.std().item() < 0.05


@pytest.mark.integration
def test_bf16_layout_equals_transformers_state_dict():
    """The hand-written names (fp8_checkpoint.layout) against transformers' own model (the peer)."""
    tok_ids = tiny_model.token_ids(5000)
    config = tiny_model.build_config(tok_ids, 5120)
    got = {t.name: t.shape for t in fp8_checkpoint.layout(config, fp8=False)}
    assert got == tiny_model._param_shapes(config)


@pytest.mark.integration
def test_real_shapes_tokenizer_has_qwens_ids():
    tok, ids = tiny_model.build_tokenizer(pad_to=tiny_model.REAL_ADDED_BASE)
    assert ids["<|endoftext|>"] == 151643 and ids["<|im_start|>"] == 151644 and ids["<|im_end|>"] == 151645
    assert (ids["<|vision_start|>"], ids["<|vision_end|>"]) == (151652, 151653)
    assert (ids["<|image_pad|>"], ids["<|video_pad|>"]) == (151655, 151656)
    assert (ids["<think>"], ids["</think>"]) == (151667, 151668)
    assert tok.get_vocab_size(with_added_tokens=True) == 151669 <= tiny_model.REAL_VOCAB
    assert tok.encode("a <|image_pad|>").ids[-1] == 151655


@pytest.mark.integration
def test_vllm_weight_mapping_accepts_every_generated_name(fp8_dir):
    """The installed vLLM's own name mapping for Qwen3VLMoe takes every tensor, and its Fp8Config
    quantizes exactly the FP8 ones (without building the model: FP8 does not run on these CPUs).
    In a child process (forked from the warm vLLM, tests/warm_vllm.py): importing vLLM here would leak
    into the tests that check it is not imported."""
    child = warm_vllm.ready()
    probe = child.run("import vllm.model_executor.models.qwen3_vl_moe")
    if probe.returncode != 0:
        vllm_missing(f"vLLM's qwen3_vl_moe is not importable: {probe.stderr.strip()[-300:]}")
    check = Path(__file__).with_name("fp8_vllm_check.py")
    proc = child.run(check.read_text(encoding="utf-8"), str(fp8_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("ok:"), proc.stdout


@pytest.mark.integration
@pytest.mark.parametrize("module", ["devtools.tiny_model", "devtools.sample_media"])
@pytest.mark.parametrize("argv", [["--bogus"], ["OUT", "--bogus"]])
def test_bad_arguments_go_through_the_one_error_handler(module, argv, tmp_path):
    """Issue 16, defect 3: a one-line error and exit 2, not argparse's usage block or a traceback."""
    import subprocess
    import sys

    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "--help" in lines[0]


@pytest.mark.integration
def test_tiny_model_refuses_a_zero_layer_count(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "devtools.tiny_model", str(tmp_path / "m"), "--fp8", "--layers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "must be at least 1, got 0" in proc.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.integration
def test_real_shapes_path_writes_qwens_vocabulary_and_ids(tmp_path, monkeypatch):
    """The --real-shapes path end to end, narrowed (hidden 256, 4 experts) to stay small in CI:
    vocabulary 151,936, Qwen's token ids in config and tokenizer, the depth cut, shards + index."""
    from transformers import AutoTokenizer

    narrow = {**tiny_model.TEXT_FP8, "num_experts": 4, "num_experts_per_tok": 2}
    monkeypatch.setattr(tiny_model, "TEXT_REAL", narrow)
    monkeypatch.setattr(
        tiny_model, "VISION_REAL", {**tiny_model.VISION, "depth": 27, "deepstack_visual_indexes": [8, 16, 24]}
    )
    monkeypatch.setattr(tiny_model, "REAL_SHARD_BYTES", 64 << 20)
    out = tiny_model.generate(tmp_path / "m", fp8=True, real_shapes=True, layers=2)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 151936 and config["text_config"]["num_hidden_layers"] == 2
    assert config["vision_config"]["depth"] == 3 and config["vision_config"]["deepstack_visual_indexes"] == [
        0,
        1,
        2,
    ]
    ids = {
        k: config[k]
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    assert ids == {
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
    }
    assert config["text_config"]["eos_token_id"] == 151645
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655 and tok.eos_token_id == 151645
    headers = _headers(out)
    assert headers["model.language_model.embed_tokens.weight"]["shape"] == [151936, 256]
    assert headers["lm_head.weight"]["shape"] == [151936, 256]
    assert "model.language_model.layers.1.mlp.experts.3.down_proj.weight_scale_inv" in headers
