"""GPU inventory: described by a spec (``--gpus 8xH100-80GB``) or detected through NVML.

Nothing here imports torch: NVML (nvidia-ml-py) answers in milliseconds and
works on nodes where CUDA was never initialised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UsageError

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

_SPEC_RE = re.compile(r"^(?:(\d+)\s*[xX*]\s*)?([A-Za-z][A-Za-z0-9]*)-(\d+(?:\.\d+)?)\s*(GB|GiB|G)?$")


def parse_spec(spec: str) -> Inventory:
    """Parse ``8xH100-80GB`` / ``4xH100-80GB`` / ``8xH200-141GB`` / ``H100-80GB``."""
    m = _SPEC_RE.match(spec.strip())
    if not m:
        raise UsageError(
            f"GPU spec {spec!r} is not understood",
            fix="write COUNTxNAME-MEMORY, e.g. 8xH100-80GB, 4xH100-80GB or 8xH200-141GB",
        )
    count = int(m.group(1) or 1)
    if not 1 <= count <= 64:
        raise UsageError(f"GPU spec {spec!r} asks for {count} GPUs", fix="give a count between 1 and 64")
    name = m.group(2).upper()
    size = float(m.group(3))
    if size <= 0:
        raise UsageError(f"GPU spec {spec!r} has no memory", fix="give the memory per GPU, e.g. 80GB")
    total = _KNOWN_TOTAL_MIB.get((name, round(size)), None)
    total_bytes = total * MiB if total else int(size * GiB)
    cc = _KNOWN_CC.get(name)
    gpus = tuple(
        Gpu(index=i, name=f"{name}-{m.group(3)}GB", total_bytes=total_bytes, free_bytes=total_bytes, compute_capability=cc)
        for i in range(count)
    )
    return Inventory(gpus=gpus, source=f"spec {spec.strip()}")
