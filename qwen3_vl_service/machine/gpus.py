"""GPU inventory: described by a spec (``--gpus 8xH100-80GB``) or detected through NVML.

Nothing here imports torch: NVML (nvidia-ml-py) answers in milliseconds and
works on nodes where CUDA was never initialised.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from qwen3_vl_service.core.errors import CheckFailed, UsageError

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    used_bytes: int


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int] | None = None
    uuid: str = ""
    processes: tuple[GpuProcess, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Inventory:
    """What the plan is made against: the GPUs, and where the facts came from."""

    gpus: tuple[Gpu, ...]
    source: str  # "nvml" or "spec <SPEC>"
    driver_version: str = ""
    cuda_version: str = ""
    # CUDA_VISIBLE_DEVICES as it was when detected (None: unset, every GPU).
    visible_devices: str | None = None
    # Things the report should mention (entries of CUDA_VISIBLE_DEVICES that CUDA ignores, ...).
    notes: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.gpus)


# Usable totals as NVML reports them (MiB), so that a plan made on a login node
# from a spec matches the one made on the node itself.
_KNOWN_TOTAL_MIB = {
    ("H100", 80): 81559,
    ("H100", 94): 95830,
    ("H200", 141): 143771,
    ("A100", 80): 81920,
    ("A100", 40): 40960,
    ("L40S", 48): 46068,
    ("H20", 96): 97871,
    ("B200", 180): 183359,
}
_KNOWN_CC = {"H100": (9, 0), "H200": (9, 0), "H20": (9, 0), "A100": (8, 0), "L40S": (8, 9), "B200": (10, 0)}
# The memory a name alone means (``--gpus 8xH200``): the model that name is sold as, or the common
# one (H100: the 80 GB SXM and PCIe cards; the 94 GB NVL is written H100-94GB). A100 came as 40 and
# 80 GB alike, so it needs the number.
_DEFAULT_GB = {"H100": 80, "H200": 141, "H20": 96, "L40S": 48, "B200": 180}

_SPEC_RE = re.compile(r"^(?:(\d+)\s*[xX*]\s*)?([A-Za-z][A-Za-z0-9]*)(?:-(\d+(?:\.\d+)?)\s*(GB|GiB|G)?)?$")
_SPEC_FIX = "write COUNTxNAME-MEMORY, e.g. 8xH100-80GB, 4xH100-80GB or 8xH200-141GB (8xH100, 8xH200 also do)"


def parse_spec(spec: str) -> Inventory:
    """Parse ``8xH100-80GB`` / ``4xH100-80GB`` / ``8xH200-141GB`` / ``H100-80GB`` / ``8xH200``.

    Without the memory, a model of the table above gets its usual size (_DEFAULT_GB).
    """
    m = _SPEC_RE.match(spec.strip())
    if not m:
        raise UsageError(f"GPU spec {spec!r} is not understood", fix=_SPEC_FIX)
    count = int(m.group(1) or 1)
    if not 1 <= count <= 64:
        raise UsageError(f"GPU spec {spec!r} asks for {count} GPUs", fix="give a count between 1 and 64")
    name = m.group(2).upper()
    if m.group(3) is None:
        if name not in _DEFAULT_GB:
            sizes = sorted(size for known, size in _KNOWN_TOTAL_MIB if known == name)
            if not sizes:  # no GPU of that name: not a spec at all ("lots")
                raise UsageError(f"GPU spec {spec!r} is not understood", fix=_SPEC_FIX)
            examples = " or ".join(f"{count}x{name}-{size}GB" for size in sizes)
            raise UsageError(
                f"GPU spec {spec!r} has no memory, and {name} comes in several sizes",
                fix=f"write it: {examples}",
            )
        size = float(_DEFAULT_GB[name])
        label = f"{name}-{_DEFAULT_GB[name]}GB"
    else:
        size = float(m.group(3))
        label = f"{name}-{m.group(3)}GB"
    if size <= 0:
        raise UsageError(f"GPU spec {spec!r} has no memory", fix="give the memory per GPU, e.g. 80GB")
    total = _KNOWN_TOTAL_MIB.get((name, round(size)))
    total_bytes = total * MiB if total else int(size * GiB)
    cc = _KNOWN_CC.get(name)
    gpus = tuple(
        Gpu(
            index=i,
            name=label,
            total_bytes=total_bytes,
            free_bytes=total_bytes,
            compute_capability=cc,
        )
        for i in range(count)
    )
    return Inventory(gpus=gpus, source=f"spec {spec.strip()}")


# ---------------------------------------------------------------------------
# Detection through NVML (nvidia-ml-py's ``pynvml`` module)


def _nvml_error_class(nvml: Any, name: str) -> type | None:
    cls = getattr(nvml, name, None)
    return cls if isinstance(cls, type) else None


def _is_nvml_error(nvml: Any, exc: BaseException, *names: str) -> bool:
    """Whether EXC is one of pynvml's NVMLError_<NAME> classes (or carries its code)."""
    for name in names:
        cls = _nvml_error_class(nvml, f"NVMLError_{name}")
        if cls is not None and isinstance(exc, cls):
            return True
    return False


