# ruff: noqa: E501 - vLLM log lines are quoted verbatim
"""readiness: phase from vLLM's log lines, likely causes, and waiting for /health with real processes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from lifecycle_helpers import PY, STANDIN, clean_env, free_port, kill_pids

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.lifecycle import readiness

# Lines as vLLM 0.32 / uvicorn print them (prefixes as in a TP=8 run).
STARTUP = [
    "INFO 11-29 10:00:00 [api_server.py:1] vLLM server version 0.32.0, serving model /models/Qwen3-VL",
    "INFO 11-29 10:00:01 [utils.py:2] non-default args: {'model': '/models/Qwen3-VL', 'tensor_parallel_size': 8}",
    "(EngineCore pid=201) INFO 11-29 10:00:20 [gpu_model_runner.py:5040] Starting to load model /models/Qwen3-VL...",
    "(Worker_TP0 pid=300) INFO 11-29 10:00:21 [weight_utils.py:1106] Filesystem type for checkpoints: LUSTRE. "
    "Checkpoint size: 220.00 GiB. Available RAM: 1800.00 GiB.",
    "(Worker_TP0 pid=300) Loading safetensors checkpoint shards:   0% Completed | 0/48 [00:00<?, ?it/s]",
    "(Worker_TP0 pid=300) Loading safetensors checkpoint shards:  25% Completed | 12/48 [01:00<03:00, 5.00s/it]",
    "(Worker_TP0 pid=300) INFO 11-29 10:05:00 [default_loader.py:502] Loading weights took 280.00 seconds",
    "(Worker_TP0 pid=300) INFO 11-29 10:05:01 [gpu_model_runner.py:5150] Model loading took 27.5 GiB memory and 281.0 seconds",
    "(Worker_TP0 pid=300) INFO 11-29 10:05:10 [monitor.py:40] Starting torch.compile",
    "(Worker_TP0 pid=300) INFO 11-29 10:06:10 [monitor.py:62] torch.compile took 60.00 s in total",
    "(Worker_TP0 pid=300) INFO 11-29 10:06:20 [monitor.py:91] Initial profiling/warmup run took 8.00 s",
    "(Worker_TP0 pid=300) INFO 11-29 10:06:30 [gpu_worker.py:760] Available KV cache memory: 35.2 GiB",
    "(EngineCore pid=201) INFO 11-29 10:06:31 [kv_cache_utils.py:2328] GPU KV cache size: 1,200,000 tokens, "
    "Maximum concurrency for 32,768 tokens per request: 36.62x",
    "(Worker_TP0 pid=300) Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  45%|####5     | 30/67 [00:05<00:06,  5.8it/s]",
    "(Worker_TP0 pid=300) INFO 11-29 10:07:00 [gpu_model_runner.py:6582] Graph capturing finished in 20 secs, took 1.2 GiB",
    "(EngineCore pid=201) INFO 11-29 10:07:01 [core.py:403] init engine (profile, create kv cache, warmup model) took 120.00 s",
    "INFO 11-29 10:07:05 [entry.py:140] Starting vLLM server on http://127.0.0.1:8010",
    "INFO:     Started server process [100]",
    "INFO:     Waiting for application startup.",
    "INFO:     Application startup complete.",
]
EXPECTED = [
    "starting vLLM",
    "starting vLLM",
    "loading the model",
    "loading weights",
    "loading weights: shard 0/48",
    "loading weights: shard 12/48",
    "weights loaded",
    "weights loaded",
    "compiling (torch.compile)",
    "compiled",
    "profiling memory",
    "allocating the KV cache",
    "allocating the KV cache",
    "capturing CUDA graphs 30/67",
    "CUDA graphs captured",
    "engine ready, starting the API server",
    "starting the API server",
    "starting the API server",
    "starting the API server",
    "ready",
]


@pytest.mark.unit
def test_phase_follows_startup() -> None:
    assert len(STARTUP) == len(EXPECTED)
    assert readiness.phase([]) == "starting"
    for n in range(1, len(STARTUP) + 1):
        assert readiness.phase(STARTUP[:n]) == EXPECTED[n - 1], STARTUP[n - 1]


@pytest.mark.unit
def test_phase_failure_sticks() -> None:
    lines = [
        *STARTUP[:3],
        "OSError: [Errno 98] Address already in use",
        "INFO:     Shutting down",
    ]
    assert readiness.phase(lines) == "failed: port already in use"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("log", "expect"),
    [
        (
            "ValueError: The output_size of gate's and up's weight = 192 is not divisible by weight quantization block_n = 128.",
            "EXPERT_PARALLEL",
        ),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "out of GPU memory"),
        (
            "ValueError: To serve at least one request with the model's max seq len (262144), (48.0 GiB KV cache is "
            "needed, which is larger than the available KV cache memory (30.1 GiB).",
            "MAX_MODEL_LEN",
        ),
        (
            "ValueError: Free memory on device cuda:0 (10.1/79.1 GiB) on startup is less than desired GPU memory "
            "utilization (0.9, 71.2 GiB).",
            "already partly in use",
        ),
        ("RuntimeError: NCCL error: unhandled system error (run with NCCL_DEBUG=INFO for details)", "NCCL"),
        (
            "torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, ncclSystemError",
            "NCCL",
        ),
        ("OSError: [Errno 98] Address already in use", "port is already in use"),
        (
            "TimeoutError: Timed out waiting for engine core processes to start. This is often caused by slow "
            "weight loading for large models. Waited 600s (configured by VLLM_ENGINE_READY_TIMEOUT_S).",
            "STARTUP_TIMEOUT",
        ),
        (
            "/usr/bin/python3: Error while finding module specification for 'vllm.entrypoints.openai.api_server' "
            "(ModuleNotFoundError: No module named 'vllm')",
            "VLLM_PYTHON",
        ),
        ("ModuleNotFoundError: No module named 'vllm'", "VLLM_PYTHON"),
        ("RuntimeError: Cannot find any model weights with `/models/x`", "download_model.py"),
        ("OSError: Invalid repository ID or local directory specified: '/models/x'.", "download_model.py"),
        (
            "FileNotFoundError: [Errno 2] No such file or directory: '/models/x/config.json'",
            "download_model.py",
        ),
        ("RuntimeError: CPUFp8BlockScaledMMKernel requires AMX tile support", "GPU nodes"),
        (
            "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
            "root cause",
        ),
    ],
)
def test_diagnose(log: str, expect: str) -> None:
    cause = readiness.diagnose(f"INFO some line\n{log}\nINFO another line")
    assert cause is not None and expect in cause


@pytest.mark.unit
def test_diagnose_prefers_the_root_cause() -> None:
    text = "\n".join(
        [
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB",
            "RuntimeError: Engine core initialization failed. See root cause above.",
        ]
    )
    assert "out of GPU memory" in readiness.diagnose(text)
    assert readiness.diagnose("INFO all fine\nINFO still fine") is None


@pytest.mark.unit
def test_log_follower_handles_rotation(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("old run line\n")
    f = readiness.LogFollower(log, offset=readiness.log_size(log))
    with open(log, "a") as fh:
        fh.write("Starting to load model x\npartial")
    assert f.poll() == ["Starting to load model x"]
    log.write_text("Starting torch.compile\n")  # rotated: a new, shorter file
    assert f.poll() == ["Starting torch.compile"]
    assert f.tracker.phase == "compiling (torch.compile)"
    assert "old run line" not in f.lines


# ---------------------------------------------------------------------------
# wait_healthy against a real process and a real port


def _start(tmp_path: Path, port: int, *args: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "service.log"
    fh = open(log, "ab")  # noqa: SIM115 - handed to the child; closed below
    p = subprocess.Popen(
        [PY, str(STANDIN), "--port", str(port), "--no-children", *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=clean_env(),
    )
    fh.close()
    return p, log


@pytest.mark.integration
def test_wait_healthy_reports_phases_then_returns(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "service.log").write_text("an earlier run: CUDA out of memory\n")
    offset = readiness.log_size(tmp_path / "service.log")
    p, log = _start(tmp_path, port, "--startup-delay", "3")
    seen: list[str] = []
    try:
        readiness.wait_healthy(
            f"http://127.0.0.1:{port}/health",
            is_alive=lambda: p.poll() is None,
            log_file=log,
            timeout=60,
            on_progress=seen.append,
            poll=0.2,
            log_offset=offset,
        )
    finally:
        kill_pids([p.pid])
        p.wait(5)
    phases = [s.rsplit(" (", 1)[0] for s in seen]
    assert phases[-1] == "ready"
    for want in ("loading weights: shard 1/2", "compiling (torch.compile)", "capturing CUDA graphs 1/2"):
        assert want in phases, phases
    assert seen[0].endswith("s)")  # elapsed time shown


def _wait(p, log: Path, port: int, *, timeout: float, on_progress=lambda s: None) -> None:
    """wait_healthy on the stand-in P, reading its LOG from the start."""
    readiness.wait_healthy(
        f"http://127.0.0.1:{port}/health",
        is_alive=lambda: p.poll() is None,
        log_file=log,
        timeout=timeout,
        on_progress=on_progress,
        poll=0.2,
        log_offset=0,
    )


@pytest.mark.integration
def test_wait_healthy_process_dies_with_cause(tmp_path: Path) -> None:
    port = free_port()
    p, log = _start(
        tmp_path, port, "--fail-with", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20 GiB"
    )
    try:
        with pytest.raises(readiness.StartupFailed) as info:
            _wait(p, log, port, timeout=60)
    finally:
        kill_pids([p.pid])
        p.wait(5)
    exc = info.value
    assert isinstance(exc, CheckFailed) and exc.exit_code == 1
    assert "vLLM exited during startup" in str(exc)
    assert any("CUDA out of memory" in line for line in exc.tail)
    assert "out of GPU memory" in exc.cause
    assert f"last {len(exc.tail)} lines of {log}" in str(exc)


@pytest.mark.integration
def test_wait_healthy_times_out(tmp_path: Path) -> None:
    port = free_port()
    p, log = _start(tmp_path, port, "--never-listen")
    t0 = time.monotonic()
    try:
        with pytest.raises(readiness.StartupFailed) as info:
            _wait(p, log, port, timeout=2)
    finally:
        kill_pids([p.pid])
        p.wait(5)
    assert 2 <= time.monotonic() - t0 < 10
    assert "did not answer" in str(info.value)
    assert "STARTUP_TIMEOUT" in info.value.cause


@pytest.mark.integration
def test_wait_healthy_ignores_earlier_runs_by_default(tmp_path: Path) -> None:
    """The log is appended to across runs: an old error must not become this start's cause."""
    port = free_port()
    log = tmp_path / "service.log"
    log.write_text("torch.OutOfMemoryError: CUDA out of memory (an earlier run)\n")
    p = subprocess.Popen([PY, "-c", "import time; time.sleep(1)"], env=clean_env())
    try:
        with pytest.raises(readiness.StartupFailed) as info:
            readiness.wait_healthy(
                f"http://127.0.0.1:{port}/health",
                is_alive=lambda: p.poll() is None,
                log_file=log,
                timeout=30,
                on_progress=lambda s: None,
                poll=0.2,
            )
    finally:
        kill_pids([p.pid])
        p.wait(5)
    assert info.value.cause is None
    assert info.value.tail == []
    assert "earlier run" not in str(info.value)


