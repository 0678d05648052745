"""vllm-router in front of the replicas: its start (its command is deployment/router_command.py's).

The router is the vLLM project's own (PyPI ``vllm-router``, a Rust server with
a Python launcher); this module starts the deployment's router unit the
way the launcher starts vLLM: detached, in its own session, tagged in its
environment (so stop_service.py finds it), with a run state in
``RUN_DIR/<service>/router/`` and its output in ``LOG_DIR/<service>/router.log``.

vllm-router 0.1.17 waits until every worker answers its health check before
it opens its port (``--worker-startup-timeout-secs``), then checks each
worker every ``--health-check-interval-secs``, retries a failed request on
another worker and opens a circuit breaker on a worker that keeps failing:
a replica that dies is taken out of rotation while the others keep serving.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.deployment.deployment import Unit
from qwen3_vl_service.deployment.router_command import ROUTER_MODULE
from qwen3_vl_service.lifecycle import readiness, runstate, stop
from qwen3_vl_service.lifecycle.supervised import service_state
from qwen3_vl_service.planning.vllm_args import identity_env
from qwen3_vl_service.settings.config import ServiceConfig


def start(
    cfg: ServiceConfig,
    unit: Unit,
    *,
    detached: bool,
    wait: bool,
    say: Callable[[str], None] = print,
    on_progress: Callable[[str], None] = lambda _text: None,
) -> runstate.RunState:
    """Start the router UNIT of a deployment; with WAIT, return once it answers /health.

    ON_PROGRESS is called at every poll (it waits for every replica of the job, the other nodes'
    too): a foreground start raises there on Ctrl+C or SIGTERM."""
    runstate.check_not_running(unit.run_dir)
    tag = runstate.new_tag()
    unit.log_file.parent.mkdir(parents=True, exist_ok=True)
    unit.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **unit.env, **identity_env(unit.run_dir, tag)}
    with open(unit.log_file, "ab") as log:
        try:
            proc = subprocess.Popen(
                list(unit.argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise CheckFailed(
                f"cannot start vllm-router ({unit.argv[0]} -m {ROUTER_MODULE}): {exc.strerror}",
                fix="install it: pip install 'vllm-router==0.1.17' (or pip install -e '.[router]')",
            ) from None
    state = service_state(cfg, unit, pid=proc.pid, tag=tag, private_tmp="", detached=detached)
    runstate.write(unit.run_dir, state)
    port = unit.ports[0].port
    say(f"router: vllm-router pid {proc.pid} on port {port}, policy {cfg.router_policy}; log {unit.log_file}")
    if not wait:
        return state
    try:
        readiness.wait_healthy(
            unit.health_url,
            is_alive=lambda: proc.poll() is None,
            log_file=unit.log_file,
            timeout=cfg.startup_timeout + 30,
            on_progress=on_progress,
            poll=0.25,
        )
    except BaseException:  # whatever failed (a timeout, Ctrl+C, a bug): nothing is left running
        stop.stop_service(unit.run_dir, host=cfg.host, port=port, timeout=10, echo=say)
        raise
    return state


__all__ = ["start"]
