"""gpu_smoke: its config, its reading of vLLM's log, and the whole script on the CPU demo (e2e)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from lifecycle_helpers import free_port
from skips import require

from devtools import gpu_smoke
from qwen3_vl_service.settings import config

REPO = Path(__file__).resolve().parents[1]

# Lines as vLLM 0.26.0 prints them (formats from its kernels/linear/__init__.py,
# fused_moe/oracle/fp8.py and v1/core/kv_cache_utils.py), with the process prefix.
_CORE = "(EngineCore_DP0 pid=4242) INFO 12-01 20:41:07"
LOG_026 = f"""\
{_CORE} [__init__.py:604] Selected CutlassFp8BlockScaledMMKernel for Fp8LinearMethod
{_CORE} [fp8.py:325] Using TRITON Fp8 MoE backend out of potential backends: ['TRITON', 'DEEPGEMM'].
(EngineCore_DP0 pid=4242) INFO 12-01 20:42:10 [kv_cache_utils.py:2177] GPU KV cache size: 1,234,560 tokens
(APIServer pid=4200) INFO 12-01 20:42:30 [api_server.py:1] Starting vLLM API server 0 on http://127.0.0.1:8010
"""
ENGINE_LINE = (
    f"{_CORE} [core.py:133] Initializing a V1 LLM engine (v0.26.0) with config: model='/m', "
    "speculative_config=None, dtype=torch.bfloat16, max_seq_len=786432, download_dir=None\n"
)


def _args(tmp_path: Path, device: str) -> Namespace:
    return Namespace(
        out=tmp_path, device=device, port=8123, media_port=8124, max_tokens=32, python=sys.executable
    )


@pytest.mark.unit
@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_the_written_config_is_valid_and_has_the_production_flags(tmp_path, device):
    tp = 2 if device == "gpu" else 1
    path = gpu_smoke.write_config(_args(tmp_path, device), tmp_path / "model", tmp_path / "media", tp=tp)
    cfg = config.load(path, environ={})
    assert (cfg.device, cfg.tensor_parallel_size, cfg.port, cfg.media_port) == (device, tp, 8123, 8124)
    assert cfg.media_server and cfg.reasoning_parser == "deepseek_r1"
    if device == "gpu":
        assert cfg.expert_parallel == "auto" and cfg.mm_encoder_tp_mode == "data" and cfg.async_scheduling


@pytest.mark.unit
def test_log_facts_show_the_fp8_kernels_and_kv_beside_the_plan():
    lines = gpu_smoke.log_facts(LOG_026, plan_kv=1_200_000)
    text = "\n".join(lines)
    assert "CutlassFp8BlockScaledMMKernel" in text and "TRITON Fp8 MoE backend" in text
    assert "vLLM GPU 1,234,560 tokens; plan 1,200,000, plan/vLLM = 0.972" in text
    assert "no block-FP8 line" in "\n".join(gpu_smoke.log_facts("INFO nothing", None))
    assert "max length  vLLM max_seq_len=786,432" in "\n".join(
        gpu_smoke.log_facts(ENGINE_LINE + LOG_026, None)
    )
    assert "max length" not in text  # no engine line, no claim


@pytest.mark.unit
def test_yarn_serves_native_positions_times_the_factor(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"text_config": {"max_position_embeddings": 262144}}')
    args = _args(tmp_path, "gpu")
    args.yarn = 3
    cfg = config.load(gpu_smoke.write_config(args, model, tmp_path / "media", tp=1), environ={})
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.max_model_len) == ("yarn", 3, 786_432)
    assert cfg.sources["MAX_MODEL_LEN"].startswith("file")


@pytest.mark.unit
def test_every_request_kind_is_sent():
    kinds = [k for k, _p, _b in gpu_smoke.request_kinds("http://h", "http://m", "x", "QUJD", 8)]
    assert kinds == [
        "health", "models", "text", "image (media URL)", "image (base64)", "video (media URL)",
        "multi-turn", "streaming", "completions",
    ]  # fmt: skip


@pytest.mark.e2e
@pytest.mark.smoke  # what test_e2e proves, once more through the script: CI runs it
@pytest.mark.timeout(900)  # a start: about a minute alone, more beside others
def test_gpu_smoke_script_runs_on_the_cpu_demo(tmp_path, tiny_model):
    """scripts/gpu_smoke.sh itself, with DEVICE=cpu and the session's tiny BF16 model (--model): start,
    every request kind, vLLM's lines, the status view and the stop with nothing left. Its --crash
    (kill -9 of the EngineCore under the supervisor) is test_faults's engine kill and its --bench
    is bench_gpu.py, run against the demo below: each costs a vLLM start here, and they run on
    every GPU visit (scripts/gpu_visit.sh)."""
    require("vllm")  # found, not imported: the script's start imports it (a broken vLLM fails there)
    port, media_port = free_port(), free_port()
    cmd = [
        "bash", str(REPO / "scripts" / "gpu_smoke.sh"), str(tmp_path / "smoke"), "2",
        "--device", "cpu", "--port", str(port), "--media-port", str(media_port),
        # The session's tiny model (devtools.tiny_model, as the script's own CPU checkpoint step makes it).
        "--model", str(tiny_model),
    ]  # fmt: skip
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    # vLLM runs eagerly here as in every test (tests/conftest.py: VLLM_CPU_CI_ENV): the inductor
    # compile of its default path cost this run 50 s alone and 150 s in CI, cold, for vLLM's kernels.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for kind in ("health", "models", "text", "image (media URL)", "image (base64)", "video (media URL)",
                 "multi-turn", "streaming", "completions"):  # fmt: skip
        assert f"ok   {kind}" in out, kind
    assert "KV cache    vLLM CPU" in out and "status_service.py:" in out
    assert "ok   stop: exit 0" in out and re.search(r"stopped \d+ process\(es\)", out), out[-3000:]
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("gpu_smoke: ") and last.endswith(" ok") and "failed" not in last, last
    for p in (port, media_port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # both ports free again: nothing of ours is left


@pytest.mark.e2e
def test_bench_gpu_tabulates_the_demo_services_speed(demo):
    """bench/bench_gpu.py (gpu_smoke --bench) against the running demo: one vllm bench serve child
    (bench/vllm_bench.py) for the warm-up waves, the text level and the image TTFT run."""
    proc = demo.script(
        "bench/bench_gpu.py", "--concurrency", "1", "--input-len", "32", "--output-len", "8",
        "--image-prompts", "1", "--image-size", "256", "--bandwidth-gbs", "20", timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    (row,) = [ln for ln in lines if ln.strip().startswith("1 |")]
    tps, tpot, tps94, tpot94 = (float(x) for x in row.split("|")[1].split() + row.split("|")[2].split())
    assert tps > 0 and tpot > 0 and tpot94 > tpot and tps94 < tps  # 94 layers read more than 2
    floor_tpot, floor_tps, ratio = (float(x) for x in row.split("|")[3].split())
    # The floor at 20 GB/s: one sequence's step reads the 94-layer active bytes once.
    assert floor_tpot > 0 and abs(floor_tps - 1000 / floor_tpot) <= 1
    assert abs(ratio - floor_tpot / tpot94) <= 0.01
    assert any(ln.startswith("image 256x256 + 16-token prompt: TTFT ") for ln in lines), proc.stdout


@pytest.mark.unit
def test_a_gpu_process_of_the_service_left_after_the_stop_fails_the_run(monkeypatch):
    from qwen3_vl_service.machine import processes

    monkeypatch.setattr(processes, "gpu_pids", lambda: [(0, 4321), (1, 999)])  # NVML: the hardware edge
    bad = gpu_smoke.no_gpu_process_left(None, {4321, 4322})
    assert not bad.ok and "GPU 0: pid 4321" in bad.detail
    good = gpu_smoke.no_gpu_process_left(None, {4322})
    assert good.ok and "none of the 1 that the service ran" in good.detail

    def no_nvml():
        raise processes.NvmlUnavailable("NVML did not start")

    monkeypatch.setattr(processes, "gpu_pids", no_nvml)
    assert not gpu_smoke.no_gpu_process_left(None, set()).ok


@pytest.mark.unit
def test_the_long_prompt_uses_no_special_token_id(tmp_path):
    text = {"vocab_size": 4096, "bos_token_id": 4000, "eos_token_id": 4002}
    cfg = {"image_token_id": 4012, "video_token_id": 4013, "vision_start_token_id": 4009, "text_config": text}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = gpu_smoke.ordinary_token_ids(tmp_path, 50_000)
    assert len(ids) == 50_000 and min(ids) >= 10 and max(ids) < 4000
    assert len(set(ids)) == 3990  # every ordinary id, none of the specials