@pytest.mark.unit
def test_the_launchers_own_report_is_not_taken_for_a_timeout() -> None:
    # The report teed into service.log shows the variable; only vLLM's own message counts.
    assert readiness.diagnose("    VLLM_ENGINE_READY_TIMEOUT_S=1800 \\") is None
    vllm_says = (
        "TimeoutError: Timed out waiting for engine core processes to start. This can happen if "
        "engines take longer than 600s (configured by VLLM_ENGINE_READY_TIMEOUT_S)."
    )
    assert "STARTUP_TIMEOUT" in (readiness.diagnose(vllm_says) or "")


@pytest.mark.unit
def test_an_unrecognised_failure_names_the_last_exception() -> None:
    lines = [
        "(APIServer pid=1) INFO starting",
        '  |   File "/x/transformers/utils/hub.py", line 595, in cached_files',
        "  | OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/nonexistent/tok'.",
        "(APIServer pid=1) ERROR something else without an exception name",
    ]
    cause = readiness._root_exception(lines)
    assert cause is not None and cause.startswith("vLLM raised OSError: Repo id must be in the form")
    assert readiness._root_exception(["all fine", "INFO done"]) is None


DATA = Path(__file__).with_name("data")


@pytest.mark.unit
def test_the_root_cause_of_a_worker_process_is_named_from_a_real_log() -> None:
    """vLLM 0.32 (CPU) with a truncated shard: the Worker raises SafetensorError, the EngineCore and the
    API server re-raise wrappers ("See stack trace for root cause", "See root cause above")."""
    lines = (DATA / "engine-failure-vllm-0.32-cpu.log").read_text().splitlines()
    root = readiness._root_exception(lines)
    assert root is not None
    assert root.startswith(
        "vLLM raised safetensors._safetensors_rust.SafetensorError: Error while deserializing"
    )
    assert "download_model.py" in readiness.diagnose("\n".join(lines))


