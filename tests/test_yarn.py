"""ROPE_SCALING=yarn: settings -> --hf-overrides that the pinned vLLM applies; the 1M-token plan per GPU."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import realmodel
import warm_vllm

from qwen3_vl_service.core.errors import ConfigError
from qwen3_vl_service.machine.gpus import parse_spec
from qwen3_vl_service.planning import plan, vllm_args
from qwen3_vl_service.planning.model import inspect
from qwen3_vl_service.settings import config

REPO = Path(__file__).resolve().parents[1]
NATIVE = 262_144


def short_context_copy(tiny: Path, dest: Path, positions: int) -> Path:
    """A copy of the tiny model whose config.json knows only POSITIONS (weights linked, not copied)."""
    dest.mkdir(parents=True)
    for f in tiny.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f)
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = positions
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return realmodel.build(tmp_path_factory.mktemp("fp8") / "model")


def yarn_cfg(model: Path, **env: str) -> config.ServiceConfig:
    return config.load(REPO / "config.env", environ={"MODEL_PATH": str(model), "ROPE_SCALING": "yarn", **env})


def levels(p: plan.Plan, check: str) -> list[str]:
    return [f.level for f in p.findings if f.check == check]


def message(p: plan.Plan, check: str) -> str:
    return "\n".join(f"{f.message} -> {f.fix}" for f in p.findings if f.check == check)


@pytest.mark.unit
def test_factor_4_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as err:
        config.load(REPO / "config.env", environ={"ROPE_SCALING": "yarn", "ROPE_FACTOR": "4"})
    assert "ROPE_FACTOR='4'" in err.value.message and "model card advises 2 or 3" in err.value.message
    for bad in ("1.5", "x", "0"):
        with pytest.raises(ConfigError):
            config.load(REPO / "config.env", environ={"ROPE_FACTOR": bad})
    assert config.load(REPO / "config.env", environ={"ROPE_FACTOR": "3"}).rope_factor == 3.0


@pytest.mark.unit
def test_overrides_name_the_models_own_mrope_and_positions(real_dir: Path) -> None:
    cfg = yarn_cfg(real_dir, ROPE_FACTOR="3", MAX_MODEL_LEN="524288")
    p = plan.make(cfg, parse_spec("8xH200-141GB"), inspect(real_dir))
    rope = p.hf_overrides["text_config"]["rope_parameters"]
    assert rope == {
        "rope_type": "yarn",
        "factor": 3.0,
        "original_max_position_embeddings": NATIVE,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    }
    assert p.rope_positions == 786_432 and p.allow_long_max_model_len
    assert levels(p, "Context") == ["ok"]
    cmd = vllm_args.build(cfg, expert_parallel=True, plan=p)
    argv = list(cmd.argv)
    assert json.loads(argv[argv.index("--hf-overrides") + 1]) == p.hf_overrides
    assert "--rope-scaling" not in argv  # removed from vLLM (PR #28006)
    assert cmd.env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] == "1"
    # Without YaRN: no override, and 524288 is beyond the model's positions.
    plain = config.load(REPO / "config.env", environ={"MODEL_PATH": str(real_dir), "MAX_MODEL_LEN": "524288"})
    q = plan.make(plain, parse_spec("8xH200-141GB"), inspect(real_dir))
    assert q.hf_overrides is None and "exceeds the model's 262144 positions" in message(q, "Context")
    assert "--hf-overrides" not in vllm_args.build(plain, expert_parallel=True, plan=q).argv


@pytest.mark.unit
def test_one_million_tokens_per_hardware(real_dir: Path) -> None:
    """44.8 GiB of KV cache per GPU at TP 8 (BF16 KV): too much for 8 x H100; fp8 KV or 8 x H200 hold it."""
    env = {"ROPE_FACTOR": "3", "MAX_MODEL_LEN": "1000000"}
    info = inspect(real_dir)
    h100 = plan.make(yarn_cfg(real_dir, **env), parse_spec("8xH100-80GB"), info)
    err = message(h100, "Capacity")
    assert levels(h100, "Capacity") == ["error"]
    assert "one sequence of MAX_MODEL_LEN=1,000,000 needs 44.82 GiB of KV cache per GPU" in err
    assert "only 38.27 GiB (853,792 tokens)" in err
    assert "set KV_CACHE_DTYPE=fp8 (holds 1,707,584 tokens)" in err and "use 8 x H200-141GB" in err
    # Past the 786,432 positions of factor 3: said, not hidden (the model card's 1M relies on media).
    assert levels(h100, "Context") == ["warn"] and "786,432" in message(h100, "Context")

    fp8 = plan.make(yarn_cfg(real_dir, KV_CACHE_DTYPE="fp8", **env), parse_spec("8xH100-80GB"), info)
    assert levels(fp8, "Capacity") == ["ok"] and fp8.kv_tokens == 1_707_584 and fp8.max_concurrency == 1
    assert "1 sequence of MAX_MODEL_LEN=1,000,000 at once" in message(fp8, "Capacity")
    h200 = plan.make(yarn_cfg(real_dir, **env), parse_spec("8xH200-141GB"), info)
    assert levels(h200, "Capacity") == ["ok"] and h200.kv_tokens == 2_073_664 and h200.max_concurrency == 2
    assert h200.kv_bytes_per_token_per_gpu * 1_000_000 / 1024**3 == pytest.approx(44.82, abs=0.01)


@pytest.mark.unit
def test_yarn_within_native_positions_warns_and_past_four_times_is_refused(real_dir: Path) -> None:
    info = inspect(real_dir)
    within = plan.make(yarn_cfg(real_dir), parse_spec("8xH100-80GB"), info)
    assert levels(within, "Context") == ["warn"] and "ROPE_SCALING=none" in message(within, "Context")
    assert not within.allow_long_max_model_len
    far = plan.make(yarn_cfg(real_dir, MAX_MODEL_LEN="1100000"), parse_spec("8xH200-141GB"), info)
    assert "error" in levels(far, "Context") and "1,048,576" in message(far, "Context")


@pytest.mark.unit
def test_a_context_past_the_native_positions_names_yarn_its_factor_and_what_the_gpus_hold(
    real_dir: Path,
) -> None:
    """Issue 24, item 3: the original service's 1M was YaRN; every fix offered is one the plan accepts."""
    info = inspect(real_dir)
    base = {"MODEL_PATH": str(real_dir)}
    h100 = parse_spec("8xH100-80GB")
    million = plan.make(
        config.load(REPO / "config.env", environ={**base, "MAX_MODEL_LEN": "1000000"}), h100, info
    )
    err = message(million, "Context")
    assert levels(million, "Context") == ["error"] and "exceeds the model's 262144 positions" in err
    assert "set ROPE_SCALING=yarn ROPE_FACTOR=3 (786,432 positions" in err
    assert "these GPUs hold 853,792 KV tokens, not one sequence of 1,000,000" in err
    assert "add KV_CACHE_DTYPE=fp8 (1,707,584 tokens: 1 sequence)" in err
    # No fix names more GPUs than a node has: one TP group never spans nodes (was "use 16 GPUs").
    assert not any("16 GPUs" in f.fix or "TENSOR_PARALLEL_SIZE=16" in f.fix for f in million.findings)
    # The fix as written plans: YaRN factor 3 with fp8 KV on the same GPUs has no error left.
    fixed = {
        **base,
        "MAX_MODEL_LEN": "1000000",
        "ROPE_SCALING": "yarn",
        "ROPE_FACTOR": "3",
        "KV_CACHE_DTYPE": "fp8",
    }
    ok = plan.make(config.load(REPO / "config.env", environ=fixed), h100, info)
    assert [f for f in ok.findings if f.level == "error"] == [] and ok.kv_tokens >= 1_000_000

    # Within factor 2: the smallest factor that reaches it, and the sequences the GPUs then hold.
    short = plan.make(
        config.load(REPO / "config.env", environ={**base, "MAX_MODEL_LEN": "300000"}), h100, info
    )
    assert "set ROPE_SCALING=yarn ROPE_FACTOR=2 (524,288 positions); these GPUs then hold 2 sequences" in (
        message(short, "Context")
    )
    env2 = {**base, "MAX_MODEL_LEN": "300000", "ROPE_SCALING": "yarn", "ROPE_FACTOR": "2"}
    ok2 = plan.make(config.load(REPO / "config.env", environ=env2), h100, info)
    assert [f for f in ok2.findings if f.level == "error"] == []
    # Past what YaRN may reach (4 x native): no YaRN offered, only the lower length.
    far = plan.make(
        config.load(REPO / "config.env", environ={**base, "MAX_MODEL_LEN": "2000000"}), h100, info
    )
    assert "ROPE_SCALING" not in message(far, "Context") and "lower MAX_MODEL_LEN to 262144" in message(
        far, "Context"
    )
    # The Context line comes before the Capacity line, as the checks run.
    checks = [f.check for f in million.findings]
    assert checks.index("Context") < checks.index("Capacity")