_NO_GPU_FIX = (
    "run it on the GPU node inside your allocation (srun --pty ... or sbatch), "
    "or plan here with --gpus 8xH100-80GB"
)


class NvmlUnavailable(CheckFailed):
    """NVML cannot answer here: no nvidia-ml-py, no driver, no permission, or a failed query."""


def load_nvml() -> Any:
    """The pynvml module (nvidia-ml-py), imported here only: tests put a fake in its place."""
    try:
        import pynvml  # lazy: CPU machines and login nodes plan without it
    except ImportError:
        raise NvmlUnavailable(
            "cannot query the GPUs: the nvidia-ml-py package (module pynvml) is not installed",
            fix="pip install nvidia-ml-py (a launcher requirement), or plan with --gpus 8xH100-80GB",
        ) from None
    return pynvml


@contextlib.contextmanager
def nvml_session(nvml: Any = None) -> Iterator[Any]:
    """NVML, initialised for the block and shut down after: the one place that opens it.

    NVML is the pynvml module (default: load_nvml()). NvmlUnavailable (a
    CheckFailed, one line with the fix) when it cannot start, and for any
    NVML error the block leaves uncaught.
    """
    nv = load_nvml() if nvml is None else nvml
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        raise _init_failure(nv, exc) from None
    except Exception as exc:  # noqa: BLE001 - OSError and friends from a broken libnvidia-ml
        raise NvmlUnavailable(
            f"NVML could not start: {exc}", fix=f"check nvidia-smi; {_NO_GPU_FIX}"
        ) from None
    try:
        yield nv
    except nv.NVMLError as exc:
        raise NvmlUnavailable(f"NVML query failed: {exc}", fix="check nvidia-smi") from None
    finally:
        with contextlib.suppress(Exception):  # nothing to do about a failing shutdown
            nv.nvmlShutdown()


def _init_failure(nvml: Any, exc: BaseException) -> NvmlUnavailable:
    if _is_nvml_error(nvml, exc, "LibraryNotFound"):
        return NvmlUnavailable(
            "no NVIDIA driver on this node: the NVML library libnvidia-ml.so.1 was not found", fix=_NO_GPU_FIX
        )
    if _is_nvml_error(nvml, exc, "DriverNotLoaded"):
        return NvmlUnavailable(
            "no NVIDIA driver on this node: NVML says the driver is not loaded",
            fix=f"{_NO_GPU_FIX}; if this is a GPU node, ask the admins (nvidia-smi fails too)",
        )
    if _is_nvml_error(nvml, exc, "LibRmVersionMismatch"):
        return NvmlUnavailable(
            "the NVIDIA driver and its NVML library have different versions "
            "(driver updated, node not rebooted)",
            fix="use another node and tell the admins",
        )
    if _is_nvml_error(nvml, exc, "NoPermission"):
        return NvmlUnavailable("no permission to open the NVIDIA devices through NVML", fix=_NO_GPU_FIX)
    return NvmlUnavailable(f"NVML could not start: {exc}", fix=f"check nvidia-smi; {_NO_GPU_FIX}")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _cuda_version_text(value: int) -> str:
    # NVML reports e.g. 12040 for CUDA 12.4.
    return f"{value // 1000}.{(value % 1000) // 10}" if value > 0 else ""


