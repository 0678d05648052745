"""The published checkpoint's facts carried in the package (issue 24, item 1): a plan before the download.

published_models.json is written from public facts without the Hub; its index numbers are derived
from config.json's shapes. These tests recompute them, plan from them when MODEL_PATH is empty, and
check a downloaded folder against them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import realmodel
from lifecycle_helpers import free_port

from devtools.fp8_checkpoint import layout
from qwen3_vl_service.download.manifest import Manifest, ManifestFile, write_manifest
from qwen3_vl_service.machine.gpus import parse_spec
from qwen3_vl_service.planning import model, plan, preflight
from qwen3_vl_service.settings import config

REPO = Path(__file__).resolve().parents[1]
FP8 = "Qwen/Qwen3-VL-235B-A22B-Thinking-FP8"
DATA = json.loads((REPO / "qwen3_vl_service" / "planning" / model.PUBLISHED_FILE).read_text())


def load(tmp_path: Path, model_dir: Path, **settings: object) -> config.ServiceConfig:
    settings = {"PORT": free_port(), "MEDIA_PORT": free_port(), **settings}
    return config.load(realmodel.write_config_env(tmp_path / "config.env", model_dir, **settings), environ={})


@pytest.mark.unit
def test_the_carried_index_numbers_are_what_the_config_shapes_add_up_to() -> None:
    """The header says what is derived; here it is derived again, from the carried config.json."""
    entry = DATA["checkpoints"][FP8]
    tensors = layout(entry["config.json"], fp8=True)
    nbytes = [math.prod(t.shape) * (1 if t.kind == "fp8" else 2) for t in tensors]
    index = entry["model.safetensors.index.json"]
    assert index["metadata"]["total_size"] == sum(nbytes) == 237_569_692_128
    derived = index["derived"]
    assert derived["tensors"] == len(tensors) and derived["fp8_tensors"] == sum(
        t.kind == "fp8" for t in tensors
    )
    vision = sum(
        n for t, n in zip(tensors, nbytes, strict=True) if t.name.startswith(derived["vision_prefix"])
    )
    assert derived["vision_bytes"] == vision
    # The plan's own estimate of the vision tower (used before the download) is the same to 0.01%.
    estimate = plan.vision_params(entry["config.json"]["vision_config"]) * 2
    assert estimate == pytest.approx(vision, rel=1e-4)
    about = " ".join(DATA["about"])
    assert "WITHOUT access to the Hugging Face Hub" in about and "DERIVED" in about
    assert entry["revision_pinned"] is False and entry["source"].endswith(FP8)


@pytest.mark.unit
def test_the_carried_config_has_the_model_facts() -> None:
    """/work/shared/model-facts.md's table, as model.py reads it."""
    info = model.from_published("/nowhere", model.published(FP8))
    assert info.config_ok and info.planned_from and not info.issues
    assert info.architectures == ("Qwen3VLMoeForConditionalGeneration",) and info.model_type == "qwen3_vl_moe"
    assert (info.num_hidden_layers, info.hidden_size, info.num_attention_heads) == (94, 4096, 64)
    assert (info.num_key_value_heads, info.head_dim, info.vocab_size) == (4, 128, 151936)
    assert (info.num_experts, info.num_experts_per_tok, info.moe_intermediate_size) == (128, 8, 1536)
    assert info.max_position_embeddings == 262144 and info.max_model_len_limit == 262144
    assert (info.quant_method, info.quant_fmt, info.weight_block_size) == ("fp8", "e4m3", (128, 128))
    assert info.mrope_section == (24, 20, 20) and info.mrope_interleaved
    assert model.published("someone/else") is None


