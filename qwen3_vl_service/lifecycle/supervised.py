"""What the supervisor keeps up for one service: its vLLM and its media server (see supervisor.py).

Each unit starts, checks and cleans up through the functions the rest of the
service uses: vllm_args.build for the command, the launcher's run state and
media start, stop.stop_service for the orphan-safe cleanup, readiness for the
likely cause in the log. A replica behind a router is kept up by giving each
one its own VllmUnit (its own config: port, run folder).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil
import requests

from qwen3_vl_service.core import hosts
from qwen3_vl_service.core.childproc import with_package_path
from qwen3_vl_service.core.cli import ArgumentParser, run
from qwen3_vl_service.core.errors import ServiceError, UsageError
from qwen3_vl_service.core.names import LAUNCHER_LOG, RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.deployment.deployment import ROUTER, VLLM, Deployment, Unit, replica_config
from qwen3_vl_service.lifecycle import readiness, registry, runstate, stop
from qwen3_vl_service.lifecycle.drain import engine_processes
from qwen3_vl_service.lifecycle.liveness import Liveness
from qwen3_vl_service.lifecycle.supervisor import (
    HEALTH_EVERY_S,
    HEALTH_TIMEOUT_S,
    Finished,
    Policy,
    Record,
    Supervisor,
    record_path,
)
from qwen3_vl_service.machine import processes
from qwen3_vl_service.media import client
from qwen3_vl_service.planning import vllm_args
from qwen3_vl_service.settings import scope
from qwen3_vl_service.settings.config import ServiceConfig, load

# After a failure, what is left of vLLM gets this long after SIGTERM: its requests are lost anyway.
CLEANUP_TIMEOUT_S = 10.0
# The log read for the likely cause of a failure: at most this much of its end.
_DIAGNOSE_BYTES = 256 * 1024
# What vLLM's API server logs when its engine died under it (vllm/v1/engine/core_client.py, 0.26-0.32).
_ENGINE_DIED = re.compile(r"engine core exited unexpectedly|EngineDeadError")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
        return f"signal {-returncode}"
    return f"status {returncode}"


def _health_error(url: str, timeout: float = HEALTH_TIMEOUT_S) -> str | None:
    """None when URL answers 200; else what went wrong, short."""
    try:
        with requests.Session() as session:
            session.trust_env = False  # the server is on this node: never through a proxy
            resp = session.get(url, timeout=timeout)
    except requests.Timeout:
        return f"no answer within {timeout:g} s"
    except requests.ConnectionError:
        return "connection refused"
    except requests.RequestException as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if resp.status_code == 200 else f"answered {resp.status_code}"


class _HealthClock:
    """When /health last answered, and whether a failing one has failed for long enough."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.next_at = 0.0
        self.ok_once = False
        self.failing_since: float | None = None

    def due(self, now: float) -> bool:
        if now < self.next_at:
            return False
        self.next_at = now + HEALTH_EVERY_S
        return True

    def failed_for(self, now: float, error: str | None) -> float:
        """Record an answer (ERROR None: healthy); seconds it has been failing since the last 200."""
        if error is None:
            self.ok_once, self.failing_since = True, None
            return 0.0
        if self.failing_since is None:
            self.failing_since = now
        return now - self.failing_since


def own_env(
    cfg: ServiceConfig, unit: Unit, tag: str, private_tmp: str, environ: Mapping[str, str]
) -> dict[str, str]:
    """What one start of UNIT sets on top of ENVIRON (the one it inherits): its own, its secrets (never
    recorded in deployment.json: taken from the settings again) and the start's identity."""
    temp = runstate.temp_env(private_tmp, environ) if private_tmp else {}
    return {**unit.env, **vllm_args.secret_env(cfg), **vllm_args.identity_env(unit.run_dir, tag), **temp}


