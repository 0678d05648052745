"""Running the check: one worker process per rank under a hard wall-clock timeout, and what they reported.

NCCL problems between the GPUs (peer-to-peer disabled by the cluster, a broken
NVLink, an ACS-enabled PCIe switch, wrong ``NCCL_*`` settings) make vLLM with
tensor parallelism hang or fail late, minutes into loading 236 GB of weights
(vLLM #5484, #8410, #31276). Each worker (worker.py) runs under the python
that has vLLM, joins a ``torch.distributed`` NCCL group, checks an
all-reduce's sums and times all-reduces of a few sizes. A hang becomes a
result naming where each rank was stuck, and every worker is killed (TERM,
then KILL, by process group). ``--backend gloo`` runs the same code path on
CPU processes, for tests. This module never imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_vl_service.core.childproc import with_package_path
from qwen3_vl_service.core.errors import UsageError
from qwen3_vl_service.core.units import format_bytes, format_ranges
from qwen3_vl_service.interconnect.worker import MARK

DEFAULT_TIMEOUT = 120.0
DEFAULT_SIZES = (1 << 20, 16 << 20, 256 << 20)
DEFAULT_SIZES_GLOO = (64 << 10, 1 << 20, 16 << 20)
WORKER_MODULE = "qwen3_vl_service.interconnect.worker"

# ---------------------------------------------------------------------------
# Sizes and bandwidth (pure)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGkmg]?)(?:i?B)?\s*$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"1M,16M,256M"`` -> bytes (K/M/G are binary: 1M = 1 MiB); each a multiple of 4 (float32)."""
    sizes = []
    for part in text.split(","):
        if not part.strip():
            continue
        m = _SIZE_RE.match(part)
        if not m:
            raise UsageError(
                f"message size {part.strip()!r} is not understood", fix="write sizes like 1M,16M,256M"
            )
        nbytes = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
        if nbytes < 4 or nbytes > (8 << 30):
            raise UsageError(
                f"message size {part.strip()!r} is out of range", fix="give sizes from 4 bytes to 8G"
            )
        sizes.append(nbytes - nbytes % 4)
    if not sizes:
        raise UsageError("no message sizes given", fix="write sizes like 1M,16M,256M")
    return tuple(sizes)


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' all-reduce bus bandwidth: what each GPU's link carries, comparable to its nominal speed."""
    if world_size <= 1:
        return 0.0
    return algbw * 2 * (world_size - 1) / world_size


# ---------------------------------------------------------------------------
# Running the workers


@dataclass(frozen=True)
class SizeResult:
    nbytes: int
    iters: int
    time_s: float  # per all-reduce, the slowest rank's
    bad_ranks: tuple[int, ...] = ()

    @property
    def algbw(self) -> float:
        """GB/s (1e9 bytes per second), as nccl-tests counts."""
        return self.nbytes / self.time_s / 1e9 if self.time_s > 0 else 0.0

    def busbw(self, world_size: int) -> float:
        return bus_bandwidth(self.algbw, world_size)


@dataclass
class CheckResult:
    status: str  # ok | wrong | timeout | failed | skipped
    backend: str
    world_size: int
    timeout_s: float
    elapsed_s: float = 0.0
    sizes: tuple[SizeResult, ...] = ()
    message: str = ""  # what went wrong, or why it was skipped
    stuck: dict[int, str] = field(default_factory=dict)  # rank -> where it was when the timeout struck
    torch_version: str = ""
    nccl_version: str = ""
    device: str = ""
    startup_s: float = 0.0
    shutdown_hung: bool = False
    log_dir: str | None = None  # the per-rank logs, when kept
    pids: tuple[int, ...] = ()
    survivors: tuple[int, ...] = ()  # workers that did not die even from SIGKILL (stuck in the driver)
    python: str = ""
    run_id: str = ""  # on every worker's command line (--run-id), to find any left behind

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sizes"] = [
            {**dataclasses.asdict(s), "algbw_gbps": s.algbw, "busbw_gbps": s.busbw(self.world_size)}
            for s in self.sizes
        ]
        d["stuck"] = {str(k): v for k, v in self.stuck.items()}
        return d


def worker_env(
    base: Mapping[str, str], extra: Mapping[str, str] | None = None, backend: str = "nccl"
) -> dict[str, str]:
    """The environment every worker shares: BASE, then EXTRA (the config file's NCCL_* and friends)."""
    env = with_package_path({**base, **(extra or {})})
    # NVLink multicast (NVLS) must stay off on the lent machines; harmless elsewhere. The user's choice wins.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env["PYTHONUNBUFFERED"] = "1"
    if backend == "gloo":
        env.setdefault("OMP_NUM_THREADS", "1")
        if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
            # All ranks are on this host; gloo otherwise resolves the host name (fails in some containers).
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_missing(python: str) -> str | None:
    """Why PYTHON cannot run the workers (None if it has torch), without importing torch here."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return None if importlib.util.find_spec("torch") else f"torch is not installed for {python}"
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return f"{python} is not an executable file"
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torch') else 3)"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    if out.returncode == 3:
        return f"torch is not installed for {python}"
    if out.returncode != 0:
        return f"{python} failed ({out.returncode})"
    return None


def _events(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith(MARK):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line[len(MARK) :]))
    return out


def _where(events: list[dict[str, Any]], sizes: Sequence[int]) -> str:
    """Where a rank was, given its last announced step: the step it had not finished."""
    if not events:
        return "starting python"
    last = events[-1]
    step = last.get("event")
    if step == "start":
        return "importing torch / initialising CUDA"
    if step == "imported":
        return "rendezvous and communicator set-up (init_process_group)"
    if step == "init":
        return "the warm-up all-reduce"
    if step == "hang":
        return "a simulated hang (--simulate-hang-rank)"
    if step == "warmup":
        return f"the all-reduce of {format_bytes(sizes[0])}" if sizes else "reporting"
    if step == "size":
        nxt = int(last.get("index", 0)) + 1
        return f"the all-reduce of {format_bytes(sizes[nxt])}" if nxt < len(sizes) else "reporting"
    if step in ("result", "exit"):
        return "shutting down (destroy_process_group)"
    return str(step)


def _last_error_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln and not ln.startswith(MARK)]
    for ln in reversed(lines):
        if re.search(r"(Error|error:|Exception|failed)", ln):
            return ln[:300]
    return lines[-1][:300] if lines else ""


def _kill_groups(procs: Sequence[subprocess.Popen], grace: float = 3.0, reap: float = 10.0) -> list[int]:
    """TERM each worker's process group, wait, KILL what is left, reap; the pids still alive after that.

    Only our own workers' groups (each worker leads its own session). A rank stuck
    in a CUDA kernel may ignore TERM, hence the KILL.
    """
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
    _wait_exit(live, grace)
    for p in procs:
        # Also the groups whose leader has exited: a child it left behind would hold the GPU.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    _wait_exit(procs, reap)
    return [p.pid for p in procs if p.poll() is None]


def _wait_exit(procs: Sequence[subprocess.Popen], seconds: float) -> None:
    """Until every one of PROCS has exited (and is reaped), or SECONDS have passed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)


