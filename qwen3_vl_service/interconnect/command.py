""".venv/bin/python -m qwen3_vl_service.interconnect: the check alone, with its topology and table."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping

from qwen3_vl_service.core import cli
from qwen3_vl_service.core.errors import UsageError
from qwen3_vl_service.core.findings import Finding
from qwen3_vl_service.interconnect.report import (
    finding_line,
    render_table,
    result_findings,
    topology_findings,
)
from qwen3_vl_service.interconnect.run import (
    DEFAULT_SIZES,
    DEFAULT_SIZES_GLOO,
    DEFAULT_TIMEOUT,
    CheckResult,
    parse_sizes,
    run_check,
    torch_missing,
    worker_env,
)
from qwen3_vl_service.interconnect.topology import Topology, read_topology, render_topology
from qwen3_vl_service.machine.gpus import NvmlUnavailable
from qwen3_vl_service.settings.config import load


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog=".venv/bin/python -m qwen3_vl_service.interconnect",
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
    p.add_config("none: VLLM_PYTHON and the NCCL_* settings are read from it when given")
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
    default_sizes = DEFAULT_SIZES if args.backend == "nccl" else DEFAULT_SIZES_GLOO
    sizes = parse_sizes(args.sizes) if args.sizes else default_sizes
    extra: Mapping[str, str] = {}
    python = args.python
    if args.config:
        cfg = load(args.config)
        extra = cfg.vllm_env
        python = python or cfg.vllm_python or None
    python = python or sys.executable
    env = worker_env(os.environ, extra, args.backend)
    topo: Topology | None = None
    if args.backend == "nccl":
        try:
            topo = _topology(env, args.world_size)
        except NvmlUnavailable as exc:
            return _skip(exc.message, args.json)
        world = len(topo.gpus)
    else:
        world = args.world_size or 2
    missing = torch_missing(python)
    if missing:
        return _skip(missing, args.json)
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
        return _skip(result.message, args.json)
    found = (topology_findings(topo) if topo else []) + result_findings(result, topo)
    if args.json:
        report = {
            "topology": topo.as_dict() if topo else None,
            "result": result.as_dict(),
            "findings": [dataclasses.asdict(f) for f in found],
        }
        print(json.dumps(report, indent=2))
    else:
        print(_render(result, topo, found, python, env))
    return 1 if any(f.level == "error" for f in found) else 0


def _topology(env: Mapping[str, str], world_size: int | None) -> Topology:
    """The topology of the first WORLD_SIZE GPUs (default all); UsageError if there are fewer."""
    topo = read_topology(env)
    world = world_size or len(topo.gpus)
    if world > len(topo.gpus):
        raise UsageError(
            f"--world-size {world} but {len(topo.gpus)} GPU(s) are visible",
            fix=f"give --world-size {len(topo.gpus)} or less",
        )
    return topo.subset(world)


def _skip(reason: str, as_json: bool) -> int:
    print(json.dumps({"skipped": reason}) if as_json else f"interconnect check skipped: {reason}")
    return 0


def _render(
    result: CheckResult, topo: Topology | None, found: list[Finding], python: str, env: Mapping[str, str]
) -> str:
    nccl = "".join(
        f", {k}={v}" for k, v in sorted(env.items()) if k.startswith("NCCL_") and k != "NCCL_NVLS_ENABLE"
    )
    parts = [
        f"Interconnect check: {result.backend}, {result.world_size} rank(s), {result.device or '?'}, "
        f"torch {result.torch_version or '?'}"
        + (f", NCCL {result.nccl_version}" if result.nccl_version else "")
        + f"\n  python {python}; NCCL_NVLS_ENABLE={env.get('NCCL_NVLS_ENABLE')}{nccl}"
    ]
    if topo is not None:
        parts.append(render_topology(topo))
    if result.sizes:
        parts.append(render_table(result, topo))
    parts.append("\n".join(finding_line(f) for f in found))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: _main(argv))
