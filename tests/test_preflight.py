"""preflight.run() / render(): every check together, on a directory shaped like the real model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import realmodel
from lifecycle_helpers import free_port
from test_gpus import H100_TOTAL, FakeNvml, h100

from qwen3_vl_service.core.names import MEDIA_PID_FILE
from qwen3_vl_service.media import client as media_client
from qwen3_vl_service.planning import preflight
from qwen3_vl_service.settings import config

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3
MiB = 1024**2
VLLM_ERROR = (
    "ValueError: The output_size of gate's and up's weight = 192 is not divisible by "
    "weight quantization block_n = 128."
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return realmodel.build(tmp_path_factory.mktemp("models") / "Qwen3-VL-235B-A22B-Thinking-FP8")


def make_cfg(tmp_path: Path, model_dir: Path, **settings) -> config.ServiceConfig:
    settings.setdefault("PORT", free_port())
    settings.setdefault("MEDIA_PORT", free_port())
    path = realmodel.write_config_env(tmp_path / "config.env", model_dir, **settings)
    return config.load(path, environ={})


def lines(report: preflight.Report, level: str, check: str | None = None) -> str:
    return "\n".join(
        f"{f.message} -> {f.fix}"
        for f in report.findings
        if f.level == level and (check is None or f.check == check)
    )


SLURM_OK = {
    "SLURM_JOB_ID": "4242",
    "SLURMD_NODENAME": "gpu017",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7",
    "SLURM_MEM_PER_NODE": str(900 * 1024),
}


def slurm_env(hours: float = 4.0, **extra: str) -> dict[str, str]:
    return {**SLURM_OK, "SLURM_JOB_END_TIME": str(int(time.time() + hours * 3600)), **extra}


# -- the dry run cases of the issue ---------------------------------------------------


@pytest.mark.unit
def test_8xh100_defaults_would_start_with_expert_parallelism(tmp_path, model_dir):
    # (How fast this answers is measured by bench/bench_dryrun.py, not asserted here.)
    report = preflight.run(make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ=slurm_env())
    assert report.ok, preflight.render(report)
    assert report.expert_parallel is True
    text = preflight.render(report)
    assert text.splitlines()[0].startswith("  ok    GPUs      8 x H100-80GB")
    assert "  ok    SLURM     job 4242 on gpu017, 8 GPUs (0,1,2,3,4,5,6,7)" in text
    assert "  ok    Parallel  expert parallelism switched on (EXPERT_PARALLEL=auto)" in text
    assert "  ok    Capacity  KV cache 38.27 GiB per GPU = 853,792 tokens" in text
    assert "    GPU  cuda  TP rank  weights GiB  KV GiB   KV tokens" in text
    assert "      7     7        7        28.41   38.27     853,792" in text
    assert "KV/token    94 layers x 1 KV head(s) per GPU x 128 x 2 (K,V) x 2 B (bfloat16) = 48,128 B" in text


@pytest.mark.unit
def test_expert_parallel_off_refuses_with_the_vllm_error(tmp_path, model_dir):
    report = preflight.run(
        make_cfg(tmp_path, model_dir, EXPERT_PARALLEL="off"), gpu_spec="8xH100-80GB", environ=slurm_env()
    )
    assert not report.ok and report.expert_parallel is False
    assert VLLM_ERROR in lines(report, "error", "Parallel")
    assert "  error Parallel  FP8 block quantization (128x128) and TP=8" in preflight.render(report)


@pytest.mark.unit
def test_tp4_needs_no_expert_parallelism(tmp_path, model_dir):
    env = slurm_env(SLURM_GPUS_ON_NODE="4", SLURM_JOB_GPUS="0,1,2,3")
    report = preflight.run(
        make_cfg(tmp_path, model_dir, TENSOR_PARALLEL_SIZE=4), gpu_spec="4xH100-80GB", environ=env
    )
    assert report.ok, preflight.render(report)
    assert report.expert_parallel is False
    assert "not needed: 1536/4 = 384 columns per GPU" in lines(report, "ok", "Parallel")


@pytest.mark.unit
def test_4xh100_at_262144_is_refused(tmp_path, model_dir):
    cfg = make_cfg(tmp_path, model_dir, TENSOR_PARALLEL_SIZE=4, MAX_MODEL_LEN=262144)
    report = preflight.run(cfg, gpu_spec="4xH100-80GB", environ={})
    assert not report.ok
    err = lines(report, "error", "Capacity")
    assert "one sequence of MAX_MODEL_LEN=262,144 needs 11.75 GiB" in err and "243,824 tokens" in err


@pytest.mark.unit
def test_missing_shard_is_named(tmp_path):
    d = realmodel.build(tmp_path / "m", missing=(17,))
    report = preflight.run(make_cfg(tmp_path, d), gpu_spec="8xH100-80GB", environ={})
    assert not report.ok
    assert "model-00017-of-00048.safetensors" in lines(report, "error", "Model")


@pytest.mark.unit
def test_missing_model_dir_says_to_download(tmp_path):
    report = preflight.run(make_cfg(tmp_path, tmp_path / "absent"), gpu_spec="8xH100-80GB", environ={})
    text = preflight.render(report)
    assert f"  error Model     {tmp_path / 'absent'}: not downloaded yet (no such folder)" in text
    assert "-> run download_model.py before starting" in text
    # The plan is made from the published facts the package carries (tests/test_published.py).
    assert report.expert_parallel is True
    # A model the package carries no facts for: nothing to plan from.
    other = make_cfg(tmp_path, tmp_path / "absent", MODEL_REPO="someone/else")
    report = preflight.run(other, gpu_spec="8xH100-80GB", environ={})
    text = preflight.render(report)
    assert f"  error Model     Model not found at {tmp_path / 'absent'} -> run download_model.py" in text
    # The decision falls back to the setting when there is no config.json to decide from.
    assert report.expert_parallel is False


@pytest.mark.integration
def test_busy_port_names_its_holder(tmp_path, model_dir):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(holder.stdout.readline())
        report = preflight.run(make_cfg(tmp_path, model_dir, PORT=port), gpu_spec="8xH100-80GB", environ={})
        assert not report.ok
        err = lines(report, "error", "Ports")
        assert f"PORT {port} on 127.0.0.1 is in use by another process: pid {holder.pid} (" in err
        assert "-c import socket, sys, time s = socket.socket()" in err  # its command line, on one line
        assert f"kill {holder.pid}" in err and "set PORT to a free port" in err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.integration
def test_media_port_held_by_a_silent_media_server_look_alike(tmp_path, model_dir):
    """Holds MEDIA_PORT with 'media_server.py' in its command line but answers no /health."""
    script = tmp_path / "media_server.py"
    script.write_text(
        textwrap.dedent(
            """
            import socket, time
            s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
            print(s.getsockname()[1], flush=True); time.sleep(120)
            """
        )
    )
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(holder.stdout.readline())
        report = preflight.run(
            make_cfg(tmp_path, model_dir, MEDIA_PORT=port), gpu_spec="8xH100-80GB", environ={}
        )
        err = lines(report, "error", "Ports")
        assert "held by our media server, but it does not answer /health" in err
        assert f"kill {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.integration
def test_our_healthy_media_server_is_reused(tmp_path, model_dir):
    cfg = make_cfg(tmp_path, model_dir)
    cfg.media_root.mkdir(parents=True, exist_ok=True)
    pid_file = cfg.run_dir / MEDIA_PID_FILE
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwen3_vl_service.media",
            "--host",
            "127.0.0.1",
            "--port",
            str(cfg.media_port),
            "--root",
            str(cfg.media_root),
            "--allowed-types",
            "jpg,png,mp4",
            "--log-file",
            str(tmp_path / "media.log"),
            "--pid-file",
            str(pid_file),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not media_client.is_ours_healthy("127.0.0.1", cfg.media_port, 0.5):
            assert server.poll() is None and time.monotonic() < deadline, "the media server did not come up"
            time.sleep(0.1)
        report = preflight.run(cfg, gpu_spec="8xH100-80GB", environ={})
        ok = lines(report, "ok", "Ports")
        assert f"MEDIA_PORT 127.0.0.1:{cfg.media_port} held by our media server" in ok and "reused" in ok
        assert lines(report, "error", "Ports") == ""
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- GPUs through (fake) NVML ------------------------------------------------------


@pytest.mark.unit
def test_no_driver_is_a_clear_error_line(tmp_path, model_dir):
    import pynvml

    fake = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    report = preflight.run(make_cfg(tmp_path, model_dir), environ={}, nvml=fake)
    assert not report.ok
    assert "  error GPUs      no NVIDIA driver on this node" in preflight.render(report)
    assert report.expert_parallel is True  # the layout is still decided from config.json
    assert "not planned: no GPUs to plan against" in lines(report, "warn", "Capacity")


@pytest.mark.unit
def test_nvml_inventory_with_fewer_visible_gpus(tmp_path, model_dir):
    report = preflight.run(
        make_cfg(tmp_path, model_dir), environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, nvml=FakeNvml()
    )
    assert "Requested 8 GPUs but only 4 available" in lines(report, "error", "GPUs")
    assert "4 x NVIDIA H100 80GB HBM3, 79.6 GiB each (79.2 GiB free); GPU 0-3" in lines(report, "ok", "GPUs")
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in lines(report, "ok", "GPUs")


@pytest.mark.unit
def test_nvml_busy_gpu_is_refused_and_its_process_named(tmp_path, model_dir):
    devices = [h100(i) for i in range(8)]
    devices[5] = h100(5, free=H100_TOTAL - 30 * GiB, procs=[(31337, 30 * GiB)])
    report = preflight.run(make_cfg(tmp_path, model_dir), environ=slurm_env(), nvml=FakeNvml(devices))
    assert not report.ok
    err = lines(report, "error", "GPUs")
    assert "GPU 5 has 49.65 GiB free, vLLM asks for 71.68 GiB" in err and "kill 31337" in err
    assert "GPU 5 (used by this plan): 1 other process(es) hold 30.0 GiB: pid 31337" in lines(
        report, "warn", "GPUs"
    )
    assert "driver 550.54.15, CUDA 12.4" in lines(report, "ok", "GPUs")


# -- SLURM -------------------------------------------------------------------------


@pytest.mark.unit
def test_outside_slurm_warns_or_refuses(tmp_path, model_dir):
    report = preflight.run(make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ={})
    assert "not inside a SLURM allocation" in lines(report, "warn", "SLURM") and report.ok
    strict = preflight.run(
        make_cfg(tmp_path, model_dir, REQUIRE_SLURM="true"), gpu_spec="8xH100-80GB", environ={}
    )
    assert "REQUIRE_SLURM=true" in lines(strict, "error", "SLURM") and not strict.ok


@pytest.mark.unit
def test_slurm_too_few_gpus_too_little_memory_too_little_time(tmp_path, model_dir):
    env = slurm_env(hours=0.05, SLURM_GPUS_ON_NODE="4", SLURM_JOB_GPUS="0-3", SLURM_MEM_PER_NODE="32000")
    report = preflight.run(make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ=env)
    err = lines(report, "error", "SLURM")
    assert "SLURM allocated 4 GPU(s) on this node, TENSOR_PARALLEL_SIZE=8 needs 8" in err
    assert "31.2 GiB of host memory" in err and "--mem=55G" in err
    assert "left; loading the model takes about" in err and "longer --time" in err


@pytest.mark.unit
def test_slurm_short_time_is_a_warning_when_loading_fits(tmp_path, model_dir):
    report = preflight.run(
        make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ=slurm_env(hours=0.5)
    )
    assert "leaving under 30 min of service" in lines(report, "warn", "SLURM")


@pytest.mark.unit
def test_older_slurm_without_end_time_asks_squeue(tmp_path, model_dir, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    end = int(time.time()) + 3 * 3600 + 120
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho 4242 {end}\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    report = preflight.run(make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ=dict(SLURM_OK))
    ok = lines(report, "ok", "SLURM")
    assert re.search(r"3h0[12]m\d\ds left \(from squeue\)", ok), ok
    # squeue gone or silent: unknown, and why.
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 1\n")
    report = preflight.run(make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ=dict(SLURM_OK))
    assert "time limit unknown (SLURM_JOB_END_TIME unset; squeue does not list job 4242)" in lines(
        report, "ok", "SLURM"
    )


@pytest.mark.unit
def test_bare_salloc_shell_is_flagged(tmp_path, model_dir):
    env = slurm_env()
    del env["SLURMD_NODENAME"]
    env["SLURM_JOB_NODELIST"] = "gpu017"
    report = preflight.run(make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ=env)
    assert "srun --jobid 4242 --pty bash" in lines(report, "warn", "SLURM")


# -- CPU mode, rendering, import weight ---------------------------------------------


@pytest.mark.unit
def test_cpu_device_skips_gpus_but_checks_model_and_ports(tmp_path, model_dir):
    cfg = make_cfg(tmp_path, model_dir, DEVICE="cpu", TENSOR_PARALLEL_SIZE=1)
    report = preflight.run(cfg, environ={}, nvml=FakeNvml(init_error=9))
    assert report.inventory is None
    assert "skipped: DEVICE=cpu" in lines(report, "ok", "GPUs")
    assert lines(report, "ok", "Model") and lines(report, "ok", "Ports")
    assert report.plan is not None and report.plan.kv_tokens is None
    assert "GPU  cuda" not in preflight.render(report)


@pytest.mark.unit
def test_cpu_device_in_a_short_small_job_is_not_held_to_the_gpu_estimates(tmp_path, model_dir):
    # Found under a real SLURM: the CPU demo in a 5-minute job was refused for the GPU
    # service's 5-minute warm-up estimate. The CPU backend has no such estimates.
    cfg = make_cfg(tmp_path, model_dir, DEVICE="cpu", TENSOR_PARALLEL_SIZE=1)
    env = slurm_env(hours=5 / 60, SLURM_MEM_PER_NODE="8000")
    report = preflight.run(cfg, environ=env, nvml=FakeNvml(init_error=9))
    assert not lines(report, "error", "SLURM") and not lines(report, "warn", "SLURM")
    assert "7.8 GiB memory" in lines(report, "ok", "SLURM") and " left" in lines(report, "ok", "SLURM")
    assert report.plan.expected_load_s is None and report.plan.host_memory_bytes is None


@pytest.mark.unit
def test_ports_can_be_left_out(tmp_path, model_dir):
    report = preflight.run(
        make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ={}, check_ports=False
    )
    assert not [f for f in report.findings if f.check == "Ports"]


@pytest.mark.unit
def test_render_colours_only_when_asked(tmp_path, model_dir):
    report = preflight.run(make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ={})
    assert "\033[" not in preflight.render(report)
    coloured = preflight.render(report, color=True)
    assert "\033[32mok   \033[0m" in coloured and "\033[33mwarn \033[0m" in coloured


@pytest.mark.unit
def test_findings_added_later_count(tmp_path, model_dir):
    report = preflight.run(make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ={})
    assert report.ok
    report.findings.append(preflight.Finding("error", "vLLM", "not installed", "install it"))
    assert not report.ok and report.errors[-1].check == "vLLM"


@pytest.mark.unit
def test_the_preflight_imports_neither_torch_nor_vllm_nor_transformers():
    code = (
        "import sys, qwen3_vl_service.planning.preflight\n"
        "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.unit
def test_run_dir_log_dir_and_media_root_must_be_folders(tmp_path, model_dir):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for key in ("RUN_DIR", "LOG_DIR", "MEDIA_ROOT"):
        report = preflight.run(
            make_cfg(tmp_path, model_dir, **{key: a_file}), gpu_spec="8xH100-80GB", environ=slurm_env()
        )
        assert f"{key}={a_file} is a file, not a folder -> point {key} at a folder" in lines(
            report, "error", "Folders"
        )
    assert a_file.read_text() == "mine"
    fine = preflight.run(make_cfg(tmp_path, model_dir), gpu_spec="8xH100-80GB", environ=slurm_env())
    assert lines(fine, "error", "Folders") == ""  # missing folders are made at the start


@pytest.mark.unit
def test_an_api_open_beyond_the_node_without_a_key_is_warned(tmp_path, model_dir):
    def access(**settings) -> str:
        cfg = make_cfg(tmp_path, model_dir, **settings)
        return lines(preflight.run(cfg, gpu_spec="8xH100-80GB", environ=slurm_env()), "warn", "Access")

    assert "HOST=0.0.0.0 serves the API beyond this node and API_KEY is not set" in access(HOST="0.0.0.0")
    assert access(HOST="0.0.0.0", API_KEY="sk-0123456789abcdef") == ""
    assert access(HOST="127.0.0.1") == ""
