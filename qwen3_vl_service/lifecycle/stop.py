"""stop_service.py: stop the service of this checkout, completely, and touch nothing else.

Order:
0. The supervisor (RESTART=on-failure), by the pid it recorded: SIGTERM,
   so that it restarts nothing from now on; it ends once vLLM is down.
1. The API server recorded in the run state gets SIGTERM and up to
   ``--timeout`` seconds (default SHUTDOWN_TIMEOUT + 30) to let in-flight
   requests finish (vLLM's ``--shutdown-timeout``) and take its engine down;
   then SIGKILL. Once ``/load`` says nothing is in flight, its engine gets
   SIGKILL as vLLM's own default shutdown does (drain.py: why).
2. Whatever is left of its tree, and every process that carries our run
   directory or tag in its environment, gets SIGTERM, a few seconds, then
   SIGKILL: the ``VLLM::EngineCore`` and ``VLLM::Worker_TP*`` processes that
   survive a ``kill -9`` of the API server or a crash and keep GPU memory
   (vLLM #55510, #34643, #25850), also those of an earlier run whose state
   file was lost. A process is ours by its environment, never by its name.
3. With ``--all``, the media server (its pid file, checked by command line).
4. The run's private socket folder (vLLM's IPC sockets, VLLM_RPC_BASE_PATH) and the state file go.
5. Verification: no process of ours is left, the port is free, and (where
   NVML works) no process of ours holds GPU memory.

Exit 0 when everything is stopped (also when nothing was running), 1 when a
process of ours survived or still holds a GPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from qwen3_vl_service.core.cli import ArgumentParser, run, seconds
from qwen3_vl_service.core.errors import EXIT_FAILED, EXIT_OK
from qwen3_vl_service.core.units import format_duration
from qwen3_vl_service.deployment.deployment import Deployment, Unit
from qwen3_vl_service.lifecycle import drain, registry, runstate, supervisor
from qwen3_vl_service.machine import processes
from qwen3_vl_service.settings import config as config_mod
from qwen3_vl_service.settings import scope

# Beyond SHUTDOWN_TIMEOUT: vLLM's engine teardown after the requests drained.
SHUTDOWN_GRACE_S = 30
# For processes that are not the API server (stragglers, orphans): TERM, then at most this
# long (and never longer than --timeout), then KILL. A real EngineCore orphan takes ~5 s to
# take its workers down gracefully.
ORPHAN_GRACE_S = 10.0
# The log tee and the multiprocessing resource tracker end by themselves once every writer is gone.
DRAIN_S = 5.0


@dataclass
class StopReport:
    state: runstate.RunState | None = None
    stale_state: str = ""  # why the state file was stale, if it was
    main: processes.StopResult | None = None
    followed: list[processes.ProcInfo] = field(default_factory=list)  # exited with the API server
    drained: list[processes.ProcInfo] = field(default_factory=list)  # ended by themselves at EOF
    rest: processes.StopResult | None = None
    media: processes.StopResult | None = None
    media_note: str = ""
    removed_tmp: list[str] = field(default_factory=list)
    leftovers: list[processes.ProcInfo] = field(default_factory=list)
    # Titled VLLM::* with a wiped environment, not in our process group: never touched.
    unidentified: list[processes.ProcInfo] = field(default_factory=list)
    port: tuple[str, int] | None = None
    port_holder: tuple[int | None, str] | None = None
    gpu_holders: list[processes.GpuHolder] = field(default_factory=list)
    gpu_note: str = ""
    elapsed: float = 0.0

    @property
    def stopped(self) -> list[processes.ProcInfo]:
        out: list[processes.ProcInfo] = [*self.followed, *self.drained]
        for r in (self.main, self.rest, self.media):
            if r:
                out += r.stopped
        return out

    @property
    def survivors(self) -> list[processes.ProcInfo]:
        out: list[processes.ProcInfo] = []
        for r in (self.main, self.rest, self.media):
            if r:
                out += r.survivors
        seen = {p.pid for p in out}
        return out + [p for p in self.leftovers if p.pid not in seen]

    @property
    def ok(self) -> bool:
        return not self.survivors and not self.gpu_holders


def _uptime(proc: psutil.Process) -> str:
    try:
        return format_duration(time.time() - proc.create_time())
    except psutil.Error:
        return "?"


def _tmpdirs(procs: list[psutil.Process]) -> set[str]:
    out = set()
    for p in procs:
        try:
            # VLLM_RPC_BASE_PATH: where the launcher points vLLM's IPC sockets (older runs: TMPDIR).
            env = p.environ()
            tmp = env.get("VLLM_RPC_BASE_PATH") or env.get("TMPDIR", "")
        except psutil.Error:
            continue
        if Path(tmp).name.startswith(runstate.PRIVATE_TMP_PREFIXES):
            out.add(tmp)
    return out


@dataclass
class _Run:
    """What the steps of one stop share."""

    current: runstate.ServiceState
    report: StopReport
    grace: float
    echo: Callable[[str], None]
    media_pids: set[int]
    media_dir: Path
    tmpdirs: set[str] = field(default_factory=set)
    load_url: str = ""  # vLLM's /load (drain.py)
    supervisor: psutil.Process | None = None
    timeout: float = 0.0  # what the supervisor gets to stop what it started (_wait_for_supervisor)

    def not_media(self, p: psutil.Process) -> bool:
        return p.pid not in self.media_pids and not processes.is_media_server(p)


def stop_service(
    run_dir: str | os.PathLike[str],
    *,
    host: str,
    port: int,
    timeout: float,
    include_media: bool = False,
    media_dir: str | os.PathLike[str] | None = None,
    grace: float = ORPHAN_GRACE_S,
    echo: Callable[[str], None] = print,
) -> StopReport:
    """Stop the service of RUN_DIR (see the module doc); the launcher calls it after a failed --detach start.

    RUN_DIR is the service's own folder (scope.paths(cfg).run_dir); MEDIA_DIR
    holds the media server's pid file (scope.paths(cfg).media_dir; default
    RUN_DIR). HOST and PORT are used for the port check when no state file
    names them. ECHO gets a line before each step that may take time.
    """
    start = time.monotonic()
    current = runstate.assess(run_dir)
    if current.elsewhere:
        raise current.elsewhere_error()
    state = current.state
    report = StopReport(state=state, stale_state=current.stale)
    if state is not None:
        host, port = state.host, state.port
    report.port = (host, port)
    # 0. The supervisor first: from now on nothing is restarted (never ourselves, when it calls us).
    sup = supervisor.request_stop(run_dir)
    if sup is not None:
        echo(f"stopping the supervisor (pid {sup.pid}): no restart from now on")
    media_dir = Path(media_dir if media_dir is not None else run_dir)
    media = processes.media_server(media_dir)
    media_pids = {media.pid, *(c.pid for c in processes.children(media))} if media else set()
    run = _Run(
        current,
        report,
        grace,
        echo,
        media_pids,
        media_dir,
        load_url=drain.load_url(host, port),
        supervisor=sup,
        timeout=timeout,
    )
    if state is not None and state.private_tmp:
        run.tmpdirs.add(state.private_tmp)

    members = _stop_api_server(run, timeout)
    _stop_the_rest(run, members)
    if include_media:
        _stop_media(run, media)
    _remove_run_files(run)
    _verify(run, host, port, include_media)
    report.elapsed = time.monotonic() - start
    return report


def _stop_api_server(run: _Run, timeout: float) -> list[psutil.Process]:
    """Step 1: the API server, with the time in-flight requests need. Returns the members of its tree."""
    main = run.current.process
    if main is None:
        return []
    members = [p for p in processes.tree(main.pid)[1:] if run.not_media(p) and processes.is_alive(p)]
    run.tmpdirs |= _tmpdirs([main, *members])
    run.echo(
        f"stopping vLLM (pid {main.pid}, up {_uptime(main)}): SIGTERM, "
        f"waiting up to {timeout:g} s for in-flight requests and the engine"
    )
    member_infos = [processes.info(p) for p in members]
    run.report.main = drain.stop_api_server(main, run.load_url, timeout, kill_timeout=run.grace)
    run.report.followed = [
        i for p, i in zip(members, member_infos, strict=False) if not processes.is_alive(p)
    ]
    return members


def _stop_the_rest(run: _Run, members: list[psutil.Process]) -> None:
    """Step 2: the rest of its tree, and every process carrying our run dir or tag (orphans)."""
    report, grace = run.report, run.grace
    _wait_for_supervisor(run)
    found = run.current.ours()  # only now: the supervisor, who starts our processes, is gone
    rest = [p for p in dict.fromkeys([*members, *found]) if run.not_media(p) and processes.is_alive(p)]
    # Helpers that ignore SIGTERM on purpose and end at EOF: let them drain last.
    drainers = [p for p in rest if processes.is_drainer(p)]
    others = [p for p in rest if p not in drainers]
    if others:
        run.tmpdirs |= _tmpdirs(others)
        kind = "remaining" if run.current.process is not None else "leftover"
        run.echo(f"stopping {len(others)} {kind} process(es) of ours: SIGTERM, SIGKILL after {grace:g} s")
        done = processes.terminate(others, grace, kill_timeout=grace)
        report.rest = report.rest.merge(done) if report.rest else done
    if drainers:
        infos = [processes.info(p) for p in drainers]
        still = processes.wait_gone(drainers, DRAIN_S)
        report.drained = [i for p, i in zip(drainers, infos, strict=False) if p not in still]
        if still:
            killed = processes.terminate(still, 0.0, kill_timeout=grace)
            report.rest = report.rest.merge(killed) if report.rest else killed


def _wait_for_supervisor(run: _Run) -> None:
    """The supervisor ends before we look for what is left of ours.

    A stop can land while it is starting a new vLLM (it looks at signals between
    steps, not inside a start): it then stops that vLLM itself, gracefully. Our
    processes looked up before it is gone missed that vLLM, and treating the
    supervisor as an orphan (SIGKILL after GRACE) ended it halfway through its
    stop: the new vLLM ran on, unsupervised. So it gets the whole TIMEOUT (it
    already has our SIGTERM), SIGKILL only after that, and the search comes after.
    """
    sup = run.supervisor
    if sup is None or not processes.is_alive(sup):
        return
    run.echo(f"waiting up to {run.timeout:g} s for the supervisor (pid {sup.pid}) to stop what it started")
    done = processes.terminate([sup], run.timeout, kill_timeout=run.grace)
    run.report.rest = run.report.rest.merge(done) if run.report.rest else done


def _stop_media(run: _Run, media: psutil.Process | None) -> None:
    """Step 3 (--all only): the media server."""
    if media is None:
        run.report.media_note = "the media server was not running"
        return
    run.echo(f"stopping the media server (pid {media.pid})")
    run.report.media = processes.terminate(
        [media, *processes.children(media)], run.grace, kill_timeout=run.grace
    )
    _remove_stale_media_pidfile(run.media_dir, media.pid)


def _remove_run_files(run: _Run) -> None:
    """Step 4: the IPC socket folders and the state file, once no process of ours is left."""
    if [p for p in run.current.ours() if processes.is_alive(p)]:
        return
    for tmp in sorted(run.tmpdirs):
        if runstate.remove_private_tmp(tmp):
            run.report.removed_tmp.append(tmp)
    state, main = run.current.state, run.current.process
    if state is not None and (main is None or not processes.is_alive(main)):
        runstate.clear(run.current.run_dir, state.tag)
    elif state is None:
        runstate.clear_corrupt(run.current.run_dir)


def _verify(run: _Run, host: str, port: int, include_media: bool) -> None:
    """Step 5: what is left of ours, the port, and GPU memory still held by what we stopped."""
    report = run.report
    left = [p for p in run.current.ours(exclude_media=not include_media) if processes.is_alive(p)]
    report.leftovers = [processes.info(p) for p in left]
    handled = {p.pid for p in report.stopped} | {p.pid for p in left}
    report.unidentified = [processes.info(p) for p in processes.unidentified_vllm(exclude=handled)]
    report.port_holder = _port_holder_settled(host, port)
    checked = {p.pid for p in report.stopped} | {p.pid for p in report.survivors}
    try:
        report.gpu_holders = processes.gpu_holders(checked) if checked else []
    except processes.NvmlUnavailable as exc:
        report.gpu_note = f"GPU check skipped: {exc}"


def _remove_stale_media_pidfile(run_dir: Path, pid: int) -> None:
    path = run_dir / processes.MEDIA_PID_FILE
    if processes.read_pid_file(path) != pid:
        return
    try:
        alive = processes.is_alive(psutil.Process(pid))
    except psutil.Error:
        alive = False
    if not alive:
        with contextlib.suppress(OSError):
            path.unlink()


def _port_holder_settled(host: str, port: int, wait: float = 2.0) -> tuple[int | None, str] | None:
    """The port's holder, allowing a moment for the kernel to close the listening socket."""
    deadline = time.monotonic() + wait
    while True:
        holder = processes.port_holder(host, port)
        if holder is None or time.monotonic() >= deadline:
            return holder
        time.sleep(0.1)