@pytest.mark.unit
def test_an_engine_core_module_error_is_the_cause_not_the_api_servers_wrapper() -> None:
    """The issue's H200 failure, in vLLM 0.26's format (core.py: "EngineCore failed to start.";
    engine/utils.py: "Engine core initialization failed. See root cause above.")."""
    core = "(EngineCore_DP0 pid=913) ERROR 11-30 18:02:11 [core.py:1330]"
    log = [
        f"{core} EngineCore failed to start.",
        f"{core} Traceback (most recent call last):",
        f'{core}   File "/tmp/site/vllm/v1/sample/ops/topk_topp_sampler.py", line 44, in flashinfer_sampler_supported',
        f"{core}     from vllm.v1.attention.backends.flashinfer import FlashInferBackend",
        f"{core} ModuleNotFoundError: No module named 'flashinfer'",
        "(APIServer pid=880) Traceback (most recent call last):",
        "(APIServer pid=880) RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}",
    ]
    assert "VLLM_USE_FLASHINFER_SAMPLER=0" in readiness.diagnose("\n".join(log))
    unknown = [line.replace("No module named 'flashinfer'", "No module named 'somelib'") for line in log]
    cause = readiness.diagnose("\n".join(unknown))
    assert cause == "vLLM raised ModuleNotFoundError: No module named 'somelib' (the traceback is in the log)"
    assert "root cause is in the lines above" in readiness.diagnose(log[-1])
