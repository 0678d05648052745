"""The preflight: every check that can run before vLLM starts, and one report.

``run(cfg)`` checks the GPUs (NVML, or a ``--gpus`` spec), the SLURM
allocation, the model directory, the parallel layout and the capacity (see
plan.py) and the two ports, and returns a ``Report``: findings (ok / warn /
error, each with its fix), the plan and the facts behind it. ``render()``
turns it into text, one line per finding, then the per-GPU plan and the
capacity maths.

Nothing here imports torch, vLLM or transformers; without GPUs the whole
preflight takes a few tens of milliseconds.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.findings import Finding, Level
from qwen3_vl_service.core.hosts import is_loopback
from qwen3_vl_service.core.names import MEDIA_MARKERS
from qwen3_vl_service.core.units import format_bytes, format_duration, format_ranges
from qwen3_vl_service.machine import gpus as gpus_mod
from qwen3_vl_service.machine import processes
from qwen3_vl_service.machine.gpus import Inventory
from qwen3_vl_service.media import client as media_client
from qwen3_vl_service.planning import model as model_mod
from qwen3_vl_service.planning import plan as plan_mod
from qwen3_vl_service.planning import slurm as slurm_mod
from qwen3_vl_service.planning.model import ModelInfo
from qwen3_vl_service.planning.plan import Plan
from qwen3_vl_service.planning.slurm import Allocation
from qwen3_vl_service.settings import scope
from qwen3_vl_service.settings.config import ServiceConfig

GiB = 1024**3
CHECK_WIDTH = 9  # "Parallel", "Capacity": the check names' column


@dataclass
class Report:
    findings: list[Finding]
    plan: Plan | None
    inventory: Inventory | None
    model: ModelInfo | None
    allocation: Allocation | None
    config_expert_parallel: str = "auto"

    @property
    def ok(self) -> bool:
        """No error: vLLM may start."""
        return not any(f.level == "error" for f in self.findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def expert_parallel(self) -> bool:
        """Whether to pass --enable-expert-parallel: the plan's decision, else EXPERT_PARALLEL=on."""
        if self.plan is not None:
            return self.plan.expert_parallel
        return self.config_expert_parallel == "on"


# ---------------------------------------------------------------------------
# GPUs


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def _gpu_findings(cfg: ServiceConfig, inv: Inventory) -> list[Finding]:
    out: list[Finding] = []
    if not inv.gpus:
        return out  # plan.make says "Requested N GPUs but only 0 available"
    names = sorted({g.name for g in inv.gpus})
    totals = sorted({g.total_bytes for g in inv.gpus})
    frees = [g.free_bytes for g in inv.gpus]
    ccs = sorted({g.compute_capability for g in inv.gpus if g.compute_capability})
    text = f"{inv.count} x {' + '.join(names)}, {_gib(totals[0])} GiB each"
    if inv.source == "nvml":
        lo, hi = _gib(min(frees)), _gib(max(frees))
        text += f" ({lo} GiB free)" if lo == hi else f" ({lo}-{hi} GiB free)"
        text = f"{text}; GPU {format_ranges(g.index for g in inv.gpus)}"
    if ccs:
        text += "; compute " + ", ".join(f"{a}.{b}" for a, b in ccs)
    if inv.driver_version:
        text += f"; driver {inv.driver_version}"
    if inv.cuda_version:
        text += f", CUDA {inv.cuda_version}"
    if inv.source == "nvml":
        vis = inv.visible_devices
        text += f"; CUDA_VISIBLE_DEVICES={vis}" if vis is not None else "; CUDA_VISIBLE_DEVICES unset (all)"
    else:
        text += f" (described by {inv.source.removeprefix('spec ')}, not detected)"
    out.append(Finding("ok", "GPUs", text))
    for note in inv.notes:
        out.append(Finding("warn", "GPUs", note, "fix CUDA_VISIBLE_DEVICES"))
    tp = cfg.tensor_parallel_size
    for pos, g in enumerate(inv.gpus):
        if not g.processes:
            continue
        used = sum(p.used_bytes for p in g.processes)
        procs = ", ".join(f"pid {p.pid} {p.name} {p.used_bytes // 2**20:,} MiB" for p in g.processes)
        role = "used by this plan" if pos < tp else "not used by this plan"
        out.append(
            Finding(
                "warn",
                "GPUs",
                f"GPU {g.index} ({role}): {len(g.processes)} other process(es) hold "
                f"{_gib(used)} GiB: {procs}",
                f"stop them if they are yours (kill {' '.join(str(p.pid) for p in g.processes)})",
            )
        )
    return out