def render(report: StopReport, *, include_media: bool) -> list[str]:
    lines: list[str] = []
    if not report.stopped and not report.survivors:
        lines.append("nothing to stop: the service is not running")
    lines += _render_stopped(report)
    if report.stale_state:
        lines.append(f"removed a stale state file ({report.stale_state})")
    if include_media and report.media_note:
        lines.append(report.media_note)
    lines += [f"removed the run's IPC socket folder {tmp}" for tmp in report.removed_tmp]
    lines += [
        f"error: pid {p.pid} ({p.label}) survived SIGKILL (stuck in the kernel?); check `ps -o stat {p.pid}`"
        for p in report.survivors
    ]
    lines += [
        f"note: pid {p.pid} ({p.label}) looks like vLLM but cannot be identified as ours "
        f"(setproctitle wiped its environment); not touched. If it is a leftover of yours: kill {p.pid}"
        for p in report.unidentified
    ]
    lines += _render_checks(report)
    if report.stopped:
        lines.append(f"stopped {len(report.stopped)} process(es) in {report.elapsed:.1f} s")
    return lines


def _render_stopped(report: StopReport) -> list[str]:
    """One line per process stopped, and how it ended."""
    lines: list[str] = []
    for result in (report.main, report.rest, report.media):
        if not result:
            continue
        lines += [f"  stopped  pid {p.pid:<7} {p.label}  (SIGTERM)" for p in result.terminated]
        lines += [
            f"  killed   pid {p.pid:<7} {p.label}  (SIGKILL: still running after SIGTERM)"
            for p in result.killed
        ]
        if result is report.main:
            lines += [
                f"  stopped  pid {p.pid:<7} {p.label}  (exited with the API server)" for p in report.followed
            ]
    lines += [
        f"  stopped  pid {p.pid:<7} {p.label}  (ended by itself once the others were gone)"
        for p in report.drained
    ]
    return lines


