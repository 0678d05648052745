"""Several replicas on this node and the router in front of them: start, stop, status.

Each replica is a whole service in its own scope: ``RUN_DIR/replica-<i>/``
(state file, its tag in its processes' environment) and
``LOG_DIR/replica-<i>/service.log``, on its own port and GPUs
(CUDA_VISIBLE_DEVICES). So stop_service.py and status_service.py handle a
replica exactly like the single service, and a replica's orphans (vLLM's
EngineCore after a ``kill -9`` of its API server) are found by its own tag.
The router (vllm-router) has ``RUN_DIR/router/`` and ``LOG_DIR/router.log``.
The media server stays shared, in RUN_DIR itself.

Start order: media server, every replica of this node (all at once), wait
until each answers /health, then on the head node the router, which waits
for every replica of the job (the other nodes' too) before it opens its port.
A failed start stops whatever it started.

With RESTART=on-failure each replica's vLLM runs under its own supervisor
(supervisor.py --replica: the same loop and VllmUnit as the single service,
scoped to the replica's run folder, port and GPUs); stop_node stops every
supervisor first, so nothing is restarted after a stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qwen3_vl_service.deployment import cluster, scope
from qwen3_vl_service.deployment.cluster import Layout, Replica
from qwen3_vl_service.settings.config import ServiceConfig


@dataclass
class Started:
    replica: Replica
    cfg: ServiceConfig
    proc: subprocess.Popen[bytes]

    def proc_alive(self) -> bool:
        return self.proc.poll() is None


def router_dir(cfg: ServiceConfig) -> Path:
    return cfg.run_dir / cluster.ROUTER_NAME


def router_log(cfg: ServiceConfig) -> Path:
    return cfg.log_dir / "router.log"


def _spawn(cfg: ServiceConfig, lay: Layout, replica: Replica, expert_parallel: bool, header: str) -> Started:
    """One replica, detached, with its output through a tee into its own service.log."""

    from qwen3_vl_service.lifecycle import launcher, runstate
    from qwen3_vl_service.planning import vllm_args

    rcfg = cluster.replica_config(cfg, replica, lay)
    runstate.check_not_running(scope.paths(rcfg).run_dir)
    tag = runstate.new_tag()
    supervised = cfg.restart == "on-failure" and lay.mode == "router"
    if supervised:
        # RESTART=on-failure: the supervisor (supervisor.py, --replica) runs this replica's vLLM,
        # restarts it on the same port and GPUs, and writes its run state each start.
        private_tmp = ""
        argv, env = supervisor_command(cfg, replica, expert_parallel=expert_parallel, tag=tag)
    else:
        private_tmp = runstate.make_private_tmp(tag)
        cmd = node_command(
            cfg, lay, replica, expert_parallel=expert_parallel, tag=tag, private_tmp=private_tmp
        )
        argv, env = list(cmd.argv), vllm_args.with_inherited(cmd.env, os.environ)
    scope.paths(rcfg).run_dir.mkdir(parents=True, exist_ok=True)
    where = f"{_where(replica)}, port {replica.port}"
    proc = launcher.spawn_logged(
        rcfg, argv, env, header=f"{header}\n[replicas] {replica.name}: {where}", private_tmp=private_tmp
    )
    if not supervised:
        runstate.write(
            scope.paths(rcfg).run_dir,
            launcher._state(rcfg, pid=proc.pid, tag=tag, private_tmp=private_tmp, detached=True),
        )
    return Started(replica, rcfg, proc)


def supervisor_command(
    cfg: ServiceConfig, replica: Replica, *, expert_parallel: bool, tag: str
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the supervisor that keeps REPLICA up: it carries the replica's tag and run
    folder (stop_service.py finds it by them) and its GPUs or cores, which its vLLM inherits."""
    from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV

    rcfg = cluster.router_replica_config(cfg, replica.index, replica.port)
    argv = [sys.executable, "-m", "qwen3_vl_service.lifecycle.supervisor", "--detached"]
    argv += ["--expert-parallel", "on" if expert_parallel else "off"]
    argv += ["--replica", str(replica.index), "--replica-port", str(replica.port)]
    if cfg.config_path:
        argv += ["--config", str(cfg.config_path)]
    env = {
        **os.environ,
        **cluster.replica_env(replica),
        TAG_ENV: tag,
        RUN_DIR_ENV: str(scope.paths(rcfg).run_dir),
    }
    pkg_parent = str(Path(__file__).resolve().parent.parent)  # `python -m` from wherever we were started
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    return argv, env


