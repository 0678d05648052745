"""Which files belong to which service: a config -> its run-state folder and its logs.

Several services can run from one checkout on one node (the FP8 model on
8010 beside the BF16 one on 7001, each with its own config file). Each gets
its own folders under the RUN_DIR and LOG_DIR that all of them share, named
after the service: ``SERVICE_NAME``, or ``port-<PORT>`` when it is left at
auto (two services on one node never share a port), so a second config that
differs only in model and ports needs no new folders::

    RUN_DIR/port-8010/service.json        the run state (runstate.py)
    LOG_DIR/port-8010/service.log         vLLM's output; launcher.log, stop.log, status.log
    RUN_DIR/media-8080-gpu01/media_server.pid   the media server, one per MEDIA_PORT and node,
    LOG_DIR/media-8080-gpu01/media_server.log   shared by the services that name that port

The media folders carry the node's name: a checkout on a shared file system
serves from several nodes (a service a node), and each node runs its own media
server on MEDIA_PORT; one pid file for all would make each node's start and
supervisor take the other's server for a stranger.

Every process of a service carries its own run folder in its environment
(vllm_args.RUN_DIR_ENV), so stopping one never touches another's.
``media_users`` names the running services that use a media server (those
whose supervisor is restarting vLLM too), so that ``stop_service.py --all`` of
one leaves it up while another still needs it.

Pure path arithmetic, apart from ``services`` and ``media_users``, which read
state files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3_vl_service.core.names import LAUNCHER_LOG, MEDIA_PID_FILE, SERVICE_LOG
from qwen3_vl_service.core.names import MEDIA_LOG_FILE as MEDIA_LOG

if TYPE_CHECKING:
    from qwen3_vl_service.settings.config import ServiceConfig

MEDIA_PREFIX = "media-"


@dataclass(frozen=True)
class ServicePaths:
    name: str
    run_dir: Path  # the service's run state and nothing else
    log_dir: Path  # the service's logs
    service_log: Path
    launcher_log: Path
    media_dir: Path  # the media server's pid file (shared by every service on that MEDIA_PORT)
    media_pid_file: Path
    media_log: Path

    @property
    def state_file(self) -> Path:
        from qwen3_vl_service.lifecycle.runstate import state_path

        return state_path(self.run_dir)

    def log(self, name: str) -> Path:
        """Another log of this service (stop.log, status.log, ...)."""
        return self.log_dir / name


def service_name(cfg: ServiceConfig) -> str:
    """SERVICE_NAME, or port-<PORT> (one port, one service on a node)."""
    return cfg.service_name or f"port-{cfg.port}"


def media_folder(media_port: int, node: str | None = None) -> str:
    """The media server's folder name under RUN_DIR and LOG_DIR: media-<port>-<node> (this node)."""
    import socket

    return f"{MEDIA_PREFIX}{media_port}-{node or socket.gethostname()}"


def paths(cfg: ServiceConfig) -> ServicePaths:
    """Every file of the service that CFG describes (see the module doc)."""
    name = service_name(cfg)
    run_dir = cfg.run_dir / name
    log_dir = cfg.log_dir / name
    media = media_folder(cfg.media_port)
    return ServicePaths(
        name=name,
        run_dir=run_dir,
        log_dir=log_dir,
        service_log=log_dir / SERVICE_LOG,
        launcher_log=log_dir / LAUNCHER_LOG,
        media_dir=cfg.run_dir / media,
        media_pid_file=cfg.run_dir / media / MEDIA_PID_FILE,
        media_log=cfg.log_dir / media / MEDIA_LOG,
    )


def services(run_root: Path) -> list[tuple[str, Path]]:
    """(name, run folder) of every service that has a state file under RUN_ROOT (the shared RUN_DIR)."""
    from qwen3_vl_service.core.names import STATE_FILE

    try:
        entries = sorted(run_root.iterdir())
    except OSError:
        return []
    return [(d.name, d) for d in entries if d.is_dir() and (d / STATE_FILE).is_file()]


@dataclass(frozen=True)
class MediaUser:
    """A running service that uses a media server: its name, port and pid (its supervisor's
    while vLLM restarts)."""

    name: str
    port: int
    pid: int


def media_users(cfg: ServiceConfig) -> list[MediaUser]:
    """The other running services under the same RUN_DIR that use CFG's media server (same host
    and port): those whose vLLM runs, and those whose supervisor is restarting it (no service.json
    for that while; its record names the media server)."""
    from qwen3_vl_service.lifecycle import runstate, supervisor

    own = paths(cfg).run_dir
    media = (cfg.media_host, cfg.media_port)
    users: list[MediaUser] = []
    try:
        folders = sorted(d for d in cfg.run_dir.iterdir() if d.is_dir() and d != own)
    except OSError:
        return []
    for run_dir in folders:
        state = runstate.read(run_dir)
        if state is not None:
            uses = state.media_server and (state.media_host, state.media_port) == media
            if uses and runstate.live_process(state) is not None:
                users.append(MediaUser(run_dir.name, state.port, state.pid))
            continue
        record = supervisor.read_record(run_dir)
        if record and record.get("media") == list(media) and supervisor.live(run_dir) is not None:
            users.append(MediaUser(run_dir.name, int(record.get("port") or 0), record["pid"]))
    return users


__all__ = ["MediaUser", "ServicePaths", "media_folder", "media_users", "paths", "service_name", "services"]
