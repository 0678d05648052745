"""One unit of a deployment as it starts: the deployment's record, and a detached start with the
unit's output through a tee into its log."""

from __future__ import annotations

import subprocess

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.fileio import write_atomic
from qwen3_vl_service.deployment.deployment import Deployment, Unit
from qwen3_vl_service.lifecycle import logtee, runstate
from qwen3_vl_service.settings.config import ServiceConfig


def record(dep: Deployment) -> None:
    """What this start runs, for stop, status and the supervisors (secrets left out: Unit.to_dict)."""
    dep.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(dep.record_file, dep.to_json())


def spawn_logged(
    cfg: ServiceConfig,
    unit: Unit,
    argv: list[str],
    env: dict[str, str],
    *,
    header: str,
    private_tmp: str = "",
) -> subprocess.Popen[bytes]:
    """ARGV (UNIT's, or its supervisor's) in its own session, its output into UNIT's log after HEADER.

    A command that cannot be executed is one CheckFailed line; its PRIVATE_TMP is removed then.
    """
    try:
        return logtee.spawn_logged(
            argv,
            env,
            log_file=unit.log_file,
            max_bytes=cfg.log_max_mb * 1024 * 1024,
            backups=cfg.log_backups,
            header=header,
        )
    except OSError as exc:
        runstate.remove_private_tmp(private_tmp)
        raise CheckFailed(
            f"cannot execute {argv[0]}: {exc.strerror}", fix="set VLLM_PYTHON to a python with vLLM"
        ) from None


__all__ = ["record", "spawn_logged"]
