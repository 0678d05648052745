"""The GPUs' topology from NVML (no torch): NVLink or the PCIe path between each pair, P2P status."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwen3_vl_service.machine.gpus import NvmlUnavailable, cuda_order, nvml_session, parse_visible_devices

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
        pcie = [
            (g.pcie_gen, g.pcie_width)
            for g in self.gpus
            if g.pcie_gen in _PCIE_LANE_GBPS and g.pcie_width is not None
        ]
        if len(pcie) < len(self.gpus):
            return None
        pcie_gen, lanes = min(pcie, key=lambda gw: _PCIE_LANE_GBPS[gw[0]] * gw[1])
        return _PCIE_LANE_GBPS[pcie_gen] * lanes, f"PCIe Gen{pcie_gen} x{lanes}"

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


def read_topology(env: Mapping[str, str] | None = None, nvml: Any = None) -> Topology:
    """The GPUs CUDA will see, in its order, and the link between each pair.

    Raises NvmlUnavailable where NVML cannot answer (no library, no driver, no
    GPU), and CheckFailed where CUDA_VISIBLE_DEVICES names a MIG instance
    (gpus.cuda_order). NVML is the pynvml module (tests pass a fake one).
    """
    env = os.environ if env is None else env
    with nvml_session(nvml) as nv:
        count = nv.nvmlDeviceGetCount()
        if count == 0:
            raise NvmlUnavailable("NVML reports no GPU")
        handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        order = visible_indices(env, [_text(nv.nvmlDeviceGetUUID(h)) for h in handles])
        if not order:
            raise NvmlUnavailable(
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
    bad = p2p_problems(topo)
    if bad:
        lines.append("  P2P not available: " + "; ".join(bad))
    nominal = topo.nominal()
    if nominal:
        lines.append(f"  nominal: {nominal[0]:g} GB/s per GPU and direction ({nominal[1]})")
    return "\n".join(lines)


def p2p_problems(topo: Topology) -> list[str]:
    out = []
    n = len(topo.gpus)
    for i in range(n):
        for j in range(i + 1, n):
            status = topo.p2p[i][j]
            # "unknown": NVML could not say (some VMs); not evidence of a problem.
            if status not in ("ok", "X", "unknown") and not topo.links[i][j].startswith("NV"):
                out.append(f"GPU{topo.gpus[i].index}-GPU{topo.gpus[j].index} {status}")
    return out
