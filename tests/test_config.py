"""config.load(): typed values, sources, and one clear line for every bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3_vl_service.core.errors import ConfigError
from qwen3_vl_service.settings import config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.env"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_env_loads_with_sane_defaults():
    cfg = config.load(REPO / "config.env", environ={})
    assert cfg.port == 8010 and cfg.media_port == 8080
    assert cfg.tensor_parallel_size == 8
    assert cfg.dtype == "auto", "float16 risks overflow on a bfloat16 model"
    assert cfg.max_num_seqs == 0, "auto: the capacity plan decides (the seed's 4 leaves the GPUs idle)"
    assert cfg.served_model_name == "qwen3-vl-fp8"
    assert cfg.model_path == (REPO / "models/Qwen3-VL-235B-A22B-Thinking-FP8").resolve()
    # Every setting is written in the file, except those the profile gives (commented out there).
    from qwen3_vl_service.settings import profiles

    for key, src in cfg.sources.items():
        assert src == ("profile balanced" if key in profiles.PROFILE_KEYS else "file config.env"), key


def test_every_setting_is_documented_in_config_env():
    text = (REPO / "config.env").read_text()
    keys = {
        line.lstrip("#").split("=", 1)[0]
        for line in text.splitlines()
        if line and "=" in line and re.fullmatch(r"#?[A-Z_]+=\S*", line)
    }
    assert keys == {s.key for s in config.SETTINGS}


def test_environment_overrides_file_and_records_source(tmp_path):
    path = write(tmp_path, "PORT=9000\nTEMPERATURE=0.3\n")
    cfg = config.load(path, environ={"PORT": "9100"})
    assert cfg.port == 9100 and cfg.sources["PORT"] == "environment"
    assert cfg.temperature == 0.3 and cfg.sources["TEMPERATURE"] == "file config.env"
    assert cfg.sources["TOP_K"] == "profile balanced"
    assert cfg.sources["DTYPE"] == "default"


def test_file_is_not_loaded_into_os_environ(tmp_path):
    path = write(tmp_path, "MAX_TOKENS=123\nVLLM_CPU_KVCACHE_SPACE=1\n")
    before = dict(os.environ)
    cfg = config.load(path, environ={})
    assert dict(os.environ) == before
    assert cfg.vllm_env == {"VLLM_CPU_KVCACHE_SPACE": "1"}


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    path = write(tmp_path, "MEDIA_ROOT=pics\nLOG_DIR=/abs/logs\n")
    cfg = config.load(path, environ={})
    assert cfg.media_root == tmp_path / "pics"
    assert cfg.log_dir == Path("/abs/logs")


def test_values_are_typed_and_config_is_frozen(tmp_path):
    cfg = config.load(
        write(tmp_path, "ASYNC_SCHEDULING=no\nTOP_K=-1\nEXTRA_VLLM_ARGS=--enable-prefix-caching --seed 3\n"),
        environ={},
    )
    assert cfg.async_scheduling is False and cfg.top_k == -1
    assert cfg.extra_vllm_args == ("--enable-prefix-caching", "--seed", "3")
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


def test_api_key_is_masked_in_display_and_repr(tmp_path):
    cfg = config.load(write(tmp_path, "API_KEY=sk-verysecretvalue-123\n"), environ={})
    assert "verysecret" not in cfg.display_value("API_KEY")
    assert "verysecret" not in repr(cfg)


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, "TENSOR_PARALEL_SIZE=4\n"), environ={})
    assert "TENSOR_PARALEL_SIZE" in str(exc.value) and "did you mean TENSOR_PARALLEL_SIZE" in str(exc.value)


# (file text, environment, words the one-line error must contain)
BAD = [
    ("PORT=abc\n", {}, ["PORT", "'abc'", "whole number"]),
    ("PORT=0\n", {}, ["PORT", "'0'", "1..65535"]),
    ("PORT=70000\n", {}, ["PORT", "'70000'", "1..65535"]),
    ("", {"PORT": "eighty"}, ["PORT", "environment"]),
    ("GPU_MEMORY_UTIL=1.5\n", {}, ["GPU_MEMORY_UTIL", "'1.5'", "(0.0, 1.0]"]),
    ("GPU_MEMORY_UTIL=0\n", {}, ["GPU_MEMORY_UTIL", "(0.0, 1.0]"]),
    ("GPU_MEMORY_UTIL=nan\n", {}, ["GPU_MEMORY_UTIL"]),
    ("TOP_K=-5\n", {}, ["TOP_K", "'-5'", "or -1"]),
    ("TOP_K=0\n", {}, ["TOP_K", "'0'"]),
    ("TOP_P=0\n", {}, ["TOP_P"]),
    ("TEMPERATURE=hot\n", {}, ["TEMPERATURE", "not a number"]),
    ("TEMPERATURE=-0.1\n", {}, ["TEMPERATURE", "out of range"]),
    ("MAX_TOKENS=0\n", {}, ["MAX_TOKENS"]),
    ("MAX_MODEL_LEN=32k\n", {}, ["MAX_MODEL_LEN", "whole number"]),
    ("TENSOR_PARALLEL_SIZE=0\n", {}, ["TENSOR_PARALLEL_SIZE"]),
    ("DTYPE=fp16\n", {}, ["DTYPE", "auto, bfloat16, float16, float32"]),
    ("EXPERT_PARALLEL=maybe\n", {}, ["EXPERT_PARALLEL", "auto, on, off"]),
    ("ASYNC_SCHEDULING=sometimes\n", {}, ["ASYNC_SCHEDULING", "true/false"]),
    ("MEDIA_PORT=8010\n", {}, ["PORT=8010", "MEDIA_PORT=8010"]),
    ("PORT=8010\n# a comment\nPORT=8012\n", {}, ["PORT is set twice (lines 1 and 3)", "keep one PORT= line"]),
    ("TENSOR_PARALEL_SIZE=8\n", {}, ["TENSOR_PARALEL_SIZE", "did you mean TENSOR_PARALLEL_SIZE"]),
    ("this line is not a setting\n", {}, ["config.env:1", "cannot parse", "KEY=value"]),
    ("PORT=8010\nMAX_NUM_SEQS = 'unterminated\n", {}, ["config.env:2", "cannot parse"]),
    ("MEDIA_ALLOWED_TYPES=jpg,../etc\n", {}, ["MEDIA_ALLOWED_TYPES"]),
    ("EXTRA_VLLM_ARGS=--foo 'unclosed\n", {}, ["EXTRA_VLLM_ARGS", "shell"]),
    ("EXTRA_VLLM_ARGS=foo --bar\n", {}, ["EXTRA_VLLM_ARGS", "must start with a flag"]),
    ("EXTRA_VLLM_ARGS=--seed 1 --port 9999\n", {}, ["EXTRA_VLLM_ARGS", "--port is the launcher's: set PORT"]),
    ("EXTRA_VLLM_ARGS=--max_num_seqs=4\n", {}, ["EXTRA_VLLM_ARGS", "--max-num-seqs", "MAX_NUM_SEQS"]),
    ("EXTRA_VLLM_ARGS=--api-key sk-x9\n", {}, ["EXTRA_VLLM_ARGS=(not shown", "set API_KEY instead"]),
    ("GPUS=lots\n", {}, ["GPUS", "8xH100-80GB"]),
    ("SERVED_MODEL_NAME=my model\n", {}, ["SERVED_MODEL_NAME"]),
    ("DEVICE=tpu\n", {}, ["DEVICE", "gpu, cpu"]),
    ("DEVICE=cpu\nTENSOR_PARALLEL_SIZE=2\n", {}, ["DEVICE=cpu", "TENSOR_PARALLEL_SIZE=2"]),
    ("VLLM_PYTHON=venv/bin/python\n", {}, ["VLLM_PYTHON", "absolute"]),
    ("VLLM_API_KEY=abc\n", {}, ["VLLM_API_KEY", "API_KEY"]),
    # Issue 16, defect 1: one rule for the media settings, checked by config (so --dry-run reports it).
    ("MEDIA_ALLOWED_TYPES=txt,html\n", {}, ["MEDIA_ALLOWED_TYPES", "'txt' is not an image or video type"]),
    ("MEDIA_WORKERS=0\n", {}, ["MEDIA_WORKERS='0'", "auto, or 1..64"]),
]


@pytest.mark.parametrize(("text", "env", "words"), BAD, ids=[b[0].strip() or str(b[1]) for b in BAD])
def test_bad_input_is_one_line_exit_2_naming_the_key(tmp_path, text, env, words):
    path = write(tmp_path, text)
    run_env = {k: v for k, v in os.environ.items() if k not in {s.key for s in config.SETTINGS}}
    run_env.update(env)
    proc = subprocess.run(
        [sys.executable, str(REPO / "start_service.py"), "--config", str(path), "--dry-run"],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_missing_config_file_is_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "start_service.py"), "--config", str(tmp_path / "nope.env"), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "nope.env not found" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_command_line_flag_is_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "start_service.py"), "--dry-runn"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "--help" in proc.stderr and "Traceback" not in proc.stderr


def test_api_key_value_never_shown_in_an_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, "API_KEY=sk-secret-abcdef\nPORT=x\n"), environ={})
    assert "sk-secret" not in str(exc.value)
