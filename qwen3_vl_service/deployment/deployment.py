"""The Deployment: every process a start runs, derived once and purely from the settings, the plan and
the layout of the job (its nodes and GPUs). No processes, no sockets, no files.

A deployment is a tuple of units, each with its name, node, argv, environment, run and log folders,
ports, health URL and GPUs:

    media      the media server, one per node (MEDIA_SERVER=true)
    vllm       the single service; or replica-<i> behind the router; or dp-node-<n> (data parallel)
    router     vllm-router on the head node, in front of the replicas

Everything that runs, shows or stops a unit reads it from here: the dry run prints it, the start
runs exactly its units (and records it as deployment.json in the service's run folder), stop and
status act on the recorded units of *this* config and nothing else. The plan's decisions
(MAX_NUM_SEQS, YaRN's --hf-overrides and VLLM_ALLOW_LONG_MAX_MODEL_LEN, expert parallelism, the
probe's variables) reach every vLLM unit through the one builder, vllm_args.build.

Replicas and the router live below the service's own folders (RUN_DIR/<service>/replica-<i>/,
RUN_DIR/<service>/router/, LOG_DIR/<service>/...), so two configs on one RUN_DIR never see each
other's units. Every port a deployment opens on a node is checked against the others here, once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_vl_service.core.errors import ConfigError
from qwen3_vl_service.core.hosts import local_url
from qwen3_vl_service.core.names import DEPLOYMENT_FILE, ROUTER_LOG
from qwen3_vl_service.core.secrets import is_secret
from qwen3_vl_service.deployment import router_command
from qwen3_vl_service.deployment.cluster import (
    REPLICA_PREFIX,
    ROUTER_NAME,
    Layout,
    Replica,
    data_parallel_args,
    replica_env,
    replica_host,
    serve_argv,
    worker_url,
)
from qwen3_vl_service.media import client as media_client
from qwen3_vl_service.planning import vllm_args
from qwen3_vl_service.planning.plan import Plan
from qwen3_vl_service.settings import scope
from qwen3_vl_service.settings.config import ServiceConfig

MEDIA = "media"
VLLM = "vllm"
ROUTER = "router"


@dataclass(frozen=True)
class Port:
    """A port a unit opens, and the setting it comes from (what an error names)."""

    port: int
    setting: str  # "PORT", "PORT+1", "ROUTER_PORT+1", "MEDIA_PORT", ...
    what: str  # "replica-1's API", "the router's metrics", ...


@dataclass(frozen=True)
class Unit:
    kind: str  # MEDIA, VLLM or ROUTER
    name: str  # the folder name below the service's: "vllm" is the service's own folder
    node_rank: int
    node: str  # host name; "" for this node when the job's nodes are unknown
    argv: tuple[str, ...]
    env: Mapping[str, str]  # what this unit sets on top of the environment it inherits
    run_dir: Path
    log_file: Path
    ports: tuple[Port, ...]
    health_url: str
    gpus: tuple[str, ...] = ()
    supervised: bool = False  # RESTART=on-failure: a supervisor runs it and restarts it

    def display(self) -> str:
        """The command as a user reads it: its variables (secrets masked), then one flag a line."""
        return vllm_args.VllmCommand(self.argv, dict(self.env)).display()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "node_rank": self.node_rank,
            "node": self.node,
            "argv": list(self.argv),
            # Secrets travel in the environment of the process, never in a file (habit 8).
            "env": {k: v for k, v in self.env.items() if not is_secret(k)},
            "run_dir": str(self.run_dir),
            "log_file": str(self.log_file),
            "ports": [[p.port, p.setting, p.what] for p in self.ports],
            "health_url": self.health_url,
            "gpus": list(self.gpus),
            "supervised": self.supervised,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Unit:
        return cls(
            kind=str(d["kind"]),
            name=str(d["name"]),
            node_rank=int(d["node_rank"]),
            node=str(d["node"]),
            argv=tuple(str(a) for a in d["argv"]),
            env={str(k): str(v) for k, v in d["env"].items()},
            run_dir=Path(d["run_dir"]),
            log_file=Path(d["log_file"]),
            ports=tuple(Port(int(p), str(s), str(w)) for p, s, w in d["ports"]),
            health_url=str(d["health_url"]),
            gpus=tuple(str(g) for g in d["gpus"]),
            supervised=bool(d["supervised"]),
        )


@dataclass(frozen=True)
class Deployment:
    service: str  # scope.service_name: SERVICE_NAME or port-<PORT>
    mode: str  # "single", "router" or "data-parallel" (cluster.Layout.mode)
    run_dir: Path  # RUN_DIR/<service>: the record, and the units' folders below it
    log_dir: Path
    api_url: str  # where a client on the head node sends requests (the router in front of replicas)
    units: tuple[Unit, ...] = field(default=())

    @property
    def record_file(self) -> Path:
        return self.run_dir / DEPLOYMENT_FILE

    def on_node(self, node_rank: int) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.node_rank == node_rank)

    def of_kind(self, kind: str, node_rank: int | None = None) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.kind == kind and node_rank in (None, u.node_rank))

    def unit(self, name: str, node_rank: int = 0) -> Unit:
        for u in self.units:
            if u.name == name and u.node_rank == node_rank:
                return u
        raise KeyError(name)

    @property
    def grouped(self) -> bool:
        return self.mode != "single"

    def display(self, only_node: int | None = None) -> str:
        """Every node's commands (or ONLY_NODE's), as a user reads them."""
        blocks = []
        for rank in sorted({u.node_rank for u in self.units}):
            if only_node is not None and rank != only_node:
                continue
            units = [u for u in self.on_node(rank) if u.kind != MEDIA]
            node = units[0].node if units else ""
            lines = [f"node {rank} ({node or 'this node'}){' - head' if rank == 0 else ''}"]
            for u in units:
                lines.append(f"  {u.name}:\n    " + u.display().replace("\n", "\n  "))
            blocks.append("\n".join(lines))
        return "\n".join(blocks)

    def to_json(self) -> str:
        return json.dumps(
            {
                "service": self.service,
                "mode": self.mode,
                "run_dir": str(self.run_dir),
                "log_dir": str(self.log_dir),
                "api_url": self.api_url,
                "units": [u.to_dict() for u in self.units],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Deployment:
        d = json.loads(text)
        return cls(
            service=str(d["service"]),
            mode=str(d["mode"]),
            run_dir=Path(d["run_dir"]),
            log_dir=Path(d["log_dir"]),
            api_url=str(d["api_url"]),
            units=tuple(Unit.from_dict(u) for u in d["units"]),
        )


# ---------------------------------------------------------------------------
# Deriving it


def derive(
    cfg: ServiceConfig,
    plan: Plan | None,
    lay: Layout,
    *,
    expert_parallel: bool,
    extra_env: Mapping[str, str] | None = None,
    python: str | None = None,
) -> Deployment:
    """The whole deployment of CFG over LAY, with PLAN's decisions in every vLLM unit.

    EXTRA_ENV: what the probe of the installed vLLM found it needs (vllm_versions.assess).
    Raises ConfigError when two units of a node would open the same port.
    """
    own = scope.paths(cfg)
    build = _Builder(cfg, plan, lay, expert_parallel, dict(extra_env or {}), python)
    units: list[Unit] = []
    if lay.mode == "single":
        units.append(build.service())
    elif lay.mode == "router":
        units += [build.replica(r) for r in lay.replicas]
        units.append(build.router())
    else:
        units += [build.rank_group(r) for r in lay.replicas]
    if cfg.media_server:
        units += [build.media(rank, node) for rank, node in enumerate(lay.nodes)]
    api = local_url(cfg.host, cfg.router_port if lay.mode == "router" else cfg.port)
    dep = Deployment(own.name, lay.mode, own.run_dir, own.log_dir, api, tuple(units))
    check_ports(dep)
    return dep


@dataclass(frozen=True)
class _Builder:
    cfg: ServiceConfig
    plan: Plan | None
    lay: Layout
    expert_parallel: bool
    extra_env: dict[str, str]
    python: str | None

    def _vllm(self, ucfg: ServiceConfig, run_dir: Path) -> vllm_args.VllmCommand:
        # The one builder: every vLLM unit gets the plan's decisions and the probe's variables.
        return vllm_args.build(
            ucfg,
            expert_parallel=self.expert_parallel,
            plan=self.plan,
            extra_env=self.extra_env,
            python=self.python,
            run_dir=run_dir,
        )

    def service(self) -> Unit:
        cfg, own = self.cfg, scope.paths(self.cfg)
        cmd = self._vllm(cfg, own.run_dir)
        return Unit(
            VLLM,
            VLLM,
            0,
            self.lay.nodes[0],
            cmd.argv,
            cmd.env,
            own.run_dir,
            own.service_log,
            (Port(cfg.port, "PORT", "vLLM's API"),),
            f"{local_url(cfg.host, cfg.port)}/health",
            self.lay.replicas[0].gpus,
            supervised=cfg.restart == "on-failure",
        )

    def replica(self, r: Replica) -> Unit:
        ucfg = replica_config(self.cfg, r.index, r.port).replace(host=replica_host(self.cfg, r, self.lay))
        own = scope.paths(ucfg)
        cmd = self._vllm(ucfg, own.run_dir)
        setting = "PORT" if r.index == 0 else f"PORT+{r.index}"
        return Unit(
            VLLM,
            r.name,
            r.node_rank,
            r.node,
            cmd.argv,
            {**cmd.env, **replica_env(r)},
            own.run_dir,
            own.service_log,
            (Port(r.port, setting, f"{r.name}'s API"),),
            f"{local_url(ucfg.host, r.port)}/health",
            r.gpus,
            supervised=self.cfg.restart == "on-failure",
        )

    def rank_group(self, r: Replica) -> Unit:
        """One node's data-parallel ranks: `vllm serve` with the DP flags; the head serves the API."""
        cfg = self.cfg
        name = f"dp-node-{r.node_rank}"
        ucfg = cfg if r.node_rank == 0 else replica_config(cfg, r.node_rank, cfg.port, name=name)
        own = scope.paths(ucfg)
        cmd = self._vllm(ucfg, own.run_dir)
        argv = (*serve_argv(cmd.argv, vllm_args.API_SERVER_MODULE), *data_parallel_args(r, self.lay, cfg))
        ports: tuple[Port, ...] = ()
        if r.node_rank == 0:
            ports = (
                Port(cfg.port, "PORT", "vLLM's API"),
                Port(cfg.data_parallel_rpc_port, "DATA_PARALLEL_RPC_PORT", "the data-parallel RPC"),
            )
        health = f"{local_url(cfg.host, cfg.port)}/health" if r.node_rank == 0 else ""
        env = {**cmd.env, **replica_env(r)}
        # The ranks share fate (the MoE layers exchange tokens between them): one restarted alone
        # cannot rejoin the others, so no supervisor restarts a rank group.
        return Unit(
            VLLM, name, r.node_rank, r.node, argv, env, own.run_dir, own.service_log, ports, health, r.gpus
        )

    def router(self) -> Unit:
        cfg = self.cfg
        own = scope.paths(cfg)
        urls = [worker_url(cfg, r, self.lay) for r in self.lay.replicas]
        run_dir = own.run_dir / ROUTER_NAME
        cmd = router_command.build(cfg, urls, python=self.python)
        ports = (
            Port(cfg.router_port, "ROUTER_PORT", "the router"),
            Port(cmd.metrics_port, "ROUTER_PORT+1", "the router's metrics"),
        )
        return Unit(
            ROUTER,
            ROUTER_NAME,
            0,
            self.lay.nodes[0],
            cmd.argv,
            cmd.env,
            run_dir,
            own.log_dir / ROUTER_LOG,
            ports,
            f"{local_url(cfg.host, cfg.router_port)}/health",
        )

    def media(self, rank: int, node: str) -> Unit:
        """The media server of a node (media.client starts it, or reuses ours when it runs)."""
        cfg = self.cfg
        own = scope.paths(cfg)
        argv = media_client.command(
            cfg.media_host,
            cfg.media_port,
            cfg.media_root,
            cfg.media_allowed_types,
            own.media_log,
            own.media_pid_file,
            python=sys.executable,  # ours, not VLLM_PYTHON: the media server is part of this package
            workers=cfg.media_workers,
            log_max_mb=cfg.log_max_mb,
            log_backups=cfg.log_backups,
        )
        return Unit(
            MEDIA,
            MEDIA,
            rank,
            node,
            tuple(argv),
            {},
            own.media_dir,
            own.media_log,
            (Port(cfg.media_port, "MEDIA_PORT", "the media server"),),
            f"{local_url(cfg.media_host, cfg.media_port)}/health",
        )


