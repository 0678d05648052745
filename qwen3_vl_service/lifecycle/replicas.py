"""Several replicas on this node and the router in front of them: the start of a node's units.

The units come from the Deployment (deployment/deployment.py), recorded by the launcher in
``RUN_DIR/<service>/deployment.json``. Each replica is a whole service in its own folders below the
service's: ``RUN_DIR/<service>/replica-<i>/`` (state file, its tag in its processes' environment)
and ``LOG_DIR/<service>/replica-<i>/service.log``, on its own port and GPUs (CUDA_VISIBLE_DEVICES).
So stop_service.py and status_service.py handle a replica exactly like the single service, and a
replica's orphans (vLLM's EngineCore after a ``kill -9`` of its API server) are found by its own
tag. The router (vllm-router) has ``RUN_DIR/<service>/router/`` and ``LOG_DIR/<service>/router.log``.
The media server stays shared, one per node and MEDIA_PORT.

Start order: media server, every replica of this node (all at once), wait until each answers
/health, then on the head node the router, which waits for every replica of the job (the other
nodes' too) before it opens its port. A failed start stops whatever it started.

With RESTART=on-failure each replica's vLLM runs under its own supervisor (supervised.py: the same
loop and VllmUnit as the single service, running the recorded unit's argv); stop.stop_group stops
every supervisor first, so nothing is restarted after a stop.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from qwen3_vl_service.core.signals import Inbox
from qwen3_vl_service.deployment import deployment
from qwen3_vl_service.deployment.deployment import Deployment, Unit
from qwen3_vl_service.lifecycle import readiness, router, runstate, stop
from qwen3_vl_service.lifecycle.supervised import ensure_media, service_state, supervisor_command, unit_env
from qwen3_vl_service.lifecycle.units import record, spawn_logged
from qwen3_vl_service.settings.config import ServiceConfig


@dataclass
class Started:
    unit: Unit
    proc: subprocess.Popen[bytes]

    def proc_alive(self) -> bool:
        return self.proc.poll() is None


def _spawn(cfg: ServiceConfig, dep: Deployment, unit: Unit, header: str) -> Started:
    """One replica, detached, with its output through a tee into its own service.log."""
    runstate.check_not_running(unit.run_dir)
    tag = runstate.new_tag()
    if unit.supervised:
        # RESTART=on-failure: the supervisor runs this replica's recorded command, restarts it on
        # the same port and GPUs, and writes its run state each start.
        private_tmp = ""
        argv, env = supervisor_command(cfg, dep.record_file, unit, tag=tag, detached=True)
        env.update(
            {k: v for k, v in unit.env.items() if k in ("CUDA_VISIBLE_DEVICES", "VLLM_CPU_OMP_THREADS_BIND")}
        )
    else:
        private_tmp = runstate.make_private_tmp(tag)
        argv, env = list(unit.argv), unit_env(cfg, unit, tag, private_tmp)
    unit.run_dir.mkdir(parents=True, exist_ok=True)
    where = ", ".join(f"{p.setting} {p.port}" for p in unit.ports)
    gpus = f"GPUs {','.join(unit.gpus)}, " if unit.gpus else ""
    proc = spawn_logged(
        cfg,
        unit,
        argv,
        env,
        header=f"{header}\n[replicas] {unit.name}: {gpus}{where}",
        private_tmp=private_tmp,
    )
    if not unit.supervised:
        state = service_state(cfg, unit, pid=proc.pid, tag=tag, private_tmp=private_tmp, detached=True)
        runstate.write(unit.run_dir, state)
    return Started(unit, proc)


def start_node(
    cfg: ServiceConfig,
    dep: Deployment,
    node_rank: int,
    *,
    header: str,
    detach: bool,
    say: Callable[[str], None] = print,
) -> int:
    """Start this node's replicas of DEP, and the router on the head node.

    In the foreground (not DETACH): then wait for SIGTERM/SIGINT and stop them all.
    """
    mine = dep.of_kind(deployment.VLLM, node_rank)
    routers = dep.of_kind(deployment.ROUTER, node_rank)
    ensure_media(cfg, say)
    record(dep)
    started: list[Started] = []
    stop_flag = Inbox()  # Ctrl+C, SIGTERM: queued by the handler, acted on here (core/signals.py)
    if not detach:
        _trap(stop_flag)

    def stop_requested(_progress: str = "") -> None:
        # At every poll of a replica's or the router's /health, not once each is healthy (up to
        # STARTUP_TIMEOUT each, as it was).
        if stop_flag.received:
            raise KeyboardInterrupt

    names = {u.name for u in (*mine, *routers)}
    try:
        for unit in mine:
            started.append(_spawn(cfg, dep, unit, header))
            say(f"{unit.name}: pid {started[-1].proc.pid} on port {unit.ports[0].port}; log {unit.log_file}")
        for s in started:
            readiness.wait_healthy(
                s.unit.health_url,
                is_alive=s.proc_alive,
                log_file=s.unit.log_file,
                timeout=cfg.startup_timeout,
                on_progress=stop_requested,
                poll=0.25,
            )
            say(f"{s.unit.name}: ready on port {s.unit.ports[0].port}")
            stop_requested()
        for unit in routers:
            router.start(cfg, unit, detached=detach, wait=True, say=say, on_progress=stop_requested)
    except BaseException:  # whatever failed (a replica, the router, Ctrl+C, a bug): stop what was started
        print("stopping what was started ...", file=sys.stderr)
        stop.stop_group(
            dep, timeout=cfg.shutdown_timeout + 5, echo=lambda line: print(line, file=sys.stderr), names=names
        )
        raise
    if routers:
        say(
            f"ready: {dep.api_url}/v1 through vllm-router ({cfg.router_policy}) "
            f"in front of {len(dep.of_kind(deployment.VLLM))} replicas"
        )
    else:
        say(f"ready: {len(mine)} replica(s) of node {node_rank}; the router runs on the head node")
    if detach:
        return 0
    say("running in the foreground; Ctrl+C or SIGTERM stops every replica of this node and the router")
    while not stop_flag.wait(1.0):
        if started and all(s.proc.poll() is not None for s in started):
            say("every replica of this node has exited; stopping")
            break
    report = stop.stop_group(dep, timeout=cfg.shutdown_timeout + 30, echo=say, names=names)
    return 0 if all(r.ok for _, r in report) else 1


def _trap(inbox: Inbox) -> None:
    # The handler only queues the signal (never Event.set(): core/signals.py); the loops act.
    inbox.install((signal.SIGTERM, signal.SIGINT))


__all__ = ["Started", "start_node"]
