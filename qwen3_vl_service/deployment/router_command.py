"""vllm-router's command (the vLLM project's router, PyPI ``vllm-router``) in front of the replicas. Pure."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from qwen3_vl_service.planning.vllm_args import pair_flags
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
    env = {
        # setproctitle renames it vllm::router; keep the environment (and our tag) readable.
        "SPT_NOENV": "1",
        "NO_COLOR": "1",
        "PYTHONUNBUFFERED": "1",
    }
    return RouterCommand(tuple(argv), env, cfg.router_port, metrics_port(cfg))


def display(cmd: RouterCommand) -> str:
    return " \\\n    ".join(pair_flags(cmd.argv))


__all__ = ["ROUTER_MODULE", "RouterCommand", "build", "display", "metrics_port"]
