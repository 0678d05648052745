"""What the interconnect check found, as preflight findings and tables; findings() is the launcher's entry."""

from __future__ import annotations

import os
import sys

from qwen3_vl_service.core.findings import Finding, Level
from qwen3_vl_service.core.units import format_bytes, format_ranges, format_short_time
from qwen3_vl_service.interconnect.run import (
    DEFAULT_SIZES,
    DEFAULT_TIMEOUT,
    CheckResult,
    run_check,
    torch_missing,
    worker_env,
)
from qwen3_vl_service.interconnect.topology import Topology, p2p_problems, read_topology
from qwen3_vl_service.machine.gpus import NvmlUnavailable
from qwen3_vl_service.settings.config import ServiceConfig

CHECK = "Interconnect"
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
    "Rerun `.venv/bin/python -m qwen3_vl_service.interconnect` with NCCL_DEBUG=INFO to see where it "
    "stops, then try, "
    "one at a time: NCCL_P2P_DISABLE=1 (if that passes, P2P or ACS is at fault; NCCL_P2P_LEVEL=NVL keeps "
    "P2P over NVLink only), NCCL_SHM_DISABLE=1, NCCL_IB_DISABLE=1, NCCL_SOCKET_IFNAME=lo. "
    "Put the one that works in config.env so that vLLM gets it too (vLLM #5484, #8410, #31276)"
)


def _subject(result: CheckResult) -> str:
    n = result.world_size
    if result.backend == "nccl":
        return f"NCCL all-reduce on {n} GPU{'s' if n != 1 else ''}"
    return f"{result.backend} all-reduce on {n} CPU process{'es' if n != 1 else ''}"


def topology_findings(topo: Topology) -> list[Finding]:
    found: list[Finding] = []
    n = len(topo.gpus)
    model = ", ".join(sorted({g.name for g in topo.gpus}))
    nominal = topo.nominal()
    nominal_text = f"; nominal {nominal[0]:g} GB/s per GPU ({nominal[1]})" if nominal else ""
    has_nvlink = any(g.nvlinks_supported for g in topo.gpus)
    if n == 1:
        found.append(Finding("ok", CHECK, f"topology: 1 x {model} (no peer to connect to)"))
    elif topo.all_nvlink:
        found.append(
            Finding("ok", CHECK, f"topology: {n} x {model}, NVLink between every pair{nominal_text}")
        )
    else:
        paths = {topo.links[i][j] for i in range(n) for j in range(n) if i != j}
        pcie = "/".join(sorted(p for p in paths if not p.startswith("NV")))
        # GPUs with NVLink ports that reach a peer over PCIe: a link or the NVSwitch fabric is down.
        fix = (
            "a link or the NVSwitch fabric is down: check `nvidia-smi nvlink -s` and "
            "`nvidia-smi -q | grep -i -A2 fabric`, report the node to the admins"
        )
        found.append(
            Finding(
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
        found.append(
            Finding(
                "warn",
                CHECK,
                f"NVLinks down: {', '.join(short)} links active, the other GPUs have {most}",
                "a broken NVLink slows or hangs NCCL; check `nvidia-smi nvlink -s`, report the node",
            )
        )
    bad = p2p_problems(topo)
    if bad:
        more = " ..." if len(bad) > 4 else ""
        found.append(
            Finding(
                "warn",
                CHECK,
                f"GPU peer-to-peer not available: {'; '.join(bad[:4])}{more}",
                "NCCL falls back to shared memory (slower); if it hangs instead, "
                "set NCCL_P2P_DISABLE=1 in config.env",
            )
        )
    return found


def result_findings(result: CheckResult, topo: Topology | None = None) -> list[Finding]:
    subject = _subject(result)
    version = f"NCCL {result.nccl_version}" if result.nccl_version else f"torch {result.torch_version}"
    if result.status == "skipped":
        return [Finding("warn", CHECK, f"interconnect check skipped: {result.message}")]
    if result.status == "timeout":
        where = f" (logs: {result.log_dir})" if result.log_dir else ""
        return [Finding("error", CHECK, f"{subject} {result.message}{where}", HANG_FIX)]
    if result.status == "failed":
        where = f" (logs: {result.log_dir})" if result.log_dir else ""
        return [Finding("error", CHECK, f"{subject} failed: {result.message}{where}", HANG_FIX)]
    if result.status == "wrong":
        return [
            Finding(
                "error",
                CHECK,
                f"{subject} returned {result.message} ({version})",
                "a faulty GPU, NVLink or P2P path corrupts data: rerun with NCCL_P2P_DISABLE=1 to see "
                "whether the P2P path is at fault, and report the node to the admins",
            )
        ]
    found: list[Finding] = []
    sizes = ", ".join(format_bytes(s.nbytes) for s in result.sizes)
    text = f"{subject} correct at {sizes} ({version}; {result.elapsed_s:.1f} s)"
    level: Level = "ok"
    fix = ""
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
    found.append(Finding(level, CHECK, text, fix))
    if result.shutdown_hung:
        found.append(
            Finding(
                "warn",
                CHECK,
                f"the check's workers hung or failed at exit (logs: {result.log_dir})",
                "usually harmless; if vLLM hangs at shutdown too, stop it with stop_service.py",
            )
        )
    return found


def findings(cfg: ServiceConfig) -> list[Finding]:
    """The launcher's entry: topology and all-reduce findings for the GPUs vLLM will use.

    Without GPUs (no driver, none visible) or without torch in VLLM_PYTHON:
    one 'warn' line saying the check was skipped. The GPUs are read from
    NVML, as CUDA will number them.
    """
    if cfg.device == "cpu":
        return [_skipped("DEVICE=cpu uses no GPU")]
    env = worker_env(os.environ, cfg.vllm_env, "nccl")
    try:
        topo = read_topology(env)
    except NvmlUnavailable as exc:
        return [_skipped(exc.message)]
    python = cfg.vllm_python or sys.executable
    missing = torch_missing(python)
    if missing:
        return [_skipped(missing)]
    n = min(cfg.tensor_parallel_size, len(topo.gpus))
    topo = topo.subset(n)
    found = topology_findings(topo)
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
    return found + result_findings(result, topo)


def _skipped(reason: str) -> Finding:
    return Finding("warn", CHECK, f"interconnect check skipped: {reason}")


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
        took = format_short_time(s.time_s)
        row = f"  {format_bytes(s.nbytes):>10} {s.iters:>6} {took:>11} {s.algbw:>7.1f} GB/s"
        row += f" {bus:>7.1f} GB/s" if result.world_size > 1 else f" {'-':>12}"
        if nominal:
            row += f" {bus / nominal[0]:>11.0%}" if result.world_size > 1 else f" {'-':>11}"
        row += "  ok" if not s.bad_ranks else f"  WRONG on rank(s) {format_ranges(s.bad_ranks)}"
        rows.append(row)
    return "\n".join(head + rows)


def finding_line(finding: Finding) -> str:
    """'warn   message' and, when there is one, an indented 'fix: ...' line."""
    text = f"{finding.level:<5}  {finding.message}"
    return text + (f"\n       fix: {finding.fix}" if finding.fix else "")
