"""start_service.py: check everything, print one report, then become vLLM.

Order: config -> already running? -> preflight (GPUs, SLURM, model, ports,
compatibility, capacity) -> report -> media server -> run state -> exec vLLM
with its output teed to logs/<service>/service.log (scope.py). With --dry-run it stops after the
report; with --detach it starts vLLM in the background and waits for /health.

This module imports neither torch, nor vllm, nor transformers: a dry run
answers in well under a second on a login node.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from qwen3_vl_service.core import cli
from qwen3_vl_service.core.errors import CheckFailed, UsageError
from qwen3_vl_service.core.findings import Level
from qwen3_vl_service.core.hosts import local_url
from qwen3_vl_service.core.names import LAUNCHER_LOG, RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.deployment import cluster, scope
from qwen3_vl_service.interconnect import report as interconnect
from qwen3_vl_service.lifecycle import logtee, readiness, replicas, runstate, stop
from qwen3_vl_service.media import client
from qwen3_vl_service.planning import preflight, vllm_args, vllm_versions
from qwen3_vl_service.planning.plan import Plan
from qwen3_vl_service.planning.vllm_args import VllmCommand
from qwen3_vl_service.settings.config import SETTINGS, ServiceConfig, load


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="start_service.py",
        description="Check the node, the model and the settings, then start vLLM's OpenAI-compatible server.",
    )
    p.add_config()
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check, print the report and the command, start nothing",
    )
    p.add_argument(
        "--gpus",
        metavar="SPEC",
        help="plan against described GPUs, e.g. 8xH100-80GB, instead of detecting them",
    )
    p.add_argument(
        "--detach", action="store_true", help="start in the background and wait until /health answers"
    )
    p.add_argument(
        "--timeout",
        type=int,
        metavar="S",
        help="with --detach: seconds to wait for /health (default STARTUP_TIMEOUT)",
    )
    p.add_argument(
        "--check-interconnect",
        action="store_true",
        help="run the NCCL all-reduce check across the GPUs before starting (see also CHECK_INTERCONNECT)",
    )
    p.add_argument(
        "--nodes",
        metavar="HOSTS",
        help="plan for these nodes, head first (default: the SLURM job's nodes), e.g. --nodes gpu01,gpu02",
    )
    p.add_argument(
        "--node-rank",
        type=int,
        metavar="K",
        help="which of the nodes this is (default SLURM_NODEID, or 0)",
    )
    p.add_argument("--quiet", action="store_true", help="print only warnings, errors and the outcome")
    return p


# ---------------------------------------------------------------------------
# Report pieces


def render_settings(cfg: ServiceConfig) -> str:
    where = str(cfg.config_path) if cfg.config_path else "none (built-in defaults)"
    lines = [f"Settings (config file: {where}; the environment overrides it)"]
    width = max(len(s.key) for s in SETTINGS)
    for s in SETTINGS:
        value = cfg.display_value(s.key)
        lines.append(f"  {s.key:<{width}}  {value:<44} {cfg.sources.get(s.key, 'default')}")
    for key in sorted(cfg.vllm_env):
        lines.append(f"  {key:<{width}}  {cfg.vllm_env[key]:<44} file (passed to vLLM)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Starting


def _spawn_detached_logtee(cfg: ServiceConfig) -> subprocess.Popen:
    """The tee for --detach: reads vLLM's output on a pipe, writes service.log only.

    Its own session (closing the terminal must not end the log), and none of our
    stdout/stderr: a caller that reads the launcher's output (a test, `ssh node
    start_service.py --detach`) must see EOF when the launcher exits.
    Untagged, like the foreground tee: stop_service.py lets it drain, then exit at EOF.
    """
    scope.paths(cfg).log_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in (TAG_ENV, RUN_DIR_ENV)}
    argv = logtee.command(
        scope.paths(cfg).service_log,
        max_bytes=cfg.log_max_mb * 1024 * 1024,
        backups=cfg.log_backups,
        quiet=True,
    )
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


def _state(cfg: ServiceConfig, *, pid: int, tag: str, private_tmp: str, detached: bool) -> runstate.RunState:
    return runstate.for_service(
        cfg,
        pid=pid,
        tag=tag,
        log_file=scope.paths(cfg).service_log,
        private_tmp=private_tmp,
        detached=detached,
        media_server=cfg.media_server,
    )


def _ensure_media(cfg: ServiceConfig, say: Callable[[str], None]) -> None:
    if not cfg.media_server:
        return
    if not cfg.media_root.is_dir():
        cfg.media_root.mkdir(parents=True, exist_ok=True)
        say(f"created the media root {cfg.media_root}")
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
    where = f"http://{cfg.media_host}:{cfg.media_port}/"
    say(f"media server: {verb} pid {pid} on {where} serving {cfg.media_root}")


@dataclass(frozen=True)
class Launch:
    """The vLLM process a start runs, built once: the report and service.log show it, then it runs.

    PRIVATE_TMP (its IPC socket folder, named by the tag) is made only when the start goes ahead.
    """

    tag: str
    private_tmp: str
    cmd: VllmCommand
    env: dict[str, str]  # the whole environment vLLM gets
    plan: Plan | None = None  # its decisions (MAX_NUM_SEQS=auto, YaRN) go to the supervisor too

    def display(self) -> str:
        return self.cmd.display(self.env)


def prepare_launch(
    cfg: ServiceConfig,
    *,
    expert_parallel: bool,
    environ: Mapping[str, str] | None = None,
    build: Callable[[str, str], VllmCommand] | None = None,
    extra_env: Mapping[str, str] | None = None,
    plan: Plan | None = None,
) -> Launch:
    """BUILD(tag, private_tmp): another command than the single service's (a data-parallel rank).
    EXTRA_ENV: what the probe of the installed vLLM found it needs (vllm_versions.assess)."""
    tag = runstate.new_tag()
    # Short and node-local: vLLM's IPC sockets go here (VLLM_RPC_BASE_PATH), and a Unix
    # socket path must stay under 108 bytes; removed whole by stop_service.py.
    private_tmp = runstate.private_tmp_path(tag)
    if build is not None:
        cmd = build(tag, private_tmp)
    else:
        # PLAN: MAX_NUM_SEQS=auto and YaRN's --hf-overrides (vllm_args.build).
        cmd = vllm_args.build(
            cfg,
            expert_parallel=expert_parallel,
            tag=tag,
            private_tmp=private_tmp,
            extra_env=extra_env,
            plan=plan,
        )
    env = vllm_args.with_inherited(cmd.env, os.environ if environ is None else environ)
    return Launch(tag=tag, private_tmp=private_tmp, cmd=cmd, env=env, plan=plan)


def _start(cfg: ServiceConfig, report_text: str, launch: Launch, args: argparse.Namespace) -> int:
    _ensure_media(cfg, print)
    scope.paths(cfg).run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.restart == "on-failure":
        return _start_supervised(cfg, report_text, launch, args)
    runstate.make_private_tmp(launch.tag)
    if args.detach:
        return _start_detached(cfg, launch, report_text, args)

    # Foreground: the launcher becomes vLLM (same pid), so Ctrl+C and `kill PID`
    # reach vLLM directly. From here on our stdout and stderr go through a tee
    # process into service.log (rotated by size) and on to the terminal.
    tag, private_tmp, argv = launch.tag, launch.private_tmp, launch.cmd.argv
    scope.paths(cfg).log_dir.mkdir(parents=True, exist_ok=True)
    logtee.start_tee(
        scope.paths(cfg).service_log, max_bytes=cfg.log_max_mb * 1024 * 1024, backups=cfg.log_backups
    )
    print(report_text, flush=True)
    print(
        f"[launcher] exec vLLM (pid {os.getpid()}, tag {tag}); log: {scope.paths(cfg).service_log}",
        flush=True,
    )
    runstate.write(
        scope.paths(cfg).run_dir,
        _state(cfg, pid=os.getpid(), tag=tag, private_tmp=private_tmp, detached=False),
    )
    try:
        os.execve(argv[0], list(argv), launch.env)
    except OSError as exc:
        runstate.clear(scope.paths(cfg).run_dir, tag)
        shutil.rmtree(private_tmp, ignore_errors=True)
        raise CheckFailed(
            f"cannot execute {argv[0]}: {exc.strerror}", fix="set VLLM_PYTHON to a python with vLLM"
        ) from None
    return 1  # not reached


def _start_supervised(cfg: ServiceConfig, report_text: str, launch: Launch, args: argparse.Namespace) -> int:
    """RESTART=on-failure: the supervisor runs LAUNCH (and restarts it); it carries the run's tag.

    Foreground: the launcher becomes the supervisor (exec, same pid: a batch job's script
    waits for it and gets its exit status). --detach: it runs in the background, and the
    launcher waits for /health as for a bare vLLM. The supervisor writes the run state.
    """
    argv = [sys.executable, "-m", "qwen3_vl_service.lifecycle.supervisor"]
    argv += ["--expert-parallel", "on" if "--enable-expert-parallel" in launch.cmd.argv else "off"]
    argv += ["--plan", vllm_args.plan_decisions(launch.plan)]
    if cfg.config_path:
        argv += ["--config", str(cfg.config_path)]
    env = {**os.environ, TAG_ENV: launch.tag, RUN_DIR_ENV: str(scope.paths(cfg).run_dir)}
    # `python -m` from wherever the user started us.
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    if args.detach:
        return _start_detached(cfg, launch, report_text, args, supervisor=([*argv, "--detached"], env))
    scope.paths(cfg).log_dir.mkdir(parents=True, exist_ok=True)
    logtee.start_tee(
        scope.paths(cfg).service_log, max_bytes=cfg.log_max_mb * 1024 * 1024, backups=cfg.log_backups
    )
    print(report_text, flush=True)
    print(
        f"[launcher] exec the supervisor (pid {os.getpid()}, tag {launch.tag}), which runs vLLM", flush=True
    )
    os.execve(argv[0], argv, env)
    return 1  # not reached


def spawn_logged(
    cfg: ServiceConfig, argv: list[str], env: dict[str, str], *, header: str, private_tmp: str = ""
) -> subprocess.Popen[bytes]:
    """ARGV in its own session, its output through a detached tee into CFG's service.log after HEADER.

    A command that cannot be executed is one CheckFailed line; its PRIVATE_TMP is removed then.
    """
    tee = _spawn_detached_logtee(cfg)
    assert tee.stdin is not None
    tee.stdin.write((header + "\n").encode())
    tee.stdin.flush()
    try:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=tee.stdin,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        runstate.remove_private_tmp(private_tmp)
        raise CheckFailed(
            f"cannot execute {argv[0]}: {exc.strerror}", fix="set VLLM_PYTHON to a python with vLLM"
        ) from None
    finally:
        tee.stdin.close()  # the child holds its own copy of the pipe


def _start_detached(
    cfg: ServiceConfig,
    launch: Launch,
    report_text: str,
    args: argparse.Namespace,
    supervisor: tuple[list[str], dict[str, str]] | None = None,
) -> int:
    """vLLM in the background, or with SUPERVISOR (argv, env) the supervisor that runs it."""
    tag, private_tmp, cmd = launch.tag, launch.private_tmp, launch.cmd
    argv, env = supervisor or (list(cmd.argv), launch.env)
    log_offset = readiness.log_size(scope.paths(cfg).service_log)
    proc = spawn_logged(cfg, argv, env, header=report_text, private_tmp="" if supervisor else private_tmp)
    if supervisor is None:
        runstate.write(
            scope.paths(cfg).run_dir,
            _state(cfg, pid=proc.pid, tag=tag, private_tmp=private_tmp, detached=True),
        )
    url = local_url(cfg.host, cfg.port)
    what = "the supervisor, which runs vLLM," if supervisor else "vLLM"
    print(f"started {what} in the background: pid {proc.pid}, log {scope.paths(cfg).service_log}")
    timeout = args.timeout or cfg.startup_timeout
    tty = sys.stdout.isatty()
    last = [""]

    def progress(text: str) -> None:
        if tty:
            print(f"\r\033[K{text}", end="", flush=True)
        elif text.split(" (")[0] != last[0]:
            print(text, flush=True)
        last[0] = text.split(" (")[0]

    try:
        readiness.wait_healthy(
            f"{url}/health",
            is_alive=lambda: proc.poll() is None,
            log_file=scope.paths(cfg).service_log,
            timeout=timeout,
            on_progress=progress,
            log_offset=log_offset,
            poll=0.25,  # /health is cheap; a coarse poll would only add to the time to ready
        )
    except (CheckFailed, KeyboardInterrupt):
        if tty:
            print()
        print("stopping what was started ...", file=sys.stderr)
        # The same path as stop_service.py: the tree, stragglers that ignore SIGTERM,
        # the tee, the IPC socket folder and the state file. The media server stays (shared).
        stop.stop_service(
            scope.paths(cfg).run_dir,
            host=cfg.host,
            port=cfg.port,
            timeout=cfg.shutdown_timeout + 5,
            echo=lambda line: print(line, file=sys.stderr),
        )
        raise
    if tty:
        print()
    print(f"ready: {url}/v1 (model {cfg.served_model_name}); health {url}/health")
    print(f"logs: tail -f {scope.paths(cfg).service_log}")
    config = f" --config {shlex.quote(_short(cfg.config_path))}" if cfg.config_path else ""
    print(f"stop: {shlex.quote(_short(sys.executable))} stop_service.py{config}")
    return 0


def _short(path) -> str:
    """PATH relative to the working directory when it lies below it (what a user would type)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------


def _main(argv: list[str] | None, log_holder: list[Path]) -> int:
    args = _parser().parse_args(argv)
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(
            f"--timeout {args.timeout} must be positive", fix="give seconds, e.g. --timeout 1800"
        )
    cfg = load(args.config)
    log_holder[0] = scope.paths(cfg).launcher_log

    if not args.dry_run:
        runstate.check_not_running(scope.paths(cfg).run_dir)

    report, probe_env = _preflight(cfg, args)
    if not args.dry_run:
        # Also for what the supervisor and the replicas build later: they inherit our environment.
        os.environ.update(probe_env)
    lay, node_rank = _layout(cfg, args, report)
    if lay.grouped:
        return _grouped(cfg, lay, node_rank, report, args)
    launch = prepare_launch(
        cfg, expert_parallel=report.expert_parallel, extra_env=probe_env, plan=report.plan
    )
    parts = []
    if not args.quiet:
        parts.append(render_settings(cfg))
    parts.append("Preflight\n" + preflight.render(report, color=sys.stdout.isatty()))
    parts.append("vLLM command\n    " + launch.display())
    text, code = _verdict(parts, report, args)
    if code is not None:
        return code
    return _start(cfg, text, launch, args)


def _verdict(parts: list[str], report: preflight.Report, args: argparse.Namespace) -> tuple[str, int | None]:
    """The report's text; with --dry-run printed with the verdict (its exit code); refused on errors.

    With --quiet only the warnings, errors and the verdict are printed; the whole text still goes
    to service.log with a start (the record of what ran).
    """
    text = "\n\n".join(parts)
    shown = text
    if args.quiet:
        shown = "Preflight\n" + preflight.render(report, color=sys.stdout.isatty(), quiet=True)
    if args.dry_run:
        verdict = "would start: yes" if report.ok else "would start: no (fix the errors above)"
        if report.ok and report.model is not None and report.model.planned_from:
            # Planned from the published facts: a start refuses until the weights are there.
            verdict = "would start: once the model is downloaded (download_model.py)"
        print(shown + "\n\n" + verdict)
        return text, 0 if report.ok else 1
    if not report.ok:
        print(shown)
        n = sum(1 for f in report.findings if f.level == "error")
        raise CheckFailed(f"preflight found {n} error(s); nothing was started", fix="fix them and run again")
    return text, None


def _layout(cfg: ServiceConfig, args: argparse.Namespace, report: preflight.Report):
    """Where the replicas run (README, "Scaling out"), and which node this is."""
    if args.nodes:
        nodes, here = cluster.parse_nodes(args.nodes), 0
        addresses = nodes
    else:
        nodes, here = cluster.job_nodes()
        addresses = cluster.node_addresses(nodes) if len(nodes) > 1 else nodes
    node_rank = here if args.node_rank is None else args.node_rank
    if not 0 <= node_rank < len(nodes):
        raise UsageError(
            f"--node-rank {node_rank} is not one of the {len(nodes)} node(s)",
            fix=f"give 0..{len(nodes) - 1}",
        )
    gpus_on_node = report.inventory.count if report.inventory is not None else None
    return cluster.layout(cfg, nodes, addresses=addresses, gpus_on_node=gpus_on_node), node_rank


def _grouped(cfg: ServiceConfig, lay: cluster.Layout, node_rank: int, report, args) -> int:
    """Several replicas (or a data-parallel rank group) on this node: report, commands, start."""
    # "TP uses N of the M GPUs" is the single service's view; the Replicas lines say who gets which.
    tp_note = f"TENSOR_PARALLEL_SIZE={cfg.tensor_parallel_size} uses "
    report.findings[:] = [f for f in report.findings if not f.message.startswith(tp_note)]
    report.findings.extend(replicas.findings(cfg, lay, report, node_rank, probe_ports=True))
    ep = report.expert_parallel
    launch = None
    if lay.mode == "data-parallel":
        replica = lay.on_node(node_rank)[0]
        launch = prepare_launch(
            cfg,
            expert_parallel=ep,
            build=lambda tag, tmp: replicas.node_command(
                cfg, lay, replica, expert_parallel=ep, tag=tag, private_tmp=tmp
            ),
        )
    parts = []
    if not args.quiet:
        parts.append(render_settings(cfg))
    parts.append("Preflight\n" + preflight.render(report, color=sys.stdout.isatty()))
    only = None if args.dry_run else node_rank
    parts.append("Commands per node\n" + replicas.commands_text(cfg, lay, expert_parallel=ep, only_node=only))
    text, code = _verdict(parts, report, args)
    if code is not None:
        return code
    if launch is not None:
        # No supervisor for a data-parallel rank: the supervisor rebuilds the single service's
        # command, and the ranks share fate (one restarted alone cannot rejoin the others).
        return _start(cfg.replace(restart="no"), text, launch, args)
    print(text, flush=True)
    return replicas.start_node(cfg, lay, node_rank, expert_parallel=ep, header=text, detach=args.detach)


def _preflight(cfg: ServiceConfig, args: argparse.Namespace) -> tuple[preflight.Report, dict[str, str]]:
    """The preflight, the vLLM probe and (when asked) the interconnect check; and the variables
    the installed vLLM needs (VLLM_USE_FLASHINFER_SAMPLER=0 without flashinfer)."""
    report = preflight.run(cfg, gpu_spec=args.gpus, dry_run=args.dry_run)
    python = cfg.vllm_python or sys.executable
    # In a child: vLLM is never imported here; its parser only when EXTRA_VLLM_ARGS is set.
    found = vllm_versions.probe(python, cfg.extra_vllm_args)
    level: Level = "error" if found.level == "warn" and not args.dry_run else found.level
    report.findings.append(
        preflight.Finding(
            level, "vLLM", found.message, "" if level == "ok" else "install vLLM there, or set VLLM_PYTHON"
        )
    )
    # What the installed vLLM lacks, unless the user set the variable (config file or environment).
    assessed = vllm_versions.assess(found, device=cfg.device, user_env={**os.environ, **cfg.vllm_env})
    for lvl, message, fix in assessed.findings:
        report.findings.append(preflight.Finding(lvl, "vLLM", message, fix))
    if args.check_interconnect or cfg.check_interconnect:
        report.findings.extend(interconnect.findings(cfg))
    return report, assessed.env


def main(argv: list[str] | None = None) -> int:
    log_holder = [Path("logs") / LAUNCHER_LOG]
    return cli.run(lambda: _main(argv, log_holder), log_path=lambda: log_holder[0])