# The pinned vLLM's own parser and ModelConfig: the override reaches the text config and the
# length vLLM will serve (what `vllm serve` does with these flags before loading any weight).
PROBE = """
import json, sys
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:  # vLLM before the launchers package
    from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
ns = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
try:
    mc = AsyncEngineArgs.from_cli_args(ns).create_model_config()
except Exception as exc:
    print(json.dumps({"error": str(exc)[:300]}))
    raise SystemExit(0)
print(json.dumps({"hf_overrides": ns.hf_overrides, "max_model_len": mc.max_model_len,
                  "rope": mc.hf_text_config.rope_parameters}))
"""


@pytest.mark.integration
def test_pinned_vllm_applies_the_override_beyond_the_native_length(tmp_path: Path) -> None:
    child = warm_vllm.ready()
    from devtools import tiny_model

    tiny = tiny_model.generate(tmp_path / "tiny")
    model = short_context_copy(tiny, tmp_path / "short", 1024)
    cfg = config.load(
        REPO / "config.demo.env",
        environ={"MODEL_PATH": str(model), "ROPE_SCALING": "yarn", "MAX_MODEL_LEN": "2048"},
    )
    p = plan.make(cfg, None, inspect(model))
    assert p.rope_positions == 2048 and p.allow_long_max_model_len
    assert p.hf_overrides["text_config"]["rope_parameters"]["mrope_section"] == [6, 5, 5]
    cmd = vllm_args.build(cfg, expert_parallel=False, plan=p)

    def probe(env: dict[str, str]) -> dict:
        base = {k: v for k, v in os.environ.items() if k != "VLLM_ALLOW_LONG_MAX_MODEL_LEN"}
        run_env = vllm_args.with_inherited(env, base)
        out = child.run(PROBE, *cmd.argv[3:], env=run_env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    got = probe(dict(cmd.env))
    assert got.get("error") is None, got
    assert got["max_model_len"] == 2048
    assert got["rope"]["rope_type"] == "yarn" and got["rope"]["factor"] == 2.0
    assert got["rope"]["original_max_position_embeddings"] == 1024
    assert got["rope"]["mrope_section"] == [6, 5, 5] and got["rope"]["mrope_interleaved"] is True
    assert got["rope"]["rope_theta"] == 5000000, "the override merges into the text config, keeping the rest"
    # Without VLLM_ALLOW_LONG_MAX_MODEL_LEN the pinned vLLM refuses the length: it is needed.
    without = probe({k: v for k, v in cmd.env.items() if k != "VLLM_ALLOW_LONG_MAX_MODEL_LEN"})
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" in without.get("error", ""), without
    shutil.rmtree(tmp_path / "tiny", ignore_errors=True)