def unit_env(cfg: ServiceConfig, unit: Unit, tag: str, private_tmp: str = "") -> dict[str, str]:
    """The whole environment of one start of UNIT (own_env on top of this process's)."""
    return vllm_args.with_inherited(own_env(cfg, unit, tag, private_tmp, os.environ), os.environ)


def service_state(
    cfg: ServiceConfig, unit: Unit, *, pid: int, tag: str, private_tmp: str, detached: bool
) -> runstate.RunState:
    """The run state of one start of UNIT (vLLM, or the router), for stop and status."""
    return runstate.for_service(
        cfg,
        pid=pid,
        tag=tag,
        log_file=unit.log_file,
        private_tmp=private_tmp,
        detached=detached,
        port=unit.ports[0].port if unit.ports else cfg.port,
        media_server=cfg.media_server and unit.kind == "vllm",
    )


def ensure_media(cfg: ServiceConfig, say: Callable[[str], None]) -> None:
    """MEDIA_ROOT, made when missing, and this node's media server for CFG: reused when ours is up,
    started otherwise (media.client).

    The folder is made without the media server too: vLLM gets it as --allowed-local-media-path, and
    vLLM 0.26 answers every chat request 400 while that folder does not exist (seen on the H100).
    """
    if not cfg.media_root.is_dir():
        cfg.media_root.mkdir(parents=True, exist_ok=True)
        say(f"created the media root {cfg.media_root}")
    if not cfg.media_server:
        return
    pid, started = client.ensure_running(
        cfg.media_host,
        cfg.media_port,
        cfg.media_root,
        cfg.media_allowed_types,
        scope.paths(cfg).media_log,
        scope.paths(cfg).media_pid_file,
        python=sys.executable,
        workers=cfg.media_workers,
        log_max_mb=cfg.log_max_mb,
        log_backups=cfg.log_backups,
    )
    verb = "started" if started else "reusing"
    where = f"{hosts.local_url(cfg.media_host, cfg.media_port)}/"
    say(f"media server: {verb} pid {pid} on {where} serving {cfg.media_root}")


