"""One rank of the interconnect check: rendezvous, a checked all-reduce, timed all-reduces.

Started once per GPU (or per CPU process with ``--backend gloo``) by
``qwen3_vl_service.interconnect``, which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT and enforces the hard wall-clock timeout. This
file needs only the standard library and torch, so that it runs under the
python that has vLLM (VLLM_PYTHON), whatever else that python has.

Each step is announced on stdout as one line ``@@qwen3-interconnect {json}``,
so that the parent can tell, after a timeout, where each rank was stuck (NCCL's
own NCCL_DEBUG output goes to the same stream and is kept in the rank's log).
Rank 0 ends with a ``result`` line holding the measurements.

Exit codes: 0 done (the result may still report wrong sums), 3 this python or
machine cannot run the check (no torch, no CUDA, no NCCL), 1 anything else.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import sys
import time

from qwen3_vl_service.core.childproc import die_with_parent

MARK = "@@qwen3-interconnect "
EXIT_SKIP = 3


def emit(event: str, **fields) -> None:
    print(MARK + json.dumps({"event": event, "rank": _RANK, **fields}), flush=True)


_RANK = int(os.environ.get("RANK", "0") or 0)


def auto_iters(backend: str, nbytes: int) -> int:
    """Timed iterations per message size: enough to average out launch noise, a fraction of a second."""
    if backend == "nccl":
        return max(5, min(50, (4 << 30) // max(nbytes, 1)))
    return max(2, min(20, (64 << 20) // max(nbytes, 1)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=".venv/bin/python -m qwen3_vl_service.interconnect.worker", description=__doc__
    )
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    p.add_argument("--sizes", default=str(1 << 20), help="message sizes in bytes, comma-separated")
    p.add_argument("--iters", type=int, default=0, help="timed iterations per size (0: chosen per size)")
    p.add_argument("--pg-timeout", type=float, default=600.0, help="torch.distributed's own timeout (s)")
    p.add_argument(
        "--simulate-hang-rank",
        type=int,
        default=None,
        metavar="R",
        help="diagnostic: rank R sleeps instead of joining the all-reduce (simulates a hung peer)",
    )
    p.add_argument("--run-id", default="", help="a tag the parent uses to recognise its workers")
    return p


class _Exit(Exception):
    """Leave main() with this exit code (after the reason was announced)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    t_start = time.perf_counter()
    # Each rank runs in its own session so that the parent can end its whole group; that also
    # means nothing else would end a rank stuck in NCCL if the parent were killed before its
    # own clean-up ran: the kernel KILLs it then.
    die_with_parent(signal.SIGKILL, exit_code=1)
    emit("start", pid=os.getpid(), world_size=world)
    try:
        torch, dist = _import_torch()
        device, device_name, nccl_version = _device(torch, dist, args.backend, local_rank)
    except _Exit as stop:
        return stop.code
    emit(
        "imported",
        torch=torch.__version__,
        nccl=nccl_version,
        device=device_name,
        s=time.perf_counter() - t_start,
    )
    _join(dist, args, rank, world, device)
    if args.simulate_hang_rank is not None and args.simulate_hang_rank == rank:
        emit("hang")
        while True:  # the parent's timeout is what ends this
            time.sleep(3600)
    t0 = time.perf_counter()
    warm = torch.ones(1024, dtype=torch.float32, device=device)
    dist.all_reduce(warm)
    _sync(torch, device)
    emit("warmup", s=time.perf_counter() - t0)
    init_to_warm = time.perf_counter() - t_start
    results = []
    for index, nbytes in enumerate(sizes):
        results.append(_measure(torch, dist, args, rank, world, device, nbytes))
        emit("size", index=index, bytes=results[-1]["bytes"])
    if rank == 0:
        emit(
            "result",
            backend=args.backend,
            world_size=world,
            torch=torch.__version__,
            nccl=nccl_version,
            device=device_name,
            expected=world * (world + 1) / 2,
            startup_s=init_to_warm,
            sizes=results,
        )
    dist.destroy_process_group()
    emit("exit")
    return 0


def _import_torch():
    try:
        # Here, not at the top: torch takes seconds to import, and only the worker needs it.
        import torch
        import torch.distributed as dist
    except ImportError as exc:
        emit("skip", reason=f"torch is not installed for {sys.executable} ({exc})")
        raise _Exit(EXIT_SKIP) from None
    return torch, dist


def _device(torch, dist, backend: str, local_rank: int):
    """(device, its name, NCCL version or None); _Exit where this machine cannot run BACKEND."""
    if backend != "nccl":
        return torch.device("cpu"), "cpu", None
    if not torch.cuda.is_available():
        emit("skip", reason=f"torch {torch.__version__} in {sys.executable} sees no CUDA GPU")
        raise _Exit(EXIT_SKIP)
    if not dist.is_nccl_available():
        emit("skip", reason=f"torch {torch.__version__} in {sys.executable} is built without NCCL")
        raise _Exit(EXIT_SKIP)
    count = torch.cuda.device_count()
    if local_rank >= count:
        emit("fail", reason=f"LOCAL_RANK {local_rank} but only {count} CUDA device(s) are visible")
        raise _Exit(1)
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    try:
        v = torch.cuda.nccl.version()
        # A tuple (2, 21, 5) in recent torch, an int 22105 or 2708 in old ones.
        nccl_version = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001 - the version is informative only
        nccl_version = None
    return device, torch.cuda.get_device_name(device), nccl_version


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _join(dist, args: argparse.Namespace, rank: int, world: int, device) -> None:
    """init_process_group, announced when done."""
    t0 = time.perf_counter()
    kwargs = {}
    if args.backend == "nccl":
        # Eager communicator set-up: a hang in NCCL's init shows up as "stuck in init", not later.
        kwargs["device_id"] = device
    timeout = _dt.timedelta(seconds=args.pg_timeout)
    try:
        dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
    except TypeError:  # torch < 2.3 has no device_id: the communicator is made at the first all-reduce
        dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=timeout)
    emit("init", s=time.perf_counter() - t0)


def _measure(torch, dist, args: argparse.Namespace, rank: int, world: int, device, nbytes: int) -> dict:
    """One message size: the sums checked on every rank, then the all-reduce timed (slowest rank)."""
    numel = max(1, nbytes // 4)
    buf = torch.empty(numel, dtype=torch.float32, device=device)
    # Correctness: each rank contributes rank+1; every element must be n(n+1)/2 on every rank.
    buf.fill_(float(rank + 1))
    dist.all_reduce(buf)
    _sync(torch, device)
    bad = int((buf != world * (world + 1) / 2).sum().item())
    flags = torch.zeros(world, dtype=torch.int64, device=device)
    flags[rank] = bad
    dist.all_reduce(flags)
    bad_ranks = [r for r, v in enumerate(flags.tolist()) if v]
    # Timing: zeros so that repeated in-place sums stay finite.
    buf.zero_()
    iters = args.iters if args.iters > 0 else auto_iters(args.backend, numel * 4)
    for _ in range(2):
        dist.all_reduce(buf)
    _sync(torch, device)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf)
    _sync(torch, device)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time is the collective's
    return {
        "bytes": numel * 4,
        "iters": iters,
        "time_s": float(elapsed.item()) / iters,
        "bad_ranks": bad_ranks,
    }


if __name__ == "__main__":
    raise SystemExit(main())