def run_check(
    world_size: int,
    *,
    backend: str = "nccl",
    sizes: Sequence[int] = DEFAULT_SIZES,
    timeout: float = DEFAULT_TIMEOUT,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    iters: int = 0,
    log_dir: str | Path | None = None,
    simulate_hang_rank: int | None = None,
) -> CheckResult:
    """Run one worker per rank under a hard wall-clock TIMEOUT and collect rank 0's measurements.

    ENV is the workers' environment (see ``worker_env``); the rank variables are added here.
    The per-rank logs go to LOG_DIR (kept), or to a temporary folder that is kept only
    when something went wrong. ``simulate_hang_rank`` is diagnostic: that rank sleeps
    instead of joining the all-reduce, to see the timeout behaviour.
    """
    if world_size < 1:
        raise UsageError(f"world size {world_size} must be at least 1", fix="give --world-size 1 or more")
    if simulate_hang_rank is not None and not 0 <= simulate_hang_rank < world_size:
        raise UsageError(
            f"--simulate-hang-rank {simulate_hang_rank} is not a rank of {world_size}",
            fix=f"give a rank from 0 to {world_size - 1}",
        )
    python = python or sys.executable
    env = dict(worker_env(os.environ, backend=backend) if env is None else env)
    own_dir = log_dir is None
    folder = Path(tempfile.mkdtemp(prefix="qwen3vl-interconnect-") if log_dir is None else log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    result = CheckResult(
        status="failed", backend=backend, world_size=world_size, timeout_s=timeout, python=python
    )
    for old in folder.glob("rank*.log"):  # a kept folder may hold an earlier, larger run's logs
        old.unlink(missing_ok=True)
    start = time.monotonic()
    run = _Run(
        python=python,
        env=env,
        world_size=world_size,
        backend=backend,
        sizes=tuple(sizes),
        iters=iters,
        timeout=timeout,
        deadline=start + timeout,
        folder=folder,
        run_id=uuid.uuid4().hex[:12],
        hang=simulate_hang_rank,
    )
    result.run_id = run.run_id
    try:
        for _attempt in range(3):
            outcome = _attempt_run(run)
            if outcome != "port in use":
                break
        _collect(result, folder, world_size, sizes, outcome)
    except OSError as exc:  # the python itself cannot be started
        result.status, result.message = "failed", f"cannot run {python}: {exc.strerror or exc}"
    finally:
        result.elapsed_s = time.monotonic() - start
        result.pids = tuple(run.pids)
        result.survivors = tuple(run.survivors)
        if run.survivors:
            left = ", ".join(map(str, run.survivors))
            result.message += f"; worker pid(s) {left} survived SIGKILL (stuck in the GPU driver?)"
        if own_dir and result.status in ("ok", "skipped") and not result.shutdown_hung:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            result.log_dir = str(folder)
    return result


@dataclass
class _Run:
    """One check's fixed inputs, and the pids it started."""

    python: str
    env: Mapping[str, str]
    world_size: int
    backend: str
    sizes: tuple[int, ...]
    iters: int
    timeout: float
    deadline: float  # time.monotonic() by which everything must be over
    folder: Path
    run_id: str
    hang: int | None
    pids: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)