class VllmUnit:
    """vLLM's API server with its EngineCore and workers; writes the run state of each start."""

    name = "vLLM"

    def __init__(
        self,
        cfg: ServiceConfig,
        unit: Unit,
        *,
        tag: str,
        detached: bool,
        echo: Callable[[str], None],
        name: str = "vLLM",
        rotation: tuple[str, str] = ("", ""),
    ) -> None:
        self.name = name  # the supervisor's log and record name the unit by it (a replica's too)
        # A replica behind vllm-router: (the router's URL, this replica's URL as the router knows it).
        # It leaves the router's rotation while it stalls or is down, and joins again once healthy.
        self.router_url, self.worker_url = rotation
        self.out_of_rotation = False
        # UNIT: the recorded deployment's command; every restart runs exactly it (the plan's
        # decisions included). CFG: the unit's settings (its port and folders, the restart policy).
        self.cfg, self.unit, self.tag, self.detached = cfg, unit, tag, detached
        self.echo, self.log_file = echo, unit.log_file
        self.proc: subprocess.Popen | None = None
        self.start_error: str | None = None
        self.engine: list = []  # (process, title) of the VLLM::* processes seen at the first healthy answer
        self.health = _HealthClock()
        self.started = 0.0
        self.log_offset = 0
        self.health_url = unit.health_url
        # Whether its engine makes progress (liveness.py), from its first healthy answer; STALL_AFTER=0: off.
        self.liveness: Liveness | None = None
        self.condition = ""  # "stalling: ..." or "hung: ...", for the supervisor's record; "" while live
        self.hung = False

    def start(self) -> None:
        self.start_error, self.engine, self.proc = None, [], None
        self.liveness, self.condition, self.hung = None, "", False
        self.health.reset()
        self.started = time.monotonic()
        self.log_offset = readiness.log_size(self.log_file)
        private_tmp = ""
        try:
            # Named by the tag, as the launcher's report showed it; the last start's is gone by now
            # (cleanup), unless something held it: then it goes the way stop_service.py removes it.
            private_tmp = runstate.private_tmp_path(self.tag)
            runstate.remove_private_tmp(private_tmp)
            runstate.make_private_tmp(self.tag)
            env = unit_env(self.cfg, self.unit, self.tag, private_tmp)
            # Its own process group, as a detached start always had: stop's group fallback finds
            # children whose environment was wiped, and Ctrl+C reaches us, who stop it in order.
            self.proc = subprocess.Popen(
                list(self.unit.argv), env=env, stdin=subprocess.DEVNULL, start_new_session=True
            )
            state = service_state(
                self.cfg,
                self.unit,
                pid=self.proc.pid,
                tag=self.tag,
                private_tmp=private_tmp,
                detached=self.detached,
            )
            runstate.write(self.unit.run_dir, state)
        except (OSError, ServiceError) as exc:
            self.start_error = f"cannot start vLLM: {exc}"
            return
        self.echo(f"started vLLM: pid {self.proc.pid}")

    def check(self, now: float) -> str | None:
        if self.start_error:
            return self.start_error
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None:
            # After its engine dies vLLM's API server exits by itself, with status 0, within a second
            # on a GPU (measured on an H100): a look may find both gone. Its log tells a crash from
            # a stop (kill PID, SIGTERM: a clean exit, not restarted).
            died = _ENGINE_DIED.search(self._this_start_log())
            if rc == 0 and self.health.ok_once and not died:
                raise Finished(f"vLLM (pid {self.proc.pid}) exited by itself with status 0")
            api = f"vLLM's API server (pid {self.proc.pid}) exited with {describe_exit(rc)}"
            if died:
                gone = [f"{label} (pid {p.pid})" for p, label in self.engine if not processes.is_alive(p)]
                engine = gone[0] if gone else "vLLM's engine"
                return f"{engine} is gone: killed or crashed (its log: '{died.group(0)}'); then {api}"
            return f"{api}{self._likely()}"
        for p, label in self.engine:
            if not processes.is_alive(p):
                return f"{label} (pid {p.pid}) is gone: killed or crashed{self._likely()}"
        if not self.health.due(now):
            return None
        error = _health_error(self.health_url)
        was_ok = self.health.ok_once
        failing = self.health.failed_for(now, error)
        if not was_ok:
            # Until the first healthy answer, the VLLM:: processes as they appear (a crash in the
            # seconds before the next look names the engine that went).
            self.engine = self._engine_processes()
        if error is None:
            if not was_ok:
                self.echo(f"vLLM is healthy after {now - self.started:.0f} s")
                self.liveness = self._liveness()
                self._rotation(join=True)
            return self._progress(now)
        if not was_ok:
            if now - self.started > self.cfg.startup_timeout:
                return f"no healthy /health within STARTUP_TIMEOUT={self.cfg.startup_timeout} s ({error})"
            return None
        if failing >= self.cfg.health_fail_after:
            limit = self.cfg.health_fail_after
            return f"/health failing for {failing:.0f} s (HEALTH_FAIL_AFTER={limit}): {error}"
        return None

    def _liveness(self) -> Liveness | None:
        if not self.cfg.stall_after:
            return None
        return Liveness(
            self.health_url.removesuffix("/health"),
            stall_after=self.cfg.stall_after,
            model=self.cfg.served_model_name,
            api_key=self.cfg.api_key,
        )

    def _progress(self, now: float) -> str | None:
        """/health answers: is the engine behind it making progress? The cause when it is hung."""
        if self.liveness is None:
            return None
        verdict = self.liveness.check(now)
        condition = "" if verdict.state == "live" else f"{verdict.state}: {verdict.evidence}"
        if condition.split(":")[0] != self.condition.split(":")[0]:
            self.echo(f"{self.name}: {condition or 'the engine makes progress again'}")
        self.condition = condition
        if verdict.state == "live":
            self._rotation(join=True)
        else:
            # Stalling already: the router would send new requests into a stuck engine until the
            # kill (STALL_AFTER), and its own /health check sees nothing wrong (200).
            self._rotation(join=False)
        if verdict.state != "hung":
            return None
        self.hung = True
        return f"hung: {verdict.evidence}"

    def _rotation(self, *, join: bool) -> None:
        """Join or leave the router's rotation (vllm-router's /add_worker, /remove_worker), once each way."""
        if not self.router_url or not self.worker_url or join != self.out_of_rotation:
            return
        error = rotation_call(self.router_url, self.worker_url, join=join)
        # Asked once each way: a router that is gone, or already knew (its own /health check), is told
        # no more; its health check still takes a dead replica out and a healthy one back.
        self.out_of_rotation = not join
        where = "back in" if join else "out of"
        if error:
            self.echo(f"{self.name}: not put {where} the rotation of the router {self.router_url}: {error}")
        else:
            self.echo(f"{self.name}: {where} the router's rotation ({self.worker_url})")

    def _engine_processes(self) -> list:
        """(process, title) of the EngineCore and workers: losing one is vLLM's end, even if its API lives."""
        assert self.proc is not None
        try:
            return [(p, processes.info(p).label) for p in engine_processes(psutil.Process(self.proc.pid))]
        except psutil.Error:
            return []  # it just exited: the next check says so

    def _this_start_log(self) -> str:
        """The end of this start's part of the log (at most _DIAGNOSE_BYTES); "" when unreadable."""
        try:
            size = self.log_file.stat().st_size
            start = self.log_offset if self.log_offset <= size else 0  # rotated meanwhile
            with open(self.log_file, "rb") as fh:
                fh.seek(max(start, size - _DIAGNOSE_BYTES))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _likely(self) -> str:
        """'; likely: ...' from this start's part of the log, when readiness recognises the cause."""
        cause = readiness.diagnose(self._this_start_log())
        return f"; likely: {cause}" if cause else ""

    def cleanup(self) -> None:
        """After a failure: stop_service.py's orphan-safe stop (tree, orphans by tag, IPC folder, state)."""
        self._rotation(join=False)  # down: the router sends its requests to the other replicas
        if self.hung:
            self._kill_tree()
        self._stop(CLEANUP_TIMEOUT_S)

    def _kill_tree(self) -> None:
        """A hung engine: SIGKILL the whole tree at once. A stopped or stuck process does not act on
        SIGTERM (a SIGSTOPped one holds it pending), and its requests are lost anyway."""
        procs = [p for p, _ in self.engine]
        if self.proc is not None:
            with contextlib.suppress(psutil.Error):
                procs = [*processes.tree(self.proc.pid), *procs]
        alive = [p for p in dict.fromkeys(procs) if processes.is_alive(p)]
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.echo(f"{self.name} is hung: SIGKILL to its {len(alive)} process(es)")
        processes.wait_gone(alive, CLEANUP_TIMEOUT_S)

    def _stop(self, timeout: float) -> None:
        report = stop.stop_service(
            self.unit.run_dir,
            host=self.cfg.host,
            port=self.cfg.port,
            timeout=timeout,
            grace=min(timeout, stop.ORPHAN_GRACE_S),
            echo=self.echo,
        )
        for line in stop.render(report, include_media=False):
            if not line.startswith("note:"):  # other users' vLLM processes: not the supervisor's business
                self.echo(line)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1)  # reap our child

    def stop(self) -> None:
        """stop_service.py's stop: in-flight requests finish within SHUTDOWN_TIMEOUT, then nothing is left."""
        self._stop(self.cfg.shutdown_timeout + stop.SHUTDOWN_GRACE_S)


