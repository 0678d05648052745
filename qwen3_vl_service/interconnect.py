"""The interconnect check: a short, checked NCCL all-reduce across the GPUs, and their topology.

NCCL problems between the GPUs (peer-to-peer disabled by the cluster, a broken
NVLink, an ACS-enabled PCIe switch, wrong ``NCCL_*`` settings) make vLLM with
tensor parallelism hang or fail late, minutes into loading 236 GB of weights
(vLLM #5484, #8410, #31276). This check finds them in seconds:

* the topology from NVML: NVLink or the PCIe path between each pair of GPUs,
  the active NVLinks per GPU and the P2P status (no torch needed);
* one worker process per GPU (``interconnect_worker.py``) under the python
  that has vLLM, which joins a ``torch.distributed`` NCCL group, checks an
  all-reduce's sums and times all-reduces of a few sizes; the bus bandwidth
  (algbw * 2(n-1)/n, the nccl-tests convention) is set against the link's
  nominal figure;
* a hard wall-clock timeout: a hang becomes an error naming where each rank
  was stuck, the likely causes and the ``NCCL_*`` variables worth trying, and
  every worker is killed (TERM, then KILL, by process group).

``--backend gloo`` runs the same code path on CPU processes, for tests.

This module never imports torch: the launcher must answer in under a second.
It runs from ``start_service.py --check-interconnect`` (or CHECK_INTERCONNECT=true)
through ``findings()``, or alone::

    python -m qwen3_vl_service.interconnect [--world-size N] [--backend nccl|gloo]
        [--timeout S] [--sizes 1M,16M,256M] [--json]
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
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

from . import cli
from .errors import UsageError
from .gpus import cuda_order, parse_visible_devices

CHECK = "Interconnect"
DEFAULT_TIMEOUT = 120.0
DEFAULT_SIZES = (1 << 20, 16 << 20, 256 << 20)
DEFAULT_SIZES_GLOO = (64 << 10, 1 << 20, 16 << 20)
WORKER_MODULE = "qwen3_vl_service.interconnect_worker"
MARK = "@@qwen3-interconnect "
EXIT_SKIP = 3
# Below this share of the nominal NVLink bandwidth (largest message), NCCL is
# very likely not using NVLink at all. A healthy 8 x H100 SXM reaches about 80%
# with NVLink multicast (NVLS) off.
LOW_BANDWIDTH_SHARE = 0.4
# Messages smaller than this are latency-bound: no verdict on their bandwidth.
JUDGE_MIN_BYTES = 64 << 20

# The variables to name when NCCL hangs or fails; kept in one place for the messages.
HANG_FIX = (
    "likely causes: GPU peer-to-peer (P2P) disabled or broken on this node, an ACS-enabled PCIe switch "
    "blocking P2P, a broken NVLink, or NCCL choosing a wrong IB/socket interface. "
    "Rerun `python -m qwen3_vl_service.interconnect` with NCCL_DEBUG=INFO to see where it stops, then try, "
    "one at a time: NCCL_P2P_DISABLE=1 (if that passes, P2P or ACS is at fault; NCCL_P2P_LEVEL=NVL keeps "
    "P2P over NVLink only), NCCL_SHM_DISABLE=1, NCCL_IB_DISABLE=1, NCCL_SOCKET_IFNAME=lo. "
    "Put the one that works in config.env so that vLLM gets it too (vLLM #5484, #8410, #31276)"
)


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


def format_bytes(nbytes: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= factor:
            value = nbytes / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{nbytes} B"


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' all-reduce bus bandwidth: what each GPU's link carries, comparable to its nominal speed."""
    if world_size <= 1:
        return 0.0
    return algbw * 2 * (world_size - 1) / world_size