def replica_config(cfg: ServiceConfig, index: int, port: int, *, name: str = "") -> ServiceConfig:
    """The settings of one replica (or of a non-head data-parallel node): its port, and its own run
    and log folders below the service's (RUN_DIR/<service>/<name>/, scope.paths)."""
    own = scope.paths(cfg)
    return cfg.replace(
        port=port,
        service_name=name or f"{REPLICA_PREFIX}{index}",
        run_dir=own.run_dir,
        log_dir=own.log_dir,
        replicas=1,
    )


def check_ports(dep: Deployment) -> None:
    """No two units of one node open the same port, and every port is a port (one place for all)."""
    for rank in sorted({u.node_rank for u in dep.units}):
        seen: dict[int, Port] = {}
        for u in dep.on_node(rank):
            for p in u.ports:
                if not 0 < p.port <= 65535:
                    raise ConfigError(
                        f"{p.setting}={p.port} ({p.what}) is not a port",
                        fix="keep PORT, ROUTER_PORT and MEDIA_PORT so that every port they imply is <= 65535",
                    )
                if p.port in seen:
                    other = seen[p.port]
                    raise ConfigError(
                        f"{p.setting}={p.port} ({p.what}) is also {other.setting} ({other.what})",
                        fix=f"move {p.setting.split('+')[0]} or {other.setting.split('+')[0]} so that every "
                        "port differs (defaults: PORT=8010, ROUTER_PORT=8040, MEDIA_PORT=8080)",
                    )
                seen[p.port] = p


__all__ = [
    "MEDIA",
    "ROUTER",
    "VLLM",
    "Deployment",
    "Port",
    "Unit",
    "check_ports",
    "derive",
    "replica_config",
]