# ---------------------------------------------------------------------------
# SLURM


def _slurm_findings(
    cfg: ServiceConfig, alloc: Allocation | None, plan: Plan | None, no_end_time: str = ""
) -> list[Finding]:
    """NO_END_TIME: why squeue could not tell the end time either (empty: it was not asked).

    The first finding is the 'ok' summary of the job; the others say what is missing or short.
    """
    if alloc is None:
        return [_no_allocation(cfg)]
    out: list[Finding] = []
    parts = [f"job {alloc.job_id}"]
    if alloc.node_name:
        parts[0] += f" on {alloc.node_name}"
    if alloc.partition:
        parts[0] += f" (partition {alloc.partition})"
    for note in alloc.notes:
        out.append(Finding("warn", "SLURM", note, "check the job's environment"))
    if not alloc.node_name:
        where = f" {alloc.nodelist}" if alloc.nodelist else ""
        out.append(
            Finding(
                "warn",
                "SLURM",
                "SLURMD_NODENAME is unset: this shell may run where salloc was typed, "
                f"not on the job's node{where}",
                f"open a shell on the node first: srun --jobid {alloc.job_id} --pty bash",
            )
        )
    if cfg.device == "gpu":
        _slurm_gpus(cfg, alloc, out, parts)
    _slurm_memory(cfg, alloc, plan, out, parts)
    _slurm_time(alloc, plan, no_end_time, out, parts)
    out.insert(0, Finding("ok", "SLURM", ", ".join(parts)))
    return out


def _no_allocation(cfg: ServiceConfig) -> Finding:
    if cfg.require_slurm:
        return Finding(
            "error",
            "SLURM",
            "not inside a SLURM allocation (SLURM_JOB_ID is unset) and REQUIRE_SLURM=true",
            f"start it in a job: salloc --gpus-per-node={cfg.tensor_parallel_size} ... "
            "then srun --pty bash, "
            "or sbatch",
        )
    return Finding(
        "warn",
        "SLURM",
        "not inside a SLURM allocation (SLURM_JOB_ID is unset): "
        "the GPUs may be shared and no time limit applies",
        "run it inside salloc/sbatch (REQUIRE_SLURM=true makes this an error)",
    )


def _slurm_gpus(cfg: ServiceConfig, alloc: Allocation, out: list[Finding], parts: list[str]) -> None:
    """The job's GPUs on this node against TENSOR_PARALLEL_SIZE (a finding, or a part of the summary)."""
    tp = cfg.tensor_parallel_size
    if alloc.gpus_on_node is None:
        out.append(
            Finding(
                "warn",
                "SLURM",
                f"job {alloc.job_id} has no GPUs recorded (SLURM_GPUS_ON_NODE and SLURM_JOB_GPUS unset)",
                f"request them: salloc --gpus-per-node={tp}",
            )
        )
    elif alloc.gpus_on_node < tp:
        out.append(
            Finding(
                "error",
                "SLURM",
                f"SLURM allocated {alloc.gpus_on_node} GPU(s) on this node, "
                f"TENSOR_PARALLEL_SIZE={tp} needs {tp}",
                f"allocate {tp}: salloc --gpus-per-node={tp}, or lower TENSOR_PARALLEL_SIZE",
            )
        )
    else:
        ids = f" ({','.join(alloc.job_gpus)})" if alloc.job_gpus else ""
        parts.append(f"{alloc.gpus_on_node} GPUs{ids}")


def _slurm_memory(
    cfg: ServiceConfig, alloc: Allocation, plan: Plan | None, out: list[Finding], parts: list[str]
) -> None:
    """The job's host memory against what vLLM's processes need."""
    need = plan.host_memory_bytes if plan is not None else None
    if alloc.mem_per_node_bytes is None:
        parts.append("no --mem limit")
    elif need and alloc.mem_per_node_bytes < need:
        out.append(
            Finding(
                "error",
                "SLURM",
                f"the job has {_gib(alloc.mem_per_node_bytes)} GiB of host memory (SLURM_MEM_PER_NODE); "
                f"vLLM with {cfg.tensor_parallel_size} GPU worker(s) needs about {_gib(need)} GiB "
                f"({_gib(plan_mod.HOST_BASE)} for the API server "
                f"and engine + {_gib(plan_mod.HOST_PER_WORKER)} per GPU worker)",
                f"allocate more: salloc --mem={int(need / GiB) + 1}G (or --mem=0 for the whole node)",
            )
        )
    else:
        parts.append(
            f"{_gib(alloc.mem_per_node_bytes)} GiB memory" + (f" (needs ~{_gib(need)} GiB)" if need else "")
        )