def start_node(
    cfg: ServiceConfig,
    lay: Layout,
    node_rank: int,
    *,
    expert_parallel: bool,
    header: str,
    detach: bool,
    say: Callable[[str], None] = print,
) -> int:
    """Start this node's replicas, and the router on the head node.

    In the foreground (not DETACH): then wait for SIGTERM/SIGINT and stop them all.
    """
    from qwen3_vl_service.lifecycle import launcher, readiness, router

    mine = lay.on_node(node_rank)
    launcher._ensure_media(cfg, say)
    started: list[Started] = []
    stop_flag = threading.Event()
    if not detach:
        _trap(stop_flag)
    try:
        for replica in mine:
            started.append(_spawn(cfg, lay, replica, expert_parallel, header))
            s = started[-1]
            say(
                f"{replica.name}: vLLM pid {s.proc.pid} on port {replica.port}, {_where(replica)}; "
                f"log {scope.paths(s.cfg).service_log}"
            )
        for s in started:
            host = "127.0.0.1" if s.cfg.host in ("0.0.0.0", "::", "") else s.cfg.host
            readiness.wait_healthy(
                f"http://{host}:{s.replica.port}/health",
                is_alive=s.proc_alive,
                log_file=scope.paths(s.cfg).service_log,
                timeout=cfg.startup_timeout,
                on_progress=lambda _t: None,
                poll=0.25,
            )
            say(f"{s.replica.name}: ready on port {s.replica.port}")
            if stop_flag.is_set():
                raise KeyboardInterrupt
        if node_rank == 0 and lay.mode == "router":
            urls = [cluster.worker_url(cfg, r, lay) for r in lay.replicas]
            router.start(cfg, urls, log_file=router_log(cfg), detached=detach, wait=True, say=say)
    except BaseException:  # whatever failed (a replica, the router, Ctrl+C, a bug): stop what was started
        print("stopping what was started ...", file=sys.stderr)
        stop_node(
            cfg,
            timeout=cfg.shutdown_timeout + 5,
            echo=lambda line: print(line, file=sys.stderr),
            names=_names(started, node_rank, lay),
        )
        raise
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    if node_rank == 0:
        say(
            f"ready: http://{host}:{cfg.router_port}/v1 through vllm-router ({cfg.router_policy}) "
            f"in front of {len(lay.replicas)} replicas"
        )
    else:
        say(f"ready: {len(mine)} replica(s) of node {node_rank}; the router runs on {lay.head}")
    if detach:
        return 0
    say("running in the foreground; Ctrl+C or SIGTERM stops every replica of this node and the router")
    while not stop_flag.wait(1.0):
        if started and all(s.proc.poll() is not None for s in started):
            say("every replica of this node has exited; stopping")
            break
    report = stop_node(
        cfg, timeout=cfg.shutdown_timeout + 30, echo=say, names=_names(started, node_rank, lay)
    )
    return 0 if all(r.ok for _, r in report) else 1


def _names(started: list[Started], node_rank: int, lay: Layout) -> set[str]:
    """What one start_node is responsible for: its replicas, and the router on the head."""
    own = {s.replica.name for s in started}
    return own | ({cluster.ROUTER_NAME} if node_rank == 0 and lay.mode == "router" else set())


def _where(replica: Replica) -> str:
    if replica.gpus:
        return f"GPUs {','.join(replica.gpus)}"
    return f"CPU cores {','.join(map(str, replica.cpus))}" if replica.cpus else "CPU"


