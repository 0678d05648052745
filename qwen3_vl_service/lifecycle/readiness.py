"""Waiting for vLLM to answer ``/health``, reading its phase from the log, and naming what went wrong.

The phases and error texts below are the ones the pinned vLLM (0.32) and
uvicorn print; each pattern names the file it comes from, so that a vLLM
upgrade can be checked against them.

Startup of the 235B model on 8 x H100, in order: vLLM parses its arguments
and binds the port (but does not listen yet), the EngineCore starts the
workers, every worker loads its part of ~236 GB of shards, torch.compile
compiles the model, memory is profiled and the KV cache allocated, CUDA
graphs are captured, and only then does uvicorn start listening. Until then
a connection is refused: that means "still starting" while the process lives.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import requests

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.units import format_duration

TAIL_LINES = 25

# ---------------------------------------------------------------------------
# Phases

# tqdm progress "...| 12/48 [..." (vllm/model_executor/model_loader/weight_utils.py _BAR_FORMAT,
# and tqdm's default bar for CUDA graph capture).
_PROGRESS = re.compile(r"\|\s*(\d+)/(\d+)\s*\[")


@dataclass(frozen=True)
class _Marker:
    pattern: re.Pattern[str]
    phase: str
    # True when the line is a tqdm bar whose n/N goes into the phase text.
    progress: bool = False


def _m(text: str, phase: str, progress: bool = False) -> _Marker:
    return _Marker(re.compile(text), phase, progress)


# Later in this list is not "later in startup": each line sets the phase it
# names, so the last matching line wins.
_MARKERS: tuple[_Marker, ...] = (
    # vllm/entrypoints/serve/utils/api_utils.py log_version_and_model
    _m(r"vLLM server version|non-default args:", "starting vLLM"),
    # vllm/v1/worker/gpu_model_runner.py, cpu_model_runner.py
    _m(r"Starting to load model|Loading model from scratch", "loading the model"),
    # weight_utils.py: info_once before the shard loop
    _m(r"Filesystem type for checkpoints", "loading weights"),
    # weight_utils.py: tqdm desc "Loading safetensors checkpoint shards" (+ " (eager)")
    _m(r"Loading safetensors checkpoint shards", "loading weights: shard", progress=True),
    _m(r"Loading (?:np_cache|pt) checkpoint shards", "loading weights: shard", progress=True),
    # default_loader.py "Loading weights took"; gpu_model_runner.py "Model loading took"
    _m(r"Loading weights took|Model loading took", "weights loaded"),
    # vllm/compilation/monitor.py, decorators.py
    _m(
        r"Starting torch\.compile|Dynamo bytecode transform time|Compiling a graph for",
        "compiling (torch.compile)",
    ),
    _m(
        r"Directly load AOT compilation|Directly load the compiled graph",
        "loading the compiled graph from cache",
    ),
    _m(r"torch\.compile took", "compiled"),
    # gpu_model_runner.py / encoder_runner.py: profiling the vision encoder on a dummy image
    _m(r"Encoder cache will be initialized", "profiling the vision encoder"),
    # monitor.py monitor_profiling_run; gpu_worker.py; kv_cache_utils.py
    _m(r"Initial profiling/warmup run took|Profiling CUDA graph memory", "profiling memory"),
    _m(r"Available KV cache memory|KV cache size:", "allocating the KV cache"),
    # gpu_model_runner.py: tqdm desc "Capturing CUDA graphs (decode, FULL)"
    _m(r"Capturing CUDA graphs", "capturing CUDA graphs", progress=True),
    _m(r"Graph capturing finished", "CUDA graphs captured"),
    # vllm/v1/engine/core.py
    _m(
        r"init engine \(profile, create kv cache, warmup model\) took",
        "engine ready, starting the API server",
    ),
    # api_server/entry.py "Starting vLLM server on"; uvicorn "Waiting for application startup."
    _m(
        r"Starting vLLM server on|Started server process|Waiting for application startup",
        "starting the API server",
    ),
    # uvicorn/lifespan/on.py
    _m(r"Application startup complete", "ready"),
    # failures that end startup
    _m(r"Address already in use|\[Errno 98\]", "failed: port already in use"),
    _m(r"Engine core initialization failed", "failed: engine core initialization"),
)


class PhaseTracker:
    """Feed it log lines as they come; ``phase`` is where vLLM is now."""

    def __init__(self) -> None:
        self.phase = "starting"
        self._failed = False

    def feed(self, line: str) -> None:
        for marker in _MARKERS:
            if not marker.pattern.search(line):
                continue
            if self._failed and not marker.phase.startswith("failed"):
                continue  # worker lines after a traceback do not hide the failure
            text = marker.phase
            if marker.progress:
                m = _PROGRESS.search(line)
                if m:
                    text = f"{text} {m.group(1)}/{m.group(2)}"
                elif text.endswith("shard"):
                    text = "loading weights"
            if text.startswith("failed"):
                # The first failure named is the clearest; a generic one does not replace it.
                if self._failed:
                    return
                self._failed = True
            self.phase = text
            return


def phase(log_lines: Iterable[str]) -> str:
    """The phase vLLM is in, from its log lines so far (pure)."""
    tracker = PhaseTracker()
    for line in log_lines:
        tracker.feed(line)
    return tracker.phase


# ---------------------------------------------------------------------------
# Causes


@dataclass(frozen=True)
class _Cause:
    pattern: re.Pattern[str]
    text: str


def _c(pattern: str, text: str) -> _Cause:
    return _Cause(re.compile(pattern, re.IGNORECASE | re.MULTILINE), text)


# Most specific first: an out-of-memory error is followed by the generic
# "Engine core initialization failed", which must not be the answer.
_CAUSES: tuple[_Cause, ...] = (
    _c(
        r"is not divisible by weight quantization block_[nk]",
        "FP8 block size: tensor parallelism splits each expert's 1536 columns into pieces that are not a "
        "multiple of the 128x128 FP8 blocks (vLLM #17327, #17569); set EXPERT_PARALLEL=on (or auto) "
        "with TENSOR_PARALLEL_SIZE=8, or TENSOR_PARALLEL_SIZE=4",
    ),
    _c(
        r"KV cache is needed, which is larger than the available KV cache memory"
        r"|No available memory for the cache blocks",
        "the KV cache for MAX_MODEL_LEN does not fit in the memory left after the weights; "
        "lower MAX_MODEL_LEN or raise GPU_MEMORY_UTIL",
    ),
    _c(
        r"Free memory on device .* on startup is less than",
        "the GPUs are already partly in use (another job, or leftovers of an earlier run); "
        "run .venv/bin/python stop_service.py, check nvidia-smi, or lower GPU_MEMORY_UTIL",
    ),
    _c(
        r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED"
        r"|cudaErrorMemoryAllocation",
        "out of GPU memory; lower MAX_MODEL_LEN or MAX_NUM_SEQS (or GPU_MEMORY_UTIL if other "
        "processes share the GPUs), and check for leftovers with .venv/bin/python status_service.py",
    ),
    _c(
        # vLLM's own words (v1/engine/core_client.py); not the bare variable name, which
        # the launcher's report (teed into the same log) also shows.
        r"Timed out waiting for engine core processes to start|configured by VLLM_ENGINE_READY_TIMEOUT_S",
        "the engine did not become ready within VLLM_ENGINE_READY_TIMEOUT_S (slow weight loading from a "
        "network file system?); raise STARTUP_TIMEOUT, or add --safetensors-load-strategy eager "
        "to EXTRA_VLLM_ARGS",
    ),
    _c(
        r"NCCL error|ncclSystemError|ncclInternalError|ncclUnhandledCudaError|ncclRemoteError"
        r"|NCCL WARN|ProcessGroupNCCL.*(?:error|timeout|Watchdog)|NCCL_ERROR",
        "NCCL (GPU-to-GPU communication) failed; check that all GPUs of the job are visible and "
        "healthy (nvidia-smi topo -m), set NCCL_DEBUG=INFO in config.env for details, and try "
        "NCCL_P2P_DISABLE=1 if peer-to-peer access is broken on this node",
    ),
    _c(
        r"Address already in use|\[Errno 98\]",
        "the port is already in use by another program; choose another PORT in config.env, or stop "
        "that program (.venv/bin/python status_service.py shows whether it is ours)",
    ),
    _c(
        # vLLM's CUDA sampler imports the optional flashinfer package unless told not to.
        r"No module named ['\"]?flashinfer",
        "vLLM's sampler needs the optional flashinfer package, which this vLLM environment lacks; "
        "set VLLM_USE_FLASHINFER_SAMPLER=0 (the launcher sets it when its probe finds flashinfer "
        "missing) or install flashinfer",
    ),
    _c(
        r"No module named ['\"]?vllm|Error while finding module specification for ['\"]?vllm"
        r"|ImportError: cannot import name .* from ['\"]?vllm",
        "the Python that runs vLLM cannot import it; install vLLM into it, or set VLLM_PYTHON to the "
        "python of the environment that has vLLM",
    ),
    _c(
        r"Invalid repository ID or local directory|Cannot find any model weights"
        r"|does not appear to have a file named|is not a local folder and is not a valid model identifier"
        r"|No such file or directory: .*(?:config\.json|\.safetensors|index\.json)"
        r"|SafetensorError: Error while deserializing",
        "model files are missing or incomplete under MODEL_PATH; download them with "
        ".venv/bin/python download_model.py (or fix MODEL_PATH)",
    ),
    _c(
        r"requires AMX tile support|Unsupported FP8 MoE backend",
        "FP8 kernels are not available on this hardware (the CPU backend has none without Intel AMX); "
        "run the FP8 model on the GPU nodes",
    ),
    _c(
        r"CUDA driver version is insufficient|no CUDA-capable device is detected"
        r"|NVIDIA driver on your system is too old|Found no NVIDIA driver",
        "CUDA cannot use the GPUs (driver missing, too old, or no GPU visible to the job); check "
        "nvidia-smi and the job's --gpus request",
    ),
    _c(
        r"(?:ImportError|OSError): .*\.so(?:\.\d+)*: cannot open shared object file|undefined symbol",
        "a compiled library failed to load (a CUDA or PyTorch version mismatch in the vLLM environment); "
        "reinstall vLLM for this node's CUDA",
    ),
    _c(
        r"^MemoryError|Cannot allocate memory|oom-kill|Out of memory: Killed process",
        "the node ran out of host memory (RAM); ask SLURM for more memory (--mem) or lower "
        "the load concurrency",
    ),
)

# The wrapper the API server raises when an engine process died: never the cause itself.
_GENERIC = _c(
    r"Engine core initialization failed",
    "the engine failed while starting; the root cause is in the lines above it in the log",
)


# "SomeError: message", after the prefixes vLLM puts on every line of a child
# process: "(EngineCore_DP0 pid=7) " and a logged traceback's "ERROR 12-01 20:41:07 [core.py:1330] ".
_LINE_PREFIX = re.compile(
    r"^\s*(?:\([\w.-]+ pid=\d+\)\s*)?(?:(?:ERROR|CRITICAL)\s+\d\d-\d\d\s+[\d:.]+\s+\[[^\]]*\]\s*)?"
)
_EXCEPTION_LINE = re.compile(r"^[|\s]*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$")
# Exceptions that only report that another process failed.
_WRAPPERS = re.compile(
    r"Engine core initialization failed|EngineCore failed to start|EngineDeadError|"
    r"Engine process failed to start|Worker proc .* died|Call to .* method failed|"
    r"See root cause above|See stack trace for root cause|failed due to an exception in a background process"
)


def _root_exception(lines) -> str | None:
    """The last 'SomeError: message' line of any process's traceback that is not a wrapper.

    vLLM's API server re-raises an engine failure as "RuntimeError: Engine core
    initialization failed. See root cause above."; the cause is the exception of
    the EngineCore or Worker process printed before it (its lines prefixed with
    "(EngineCore_DP0 pid=N)").
    """
    for line in reversed(list(lines)):
        m = _EXCEPTION_LINE.match(_LINE_PREFIX.sub("", line.strip()).strip())
        if m and not _WRAPPERS.search(line):
            return f"vLLM raised {m.group(1)}: {m.group(2).strip()[:300]} (the traceback is in the log)"
    return None


def diagnose(text: str, *, exceptions: bool = True) -> str | None:
    """The likely cause of a failed start, with the fix, from the log text; None if not recognised.

    Known patterns first (most specific first); then, with exceptions, the root
    exception of whichever process raised it; last, the API server's generic
    "Engine core initialization failed".
    """
    for cause in _CAUSES:
        if cause.pattern.search(text):
            return cause.text
    if exceptions:
        root = _root_exception(text.splitlines())
        if root is not None:
            return root
    if _GENERIC.pattern.search(text):
        return _GENERIC.text
    return None


# ---------------------------------------------------------------------------
# Following the log


class LogFollower:
    """Reads new lines of a growing (and possibly rotated) log file; keeps the last few."""

    def __init__(self, path: str | os.PathLike[str], offset: int | None = None, keep: int = 400) -> None:
        self.path = Path(path)
        self.offset = 0 if offset is None else offset
        self.lines: deque[str] = deque(maxlen=keep)
        self._partial = ""
        self.tracker = PhaseTracker()

    def poll(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:  # rotated (or truncated): the new file starts afresh
            self.offset = 0
            self._partial = ""
        if size == self.offset:
            return []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(size - self.offset)
        except OSError:
            return []
        self.offset += len(data)
        parts = re.split(r"[\r\n]", self._partial + data.decode("utf-8", "replace"))
        self._partial = parts.pop()
        new = [p for p in parts if p.strip()]
        for line in new:
            self.lines.append(line)
            self.tracker.feed(line)
        return new

    def flush_partial(self) -> None:
        if self._partial.strip():
            self.lines.append(self._partial)
            self.tracker.feed(self._partial)
        self._partial = ""

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        return list(self.lines)[-n:]


def log_size(path: str | os.PathLike[str]) -> int:
    """The current size of PATH (0 if missing): pass it as LOG_OFFSET to read only the new run's lines."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