def rotation_call(router_url: str, worker_url: str, *, join: bool, timeout: float = 5.0) -> str:
    """Add WORKER_URL to (JOIN) or remove it from vllm-router's rotation; "" when done, else why not."""
    action = "add_worker" if join else "remove_worker"
    try:
        with requests.Session() as session:
            session.trust_env = False  # the router is ours, on the job's nodes
            resp = session.post(f"{router_url}/{action}", params={"url": worker_url}, timeout=timeout)
    except requests.RequestException as exc:
        return f"{type(exc).__name__}"
    return "" if resp.status_code == 200 else f"/{action} answered {resp.status_code}: {resp.text[:100]}"


def rotation(dep: Deployment, unit: Unit) -> tuple[str, str]:
    """(the router's URL as UNIT's node reaches it, UNIT's URL as the router knows it), or ("", "")
    when no router of DEP sends requests to UNIT."""
    routers = dep.of_kind(ROUTER)
    if not routers or not unit.ports:
        return "", ""
    router = routers[0]
    argv = list(router.argv)
    if "--worker-urls" not in argv:
        return "", ""
    urls = []
    for word in argv[argv.index("--worker-urls") + 1 :]:
        if word.startswith("--"):
            break
        urls.append(word)
    port = unit.ports[0].port
    mine = [u for u in urls if u.rstrip("/").rsplit(":", 1)[-1] == str(port)]  # replica i: PORT+i, job-wide
    if len(mine) != 1:
        return "", ""
    base = router.health_url.removesuffix("/health")  # on the router's node
    if router.node_rank != unit.node_rank:
        # From another node: the head's address as the router's own URLs name it (its replica's).
        heads = [u.ports[0].port for u in dep.of_kind(VLLM, router.node_rank) if u.ports]
        head_urls = [u for u in urls if any(u.rstrip("/").endswith(f":{p}") for p in heads)]
        if not head_urls:
            return "", ""
        base = f"{head_urls[0].rstrip('/').rsplit(':', 1)[0]}:{router.ports[0].port}"
    return base, mine[0]


