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
import sys
import time

MARK = "@@qwen3-interconnect "
EXIT_SKIP = 3


def emit(event: str, **fields) -> None:
    print(MARK + json.dumps({"event": event, "rank": _RANK, **fields}), flush=True)


_RANK = int(os.environ.get("RANK", "0") or 0)


def die_with_parent() -> None:
    """Linux: have the kernel KILL this rank when the parent dies (even by SIGKILL).

    Each rank runs in its own session so that the parent can end its whole group;
    that also means nothing else would end a rank stuck in NCCL if the parent were
    killed before its own clean-up ran.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl: nobody waits for us
        os._exit(1)


def auto_iters(backend: str, nbytes: int) -> int:
    """Timed iterations per message size: enough to average out launch noise, a fraction of a second."""
    if backend == "nccl":
        return max(5, min(50, (4 << 30) // max(nbytes, 1)))
    return max(2, min(20, (64 << 20) // max(nbytes, 1)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwen3_vl_service.interconnect_worker", description=__doc__)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    t_start = time.perf_counter()
    die_with_parent()
    emit("start", pid=os.getpid(), world_size=world)

    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:
        emit("skip", reason=f"torch is not installed for {sys.executable} ({exc})")
        return EXIT_SKIP

    nccl_version = None
    device_name = "cpu"
    if args.backend == "nccl":
        if not torch.cuda.is_available():
            emit("skip", reason=f"torch {torch.__version__} in {sys.executable} sees no CUDA GPU")
            return EXIT_SKIP
        if not dist.is_nccl_available():
            emit("skip", reason=f"torch {torch.__version__} in {sys.executable} is built without NCCL")
            return EXIT_SKIP
        count = torch.cuda.device_count()
        if local_rank >= count:
            emit("fail", reason=f"LOCAL_RANK {local_rank} but only {count} CUDA device(s) are visible")
            return 1
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        device_name = torch.cuda.get_device_name(device)
        try:
            v = torch.cuda.nccl.version()
            # A tuple (2, 21, 5) in recent torch, an int 22105 or 2708 in old ones.
            nccl_version = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
        except Exception:  # noqa: BLE001 - the version is informative only
            nccl_version = None
    else:
        device = torch.device("cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    emit(
        "imported",
        torch=torch.__version__,
        nccl=nccl_version,
        device=device_name,
        s=time.perf_counter() - t_start,
    )

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

    if args.simulate_hang_rank is not None and args.simulate_hang_rank == rank:
        emit("hang")
        while True:  # the parent's timeout is what ends this
            time.sleep(3600)

    t0 = time.perf_counter()
    warm = torch.ones(1024, dtype=torch.float32, device=device)
    dist.all_reduce(warm)
    sync()
    emit("warmup", s=time.perf_counter() - t0)
    init_to_warm = time.perf_counter() - t_start

    expected = world * (world + 1) / 2
    results = []
    for index, nbytes in enumerate(sizes):
        numel = max(1, nbytes // 4)
        buf = torch.empty(numel, dtype=torch.float32, device=device)
        # Correctness: each rank contributes rank+1; every element must be n(n+1)/2 on every rank.
        buf.fill_(float(rank + 1))
        dist.all_reduce(buf)
        sync()
        bad = int((buf != expected).sum().item())
        flags = torch.zeros(world, dtype=torch.int64, device=device)
        flags[rank] = bad
        dist.all_reduce(flags)
        bad_ranks = [r for r, v in enumerate(flags.tolist()) if v]

        # Timing: zeros so that repeated in-place sums stay finite.
        buf.zero_()
        iters = args.iters if args.iters > 0 else auto_iters(args.backend, numel * 4)
        for _ in range(2):
            dist.all_reduce(buf)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(buf)
        sync()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        # The slowest rank's time is the collective's time.
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        per_iter = float(elapsed.item()) / iters
        results.append({"bytes": numel * 4, "iters": iters, "time_s": per_iter, "bad_ranks": bad_ranks})
        emit("size", index=index, bytes=numel * 4)
        del buf

    if rank == 0:
        emit(
            "result",
            backend=args.backend,
            world_size=world,
            torch=torch.__version__,
            nccl=nccl_version,
            device=device_name,
            expected=expected,
            startup_s=init_to_warm,
            sizes=results,
        )
    dist.destroy_process_group()
    emit("exit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