def _render_checks(report: StopReport) -> list[str]:
    """The verification: the port, and GPU memory still held by a process of ours."""
    lines: list[str] = []
    if report.port is not None:
        host, port = report.port
        if report.port_holder is None:
            lines.append(f"port {host}:{port} is free")
        else:
            pid, cmd = report.port_holder
            who = f"pid {pid} ({cmd})" if pid else cmd
            lines.append(
                f"warning: port {host}:{port} is still held by {who}, not a process of ours; "
                "the next start needs another PORT"
            )
    if report.gpu_holders:
        lines += [
            f"error: pid {h.pid} of ours still holds memory on GPU {h.gpu_index}" for h in report.gpu_holders
        ]
    elif report.gpu_note:
        lines.append(report.gpu_note)
    elif report.stopped:
        lines.append("no process of ours holds a GPU")
    return lines


def group_units(dep: Deployment, *, recorded: bool = True) -> list[Unit]:
    """The router and the vLLM units of DEP that run on this node: all of them but those whose state
    says another node of a running job has them (their processes are found on this node only anyway:
    SLURM's node names need not be this host's name).

    RECORDED: only those with a state file or a supervisor record (status); else every unit (stop,
    which also looks for orphans whose state file is gone). A state written on another node of a
    running job is that node's to handle (RUN_DIR on a shared file system).
    """
    kept = []
    for u in dep.units:
        if u.kind == "media":
            continue
        state = runstate.read(u.run_dir)
        if state is not None and runstate.other_node(state) is not None and runstate.elsewhere(state):
            continue
        # A replica between two starts of its supervisor (or whose supervisor gave up) has no
        # state file, but its supervisor's record says what happened: status shows it.
        if recorded and state is None and supervisor.read_record(u.run_dir) is None:
            continue
        kept.append(u)
    return kept