def _trap(flag: threading.Event) -> None:
    def handler(signum, frame):  # only sets the flag: the loop acts (design habit 7)
        flag.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def scopes(cfg: ServiceConfig, *, recorded: bool = True) -> list[tuple[str, Path, int]]:
    """(name, run folder, port) of the router and every replica of this checkout on this node.

    RECORDED: only those with a state file (status); else every folder (stop, which
    also looks for orphans whose state file is gone). A state written on another node
    of a running job is that node's to handle (RUN_DIR on a shared file system).
    """
    from qwen3_vl_service.lifecycle import runstate, supervisor

    out: list[tuple[str, Path, int]] = []
    rdir = router_dir(cfg)
    if rdir.is_dir():
        out.append((cluster.ROUTER_NAME, rdir, cfg.router_port))
    for d in cluster.replica_dirs(cfg):
        index = int(d.name.removeprefix(cluster.REPLICA_PREFIX))
        out.append((d.name, d, cfg.port + index))
    kept = []
    for name, run_dir, port in out:
        state = runstate.read(run_dir)
        if state is not None and runstate.other_node(state) is not None and runstate.elsewhere(state):
            continue
        # A replica between two starts of its supervisor (or whose supervisor gave up) has no
        # state file, but its supervisor's record says what happened: status shows it.
        if recorded and state is None and supervisor.read_record(run_dir) is None:
            continue
        kept.append((name, run_dir, state.port if state else port))
    return kept


def stop_node(
    cfg: ServiceConfig,
    *,
    timeout: float,
    echo: Callable[[str], None] = print,
    grace: float = 10.0,
    names: Collection[str] | None = None,
):
    """Stop the router first (no new requests), then every replica at once. [(name, StopReport)].

    NAMES: only these (what one start_node started); default every scope of this node.
    """
    from qwen3_vl_service.lifecycle import stop, supervisor

    found = [s for s in scopes(cfg, recorded=False) if names is None or s[0] in names]
    # Every replica's supervisor first: nothing is restarted while the router and the others stop.
    for name, run_dir, _ in found:
        sup = supervisor.request_stop(run_dir)
        if sup is not None:
            echo(f"{name}: stopping the supervisor (pid {sup.pid}): no restart from now on")
    results = []
    for name, run_dir, port in [s for s in found if s[0] == cluster.ROUTER_NAME]:
        say = _prefixed(echo, name)
        results.append(
            (
                name,
                stop.stop_service(
                    run_dir, host=cfg.host, port=port, timeout=min(timeout, 15), grace=grace, echo=say
                ),
            )
        )
    rest = [s for s in found if s[0] != cluster.ROUTER_NAME]
    if rest:
        with ThreadPoolExecutor(max_workers=len(rest)) as pool:
            futures = [
                (
                    name,
                    pool.submit(
                        stop.stop_service,
                        run_dir,
                        host=cfg.host,
                        port=port,
                        timeout=timeout,
                        grace=grace,
                        echo=_prefixed(echo, name),
                    ),
                )
                for name, run_dir, port in rest
            ]
            results += [(name, f.result()) for name, f in futures]
    for _, run_dir, _ in found:
        if supervisor.live(run_dir) is None:  # its record: the restarts stay in the replica's service.log
            with contextlib.suppress(OSError):
                supervisor.record_path(run_dir).unlink()
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only when empty: what stop left behind is kept for a look
    return [(n, r) for n, r in results if r.stopped or r.survivors or r.state is not None]


def _prefixed(echo: Callable[[str], None], name: str) -> Callable[[str], None]:
    return lambda line: echo(f"{name}: {line}")