class MediaUnit:
    """The media server of the config, started (or reused) the launcher's way; shared: never stopped here."""

    name = "media server"

    def __init__(self, cfg: ServiceConfig, *, echo: Callable[[str], None]) -> None:
        self.cfg, self.echo = cfg, echo
        self.proc: psutil.Process | None = None
        self.start_error: str | None = None
        self.health = _HealthClock()

    def start(self) -> None:
        self.start_error = None
        self.health.reset()
        try:
            ensure_media(self.cfg, self.echo)
        except ServiceError as exc:
            self.start_error = f"cannot start the media server: {exc.one_line()}"
            return
        self.proc = processes.media_server(scope.paths(self.cfg).media_dir)
        if self.proc is None:
            self.start_error = "the media server started but its pid file names no media server"

    def check(self, now: float) -> str | None:
        if self.start_error:
            return self.start_error
        if self.proc is None or not processes.is_alive(self.proc):
            return f"the media server (pid {self.proc.pid if self.proc else '?'}) is gone"
        if not self.health.due(now):
            return None
        cfg = self.cfg
        ok = client.is_ours_healthy(
            cfg.media_host, cfg.media_port, HEALTH_TIMEOUT_S, pid_file=scope.paths(cfg).media_pid_file
        )
        error = None if ok else "no answer from our media server"
        failing = self.health.failed_for(now, error)
        if error is not None and failing >= cfg.health_fail_after:
            return f"the media server's /health failing for {failing:.0f} s: {error}"
        return None

    def cleanup(self) -> None:
        if self.proc is not None and processes.is_alive(self.proc):
            with contextlib.suppress(Exception):
                kids = self.proc.children(recursive=True)
                processes.terminate([self.proc, *kids], 5.0)
        self.proc = None

    def stop(self) -> None:
        """Left running: other services may use it; stop_service.py --all stops it."""


SUPERVISOR_MODULE = "qwen3_vl_service.lifecycle.supervised"


