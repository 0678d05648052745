"""bench/bench_serve.py's profile runs: the config copy a profile runs on, and its argument checks."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3_vl_service.settings import config

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_serve", REPO / "bench" / "bench_serve.py")
assert _spec and _spec.loader
bench_serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_serve)

CONFIG = """\
# the demo's settings, with the keys a profile sets
MODEL_PATH=demo/model
PROFILE=creative
MAX_MODEL_LEN=4096
MAX_TOKENS=64
TEMPERATURE=0.2
EXTRA_VLLM_ARGS="--skip-mm-profiling
  --enforce-eager"
PORT=8123
"""


@pytest.mark.unit
def test_a_profile_runs_on_a_copy_without_the_keys_a_profile_sets(tmp_path, monkeypatch):
    original = tmp_path / "my.env"
    original.write_text(CONFIG, encoding="utf-8")
    copy, dropped = bench_serve.profile_config(original, keep=False)
    try:
        assert copy.parent == tmp_path and copy != original  # beside it: relative paths mean the same
        assert dropped == ["PROFILE", "MAX_MODEL_LEN", "MAX_TOKENS", "TEMPERATURE"]
        monkeypatch.setenv("MAX_MODEL_LEN", "2048")  # the environment's value is left to the profile too
        env = bench_serve.profile_env("long-context", keep=False)
        assert "MAX_MODEL_LEN" not in env and env["PROFILE"] == "long-context"
        cfg = config.load(copy, environ=env)
        assert cfg.model_path == tmp_path / "demo" / "model"
        assert (cfg.max_model_len, cfg.max_tokens, cfg.temperature) == (65536, 8192, 0.7)
        assert cfg.sources["MAX_MODEL_LEN"] == "profile long-context"
        assert cfg.extra_vllm_args == ("--skip-mm-profiling", "--enforce-eager") and cfg.port == 8123
    finally:
        copy.unlink()
    assert original.read_text(encoding="utf-8") == CONFIG  # the user's file is untouched


@pytest.mark.unit
def test_keep_settings_runs_on_the_config_as_it_is(tmp_path, monkeypatch):
    original = tmp_path / "my.env"
    original.write_text(CONFIG, encoding="utf-8")
    assert bench_serve.profile_config(original, keep=True) == (original, [])
    monkeypatch.setenv("MAX_MODEL_LEN", "2048")
    env = bench_serve.profile_env("throughput", keep=True)
    cfg = config.load(original, environ=env)
    assert (cfg.max_model_len, cfg.max_tokens) == (2048, 64) and cfg.gpu_memory_util == 0.95


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profiles", "balanced,fastest"], "--profiles 'balanced,fastest': allowed balanced, throughput"),
        (["--modes", "ftp"], "--modes 'ftp': allowed base64, url, file"),
        (["--concurrency", "1,x"], "--concurrency '1,x': give whole numbers"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, args, message):
    path = tmp_path / "c.env"
    path.write_text(f"MEDIA_ROOT={tmp_path}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_serve.py"), "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], proc.stderr


@pytest.mark.integration
def test_profiles_refuse_a_port_that_something_already_answers_on(tmp_path):
    (tmp_path / "sample.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "c.env"
        path.write_text(f"HOST=127.0.0.1\nPORT={port}\nMEDIA_ROOT={tmp_path}\n", encoding="utf-8")
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "bench" / "bench_serve.py"),
                "--config",
                str(path),
                "--profiles",
                "balanced",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"error: something already answers on port {port}") and "Traceback" not in proc.stderr
    )
    assert not list(tmp_path.glob(".bench-serve-*.env")), "no config copy is left behind"


@pytest.mark.integration
def test_bench_gpu_says_in_one_line_what_is_missing(tmp_path):
    """bench/bench_gpu.py: a bad level (exit 2) and no running service (exit 1), never a traceback."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"text_config": {"num_hidden_layers": 2}}')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing answers there
    path = tmp_path / "c.env"
    path.write_text(f"HOST=127.0.0.1\nPORT={port}\nMODEL_PATH={model}\n", encoding="utf-8")
    script = str(REPO / "bench" / "bench_gpu.py")
    for args, code, message in (
        (["--concurrency", "0,8"], 2, "--concurrency '0,8': give whole numbers of at least 1"),
        ([], 1, f"the service does not answer http://127.0.0.1:{port}/health"),
    ):
        proc = subprocess.run(
            [sys.executable, script, "--config", str(path), *args], capture_output=True, text=True, timeout=60
        )
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(err) == 1 and message in err[0], proc.stderr
