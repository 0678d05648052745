"""vllm-router in front of the replicas: its command line (pure) and its start (an effect).

The router is the vLLM project's own (PyPI ``vllm-router``, a Rust server with
a Python launcher); this module only builds its arguments and starts it the
way the launcher starts vLLM: detached, in its own session, tagged in its
environment (so stop_service.py finds it), with a run state in
``RUN_DIR/router/`` and its output in ``LOG_DIR/router.log``.

vllm-router 0.1.17 waits until every worker answers its health check before
it opens its port (``--worker-startup-timeout-secs``), then checks each
worker every ``--health-check-interval-secs``, retries a failed request on
another worker and opens a circuit breaker on a worker that keeps failing:
a replica that dies is taken out of rotation while the others keep serving.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.settings.config import ServiceConfig

ROUTER_MODULE = "vllm_router.launch_router"
# How often the router asks each worker's /health once running (its default is 60 s,
# which leaves a dead replica in rotation for a minute of retried requests).
HEALTH_CHECK_INTERVAL_S = 5


@dataclass(frozen=True)
class RouterCommand:
    argv: tuple[str, ...]
    env: dict[str, str]
    port: int
    metrics_port: int


def metrics_port(cfg: ServiceConfig) -> int:
    """The router's own Prometheus port: ROUTER_PORT + 1, on loopback."""
    return cfg.router_port + 1


def build(
    cfg: ServiceConfig,
    worker_urls: Sequence[str],
    *,
    tag: str = "",
    run_dir: Path | None = None,
    python: str | None = None,
) -> RouterCommand:
    """The vllm-router command for WORKER_URLS with the configured policy and port."""
    if not worker_urls:
        raise ValueError("the router needs at least one worker URL")
    py = python or sys.executable
    argv = [
        py,
        "-m",
        ROUTER_MODULE,
        "--host",
        cfg.host,
        "--port",
        str(cfg.router_port),
        "--worker-urls",
        *worker_urls,
        "--policy",
        cfg.router_policy,
        # The replicas may take STARTUP_TIMEOUT to load; the router waits for all of them.
        "--worker-startup-timeout-secs",
        str(cfg.startup_timeout),
        "--worker-startup-check-interval",
        "2",
        "--health-check-interval-secs",
        str(HEALTH_CHECK_INTERVAL_S),
        "--health-check-endpoint",
        "/health",
        # Its default 29000 would collide between two routers on one host.
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port(cfg)),
        # vLLM's own limit for a request is STARTUP-independent; keep the router's as long.
        "--request-timeout-secs",
        "1800",
    ]
    from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV

    env = {
        # setproctitle renames it vllm::router; keep the environment (and our tag) readable.
        "SPT_NOENV": "1",
        "NO_COLOR": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if tag:
        env[TAG_ENV] = tag
        env[RUN_DIR_ENV] = str(run_dir or cfg.run_dir / "router")
    return RouterCommand(tuple(argv), env, cfg.router_port, metrics_port(cfg))


def display(cmd: RouterCommand) -> str:

    from qwen3_vl_service.planning.vllm_args import _pair_flags

    return " \\\n    ".join(_pair_flags(cmd.argv))


def start(
    cfg: ServiceConfig,
    worker_urls: Sequence[str],
    *,
    log_file: Path,
    detached: bool,
    wait: bool,
    say: Callable[[str], None] = print,
):
    """Start the router; with WAIT, return once it answers /health. Returns its RunState."""

    from qwen3_vl_service.lifecycle import readiness, runstate, stop

    run_dir = cfg.run_dir / "router"
    runstate.check_not_running(run_dir)
    tag = runstate.new_tag()
    cmd = build(cfg, worker_urls, tag=tag, run_dir=run_dir)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **cmd.env}
    with open(log_file, "ab") as log:
        try:
            proc = subprocess.Popen(
                list(cmd.argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise CheckFailed(
                f"cannot start vllm-router ({cmd.argv[0]} -m {ROUTER_MODULE}): {exc.strerror}",
                fix="install it: pip install 'vllm-router==0.1.17' (or pip install -e '.[router]')",
            ) from None
    state = runstate.for_service(
        cfg, pid=proc.pid, tag=tag, log_file=log_file, detached=detached, port=cfg.router_port
    )
    runstate.write(run_dir, state)
    say(
        f"router: vllm-router pid {proc.pid} on port {cfg.router_port}, policy {cfg.router_policy}, "
        f"{len(worker_urls)} worker(s); log {log_file}"
    )
    if not wait:
        return state
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    try:
        readiness.wait_healthy(
            f"http://{host}:{cfg.router_port}/health",
            is_alive=lambda: proc.poll() is None,
            log_file=log_file,
            timeout=cfg.startup_timeout + 30,
            on_progress=lambda _text: None,
            poll=0.25,
        )
    except BaseException:  # whatever failed (a timeout, Ctrl+C, a bug): nothing is left running
        stop.stop_service(run_dir, host=cfg.host, port=cfg.router_port, timeout=10, echo=say)
        raise
    return state


__all__ = ["RouterCommand", "build", "display", "metrics_port", "start"]