class StartupFailed(CheckFailed):
    """vLLM exited or did not become healthy; carries the log tail and the likely cause."""

    def __init__(self, what: str, *, log_file: str, tail: list[str], cause: str | None) -> None:
        self.what = what
        self.log_file = log_file
        self.tail = tail
        self.cause = cause
        lines = [what]
        if tail:
            lines.append(f"  last {len(tail)} lines of {log_file}:")
            lines += [f"  | {t}" for t in tail]
        else:
            lines.append(f"  ({log_file} has no output from this start)")
        lines.append(
            f"  likely cause: {cause}" if cause else f"  likely cause: not recognised; read {log_file}"
        )
        super().__init__("\n".join(lines))


def poll_until(predicate: Callable[[], bool], timeout: float, step: float = 0.5) -> bool:
    """Ask PREDICATE every STEP seconds until it is true (True) or TIMEOUT seconds pass (its last answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _health_ok(session, url: str, timeout: float) -> bool:
    try:
        return session.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def wait_healthy(
    url: str,
    *,
    is_alive: Callable[[], bool],
    log_file: str | os.PathLike[str],
    timeout: float,
    on_progress: Callable[[str], None],
    poll: float = 1.0,
    log_offset: int | None = None,
) -> None:
    """Poll URL (vLLM's /health) until it answers 200; report the phase on the way.

    ON_PROGRESS gets a line like "loading weights: shard 12/48 (3m05s)" at
    every poll. Raises StartupFailed (a CheckFailed) with the last lines of
    LOG_FILE and the likely cause when IS_ALIVE() turns False or TIMEOUT
    seconds pass. LOG_OFFSET: where this start's output begins in LOG_FILE
    (``log_size()`` taken before starting vLLM); by default, where the file
    ends when this is called, so that the errors of earlier runs (the log is
    appended to) are neither shown nor diagnosed.
    """
    follower = LogFollower(log_file, offset=log_size(log_file) if log_offset is None else log_offset)
    start = time.monotonic()
    deadline = start + timeout
    session = requests.Session()
    session.trust_env = False  # never through an HTTP proxy: the server is on this node
    try:
        while True:
            follower.poll()
            if _health_ok(session, url, timeout=max(1.0, min(5.0, poll * 3))):
                follower.poll()
                on_progress(f"ready ({format_duration(time.monotonic() - start)})")
                return
            if not is_alive():
                time.sleep(min(1.0, poll))  # let the tee write vLLM's last lines
                follower.poll()
                follower.flush_partial()
                raise _failure(follower, "vLLM exited during startup", log_file)
            now = time.monotonic()
            if now >= deadline:
                follower.flush_partial()
                raise _failure(
                    follower,
                    f"vLLM did not answer {url} within {format_duration(timeout)} "
                    f"(last phase: {follower.tracker.phase})",
                    log_file,
                    timed_out=True,
                )
            on_progress(f"{follower.tracker.phase} ({format_duration(now - start)})")
            time.sleep(max(0.0, min(poll, deadline - time.monotonic())))
    finally:
        session.close()


def _failure(follower: LogFollower, what: str, log_file, *, timed_out: bool = False) -> StartupFailed:
    # After a timeout, an exception in the log may be harmless: only the known patterns.
    cause = diagnose("\n".join(follower.lines), exceptions=not timed_out)
    if cause is None and timed_out:
        cause = (
            "startup is slower than STARTUP_TIMEOUT allows (weights from a network file system?); "
            "raise STARTUP_TIMEOUT, or add --safetensors-load-strategy eager to EXTRA_VLLM_ARGS"
        )
    return StartupFailed(what, log_file=str(log_file), tail=follower.tail(), cause=cause)


__all__ = [
    "LogFollower",
    "PhaseTracker",
    "StartupFailed",
    "diagnose",
    "log_size",
    "phase",
    "wait_healthy",
]