def status(cfg: ServiceConfig, *, sample: float, http_timeout: float) -> dict:
    """The router's and every replica's status (status.collect on each scope)."""
    from qwen3_vl_service.lifecycle import status as status_mod

    out: dict = {"replicas": []}
    for name, _run_dir, port in scopes(cfg):
        scoped = cfg.replace(service_name=name, port=port, media_server=False)  # RUN_DIR/<name> (scope.paths)
        if name == cluster.ROUTER_NAME:
            info = status_mod.collect(scoped, sample=0, http_timeout=http_timeout).to_dict()
            info.pop("metrics", None)  # vLLM's metric names: the router has its own (ROUTER_PORT + 1)
            info["log_file"] = str(router_log(cfg))
            out["router"] = info
        else:
            info = status_mod.collect(scoped, sample=sample, http_timeout=http_timeout).to_dict()
            info["name"] = name
            out["replicas"].append(info)
    return out


def healthy(group: dict) -> bool:
    """The router (where this node runs one) and every replica answer /health."""
    parts = [*group["replicas"], *([group["router"]] if "router" in group else [])]
    return bool(parts) and all(p["running"] and p["healthy"] for p in parts)


def render_status(group: dict) -> list[str]:
    from qwen3_vl_service.lifecycle.status import supervisor_lines

    lines: list[str] = []
    r = group.get("router")
    if r is not None:
        if r["running"]:
            h = r.get("health", {})
            lines.append(
                f"router       vllm-router pid {r['pid']}: {r['urls']['api']} -> "
                f"{'healthy' if r['healthy'] else 'NOT healthy'} ({h.get('status') or h.get('error')})"
            )
        else:
            lines.append(
                "router       not running" + (f" ({r['stale_state']})" if r.get("stale_state") else "")
            )
    for info in group["replicas"]:
        name = info["name"]
        if not info["running"]:
            lines.append(
                f"{name:<12} not running" + (f" ({info['stale_state']})" if info.get("stale_state") else "")
            )
            lines += supervisor_lines(info.get("supervisor"))
            continue
        m = info.get("metrics") or {}
        kv = m.get("kv_cache_usage")
        done = m.get("requests_total")
        lines.append(
            f"{name:<12} pid {info['pid']} {info['urls']['api']} "
            f"{'healthy' if info['healthy'] else 'NOT healthy'}; "
            f"{'?' if m.get('requests_running') is None else int(m['requests_running'])} running, "
            f"{'?' if m.get('requests_waiting') is None else int(m['requests_waiting'])} waiting, "
            f"{'?' if done is None else int(done)} done; KV cache {'?' if kv is None else f'{kv * 100:.1f}%'}"
        )
        lines += supervisor_lines(info.get("supervisor"))
    return lines


__all__ = ["render_status", "scopes", "start_node", "status", "stop_node"]


# ---------------------------------------------------------------------------
# What the preflight and --dry-run show (pure, apart from the port probes)


def findings(cfg: ServiceConfig, lay: Layout, report, node_rank: int, *, probe_ports: bool) -> list:
    """Report lines for the replicas: where each runs, capacity per replica and in total, ports."""
    from qwen3_vl_service.planning.plan import Finding

    out: list[Finding] = []
    tp = lay.tensor_parallel_size
    nodes = len(lay.nodes)
    if lay.mode == "router":
        out.append(
            Finding(
                "ok",
                "Replicas",
                f"{lay.total} replicas behind vllm-router ({cfg.router_policy}) on port {cfg.router_port} "
                f"of {lay.head or 'this node'}: {nodes} node(s) x {lay.per_node} replica(s) x TP {tp}",
            )
        )
        for r in lay.replicas:
            where = r.node or "this node"
            gpus = _where(r)
            out.append(Finding("ok", "Replicas", f"{r.name} on {where}: {gpus}, port {r.port}"))
    else:
        out.append(
            Finding(
                "ok",
                "Replicas",
                f"data parallel: {lay.total} ranks over {nodes} node(s) ({lay.per_node} per node x TP {tp}, "
                f"{lay.total * tp} GPUs); head {lay.head or 'this node'}, "
                f"rpc port {cfg.data_parallel_rpc_port}; "
                "the MoE layers exchange tokens between ranks: needs a fast fabric, ranks share fate",
            )
        )
    plan = report.plan if report is not None else None
    if plan is not None and plan.has_capacity:
        per = plan.max_concurrency or 0
        seqs = plan.max_num_seqs or cfg.max_num_seqs  # MAX_NUM_SEQS=auto: the plan's number
        shown = f"auto: {seqs}" if not cfg.max_num_seqs else str(seqs)
        out.append(
            Finding(
                "ok",
                "Capacity",
                f"per {'replica' if lay.mode == 'router' else 'rank'}: {plan.kv_tokens:,} KV tokens, {per} "
                f"full-length sequences, MAX_NUM_SEQS={shown}; in total ({lay.total}): "
                f"{plan.kv_tokens * lay.total:,} KV tokens, {per * lay.total} full-length sequences, "
                f"{seqs * lay.total} requests decoded at once",
            )
        )
    if probe_ports:
        out += _port_findings(cfg, lay, node_rank)
    return out


