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
``registry.media_users`` names the running services that use a media server (those
whose supervisor is restarting vLLM too), so that ``stop_service.py --all`` of
one leaves it up while another still needs it.

Pure path arithmetic (lifecycle/registry.py reads what runs in these folders).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3_vl_service.core.names import LAUNCHER_LOG, MEDIA_PID_FILE, SERVICE_LOG, STATE_FILE
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
        return self.run_dir / STATE_FILE

    def log(self, name: str) -> Path:
        """Another log of this service (stop.log, status.log, ...)."""
        return self.log_dir / name


def service_name(cfg: ServiceConfig) -> str:
    """SERVICE_NAME, or port-<PORT> (one port, one service on a node)."""
    return cfg.service_name or f"port-{cfg.port}"


def media_folder(media_port: int, node: str | None = None) -> str:
    """The media server's folder name under RUN_DIR and LOG_DIR: media-<port>-<node> (this node)."""
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


__all__ = ["ServicePaths", "media_folder", "paths", "service_name"]