def format_ranks(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    ranks = sorted(set(ranks))
    parts: list[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(parts)


# ---------------------------------------------------------------------------
# Topology from NVML (no torch)


class TopologyUnavailable(Exception):
    """NVML cannot be used here (no driver, no library, no GPU)."""


_LEVELS = {0: "BRD", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
_P2P_STATUS = {
    0: "ok",
    1: "chipset not supported",
    2: "GPU not supported",
    3: "IOH topology not supported",
    4: "disabled by regkey",
    5: "not supported",
    6: "unknown",
}
_P2P_READ = 0  # NVML_P2P_CAPS_INDEX_READ (pynvml spells it as a tuple by mistake)
_P2P_NVLINK = 2  # NVML_P2P_CAPS_INDEX_NVLINK
# PCIe GB/s per lane and direction, by generation (after line encoding).
_PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


@dataclass(frozen=True)
class TopoGpu:
    index: int  # NVML index
    name: str
    bus_id: str
    nvlinks_active: int = 0
    nvlinks_supported: int = 0
    compute_capability: tuple[int, int] | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None


@dataclass(frozen=True)
class Topology:
    gpus: tuple[TopoGpu, ...]
    # links[i][j]: "X" on the diagonal, "NV<k>" over NVLink, else the PCIe path (PIX ... SYS) or "?".
    links: tuple[tuple[str, ...], ...]
    # p2p[i][j]: NVML's P2P read status between the pair ("ok" or why not).
    p2p: tuple[tuple[str, ...], ...]
    driver: str = ""

    def subset(self, n: int) -> Topology:
        return Topology(
            self.gpus[:n],
            tuple(row[:n] for row in self.links[:n]),
            tuple(row[:n] for row in self.p2p[:n]),
            self.driver,
        )

    @property
    def all_nvlink(self) -> bool:
        n = len(self.gpus)
        return n > 1 and all(self.links[i][j].startswith("NV") for i in range(n) for j in range(n) if i != j)

    def nominal(self) -> tuple[float, str] | None:
        """(GB/s per GPU and direction, what it is) of the slowest link a ring all-reduce crosses."""
        if len(self.gpus) < 2:
            return None
        if self.all_nvlink:
            links = min(g.nvlinks_active for g in self.gpus)
            ccs = [g.compute_capability for g in self.gpus if g.compute_capability]
            per_link = 50.0 if ccs and min(cc[0] for cc in ccs) >= 10 else 25.0
            if links <= 0:
                return None
            gen = {8: "NVLink3", 9: "NVLink4", 10: "NVLink5"}.get(
                min(cc[0] for cc in ccs) if ccs else 0, "NVLink"
            )
            return links * per_link, f"{gen}: {links} links x {per_link:g} GB/s"
        gens = [(g.pcie_gen, g.pcie_width) for g in self.gpus]
        if any(gen is None or width is None or gen not in _PCIE_LANE_GBPS for gen, width in gens):
            return None
        gen, width = min(gens, key=lambda gw: _PCIE_LANE_GBPS[gw[0]] * gw[1])
        return _PCIE_LANE_GBPS[gen] * width, f"PCIe Gen{gen} x{width}"

    def as_dict(self) -> dict[str, Any]:
        nominal = self.nominal()
        return {
            "driver": self.driver,
            "gpus": [dataclasses.asdict(g) for g in self.gpus],
            "links": [list(r) for r in self.links],
            "p2p": [list(r) for r in self.p2p],
            "nominal_gbps": nominal[0] if nominal else None,
            "nominal": nominal[1] if nominal else None,
        }


def _load_nvml():
    """The pynvml module (nvidia-ml-py); tests replace this with a fake."""
    import pynvml

    return pynvml


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _norm_bus(bus_id: str) -> str:
    """'00000000:18:00.0' and '0000:18:00.0' -> '0:18:00.0'."""
    bus_id = bus_id.strip().lower()
    parts = bus_id.split(":")
    if len(parts) == 3:
        with contextlib.suppress(ValueError):
            return f"{int(parts[0], 16):x}:{parts[1]}:{parts[2]}"
    return bus_id


def visible_indices(env: Mapping[str, str], uuids: Sequence[str]) -> list[int]:
    """The NVML indices of the devices CUDA will use, in CUDA's order (gpus' CUDA_VISIBLE_DEVICES rule)."""
    entries = parse_visible_devices(env.get("CUDA_VISIBLE_DEVICES"))
    if entries is None:
        return list(range(len(uuids)))
    return cuda_order(entries, len(uuids), lambda i: uuids[i])[0]


def read_topology(env: Mapping[str, str] | None = None, nvml=None) -> Topology:
    """The GPUs CUDA will see, in its order, and the link between each pair.

    Raises TopologyUnavailable where NVML cannot answer (no library, no driver, no GPU),
    and CheckFailed where CUDA_VISIBLE_DEVICES names a MIG instance (gpus.cuda_order).
    """
    env = os.environ if env is None else env
    try:
        nv = nvml or _load_nvml()
    except ImportError:
        raise TopologyUnavailable("nvidia-ml-py (pynvml) is not installed") from None
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        raise TopologyUnavailable(f"no NVIDIA driver (NVML: {exc})") from None
    try:
        count = nv.nvmlDeviceGetCount()
        if count == 0:
            raise TopologyUnavailable("NVML reports no GPU")
        handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_text(nv.nvmlDeviceGetUUID(h)) for h in handles]
        order = visible_indices(env, uuids)
        if not order:
            raise TopologyUnavailable(
                f"no GPU is visible (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
        except nv.NVMLError:
            driver = ""
        gpus = [_read_gpu(nv, i, handles[i]) for i in order]
        remotes = {i: _nvlink_remotes(nv, handles[i]) for i in order}
        links, p2p = [], []
        for a in order:
            row_links, row_p2p = [], []
            for b in order:
                if a == b:
                    row_links.append("X")
                    row_p2p.append("X")
                    continue
                row_links.append(_link_label(nv, handles[a], handles[b], gpus, order, a, b, remotes))
                row_p2p.append(_p2p(nv, handles[a], handles[b], _P2P_READ))
            links.append(tuple(row_links))
            p2p.append(tuple(row_p2p))
        return Topology(tuple(gpus), tuple(links), tuple(p2p), driver)
    except nv.NVMLError as exc:
        raise TopologyUnavailable(f"NVML failed: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            nv.nvmlShutdown()


def _read_gpu(nv, index: int, handle) -> TopoGpu:
    def opt(fn, *args):
        try:
            return fn(*args)
        except nv.NVMLError:
            return None

    bus = opt(nv.nvmlDeviceGetPciInfo, handle)
    supported = active = 0
    for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            state = nv.nvmlDeviceGetNvLinkState(handle, link)
        except nv.NVMLError:
            if link == 0:
                break  # no NVLink on this GPU
            continue
        supported += 1
        active += 1 if state else 0
    cc = opt(nv.nvmlDeviceGetCudaComputeCapability, handle)
    return TopoGpu(
        index=index,
        name=_text(nv.nvmlDeviceGetName(handle)),
        bus_id=_text(bus.busId) if bus is not None else "",
        nvlinks_active=active,
        nvlinks_supported=supported,
        compute_capability=tuple(cc) if cc else None,
        pcie_gen=opt(nv.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        pcie_width=opt(nv.nvmlDeviceGetMaxPcieLinkWidth, handle),
    )


def _nvlink_remotes(nv, handle) -> list[str]:
    """The PCI bus ids at the far end of each active NVLink (a GPU, or an NVSwitch)."""
    out = []
    for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if not nv.nvmlDeviceGetNvLinkState(handle, link):
                continue
            out.append(_norm_bus(_text(nv.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)))
        except nv.NVMLError:
            if link == 0:
                break
    return out


def _p2p(nv, a, b, index: int) -> str:
    try:
        return _P2P_STATUS.get(nv.nvmlDeviceGetP2PStatus(a, b, index), "unknown")
    except nv.NVMLError:
        return "unknown"


def _link_label(nv, ha, hb, gpus, order, a, b, remotes) -> str:
    ga, gb = gpus[order.index(a)], gpus[order.index(b)]
    direct = sum(1 for r in remotes[a] if gb.bus_id and r == _norm_bus(gb.bus_id))
    if direct:
        return f"NV{direct}"  # NVLink bridge or point-to-point links
    if _p2p(nv, ha, hb, _P2P_NVLINK) == "ok":
        # Through NVSwitch: all of a GPU's links lead into the fabric (nvidia-smi shows NV18 on H100 SXM).
        return f"NV{min(ga.nvlinks_active, gb.nvlinks_active)}"
    try:
        return _LEVELS.get(nv.nvmlDeviceGetTopologyCommonAncestor(ha, hb), "?")
    except nv.NVMLError:
        return "?"


def render_topology(topo: Topology) -> str:
    n = len(topo.gpus)
    names = [f"GPU{g.index}" for g in topo.gpus]
    width = max(6, *(len(x) + 1 for x in names), *(len(c) + 1 for row in topo.links for c in row))
    lines = [
        "GPU topology (NVML; NV# = NVLink with # links, PIX/PXB/PHB/NODE/SYS = the PCIe path, "
        "as in `nvidia-smi topo -m`)",
        " " * 8 + "".join(f"{x:>{width}}" for x in names),
    ]
    for i in range(n):
        lines.append(f"  {names[i]:<6}" + "".join(f"{c:>{width}}" for c in topo.links[i]))
    models = sorted({g.name for g in topo.gpus})
    lines.append(f"  GPUs: {', '.join(models)}" + (f"; driver {topo.driver}" if topo.driver else ""))
    if any(g.nvlinks_supported for g in topo.gpus):
        counts = ", ".join(f"GPU{g.index} {g.nvlinks_active}/{g.nvlinks_supported}" for g in topo.gpus)
        lines.append(f"  NVLinks active/supported: {counts}")
    bad = _p2p_problems(topo)
    if bad:
        lines.append("  P2P not available: " + "; ".join(bad))
    nominal = topo.nominal()
    if nominal:
        lines.append(f"  nominal: {nominal[0]:g} GB/s per GPU and direction ({nominal[1]})")
    return "\n".join(lines)


def _p2p_problems(topo: Topology) -> list[str]:
    out = []
    n = len(topo.gpus)
    for i in range(n):
        for j in range(i + 1, n):
            status = topo.p2p[i][j]
            # "unknown": NVML could not say (some VMs); not evidence of a problem.
            if status not in ("ok", "X", "unknown") and not topo.links[i][j].startswith("NV"):
                out.append(f"GPU{topo.gpus[i].index}-GPU{topo.gpus[j].index} {status}")
    return out


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
    base: Mapping[str, str], extra: Mapping[str, str] = (), backend: str = "nccl"
) -> dict[str, str]:
    """The environment every worker shares: BASE, then EXTRA (the config file's NCCL_* and friends)."""
    env = dict(base)
    env.update(extra or {})
    # NVLink multicast (NVLS) must stay off on the lent machines; harmless elsewhere. The user's choice wins.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env["PYTHONUNBUFFERED"] = "1"
    # The worker is run with -m from whatever python has vLLM: make this package importable there.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
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
    out = []
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
    folder = Path(tempfile.mkdtemp(prefix="qwen3vl-interconnect-")) if own_dir else Path(log_dir)
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
            import shutil

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
                f"wrong sums on rank(s) {format_ranks(s.bad_ranks)} at {format_bytes(s.nbytes)}"
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
            f"rank{'s' if len(rs) > 1 else ''} {format_ranks(rs)} in {where}" for where, rs in groups.items()
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


# ---------------------------------------------------------------------------
# Findings (plain dataclass here; preflight.Finding when the launcher asks)


@dataclass(frozen=True)
class Note:
    level: str  # ok | warn | error
    check: str
    message: str
    fix: str = ""


def _subject(result: CheckResult) -> str:
    n = result.world_size
    if result.backend == "nccl":
        return f"NCCL all-reduce on {n} GPU{'s' if n != 1 else ''}"
    return f"{result.backend} all-reduce on {n} CPU process{'es' if n != 1 else ''}"


def topology_notes(topo: Topology) -> list[Note]:
    notes: list[Note] = []
    n = len(topo.gpus)
    model = ", ".join(sorted({g.name for g in topo.gpus}))
    nominal = topo.nominal()
    nominal_text = f"; nominal {nominal[0]:g} GB/s per GPU ({nominal[1]})" if nominal else ""
    has_nvlink = any(g.nvlinks_supported for g in topo.gpus)
    if n == 1:
        notes.append(Note("ok", CHECK, f"topology: 1 x {model} (no peer to connect to)"))
    elif topo.all_nvlink:
        notes.append(Note("ok", CHECK, f"topology: {n} x {model}, NVLink between every pair{nominal_text}"))
    else:
        paths = {topo.links[i][j] for i in range(n) for j in range(n) if i != j}
        pcie = "/".join(sorted(p for p in paths if not p.startswith("NV")))
        # GPUs with NVLink ports that reach a peer over PCIe: a link or the NVSwitch fabric is down.
        fix = (
            "a link or the NVSwitch fabric is down: check `nvidia-smi nvlink -s` and "
            "`nvidia-smi -q | grep -i -A2 fabric`, report the node to the admins"
        )
        notes.append(
            Note(
                "warn" if has_nvlink else "ok",
                CHECK,
                f"topology: {n} x {model}, pairs without NVLink (PCIe path {pcie}){nominal_text}",
                fix if has_nvlink else "",
            )
        )
    active = {g.nvlinks_active for g in topo.gpus if g.nvlinks_supported}
    if len(active) > 1:
        most = max(active)
        short = [f"GPU{g.index} {g.nvlinks_active}/{most}" for g in topo.gpus if g.nvlinks_active < most]
        notes.append(
            Note(
                "warn",
                CHECK,
                f"NVLinks down: {', '.join(short)} links active, the other GPUs have {most}",
                "a broken NVLink slows or hangs NCCL; check `nvidia-smi nvlink -s`, report the node",
            )
        )
    bad = _p2p_problems(topo)
    if bad:
        more = " ..." if len(bad) > 4 else ""
        notes.append(
            Note(
                "warn",
                CHECK,
                f"GPU peer-to-peer not available: {'; '.join(bad[:4])}{more}",
                "NCCL falls back to shared memory (slower); if it hangs instead, "
                "set NCCL_P2P_DISABLE=1 in config.env",
            )
        )
    return notes


def result_notes(result: CheckResult, topo: Topology | None = None) -> list[Note]:
    subject = _subject(result)
    version = f"NCCL {result.nccl_version}" if result.nccl_version else f"torch {result.torch_version}"
    if result.status == "skipped":
        return [Note("warn", CHECK, f"interconnect check skipped: {result.message}")]
    if result.status == "timeout":
        where = f" (logs: {result.log_dir})" if result.log_dir else ""
        return [Note("error", CHECK, f"{subject} {result.message}{where}", HANG_FIX)]
    if result.status == "failed":
        where = f" (logs: {result.log_dir})" if result.log_dir else ""
        return [Note("error", CHECK, f"{subject} failed: {result.message}{where}", HANG_FIX)]
    if result.status == "wrong":
        return [
            Note(
                "error",
                CHECK,
                f"{subject} returned {result.message} ({version})",
                "a faulty GPU, NVLink or P2P path corrupts data: rerun with NCCL_P2P_DISABLE=1 to see "
                "whether the P2P path is at fault, and report the node to the admins",
            )
        ]
    notes = []
    sizes = ", ".join(format_bytes(s.nbytes) for s in result.sizes)
    text = f"{subject} correct at {sizes} ({version}; {result.elapsed_s:.1f} s)"
    level, fix = "ok", ""
    largest = max(result.sizes, key=lambda s: s.nbytes) if result.sizes else None
    nominal = topo.nominal() if topo is not None else None
    if largest is not None and result.world_size > 1:
        bus = largest.busbw(result.world_size)
        text += f"; bus bandwidth {bus:.0f} GB/s at {format_bytes(largest.nbytes)}"
        if nominal and result.backend == "nccl":
            share = bus / nominal[0]
            text += f" = {share:.0%} of the nominal {nominal[0]:g} GB/s ({nominal[1]})"
            if (
                topo is not None
                and topo.all_nvlink
                and largest.nbytes >= JUDGE_MIN_BYTES
                and share < LOW_BANDWIDTH_SHARE
            ):
                level = "warn"
                fix = (
                    f"below {LOW_BANDWIDTH_SHARE:.0%} of NVLink's nominal: NCCL is probably not using NVLink "
                    "(NCCL_P2P_DISABLE or NCCL_P2P_LEVEL set? P2P disabled on the node?); rerun with "
                    "NCCL_DEBUG=INFO and look for 'via P2P' against 'via SHM' in the logs"
                )
    notes.append(Note(level, CHECK, text, fix))
    if result.shutdown_hung:
        notes.append(
            Note(
                "warn",
                CHECK,
                f"the check's workers hung or failed at exit (logs: {result.log_dir})",
                "usually harmless; if vLLM hangs at shutdown too, stop it with stop_service.py",
            )
        )
    return notes


def _finding_class():
    try:
        from .preflight import Finding
    except ImportError:  # preflight not there (yet): the same fields, as a plain dataclass
        return Note
    return Finding


def _as_findings(notes: list[Note]) -> list:
    finding = _finding_class()
    return [finding(n.level, n.check, n.message, n.fix) for n in notes]


def findings(cfg, report=None) -> list:
    """The launcher's entry: topology and all-reduce findings for the GPUs vLLM will use.

    Without GPUs (no driver, none visible) or without torch in VLLM_PYTHON: one
    'warn' line saying the check was skipped. REPORT (the preflight report so
    far) is not needed: the GPUs are read from NVML, as CUDA will number them.
    """
    del report
    if cfg.device == "cpu":
        return _as_findings([Note("warn", CHECK, "interconnect check skipped: DEVICE=cpu uses no GPU")])
    env = worker_env(os.environ, cfg.vllm_env, "nccl")
    try:
        topo = read_topology(env)
    except TopologyUnavailable as exc:
        return _as_findings([Note("warn", CHECK, f"interconnect check skipped: {exc}")])
    python = cfg.vllm_python or sys.executable
    missing = torch_missing(python)
    if missing:
        return _as_findings([Note("warn", CHECK, f"interconnect check skipped: {missing}")])
    n = min(cfg.tensor_parallel_size, len(topo.gpus))
    topo = topo.subset(n)
    notes = topology_notes(topo)
    if sys.stderr.isatty():
        print(
            f"checking the interconnect: NCCL all-reduce on {n} GPU(s), up to {DEFAULT_TIMEOUT:g} s ...",
            file=sys.stderr,
        )
    result = run_check(
        n,
        backend="nccl",
        sizes=DEFAULT_SIZES,
        timeout=DEFAULT_TIMEOUT,
        python=python,
        env=env,
        log_dir=cfg.log_dir / "interconnect",
    )
    notes += result_notes(result, topo)
    return _as_findings(notes)


# ---------------------------------------------------------------------------
# Standalone command


def render_table(result: CheckResult, topo: Topology | None = None) -> str:
    nominal = topo.nominal() if topo is not None and result.backend == "nccl" else None
    head = [
        f"All-reduce ({result.backend}, {result.world_size} rank(s), float32 sum in place; "
        "busbw = algbw * 2(n-1)/n as in nccl-tests; GB/s = 1e9 bytes/s)"
    ]
    cols = f"  {'size':>10} {'iters':>6} {'time':>11} {'algbw':>12} {'busbw':>12}"
    if nominal:
        cols += f" {'of nominal':>11}"
    cols += "  check"
    rows = [cols]
    for s in result.sizes:
        bus = s.busbw(result.world_size)
        row = f"  {format_bytes(s.nbytes):>10} {s.iters:>6} {format_time(s.time_s):>11} {s.algbw:>7.1f} GB/s"
        row += f" {bus:>7.1f} GB/s" if result.world_size > 1 else f" {'-':>12}"
        if nominal:
            row += f" {bus / nominal[0]:>11.0%}" if result.world_size > 1 else f" {'-':>11}"
        row += "  ok" if not s.bad_ranks else f"  WRONG on rank(s) {format_ranks(s.bad_ranks)}"
        rows.append(row)
    return "\n".join(head + rows)


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m qwen3_vl_service.interconnect",
        description="Check the links between the GPUs: topology from NVML, a checked and timed all-reduce, "
        "with a hard timeout so that a hang becomes an error.",
    )
    p.add_argument("--world-size", type=int, metavar="N", help="ranks (default: every visible GPU; gloo: 2)")
    p.add_argument(
        "--backend", choices=("nccl", "gloo"), default="nccl", help="nccl (GPUs) or gloo (CPU processes)"
    )
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S", help="hard limit in seconds"
    )
    p.add_argument("--sizes", metavar="LIST", help="message sizes (default 1M,16M,256M; gloo 64K,1M,16M)")
    p.add_argument(
        "--iters", type=int, default=0, metavar="N", help="timed all-reduces per size (default: by size)"
    )
    p.add_argument(
        "--config", metavar="FILE", help="take VLLM_PYTHON and the NCCL_* settings from this config file"
    )
    p.add_argument(
        "--python", metavar="PATH", help="python to run the workers (default VLLM_PYTHON, or this one)"
    )
    p.add_argument(
        "--log-dir", metavar="DIR", help="keep the per-rank logs here (default: kept only on failure)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--simulate-hang-rank",
        type=int,
        metavar="R",
        help="diagnostic: rank R sleeps instead of joining the all-reduce (simulates a hung peer to see the "
        "timeout behaviour)",
    )
    return p


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.timeout <= 0:
        raise UsageError(
            f"--timeout {args.timeout:g} must be positive", fix="give seconds, e.g. --timeout 120"
        )
    sizes = (
        parse_sizes(args.sizes)
        if args.sizes
        else (DEFAULT_SIZES if args.backend == "nccl" else DEFAULT_SIZES_GLOO)
    )
    extra: Mapping[str, str] = {}
    python = args.python
    if args.config:
        from .config import load

        cfg = load(args.config)
        extra = cfg.vllm_env
        python = python or cfg.vllm_python or None
    python = python or sys.executable
    env = worker_env(os.environ, extra, args.backend)

    def skip(reason: str) -> int:
        if args.json:
            print(json.dumps({"skipped": reason}))
        else:
            print(f"interconnect check skipped: {reason}")
        return 0

    topo: Topology | None = None
    notes: list[Note] = []
    if args.backend == "nccl":
        try:
            topo = read_topology(env)
        except TopologyUnavailable as exc:
            return skip(str(exc))
        world = args.world_size or len(topo.gpus)
        if world > len(topo.gpus):
            raise UsageError(
                f"--world-size {world} but {len(topo.gpus)} GPU(s) are visible",
                fix=f"give --world-size {len(topo.gpus)} or less",
            )
        topo = topo.subset(world)
        notes += topology_notes(topo)
    else:
        world = args.world_size or 2
    missing = torch_missing(python)
    if missing:
        return skip(missing)
    result = run_check(
        world,
        backend=args.backend,
        sizes=sizes,
        timeout=args.timeout,
        python=python,
        env=env,
        iters=args.iters,
        log_dir=args.log_dir,
        simulate_hang_rank=args.simulate_hang_rank,
    )
    if result.status == "skipped":
        return skip(result.message)
    notes += result_notes(result, topo)
    if args.json:
        print(
            json.dumps(
                {
                    "topology": topo.as_dict() if topo else None,
                    "result": result.as_dict(),
                    "findings": [dataclasses.asdict(n) for n in notes],
                },
                indent=2,
            )
        )
    else:
        parts = [
            f"Interconnect check: {result.backend}, {world} rank(s), {result.device or '?'}, "
            f"torch {result.torch_version or '?'}"
            + (f", NCCL {result.nccl_version}" if result.nccl_version else "")
            + f"\n  python {python}; NCCL_NVLS_ENABLE={env.get('NCCL_NVLS_ENABLE')}"
            + "".join(
                f", {k}={v}"
                for k, v in sorted(env.items())
                if k.startswith("NCCL_") and k != "NCCL_NVLS_ENABLE"
            )
        ]
        if topo is not None:
            parts.append(render_topology(topo))
        if result.sizes:
            parts.append(render_table(result, topo))
        parts.append("\n".join(_note_line(n) for n in notes))
        print("\n\n".join(parts))
    return 1 if any(n.level == "error" for n in notes) else 0


def _note_line(note: Note) -> str:
    text = f"{note.level:<5}  {note.message}"
    return text + (f"\n       fix: {note.fix}" if note.fix else "")


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: _main(argv))


if __name__ == "__main__":
    raise SystemExit(main())
