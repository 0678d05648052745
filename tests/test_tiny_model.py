"""The generated tiny Qwen3-VL-MoE checkpoint: deterministic, real layout, loadable."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from skips import require

from devtools import tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _torch_and_transformers() -> None:
    require("torch", "transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model.generate(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def test_same_seed_gives_identical_bytes(model_dir, tmp_path):
    again = tiny_model.generate(tmp_path / "again", seed=0)
    assert _files(again) == _files(model_dir)


def test_main_writes_model(tmp_path, capsys):
    assert tiny_model.main([str(tmp_path / "m"), "--seed", "1"]) == 0
    assert "shards" in capsys.readouterr().out
    assert (tmp_path / "m" / "config.json").is_file()


def test_a_folder_it_did_not_write_is_never_overwritten(tmp_path, capsys):
    real = tmp_path / "Qwen3-VL-235B-A22B-Thinking-FP8"
    real.mkdir()
    (real / "config.json").write_text('{"model_type": "qwen3_vl_moe"}')
    (real / "model-00001-of-00048.safetensors").write_bytes(b"weights")
    assert tiny_model.main([str(real)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds 2 file(s) not written by tiny_model" in err[0], err
    assert (real / "model-00001-of-00048.safetensors").read_bytes() == b"weights"
    assert (real / "config.json").read_text() == '{"model_type": "qwen3_vl_moe"}'
    # Its own folder it writes again (the marker says so); a file is no folder.
    again = tmp_path / "again"
    tiny_model.generate(again, seed=3)
    assert (again / tiny_model.MARKER).is_file() and tiny_model.main([str(again), "--seed", "4"]) == 0
    (tmp_path / "f").write_text("x")
    assert (
        tiny_model.main([str(tmp_path / "f")]) == 2 and "is a file, not a folder" in capsys.readouterr().err
    )


def test_config_has_the_real_layout(config):
    assert config["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    assert config["model_type"] == "qwen3_vl_moe"
    assert "quantization_config" not in config  # FP8 does not run on CPU
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert isinstance(config[key], int)
    text, vision = config["text_config"], config["vision_config"]
    for key in (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "num_hidden_layers",
    ):
        assert key in text
    assert text["rope_scaling"]["mrope_interleaved"] is True
    assert sum(text["rope_scaling"]["mrope_section"]) == text["head_dim"] // 2
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert all(0 <= i < vision["depth"] for i in vision["deepstack_visual_indexes"])
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (16, 2, 2)


def test_sharded_weights_with_index_and_checkpoint_expert_layout(model_dir, config):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert sorted(p.name for p in model_dir.glob("model-*.safetensors")) == shards
    headers = {}
    for s in shards:
        headers.update({k: v for k, v in _safetensors_header(model_dir / s).items() if k != "__metadata__"})
    assert set(headers) == set(index["weight_map"])
    assert {v["dtype"] for v in headers.values()} == {"BF16"}
    text = config["text_config"]
    e, h, i = text["num_experts"], text["hidden_size"], text["moe_intermediate_size"]
    # Released Qwen3-VL-MoE checkpoints store fused experts as [E, H, 2I] / [E, I, H].
    gate_up = headers["model.language_model.layers.0.mlp.experts.gate_up_proj"]["shape"]
    down = headers["model.language_model.layers.0.mlp.experts.down_proj"]["shape"]
    assert gate_up == [e, h, 2 * i]
    assert down == [e, i, h]
    assert "lm_head.weight" in headers and any(k.startswith("model.visual.") for k in headers)


def test_tokenizer_special_tokens_match_config(model_dir, config):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = {
        "<|image_pad|>": config["image_token_id"],
        "<|video_pad|>": config["video_token_id"],
        "<|vision_start|>": config["vision_start_token_id"],
        "<|vision_end|>": config["vision_end_token_id"],
        "<|im_end|>": config["text_config"]["eos_token_id"],
    }
    for text, want in ids.items():
        assert tok.convert_tokens_to_ids(text) == want, text
    assert tok.eos_token == "<|im_end|>"
    for text in ("<|im_start|>", "<|endoftext|>", "<think>", "</think>"):
        assert tok.convert_tokens_to_ids(text) < config["text_config"]["vocab_size"]
    assert len(tok) <= config["text_config"]["vocab_size"]
    assert len(tok) >= 2000
    # </think> stays in decoded text (not special), so a reasoning parser can split on it.
    assert tok.decode(tok.encode("abc</think>answer"), skip_special_tokens=True) == "abc</think>answer"


def test_chat_template_is_thinking_style(model_dir):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    assert type(proc).__name__ == "Qwen3VLProcessor"
    assert type(proc.video_processor).__name__ == "Qwen3VLVideoProcessor"
    content = [
        {"type": "image", "image": "x.png"},
        {"type": "video", "video": "x.mp4"},
        {"type": "text", "text": "What?"},
    ]
    messages = [{"role": "user", "content": content}]
    prompt = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt
    assert "<|vision_start|><|video_pad|><|vision_end|>" in prompt
    no_prompt = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<think>\n")