@pytest.mark.integration
def test_dry_run_without_the_checkpoint_prints_the_full_plan_and_exits_0(tmp_path: Path) -> None:
    """The README's "plan before you queue" on a login node, before the 238 GB download."""
    env = {
        **os.environ,
        "MODEL_PATH": str(tmp_path / "not-downloaded"),
        "RUN_DIR": str(tmp_path / "run"),
        "LOG_DIR": str(tmp_path / "logs"),
        "PORT": str(free_port()),
        "MEDIA_PORT": str(free_port()),
    }
    out = subprocess.run(
        [sys.executable, "start_service.py", "--dry-run", "--gpus", "8xH100-80GB"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.stdout
    assert out.returncode == 0, out.stdout + out.stderr
    assert not [line for line in text.splitlines() if line.startswith("  error")], text
    assert f"  warn  Model     {tmp_path / 'not-downloaded'}: not downloaded yet (no such folder)" in text
    assert f"the plan uses the published facts of {FP8}" in text
    assert "  ok    Parallel  TP=8:" in text and "expert parallel on" in text
    assert "  ok    Capacity  KV cache 38.09 GiB per GPU = 849,712 tokens" in text
    assert "221.25 GiB from the published total_size (derived; not downloaded yet)" in text
    command = text.split("vLLM command\n", 1)[1]
    assert "--enable-expert-parallel" in command and "--tensor-parallel-size 8" in command
    assert "--mm-encoder-tp-mode data" in command and command.rstrip().endswith(
        "would start: once the model is downloaded (download_model.py)"
    )


@pytest.mark.unit
def test_a_start_without_the_checkpoint_is_refused_with_the_plan_still_made(tmp_path: Path) -> None:
    cfg = load(tmp_path, tmp_path / "absent")
    start = preflight.run(cfg, gpu_spec="8xH100-80GB", environ={})
    (err,) = [f for f in start.findings if f.level == "error"]
    assert err.check == "Model" and "not downloaded yet" in err.message and "download_model.py" in err.fix
    assert start.plan is not None and start.plan.expert_parallel and start.plan.kv_tokens == 849_712
    dry = preflight.run(cfg, gpu_spec="8xH100-80GB", environ={}, dry_run=True)
    assert dry.ok and [f.level for f in dry.findings if f.check == "Model"] == ["warn"]


@pytest.mark.unit
def test_a_folder_without_config_json_yet_is_planned_from_the_published_facts(tmp_path: Path) -> None:
    folder = tmp_path / "downloading"
    folder.mkdir()
    (folder / "model-00001-of-00048.safetensors.incomplete").write_bytes(b"")
    report = preflight.run(load(tmp_path, folder), gpu_spec="8xH100-80GB", environ={}, dry_run=True)
    (note,) = [f for f in report.findings if f.check == "Model"]
    assert note.level == "warn" and "not downloaded yet (no config.json in it yet)" in note.message


@pytest.mark.unit
def test_the_cpu_demo_and_other_repos_borrow_no_facts(tmp_path: Path) -> None:
    cpu = preflight.run(
        load(tmp_path, tmp_path / "absent", DEVICE="cpu", TENSOR_PARALLEL_SIZE=1), environ={}, dry_run=True
    )
    assert any(f.level == "error" and "Model not found" in f.message for f in cpu.findings)
    other = preflight.run(
        load(tmp_path, tmp_path / "absent", MODEL_REPO="someone/else"),
        gpu_spec="8xH100-80GB",
        environ={},
        dry_run=True,
    )
    assert any(f.level == "error" and "Model not found" in f.message for f in other.findings)


def _downloaded(root: Path, repo: str = FP8, **config_changes: object) -> Path:
    """A realmodel folder with the manifest download_model.py writes (the repo it fetched)."""
    cfg = json.loads(json.dumps(realmodel.REAL_CONFIG))
    cfg["text_config"].update(config_changes)
    folder = realmodel.build(root, config=cfg, total_size=237_500_000_000)
    files = tuple(ManifestFile(p.name, p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file())
    write_manifest(folder, Manifest(repo, "main", "0" * 40, "2026-01-01T00:00:00", files))
    return folder


@pytest.mark.unit
def test_a_downloaded_folder_is_checked_against_the_carried_facts(tmp_path: Path) -> None:
    same = model.for_plan(model.inspect(_downloaded(tmp_path / "a")), FP8, dry_run=False)
    assert not same.errors and not same.planned_from
    assert any(f.level == "ok" and "agree with the published facts" in f.message for f in same.issues)

    changed = model.inspect(_downloaded(tmp_path / "b", num_hidden_layers=80))
    checked = model.for_plan(changed, FP8, dry_run=False)
    (warn,) = [f for f in checked.issues if f.level == "warn"]
    assert "differs from the facts this package carries" in warn.message
    assert "num_hidden_layers 80 here, 94 carried" in warn.message and "stale" in warn.fix
    # The plan uses the folder's own facts.
    assert checked.num_hidden_layers == 80

    # Another repo's download, or a folder without a manifest: nothing to compare with.
    other = model.inspect(_downloaded(tmp_path / "c", repo="someone/else", num_hidden_layers=80))
    assert model.for_plan(other, FP8, dry_run=False).issues == other.issues


@pytest.mark.unit
def test_a_total_size_far_from_the_derived_one_is_named(tmp_path: Path) -> None:
    info = model.inspect(_downloaded(tmp_path / "a"))
    assert model.published_differences(info, model.published(FP8)) == []
    far = dataclasses.replace(info, index_total_size=200_000_000_000)
    assert model.published_differences(far, model.published(FP8)) == [
        "total_size 200,000,000,000 here, 237,569,692,128 derived"
    ]


@pytest.mark.unit
def test_the_facts_ship_with_the_package() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert f'"qwen3_vl_service.planning" = ["{model.PUBLISHED_FILE}"]' in text


@pytest.mark.unit
def test_a_plan_from_the_published_facts_matches_a_plan_from_a_complete_download(tmp_path: Path) -> None:
    """Same facts in, same plan out: the only difference is where total_size came from."""
    cfg = load(tmp_path, tmp_path / "absent")
    before = plan.make(cfg, parse_spec("8xH100-80GB"), model.from_published(tmp_path, model.published(FP8)))
    folder = realmodel.build(tmp_path / "full", total_size=237_569_692_128)
    after = plan.make(cfg, parse_spec("8xH100-80GB"), model.inspect(folder))
    assert before.expert_parallel == after.expert_parallel is True
    assert before.kv_tokens == pytest.approx(after.kv_tokens, rel=1e-3)


@pytest.mark.unit
def test_a_download_under_way_is_sized_from_the_published_facts(tmp_path: Path) -> None:
    """config.json arrived, the index not yet: the plan is made, the missing index stays an error."""
    folder = tmp_path / "downloading"
    folder.mkdir()
    cfg = json.loads(json.dumps(DATA["checkpoints"][FP8]["config.json"]))
    (folder / "config.json").write_text(json.dumps(cfg))
    info = model.for_plan(model.inspect(folder), FP8, dry_run=True)
    assert info.weights_bytes == 237_569_692_128 and info.planned_from
    assert any("is not in" in f.message and "published total_size" in f.message for f in info.issues)
    assert any(f.level == "error" and "no model.safetensors.index.json" in f.message for f in info.issues)
    p = plan.make(load(tmp_path, folder), parse_spec("8xH100-80GB"), info)
    assert p.kv_tokens == 849_712 and p.expert_parallel
    # Another checkpoint's config.json in MODEL_PATH: no borrowed size.
    cfg["text_config"]["num_hidden_layers"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    assert model.for_plan(model.inspect(folder), FP8, dry_run=True).weights_bytes is None