def _attempt_run(run: _Run) -> str:
    """Start the ranks and wait: 'done', 'timeout', 'failed' or 'port in use'. Leaves no worker running."""
    port = free_port()
    argv = [
        run.python,
        "-m",
        WORKER_MODULE,
        "--backend",
        run.backend,
        "--sizes",
        ",".join(str(s) for s in run.sizes),
        "--iters",
        str(run.iters),
        # torch's own watchdog must not act before our timeout does.
        "--pg-timeout",
        str(int(run.timeout) + 60),
        "--run-id",
        run.run_id,
    ]
    if run.hang is not None:
        argv += ["--simulate-hang-rank", str(run.hang)]
    world_size, folder = run.world_size, run.folder
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(world_size):
            rank_env = dict(run.env)
            rank_env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            with open(folder / f"rank{rank}.log", "wb") as log:
                # Own session: our TERM/KILL reaches everything the rank starts, and Ctrl+C
                # in the terminal reaches only us (we then end them in `finally`).
                procs.append(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=rank_env,
                        start_new_session=True,
                    )
                )
            run.pids.append(procs[-1].pid)
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return "done"
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # The others would wait for the failed rank until the timeout: end them now.
                # Another program took the port between free_port() and rank 0's bind: try another.
                logs = [folder / f"rank{r}.log" for r in {0, *failed}]
                text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
                if (
                    re.search(r"EADDRINUSE|address already in use", text, re.IGNORECASE)
                    and time.monotonic() < run.deadline
                ):
                    return "port in use"
                return "failed"
            if time.monotonic() >= run.deadline:
                return "timeout"
            time.sleep(0.05)
    finally:
        run.survivors.extend(_kill_groups(procs))


def _collect(result: CheckResult, folder: Path, world_size: int, sizes: Sequence[int], outcome: str) -> None:
    events = {r: _events(folder / f"rank{r}.log") for r in range(world_size)}
    final = next((e for e in events.get(0, []) if e.get("event") == "result"), None)
    for evs in events.values():
        for e in evs:
            if e.get("event") == "imported":
                result.torch_version = e.get("torch") or ""
                result.nccl_version = e.get("nccl") or ""
                result.device = e.get("device") or ""
                break
    skips = [e for evs in events.values() for e in evs if e.get("event") == "skip"]
    fails = [(r, e) for r, evs in events.items() for e in evs if e.get("event") == "fail"]
    if skips:
        result.status, result.message = "skipped", skips[0].get("reason", "")
        return
    if final is not None:
        result.sizes = tuple(
            SizeResult(int(s["bytes"]), int(s["iters"]), float(s["time_s"]), tuple(s.get("bad_ranks", ())))
            for s in final.get("sizes", ())
        )
        result.startup_s = float(final.get("startup_s") or 0.0)
        result.shutdown_hung = outcome != "done"
        wrong = [s for s in result.sizes if s.bad_ranks]
        if wrong:
            result.status = "wrong"
            result.message = "; ".join(
                f"wrong sums on rank(s) {format_ranges(s.bad_ranks)} at {format_bytes(s.nbytes)}"
                for s in wrong
            )
        else:
            result.status = "ok"
        return
    if outcome == "timeout":
        result.status = "timeout"
        result.stuck = {r: _where(events[r], sizes) for r in range(world_size)}
        groups: dict[str, list[int]] = {}
        for r, where in result.stuck.items():
            groups.setdefault(where, []).append(r)
        what = "; ".join(
            f"rank{'s' if len(rs) > 1 else ''} {format_ranges(rs)} in {where}" for where, rs in groups.items()
        )
        result.message = (
            f"did not finish within {result.timeout_s:g} s (stuck: {what}); its workers were killed"
        )
        return
    result.status = "failed"
    if fails:
        r, e = fails[0]
        result.message = f"rank {r}: {e.get('reason', 'failed')}"
        return
    for r in range(world_size):
        line = _last_error_line(folder / f"rank{r}.log")
        if line:
            result.message = f"rank {r} failed: {line}"
            return
    result.message = "a worker failed without a message"