def _port_findings(cfg: ServiceConfig, lay: Layout, node_rank: int) -> list:
    from qwen3_vl_service.machine import processes
    from qwen3_vl_service.planning.plan import Finding

    wanted: list[tuple[str, int]] = [(r.name, r.port) for r in lay.on_node(node_rank) if r.port != cfg.port]
    if lay.mode == "router" and node_rank == 0:
        from qwen3_vl_service.lifecycle.router import metrics_port

        wanted += [("ROUTER_PORT", cfg.router_port), ("the router's metrics", metrics_port(cfg))]
    out = []
    for what, port in wanted:
        holder = processes.port_holder(cfg.host, port)
        if holder is None:
            out.append(Finding("ok", "Ports", f"{what}: {cfg.host}:{port} is free"))
        else:
            pid, cmd = holder
            out.append(
                Finding(
                    "error",
                    "Ports",
                    f"{what}: {cfg.host}:{port} is held by {f'pid {pid} ({cmd})' if pid else cmd}",
                    "stop it, or move PORT / ROUTER_PORT",
                )
            )
    return out


def commands_text(cfg: ServiceConfig, lay: Layout, *, expert_parallel: bool, only_node: int | None) -> str:
    """Every node's commands (or ONLY_NODE's), as a user would read them."""
    from qwen3_vl_service.lifecycle import router as router_mod

    blocks: list[str] = []
    for rank, node in enumerate(lay.nodes):
        if only_node is not None and rank != only_node:
            continue
        title = f"node {rank} ({node or 'this node'}){' - head' if rank == 0 else ''}"
        lines = [title]
        for r in lay.on_node(rank):
            cmd = node_command(cfg, lay, r, expert_parallel=expert_parallel)
            lines.append(f"  {r.name}:\n    " + cmd.display().replace("\n", "\n  "))
        if rank == 0 and lay.mode == "router":
            urls = [cluster.worker_url(cfg, r, lay) for r in lay.replicas]
            lines.append(
                "  router:\n    " + router_mod.display(router_mod.build(cfg, urls)).replace("\n", "\n  ")
            )
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def node_command(
    cfg: ServiceConfig,
    lay: Layout,
    replica: Replica,
    *,
    expert_parallel: bool,
    tag: str = "",
    private_tmp: str = "",
):
    """The vLLM command of REPLICA: its own settings and GPUs; data-parallel flags in that mode."""
    from qwen3_vl_service.planning import vllm_args

    rcfg = cluster.replica_config(cfg, replica, lay)
    cmd = vllm_args.build(rcfg, expert_parallel=expert_parallel, tag=tag, private_tmp=private_tmp)
    if lay.mode == "data-parallel":
        argv = cluster.serve_argv(cmd.argv, vllm_args.API_SERVER_MODULE)
        argv = (*argv, *cluster.data_parallel_args(replica, lay, cfg))
        return vllm_args.VllmCommand(argv=argv, env=cmd.env)
    return vllm_args.VllmCommand(argv=cmd.argv, env={**cmd.env, **cluster.replica_env(replica)})