def _slurm_time(
    alloc: Allocation, plan: Plan | None, no_end_time: str, out: list[Finding], parts: list[str]
) -> None:
    """The job's time left against the expected load time."""
    load = plan.expected_load_s if plan is not None else None
    if alloc.time_left_s is None:
        why = "SLURM_JOB_END_TIME unset" + (f"; {no_end_time}" if no_end_time else "")
        parts.append(f"time limit unknown ({why})")
    elif load is not None and alloc.time_left_s < load:
        out.append(
            Finding(
                "error",
                "SLURM",
                f"job {alloc.job_id} has {format_duration(alloc.time_left_s)} left; "
                "loading the model takes about "
                f"{format_duration(load)} (checkpoint at {plan_mod.LOAD_RATE / GiB:g} GiB/s + "
                f"{plan_mod.LOAD_FIXED_S / 60:g} min to compile and warm up)",
                "start a new allocation with a longer --time",
            )
        )
    elif load is not None and alloc.time_left_s < load + 1800:
        out.append(
            Finding(
                "warn",
                "SLURM",
                f"job {alloc.job_id} has {format_duration(alloc.time_left_s)} left; loading takes about "
                f"{format_duration(load)}, leaving under 30 min of service",
                "start a new allocation with a longer --time",
            )
        )
    else:
        left = format_duration(max(0.0, alloc.time_left_s))
        source = " (from squeue)" if alloc.end_time_source == "squeue" else ""
        parts.append(f"{left} left{source}" + (f" (loading takes ~{format_duration(load)})" if load else ""))


# ---------------------------------------------------------------------------
# Model


def _model_findings(info: ModelInfo) -> list[Finding]:
    out = list(info.issues)
    if not info.config_ok or info.errors or info.planned_from:
        return out
    arch = info.architectures[0] if info.architectures else "?"
    quant = ""
    if info.quant_method:
        block = "x".join(str(b) for b in info.weight_block_size or ())
        quant = f", {info.quant_method}" + (f" {info.quant_fmt}" if info.quant_fmt else "")
        quant += f" blocks {block}" if block else ""
    moe = f", {info.num_experts} experts top-{info.num_experts_per_tok}" if info.num_experts else ""
    size = info.weights_bytes
    files = f"{len(info.shards)} shard(s)" + (f", {format_bytes(size)}" if size else "") + " complete"
    if info.manifest:
        files += " (checked against the download manifest)"
    extras = "tokenizer, processor and chat template present"
    text = f"{arch}{quant}, {info.num_hidden_layers} layers{moe}; {files}; {extras}"
    out.insert(0, Finding("ok", "Model", f"{info.path}: {text}"))
    return out


# ---------------------------------------------------------------------------
# Ports


def _exposure_findings(cfg: ServiceConfig) -> list[Finding]:
    """An API open beyond this node without API_KEY: anyone who reaches the node can use it."""
    if is_loopback(cfg.host) or cfg.api_key:
        return []
    return [
        Finding(
            "warn",
            "Access",
            f"HOST={cfg.host} serves the API beyond this node and API_KEY is not set: anyone who "
            f"reaches port {cfg.port} can use the model (and, through media URLs, this node's loopback)",
            "set API_KEY (clients send 'Authorization: Bearer <key>'), or keep HOST=127.0.0.1 and use ssh -L",
        )
    ]


def _folder_findings(cfg: ServiceConfig) -> list[Finding]:
    """RUN_DIR, LOG_DIR and MEDIA_ROOT: folders (made when missing) that the start can write or read."""
    out: list[Finding] = []
    wanted = [("RUN_DIR", cfg.run_dir, True), ("LOG_DIR", cfg.log_dir, True)]
    if cfg.media_server:
        wanted.append(("MEDIA_ROOT", cfg.media_root, False))
    for key, path, write in wanted:
        if path.exists() and not path.is_dir():
            out.append(
                Finding(
                    "error", "Folders", f"{key}={path} is a file, not a folder", f"point {key} at a folder"
                )
            )
            continue
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not existing.is_dir():
            out.append(Finding("error", "Folders", f"{key}={path}: {existing} is not a folder", f"fix {key}"))
        elif write and not os.access(existing, os.W_OK | os.X_OK):
            out.append(
                Finding(
                    "error",
                    "Folders",
                    f"{key}={path}: {existing} is not writable for this user",
                    f"point {key} at a folder of yours",
                )
            )
    return out