def _process_name(nvml: Any, pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except Exception:  # noqa: BLE001 - another user's or another namespace's pid
        pass
    try:
        return os.path.basename(_text(nvml.nvmlSystemGetProcessName(pid))) or "?"
    except Exception:  # noqa: BLE001 - not fatal: the pid is what matters
        return "?"


def nvml_processes(nvml: Any, handle: Any) -> list[tuple[int, int | None]]:
    """(pid, bytes used or None where the driver does not say) of each process on the GPU HANDLE."""
    found: dict[int, int | None] = {}
    for fn_name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        fn = getattr(nvml, fn_name, None)
        if fn is None:
            continue
        try:
            procs = fn(handle)
        except Exception:  # noqa: BLE001 - NotSupported on some boards; the memory numbers still tell
            continue
        for p in procs or ():
            pid = int(getattr(p, "pid", 0) or 0)
            used = getattr(p, "usedGpuMemory", None)
            # NVML reports "not available" as a huge sentinel (NVML_VALUE_NOT_AVAILABLE).
            if pid and pid not in found:
                found[pid] = None if used is None or used >= 2**63 else int(used)
    return list(found.items())


def _gpu_processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    return tuple(
        GpuProcess(pid=pid, name=_process_name(nvml, pid), used_bytes=used or 0)
        for pid, used in nvml_processes(nvml, handle)
    )


def parse_visible_devices(value: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: None when unset (all GPUs), else the entries in order.

    CUDA stops at the first entry it cannot use (``-1`` or garbage), so an
    empty list means no GPU at all.
    """
    if value is None:
        return None
    entries: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def cuda_order(entries: list[str], count: int, uuid_of: Callable[[int], str]) -> tuple[list[int], int | None]:
    """The NVML indices CUDA uses for ENTRIES (from parse_visible_devices), in CUDA's order.

    Also returns the position of the first entry CUDA ignores, with all after
    it (None: every entry is used): an index past COUNT, a UUID prefix that
    names no GPU or several, a GPU named twice. UUID_OF(i) is asked only when
    an entry is a UUID (CUDA accepts any unique prefix, in any case). A MIG
    instance raises CheckFailed: this model needs whole GPUs.
    """
    order: list[int] = []
    uuids: dict[int, str] | None = None
    for pos, entry in enumerate(entries):
        index: int | None = None
        if entry.isdigit():
            index = int(entry) if int(entry) < count else None
        elif entry.upper().startswith("MIG-"):
            raise CheckFailed(
                f"CUDA_VISIBLE_DEVICES names a MIG instance ({entry}); this model needs whole GPUs",
                fix="give whole GPUs (indices or GPU-UUIDs), or unset CUDA_VISIBLE_DEVICES",
            )
        elif entry.upper().startswith("GPU-"):
            if uuids is None:
                uuids = {i: uuid_of(i).upper() for i in range(count)}
            matches = [i for i, u in uuids.items() if u.startswith(entry.upper())]
            index = matches[0] if len(matches) == 1 else None
        if index is None or index in order:
            return order, pos
        order.append(index)
    return order, None


def _select(nvml: Any, count: int, entries: list[str] | None) -> tuple[list[tuple[int, Any]], list[str]]:
    """[(nvml_index, handle)] in CUDA order, and notes about entries CUDA would ignore."""
    handles: dict[int, Any] = {}

    def handle(i: int) -> Any:
        if i not in handles:
            try:
                handles[i] = nvml.nvmlDeviceGetHandleByIndex(i)
            except nvml.NVMLError as exc:
                raise CheckFailed(
                    f"NVML cannot open GPU {i}: {exc}",
                    fix="check nvidia-smi; the GPU may be lost or need a reset",
                ) from None
        return handles[i]

    if entries is None:
        every: list[tuple[int, Any]] = []
        skipped: list[str] = []
        for i in range(count):
            try:
                every.append((i, nvml.nvmlDeviceGetHandleByIndex(i)))
            except nvml.NVMLError as exc:
                if not _is_nvml_error(nvml, exc, "NoPermission"):
                    raise CheckFailed(
                        f"NVML cannot open GPU {i}: {exc}", fix="check nvidia-smi; the GPU may need a reset"
                    ) from None
                # Another job's GPU behind a device cgroup: not ours to use.
                skipped.append(str(i))
        notes = (
            [f"no permission to open GPU(s) {','.join(skipped)} (another job's?); left out"]
            if skipped
            else []
        )
        return every, notes
    order, ignored_from = cuda_order(entries, count, lambda i: _text(nvml.nvmlDeviceGetUUID(handle(i))))
    notes = []
    if ignored_from is not None:
        entry, rest = entries[ignored_from], ",".join(entries[ignored_from:])
        notes.append(f"CUDA ignores CUDA_VISIBLE_DEVICES from {entry!r} on ({rest}): not a GPU of this node")
    return [(i, handle(i)) for i in order], notes


def detect(environ: Mapping[str, str] | None = None, nvml: Any = None) -> Inventory:
    """The GPUs this process would see, through NVML, in CUDA_VISIBLE_DEVICES order.

    ``nvml`` is the pynvml module (tests pass a fake one). Raises CheckFailed
    with one clear line when there is no driver, no NVML library or no
    permission. Integer entries of CUDA_VISIBLE_DEVICES are taken as NVML
    (PCI bus) indices, which is how SLURM writes them; CUDA agrees when
    CUDA_DEVICE_ORDER=PCI_BUS_ID or the GPUs are all of one kind.
    """
    env = os.environ if environ is None else environ
    with nvml_session(nvml) as nvml:
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            raise CheckFailed(f"NVML cannot count the GPUs: {exc}", fix="check nvidia-smi") from None
        visible = env.get("CUDA_VISIBLE_DEVICES")
        selected, notes = _select(nvml, count, parse_visible_devices(visible))
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            driver = ""
        try:
            cuda = _cuda_version_text(int(nvml.nvmlSystemGetCudaDriverVersion()))
        except nvml.NVMLError:
            cuda = ""
        gpus = []
        for index, h in selected:
            try:
                name = _text(nvml.nvmlDeviceGetName(h))
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
            except nvml.NVMLError as exc:
                raise CheckFailed(
                    f"NVML cannot read GPU {index}: {exc}",
                    fix="check nvidia-smi; the GPU may be lost or need a reset",
                ) from None
            try:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(h)
                cc: tuple[int, int] | None = (int(major), int(minor))
            except nvml.NVMLError:
                cc = None
            try:
                uuid = _text(nvml.nvmlDeviceGetUUID(h))
            except nvml.NVMLError:
                uuid = ""
            gpus.append(
                Gpu(
                    index=index,
                    name=name,
                    total_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                    compute_capability=cc,
                    uuid=uuid,
                    processes=_gpu_processes(nvml, h),
                )
            )
    return Inventory(
        gpus=tuple(gpus),
        source="nvml",
        driver_version=driver,
        cuda_version=cuda,
        visible_devices=visible,
        notes=tuple(notes),
    )