def supervisor_command(
    cfg: ServiceConfig, record_file: Path, unit: Unit, *, tag: str, detached: bool
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the supervisor that keeps UNIT of the deployment recorded in RECORD_FILE up.

    It carries the unit's tag and run folder (stop_service.py finds it by them) and the unit's GPUs
    or cores, which its vLLM inherits. It runs the recorded argv: nothing is rebuilt."""
    argv = [sys.executable, "-m", SUPERVISOR_MODULE, "--deployment", str(record_file), "--unit", unit.name]
    argv += ["--node-rank", str(unit.node_rank)]
    if detached:
        argv.append("--detached")
    if cfg.config_path:
        argv += ["--config", str(cfg.config_path)]
    env = with_package_path({**os.environ, **vllm_args.identity_env(unit.run_dir, tag)})
    return argv, env


def _echo(message: str) -> None:
    """A line into the log (our stdout is the tee into service.log)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[supervisor {stamp}] {message}", flush=True)


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"python -m {SUPERVISOR_MODULE}",
        description="Keep one vLLM unit of a deployment (and the media server) up (run by start_service.py).",
    )
    parser.add_config()
    parser.add_argument("--deployment", type=Path, required=True, help="the deployment.json a start recorded")
    parser.add_argument("--unit", required=True, help="the unit of it to keep up (vllm, replica-<i>)")
    parser.add_argument("--node-rank", type=int, default=0, help="the unit's node (default 0)")
    parser.add_argument("--detached", action="store_true", help="started by start_service.py --detach")
    return parser


def main(argv: list[str] | None = None) -> int:
    log_holder: list[Path | None] = [None]

    def body() -> int:
        args = _parser().parse_args(argv)
        tag = os.environ.get(TAG_ENV, "")
        if not tag:
            raise UsageError(f"{TAG_ENV} is not set", fix="start the service with start_service.py")
        cfg = load(args.config)
        log_holder[0] = scope.paths(cfg).launcher_log
        dep = registry.recorded_deployment(args.deployment.parent)
        if dep is None:
            raise UsageError(
                f"no readable deployment in {args.deployment}", fix="start it with start_service.py"
            )
        try:
            unit = dep.unit(args.unit, args.node_rank)
        except KeyError:
            raise UsageError(
                f"{args.deployment} has no unit {args.unit} on node {args.node_rank}",
                fix="start it with start_service.py",
            ) from None
        replica = dep.grouped
        if replica:
            # A replica behind the router: its own port, run and log folders (deployment.replica_config).
            cfg = replica_config(cfg, 0, unit.ports[0].port, name=unit.name)
        # The tag stays in /proc/<pid>/environ (what stop_service.py reads, set at exec) but
        # leaves os.environ: the media server we may start is not a process of this run.
        os.environ.pop(TAG_ENV, None)
        os.environ.pop(RUN_DIR_ENV, None)
        policy = Policy.of(cfg)
        record = Record(
            record_path(unit.run_dir),
            tag=tag,
            policy=policy,
            restart=cfg.restart,
            port=cfg.port,
            media=(cfg.media_host, cfg.media_port) if cfg.media_server else None,
        )
        # The media server is shared by the replicas: start_service.py starts it, not a replica's supervisor.
        units: list = [MediaUnit(cfg, echo=_echo)] if cfg.media_server and not replica else []
        name = f"{unit.name} vLLM" if replica else "vLLM"
        units.append(
            VllmUnit(
                cfg,
                unit,
                tag=tag,
                detached=args.detached,
                echo=_echo,
                name=name,
                rotation=rotation(dep, unit) if replica else ("", ""),
            )
        )
        return Supervisor(units, policy, record, echo=_echo).run()

    return run(body, log_path=lambda: log_holder[0] or Path("logs") / LAUNCHER_LOG)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "MediaUnit",
    "VllmUnit",
    "describe_exit",
    "ensure_media",
    "main",
    "rotation",
    "rotation_call",
    "service_state",
    "supervisor_command",
]