def _prefixed(echo: Callable[[str], None], name: str) -> Callable[[str], None]:
    return lambda line: echo(f"{name}: {line}")


def stop_group(
    dep: Deployment,
    *,
    timeout: float,
    echo: Callable[[str], None] = print,
    grace: float = ORPHAN_GRACE_S,
    names: Collection[str] | None = None,
) -> list[tuple[str, StopReport]]:
    """Stop the router first (no new requests), then every replica of this node at once.

    NAMES: only these units (what one start of a node started); default every unit of this node.
    """
    found = [u for u in group_units(dep, recorded=False) if names is None or u.name in names]
    # Every replica's supervisor first: nothing is restarted while the router and the others stop.
    for u in found:
        sup = supervisor.request_stop(u.run_dir)
        if sup is not None:
            echo(f"{u.name}: stopping the supervisor (pid {sup.pid}): no restart from now on")

    def one(u: Unit, limit: float) -> StopReport:
        port = u.ports[0] if u.ports else None
        host = urlsplit(u.health_url).hostname or "127.0.0.1"
        return stop_service(
            u.run_dir,
            host=host,
            port=port.port if port else 0,
            timeout=limit,
            grace=grace,
            echo=_prefixed(echo, u.name),
        )

    results = [(u.name, one(u, min(timeout, 15))) for u in found if u.kind == "router"]
    rest = [u for u in found if u.kind != "router"]
    if rest:
        with ThreadPoolExecutor(max_workers=len(rest)) as pool:
            futures = [(u.name, pool.submit(one, u, timeout)) for u in rest]
            results += [(name, f.result()) for name, f in futures]
    for u in found:
        if supervisor.live(u.run_dir) is None:  # its record: the restarts stay in the replica's log
            with contextlib.suppress(OSError):
                supervisor.record_path(u.run_dir).unlink()
        with contextlib.suppress(OSError):
            u.run_dir.rmdir()  # only when empty: what stop left behind is kept for a look
    return [(n, r) for n, r in results if r.stopped or r.survivors or r.state is not None]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        parser = ArgumentParser(
            prog="stop_service.py", description="Stop the Qwen3-VL service of this checkout."
        )
        parser.add_config()
        parser.add_argument("--all", action="store_true", help="also stop the media server")
        parser.add_argument(
            "--timeout",
            type=seconds(86400),
            metavar="S",
            help=(
                "seconds vLLM gets after SIGTERM before SIGKILL "
                f"(default SHUTDOWN_TIMEOUT + {SHUTDOWN_GRACE_S})"
            ),
        )
        args = parser.parse_args(argv)
        cfg = config_mod.load(args.config)
        timeout = args.timeout if args.timeout is not None else cfg.shutdown_timeout + SHUTDOWN_GRACE_S
        if timeout < 0:
            parser.error("--timeout must be >= 0")
        grace = min(ORPHAN_GRACE_S, max(timeout, 1.0))
        # A replica group or data-parallel ranks: the router first (no new requests), then every
        # replica, each in its own folder below the service's (the deployment recorded at the start).
        dep = registry.recorded_deployment(scope.paths(cfg).run_dir)
        group = []
        if dep is not None and dep.grouped:
            group = stop_group(dep, timeout=timeout, grace=grace, echo=lambda line: print(line, flush=True))
        for name, part in group:
            print(f"{name}:", flush=True)
            for line in render(part, include_media=False):
                stream = sys.stderr if line.startswith(("error:", "warning:")) else sys.stdout
                print(f"  {line}", file=stream, flush=True)
        where = scope.paths(cfg)
        # The media server is shared by every service of this RUN_DIR on the same MEDIA_PORT:
        # --all leaves it up while another of them still runs.
        users = registry.media_users(cfg) if args.all else []
        report = stop_service(
            where.run_dir,
            host=cfg.host,
            port=cfg.port,
            timeout=timeout,
            include_media=args.all and not users,
            media_dir=where.media_dir,
            grace=grace,
            echo=lambda line: print(line, flush=True),
        )
        if users:
            names = ", ".join(f"{u.name} (port {u.port}, pid {u.pid})" for u in users)
            report.media_note = f"the media server stays: still used by {names}"
        print(f"service {where.name} ({where.run_dir})", flush=True)
        for line in render(report, include_media=args.all):
            if group and line.startswith("nothing to stop"):
                continue  # the replicas were the service
            stream = sys.stderr if line.startswith(("error:", "warning:")) else sys.stdout
            print(line, file=stream, flush=True)
        return EXIT_OK if report.ok and all(part.ok for _, part in group) else EXIT_FAILED

    return run(body, command_log(argv, "stop.log"))


def command_log(argv: list[str], name: str) -> Path | None:
    """Where an unexpected traceback goes: LOG_DIR of the config, if it loads."""
    try:
        cfg_path = None
        for i, a in enumerate(argv):
            if a == "--config" and i + 1 < len(argv):
                cfg_path = argv[i + 1]
            elif a.startswith("--config="):
                cfg_path = a.split("=", 1)[1]
        return scope.paths(config_mod.load(cfg_path)).log(name)
    except Exception:  # noqa: BLE001 - the real error is reported by the command itself
        return None


__all__ = ["StopReport", "command_log", "main", "render", "stop_group", "stop_service"]
