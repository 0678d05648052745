"""Which services run under a RUN_DIR, read from their state files: the services, and the users of
a media server (so that ``stop_service.py --all`` of one leaves it up while another still needs it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwen3_vl_service.core.names import DEPLOYMENT_FILE, STATE_FILE
from qwen3_vl_service.deployment.deployment import Deployment
from qwen3_vl_service.lifecycle import runstate, supervisor
from qwen3_vl_service.settings.config import ServiceConfig
from qwen3_vl_service.settings.scope import paths


def services(run_root: Path) -> list[tuple[str, Path]]:
    """(name, run folder) of every service that has a state file under RUN_ROOT (the shared RUN_DIR)."""
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
    """The other running services under the same RUN_DIR that use CFG's media server: those whose
    vLLM runs, and those whose supervisor is restarting it (no service.json for that while; its
    record names the media server); a replica group's replicas count for the group.

    The media server's identity is its port on this node (scope.media_folder): one server binds a
    port, whatever MEDIA_HOST each service names."""
    own = paths(cfg).run_dir
    users: list[MediaUser] = []
    try:
        folders = sorted(d for d in cfg.run_dir.iterdir() if d.is_dir() and d != own)
    except OSError:
        return []
    for folder in folders:
        dep = recorded_deployment(folder)
        run_dirs = [u.run_dir for u in dep.of_kind("vllm")] if dep is not None and dep.grouped else [folder]
        for run_dir in run_dirs:
            user = _media_user(run_dir, cfg.media_port)
            if user is not None:
                users.append(MediaUser(folder.name, user.port, user.pid))
                break
    return users


def _media_user(run_dir: Path, media_port: int) -> MediaUser | None:
    state = runstate.read(run_dir)
    if state is not None:
        if state.media_server and state.media_port == media_port and runstate.live_process(state) is not None:
            return MediaUser(run_dir.name, state.port, state.pid)
        return None
    record = supervisor.read_record(run_dir)
    media = record.get("media") if record else None
    if record and media and int(media[1]) == media_port and supervisor.live(run_dir) is not None:
        return MediaUser(run_dir.name, int(record.get("port") or 0), record["pid"])
    return None


def recorded_deployment(run_dir: Path) -> Deployment | None:
    """The deployment a start recorded in RUN_DIR (the service's folder); None without one."""
    try:
        return Deployment.from_json((run_dir / DEPLOYMENT_FILE).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
