"""model.inspect(): facts and problems of a model directory shaped like the real checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import realmodel
from skips import vllm_missing

from qwen3_vl_service.download.manifest import Manifest, ManifestFile, write_manifest
from qwen3_vl_service.planning import model

pytestmark = pytest.mark.unit


@pytest.fixture
def real_dir(tmp_path: Path) -> Path:
    return realmodel.build(tmp_path / "Qwen3-VL-235B-A22B-Thinking-FP8")


def issue_text(info: model.ModelInfo, level: str = "error") -> str:
    return "\n".join(f"{i.message} -> {i.fix}" for i in info.issues if i.level == level)


def test_the_real_layout_reads_clean(real_dir: Path):
    info = model.inspect(real_dir)
    assert info.issues == ()
    assert info.config_ok
    assert info.architectures == ("Qwen3VLMoeForConditionalGeneration",)
    assert (info.num_hidden_layers, info.hidden_size) == (94, 4096)
    assert (info.num_attention_heads, info.num_key_value_heads, info.head_dim) == (64, 4, 128)
    assert (info.num_experts, info.num_experts_per_tok, info.moe_intermediate_size) == (128, 8, 1536)
    assert info.max_position_embeddings == 262144 and info.max_model_len_limit == 262144
    assert info.dtype == "bfloat16"
    assert (info.quant_method, info.quant_fmt, info.weight_block_size) == ("fp8", "e4m3", (128, 128))
    assert info.vision["depth"] == 27
    assert len(info.shards) == realmodel.SHARDS
    assert info.shards[0].name == "model-00001-of-00048.safetensors"
    assert info.index_total_size == realmodel.TOTAL_SIZE == info.weights_bytes
    assert info.vision_bytes == realmodel.VISION_BYTES  # read from the last shard's header
    assert info.shard_bytes > realmodel.TOTAL_SIZE  # the headers add a little
    assert info.chat_template == "chat_template.json"
    assert "tokenizer.json" in info.tokenizer_files and "preprocessor_config.json" in info.processor_files


def test_sparse_shards_cost_no_disk(real_dir: Path):
    used = sum(f.stat().st_blocks * 512 for f in real_dir.iterdir())
    assert used < 50 * 1024**2  # 236 GB of apparent size


def test_missing_directory_says_to_download(tmp_path: Path):
    info = model.inspect(tmp_path / "nowhere")
    assert not info.exists and not info.config_ok
    (err,) = info.errors
    assert err.message == f"Model not found at {tmp_path / 'nowhere'}"
    assert "download_model.py" in err.fix


def test_a_file_instead_of_a_folder(tmp_path: Path):
    (tmp_path / "m").write_text("x")
    assert "is a file, not a folder" in model.inspect(tmp_path / "m").errors[0].message


def test_missing_shard_is_named(tmp_path: Path):
    d = realmodel.build(tmp_path / "m", missing=(7, 31))
    info = model.inspect(d)
    assert info.missing_shards == ("model-00007-of-00048.safetensors", "model-00031-of-00048.safetensors")
    text = issue_text(info)
    assert "2 of 48 weight shards missing" in text
    assert "model-00007-of-00048.safetensors" in text and "model-00031-of-00048.safetensors" in text
    assert "download_model.py" in text


def test_truncated_shard_is_named_with_its_sizes(tmp_path: Path):
    d = realmodel.build(tmp_path / "m", truncated=(12,))
    info = model.inspect(d)
    (bad,) = info.bad_shards
    assert bad.name == "model-00012-of-00048.safetensors"
    assert bad.problem.startswith("truncated:") and "safetensors header" in bad.problem
    assert "model-00012-of-00048.safetensors is truncated" in issue_text(info)


def test_a_shard_that_is_not_safetensors(tmp_path: Path):
    d = realmodel.build(tmp_path / "m")
    shard = d / realmodel.shard_name(3)
    with open(shard, "r+b") as fh:
        fh.write(b"\0" * 8)  # header length 0: an HTML error page or zeros
    assert "not a safetensors file" in issue_text(model.inspect(d))


def test_config_json_broken_or_missing(tmp_path: Path):
    d = realmodel.build(tmp_path / "m")
    (d / "config.json").write_text("{not json")
    info = model.inspect(d)
    assert not info.config_ok and "config.json" in issue_text(info) and "not valid JSON" in issue_text(info)
    (d / "config.json").unlink()
    assert "config.json in" in issue_text(model.inspect(d)) and "missing" in issue_text(model.inspect(d))


def test_config_without_the_needed_facts(tmp_path: Path):
    cfg = json.loads(json.dumps(realmodel.REAL_CONFIG))
    del cfg["text_config"]["num_hidden_layers"]
    info = model.inspect(realmodel.build(tmp_path / "m", config=cfg))
    assert not info.config_ok and "lacks num_hidden_layers" in issue_text(info)


def test_an_architecture_vllm_does_not_serve(tmp_path: Path):
    cfg = json.loads(json.dumps(realmodel.REAL_CONFIG))
    cfg["architectures"] = ["TotallyMadeUpForCausalLM"]
    info = model.inspect(realmodel.build(tmp_path / "m", config=cfg))
    if model.vllm_architectures() is None:
        assert "TotallyMadeUpForCausalLM" in issue_text(info, "warn")
    else:
        assert "not one the installed vLLM serves" in issue_text(info)


def test_vllm_registry_is_read_without_importing_vllm():
    import sys

    archs = model.vllm_architectures()
    if archs is None:
        vllm_missing("vLLM is not installed for this interpreter")
    assert "Qwen3VLMoeForConditionalGeneration" in archs
    assert "vllm" not in sys.modules or "vllm.model_executor" not in sys.modules


def test_tokenizer_processor_and_chat_template(tmp_path: Path):
    d = realmodel.build(tmp_path / "m")
    (d / "tokenizer.json").unlink()
    assert model.inspect(d).errors == ()  # vocab.json + merges.txt still make a tokenizer
    (d / "vocab.json").unlink()
    assert "tokenizer.json (or vocab.json + merges.txt)" in issue_text(model.inspect(d))
    (d / "preprocessor_config.json").unlink()
    (d / "chat_template.json").unlink()
    text = issue_text(model.inspect(d))
    assert "preprocessor_config.json missing" in text and "no chat template" in text


def test_chat_template_inside_tokenizer_config(tmp_path: Path):
    d = realmodel.build(tmp_path / "m")
    (d / "chat_template.json").unlink()
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ x }}"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    assert model.inspect(d).chat_template == "tokenizer_config.json"


def test_unfinished_download_files_are_a_warning(tmp_path: Path):
    d = realmodel.build(tmp_path / "m")
    part = d / ".cache/huggingface/download/x.incomplete"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"")
    assert "unfinished download" in issue_text(model.inspect(d), "warn")


def test_single_file_checkpoint_without_index(tmp_path: Path):
    d = realmodel.build(tmp_path / "m", shards=1)
    os.replace(d / realmodel.shard_name(1, 1), d / "model.safetensors")
    (d / "model.safetensors.index.json").unlink()
    info = model.inspect(d)
    assert info.index_file == "model.safetensors" and info.errors == ()
    assert info.weights_bytes and info.weights_bytes > realmodel.TOTAL_SIZE


def test_download_manifest_sizes_and_problems_are_used_once(tmp_path: Path):
    d = realmodel.build(tmp_path / "m")
    files = tuple(ManifestFile(p.name, p.stat().st_size) for p in sorted(d.iterdir()) if p.is_file())
    manifest = Manifest(
        repo="Qwen/Qwen3-VL-235B-A22B-Thinking-FP8", revision="main", commit="c" * 40, created="", files=files
    )
    write_manifest(d, manifest)
    info = model.inspect(d)
    assert info.manifest and info.errors == ()
    shard = d / realmodel.shard_name(5)
    os.truncate(shard, shard.stat().st_size - 1)
    info = model.inspect(d)
    lines = [i.message for i in info.errors]
    assert sum(realmodel.shard_name(5) in line for line in lines) == 1, lines  # once, from the manifest check
    assert info.bad_shards[0].expected == files[[f.name for f in files].index(shard.name)].size