def _bind_error(host: str, port: int) -> OSError | None:
    """None when HOST:PORT could be listened on now (as uvicorn would: with SO_REUSEADDR)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        return None
    except OSError as exc:
        return exc
    finally:
        sock.close()


def _looks_like_media(cmdline: str) -> bool:
    return any(m in cmdline for m in MEDIA_MARKERS)


def _media_ours(cfg: ServiceConfig, holders: list[processes.PortHolder]) -> tuple[bool | None, str]:
    """(True: ours and fit for reuse / False: ours but not usable / None: not ours, detail)."""
    recorded = processes.read_pid_file(scope.paths(cfg).media_pid_file)
    if media_client.is_ours_healthy(cfg.media_host, cfg.media_port, 1.0):
        if not media_client.is_ours_healthy(cfg.media_host, cfg.media_port, 1.0, root=cfg.media_root):
            return False, f"it serves another folder than MEDIA_ROOT={cfg.media_root}"
        return True, ""
    ours = [h for h in holders if h.pid is not None and (h.pid == recorded or _looks_like_media(h.cmdline))]
    if not ours:
        return None, ""
    return False, "it does not answer /health"


def _port_findings(cfg: ServiceConfig) -> list[Finding]:
    out: list[Finding] = []
    ports = [("PORT", "HOST", cfg.host, cfg.port)]
    if cfg.media_server:
        ports.append(("MEDIA_PORT", "MEDIA_HOST", cfg.media_host, cfg.media_port))
    free: list[str] = []
    for key, host_key, host, port in ports:
        try:
            exc = _bind_error(host, port)
        except socket.gaierror as gai:
            out.append(
                Finding(
                    "error",
                    "Ports",
                    f"{host_key}={host} cannot be resolved ({gai.strerror})",
                    "use 127.0.0.1",
                )
            )
            continue
        if exc is None:
            free.append(f"{key} {host}:{port} free")
            continue
        if exc.errno == errno.EADDRNOTAVAIL:
            out.append(
                Finding(
                    "error",
                    "Ports",
                    f"{host_key}={host} is not an address of this node",
                    "use 127.0.0.1 (this node only) or 0.0.0.0 (all interfaces)",
                )
            )
            continue
        if exc.errno == errno.EACCES:
            out.append(
                Finding(
                    "error", "Ports", f"no permission to listen on {host}:{port}", f"set {key} above 1023"
                )
            )
            continue
        if exc.errno != errno.EADDRINUSE:
            out.append(
                Finding("error", "Ports", f"cannot listen on {host}:{port}: {exc.strerror}", f"change {key}")
            )
            continue
        holders = processes.port_holders(host, port) or [processes.PortHolder(None)]
        who = "; ".join(h.describe() for h in holders)
        pids = " ".join(str(h.pid) for h in holders if h.pid is not None)
        if key == "MEDIA_PORT":
            ours, detail = _media_ours(cfg, holders)
            if ours:
                free.append(f"MEDIA_PORT {host}:{port} held by our media server ({who}): reused")
                continue
            if ours is False:
                out.append(
                    Finding(
                        "error",
                        "Ports",
                        f"MEDIA_PORT {port} on {host} is held by our media server, but {detail}: {who}",
                        f"stop it (kill {pids}); start_service.py then starts a fresh one"
                        if pids
                        else "stop it, or set MEDIA_PORT to a free port",
                    )
                )
                continue
        vllm = any("vllm" in h.cmdline for h in holders)
        if vllm:
            fix = (
                "stop it: .venv/bin/python stop_service.py"
                + (f" (or kill {pids})" if pids else "")
                + f", or set {key}"
            )
        elif pids:
            fix = f"stop it (kill {pids}) or set {key} to a free port"
        else:
            fix = f"set {key} to a free port (as root, `ss -ltnp 'sport = :{port}'` names the holder)"
        what = "vLLM" if vllm else "another process"
        out.append(Finding("error", "Ports", f"{key} {port} on {host} is in use by {what}: {who}", fix))
    if free:
        out.insert(0, Finding("ok", "Ports", "; ".join(free)))
    return out


# ---------------------------------------------------------------------------


def run(
    cfg: ServiceConfig,
    *,
    gpu_spec: str | None = None,
    environ: Mapping[str, str] | None = None,
    check_ports: bool = True,
    nvml: Any = None,
    dry_run: bool = False,
) -> Report:
    """Every check; never starts anything. A bad --gpus spec raises UsageError (exit 2).

    DRY_RUN: a model not downloaded yet is a warning (the plan uses the published facts), not an error.
    """
    env = os.environ if environ is None else environ
    findings: list[Finding] = []
    inventory: Inventory | None = None
    gpu_findings: list[Finding] = []
    if cfg.device == "cpu":
        gpu_findings.append(
            Finding(
                "ok",
                "GPUs",
                "skipped: DEVICE=cpu runs vLLM's CPU backend (no NVML, SLURM GPU or capacity checks)",
            )
        )
    else:
        spec = gpu_spec or cfg.gpus
        if spec:
            inventory = gpus_mod.parse_spec(spec)
        else:
            try:
                inventory = gpus_mod.detect(environ=env, nvml=nvml)
            except CheckFailed as exc:
                gpu_findings.append(Finding("error", "GPUs", exc.message, exc.fix or ""))
        if inventory is not None:
            gpu_findings.extend(_gpu_findings(cfg, inventory))

    alloc = slurm_mod.allocation(env)
    no_end_time = ""
    if alloc is not None and alloc.end_time is None and "SLURM_JOB_END_TIME" not in env:
        end, no_end_time = slurm_mod.squeue_end_time(alloc.job_id)
        if end is not None:
            alloc = slurm_mod.with_end_time(alloc, end)
    # Before the download the plan uses the published checkpoint's facts (a dry run warns, a start
    # refuses); the CPU demo's tiny model has none to borrow.
    repo = cfg.model_repo if cfg.device == "gpu" else ""
    info = model_mod.for_plan(model_mod.inspect(cfg.model_path), repo, dry_run=dry_run)
    plan = plan_mod.make(cfg, inventory, info)

    findings.extend(gpu_findings)
    # The plan's GPU findings (count, free memory) belong with the GPU lines.
    findings.extend(f for f in plan.findings if f.check == "GPUs")
    findings.extend(_slurm_findings(cfg, alloc, plan, no_end_time))
    findings.extend(_model_findings(info))
    findings.extend(_folder_findings(cfg))
    findings.extend(_exposure_findings(cfg))
    findings.extend(f for f in plan.findings if f.check != "GPUs")
    if check_ports:
        findings.extend(_port_findings(cfg))
    return Report(
        findings=findings,
        plan=plan,
        inventory=inventory,
        model=info,
        allocation=alloc,
        config_expert_parallel=cfg.expert_parallel,
    )


# ---------------------------------------------------------------------------
# Rendering

_COLORS = {"ok": "\033[32m", "warn": "\033[33m", "error": "\033[31m"}
_RESET = "\033[0m"


def render(report: Report, color: bool = False, quiet: bool = False) -> str:
    """The report as text: one line per finding, then the plan table and the capacity maths.

    QUIET (start_service.py --quiet): only the warnings and errors; no ok line, no table.
    """
    lines = []
    for f in report.findings:
        if quiet and f.level == "ok":
            continue
        level = f"{f.level:<5}"
        if color:
            level = f"{_COLORS.get(f.level, '')}{level}{_RESET}"
        text = f"  {level} {f.check:<{CHECK_WIDTH}} {f.message}"
        if f.fix and f.level != "ok":
            text += f" -> {f.fix}"
        lines.append(text)
    plan = report.plan
    if plan is not None and plan.has_capacity and not quiet:
        ep = "on" if plan.expert_parallel else "off"
        lines.append("")
        lines.append(
            f"  Plan: tensor parallel {plan.tensor_parallel_size}, expert parallel {ep}, "
            f"KV cache {plan.kv_dtype}, MAX_MODEL_LEN {plan.max_model_len:,}"
        )
        lines.append("    GPU  cuda  TP rank  weights GiB  KV GiB   KV tokens")
        for s in plan.rank_map:
            lines.append(
                f"    {s.gpu_index:>3}  {s.cuda_index:>4}  {s.rank:>7}  {s.weights_bytes / GiB:>11.2f}  "
                f"{s.kv_bytes / GiB:>6.2f}  {s.kv_tokens:>10,}"
            )
        lines.append("  Capacity per GPU:")
        lines.extend(f"    {line}" for line in plan.formula())
    return "\n".join(lines)


__all__ = ["Finding", "Level", "Report", "render", "run"]
