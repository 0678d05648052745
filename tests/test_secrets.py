"""Secrets out of every display: which names say secret, and a whole start, status and stop grepped."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import realmodel
from lifecycle_helpers import PY, STANDIN, clean_env, free_port, kill_pids, run_tool

from qwen3_vl_service.core import secrets
from qwen3_vl_service.settings import config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.unit
@pytest.mark.parametrize(
    "name",
    [
        "API_KEY",
        "VLLM_API_KEY",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "WANDB_API_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "DB_PASSWORD",
        "NCCL_SOME_PASSWD",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "--hf-token",
        "--api-key",
        "apikey",
    ],
)
def test_names_that_say_secret(name):
    assert secrets.is_secret(name)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name", ["MAX_TOKENS", "TOKENIZERS_PARALLELISM", "KV_CACHE_DTYPE", "PORT", "--max-num-batched-tokens"]
)
def test_names_that_do_not(name):
    assert not secrets.is_secret(name)


@pytest.mark.unit
def test_a_masked_value_shows_nothing_of_it():
    assert secrets.mask("sk-abcdefghijklmnop") == "(set, masked)"
    assert secrets.mask("") == "(not set)"
    argv = ["python", "-m", "x", "--hf-token", "hf_A", "--api-key=sk-B", "--port", "1", "--token"]
    assert secrets.mask_argv(argv) == [
        "python",
        "-m",
        "x",
        "--hf-token",
        "(set, masked)",
        "--api-key=(set, masked)",
        "--port",
        "1",
        "--token",
    ]


@pytest.mark.unit
def test_a_secret_flag_in_extra_vllm_args_is_refused_without_echoing_it():
    with pytest.raises(config.ConfigError) as exc:
        config.load(None, environ={"EXTRA_VLLM_ARGS": "--hf-token hf_refusedrefused"})
    text = str(exc.value)
    assert "hf_refusedrefused" not in text and "every user sees in ps" in text and "HF_TOKEN" in text


# A token under each name pattern that is masked: a setting, and variables of the pass-through prefixes.
SECRETS = {
    "API_KEY": "sk-apikey-0123456789abcdef",
    "HF_TOKEN": "hf_tokenvalue0123456789abcdef",
    "VLLM_S3_SECRET": "vllm-secret-0123456789abcdef",
    "NCCL_IB_PASSWORD": "nccl-password-0123456789abcdef",
    "TORCH_HUB_KEY": "torch-key-0123456789abcdef",
    "TRANSFORMERS_AUTH_TOKEN": "tf-token-0123456789abcdef",
    "CUDA_PASSWD": "cuda-passwd-0123456789abcdef",
}

# Stands in for VLLM_PYTHON: the launcher's probe (-c ...) gets a version; started as vLLM's API
# server it becomes the stand-in server (tests/standin_server.py) on the port it was given.
FAKE_VLLM = """#!{py}
import os, sys
if sys.argv[1] == "-c":
    print("vllm 0.0.0-fake")
    sys.exit(0)
port = sys.argv[sys.argv.index("--port") + 1]
os.execv({py!r}, [{py!r}, {standin!r}, "--port", port, "--pids-file", {pids!r}])
"""


def _our_argvs() -> list[str]:
    """The command lines of every process on the node (a secret there is readable by any user)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace"))
    return out


@pytest.mark.integration
def test_no_output_log_or_record_of_a_whole_run_holds_a_secret(tmp_path):
    """Dry run, a supervised --detach start, status (text and JSON), stop --all: every output, every
    file under the run and log folders and every process's command line is grepped for each token."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_VLLM.format(py=PY, standin=str(STANDIN), pids=str(tmp_path / "pids.json")))
    fake.chmod(0o755)
    cfg = realmodel.write_config_env(
        tmp_path / "config.env",
        realmodel.build(tmp_path / "model"),
        DEVICE="cpu",
        TENSOR_PARALLEL_SIZE=1,
        EXPERT_PARALLEL="off",
        HOST="127.0.0.1",
        PORT=free_port(),
        MEDIA_PORT=free_port(),
        MEDIA_SERVER="false",
        RESTART="on-failure",
        STARTUP_TIMEOUT=60,
        SHUTDOWN_TIMEOUT=2,
        VLLM_PYTHON=fake,
        **SECRETS,
    )
    env = clean_env()
    outputs: dict[str, str] = {}

    def tool(label: str, *args: str) -> subprocess.CompletedProcess:
        r = run_tool(*args, env=env, timeout=180)
        outputs[label] = r.stdout + r.stderr
        return r

    dry = tool("dry run", "start_service.py", "--config", str(cfg), "--dry-run")
    assert dry.returncode == 0, outputs["dry run"]
    assert "HF_TOKEN" in dry.stdout and "(set, masked)" in dry.stdout  # shown as set, not its value
    argvs: list[str] = []
    try:
        start = tool("start", "start_service.py", "--config", str(cfg), "--detach")
        assert start.returncode == 0, outputs["start"]
        argvs = _our_argvs()
        status = tool("status", "status_service.py", "--config", str(cfg))
        assert status.returncode == 0, outputs["status"]
        tool("status --json", "status_service.py", "--config", str(cfg), "--json")
        assert json.loads(outputs["status --json"])["healthy"]
    finally:
        # --timeout 3: the stand-in's Worker_TP0 ignores SIGTERM; its SIGKILL comes after 3 s, not 10.
        stop = tool("stop", "stop_service.py", "--config", str(cfg), "--all", "--timeout", "3")
        if (tmp_path / "pids.json").exists():  # the stand-in's tree, should the stop have failed
            pids = json.loads((tmp_path / "pids.json").read_text())
            kill_pids([pids.get("api"), pids.get("engine"), *pids.get("workers", [])])
    assert stop.returncode == 0, outputs["stop"]

    # Every log and record (the model folder's shards are sparse files of their real sizes: not read).
    kept = [p for d in ("run", "logs") for p in (tmp_path / d).rglob("*") if p.is_file()]
    files = {str(p): p.read_bytes().decode("utf-8", "replace") for p in kept}
    assert any(p.endswith("service.log") for p in files) and any(p.endswith("supervisor.json") for p in files)
    hits = [
        f"{name} in {where}"
        for name, value in SECRETS.items()
        for where, text in [*outputs.items(), *files.items(), *(("a command line", a) for a in argvs)]
        if value in text
    ]
    assert hits == []
