"""start_service.py: check everything, print one report, then become vLLM.

Order: config -> already running? -> preflight (GPUs, SLURM, model, ports, compatibility,
capacity) -> the Deployment (deployment/deployment.py: every unit's argv, environment, folders and
ports, derived once) -> report -> the deployment recorded in RUN_DIR/<service>/deployment.json ->
media server -> exec vLLM (or its supervisor) with its output teed to LOG_DIR/<service>/service.log.
Several replicas or data-parallel ranks: lifecycle/replicas.py runs this node's units.
With --dry-run it stops after the report; with --detach it starts in the background and waits
for /health.

This module imports neither torch, nor vllm, nor transformers: a dry run
answers in well under a second on a login node.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from qwen3_vl_service.core import cli, secrets
from qwen3_vl_service.core.errors import CheckFailed, UsageError
from qwen3_vl_service.core.findings import Finding, Level
from qwen3_vl_service.core.hosts import local_url
from qwen3_vl_service.core.names import LAUNCHER_LOG
from qwen3_vl_service.deployment import cluster, deployment, summary
from qwen3_vl_service.deployment.deployment import Deployment, Unit
from qwen3_vl_service.interconnect import report as interconnect
from qwen3_vl_service.lifecycle import logtee, readiness, replicas, runstate, stop
from qwen3_vl_service.lifecycle.supervised import ensure_media, own_env, service_state, supervisor_command
from qwen3_vl_service.lifecycle.units import record, spawn_logged
from qwen3_vl_service.machine import processes
from qwen3_vl_service.planning import preflight, vllm_args, vllm_versions
from qwen3_vl_service.settings import scope
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
        lines.append(f"  {key:<{width}}  {secrets.shown(key, cfg.vllm_env[key]):<44} file (passed to vLLM)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Starting


@dataclass(frozen=True)
class Launch:
    """One start of the single vLLM unit: its tag, its IPC socket folder (named by the tag, made only
    when the start goes ahead) and the whole environment it gets."""

    tag: str
    private_tmp: str
    unit: Unit
    env: dict[str, str]  # the whole environment vLLM gets
    own: dict[str, str]  # what of it we set: shown with the command (secrets masked)

    def display(self) -> str:
        return vllm_args.VllmCommand(self.unit.argv, self.own).display()


def prepare_launch(cfg: ServiceConfig, unit: Unit, environ: Mapping[str, str] | None = None) -> Launch:
    tag = runstate.new_tag()
    # Short and node-local: vLLM's temp files and IPC sockets go here (TMPDIR, VLLM_RPC_BASE_PATH), and a Unix
    # socket path must stay under 108 bytes; removed whole by stop_service.py.
    private_tmp = runstate.private_tmp_path(tag)
    base = os.environ if environ is None else environ
    own = own_env(cfg, unit, tag, private_tmp, base)
    env = vllm_args.with_inherited(own, base)
    # Shown as vLLM gets them (NO_PROXY merged with the inherited one).
    return Launch(tag=tag, private_tmp=private_tmp, unit=unit, env=env, own={k: env[k] for k in own})


def _start(
    cfg: ServiceConfig, dep: Deployment, report_text: str, launch: Launch, args: argparse.Namespace
) -> int:
    ensure_media(cfg, print)
    record(dep)
    if launch.unit.supervised:
        return _start_supervised(cfg, dep, report_text, launch, args)
    runstate.make_private_tmp(launch.tag)
    if args.detach:
        return _start_detached(cfg, launch, report_text, args)

    # Foreground: the launcher becomes vLLM (same pid), so Ctrl+C and `kill PID`
    # reach vLLM directly. From here on our stdout and stderr go through a tee
    # process into service.log (rotated by size) and on to the terminal.
    unit = launch.unit
    logtee.start_tee(
        unit.log_file,
        max_bytes=cfg.log_max_mb * 1024 * 1024,
        backups=cfg.log_backups,
        end=(unit.run_dir, launch.tag),  # no supervisor tidies up after a foreground vLLM: the tee does
    )
    print(report_text, flush=True)
    print(f"[launcher] exec vLLM (pid {os.getpid()}, tag {launch.tag}); log: {unit.log_file}", flush=True)
    state = service_state(
        cfg, unit, pid=os.getpid(), tag=launch.tag, private_tmp=launch.private_tmp, detached=False
    )
    runstate.write(unit.run_dir, state)
    try:
        os.execve(unit.argv[0], list(unit.argv), launch.env)
    except OSError as exc:
        runstate.clear(unit.run_dir, launch.tag)
        shutil.rmtree(launch.private_tmp, ignore_errors=True)
        raise CheckFailed(
            f"cannot execute {unit.argv[0]}: {exc.strerror}", fix="set VLLM_PYTHON to a python with vLLM"
        ) from None
    return 1  # not reached


def _start_supervised(
    cfg: ServiceConfig, dep: Deployment, report_text: str, launch: Launch, args: argparse.Namespace
) -> int:
    """RESTART=on-failure: the supervisor runs the recorded unit (and restarts it); it carries the tag.

    Foreground: the launcher becomes the supervisor (exec, same pid: a batch job's script
    waits for it and gets its exit status). --detach: it runs in the background, and the
    launcher waits for /health as for a bare vLLM. The supervisor writes the run state.
    """
    argv, env = supervisor_command(cfg, dep.record_file, launch.unit, tag=launch.tag, detached=args.detach)
    if args.detach:
        return _start_detached(cfg, launch, report_text, args, supervisor=(argv, env))
    logtee.start_tee(launch.unit.log_file, max_bytes=cfg.log_max_mb * 1024 * 1024, backups=cfg.log_backups)
    print(report_text, flush=True)
    print(
        f"[launcher] exec the supervisor (pid {os.getpid()}, tag {launch.tag}), which runs vLLM", flush=True
    )
    os.execve(argv[0], argv, env)
    return 1  # not reached


def _start_detached(
    cfg: ServiceConfig,
    launch: Launch,
    report_text: str,
    args: argparse.Namespace,
    supervisor: tuple[list[str], dict[str, str]] | None = None,
) -> int:
    """vLLM in the background, or with SUPERVISOR (argv, env) the supervisor that runs it."""
    unit = launch.unit
    argv, env = supervisor or (list(unit.argv), launch.env)
    log_offset = readiness.log_size(unit.log_file)
    private_tmp = "" if supervisor else launch.private_tmp
    proc = spawn_logged(cfg, unit, argv, env, header=report_text, private_tmp=private_tmp)
    if supervisor is None:
        state = service_state(cfg, unit, pid=proc.pid, tag=launch.tag, private_tmp=private_tmp, detached=True)
        runstate.write(unit.run_dir, state)
    what = "the supervisor, which runs vLLM," if supervisor else "vLLM"
    print(f"started {what} in the background: pid {proc.pid}, log {unit.log_file}")
    try:
        wait_ready(
            unit,
            is_alive=lambda: proc.poll() is None,
            timeout=args.timeout or cfg.startup_timeout,
            log_offset=log_offset,
        )
    except (CheckFailed, KeyboardInterrupt):
        print("stopping what was started ...", file=sys.stderr)
        # The same path as stop_service.py: the tree, stragglers that ignore SIGTERM,
        # the tee, the IPC socket folder and the state file. The media server stays (shared).
        stop.stop_service(
            unit.run_dir,
            host=cfg.host,
            port=cfg.port,
            timeout=cfg.shutdown_timeout + 5,
            echo=lambda line: print(line, file=sys.stderr),
        )
        raise
    url = local_url(cfg.host, cfg.port)
    print(f"ready: {url}/v1 (model {cfg.served_model_name}); health {url}/health")
    print(f"logs: tail -f {unit.log_file}")
    config = f" --config {shlex.quote(_short(cfg.config_path))}" if cfg.config_path else ""
    print(f"stop: {shlex.quote(_short(sys.executable))} stop_service.py{config}")
    return 0


def wait_ready(unit: Unit, *, is_alive: Callable[[], bool], timeout: float, log_offset: int = 0) -> None:
    """Until UNIT answers /health, with one progress line (rewritten in place on a terminal)."""
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
            unit.health_url,
            is_alive=is_alive,
            log_file=unit.log_file,
            timeout=timeout,
            on_progress=progress,
            log_offset=log_offset,
            poll=0.25,  # /health is cheap; a coarse poll would only add to the time to ready
        )
    finally:
        if tty:
            print()


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
        # Also for what the supervisors inherit.
        os.environ.update(probe_env)
    lay, node_rank = _layout(cfg, args, report)
    dep = deployment.derive(
        cfg, report.plan, lay, expert_parallel=report.expert_parallel, extra_env=probe_env
    )
    if dep.grouped:
        return _grouped(cfg, dep, lay, node_rank, report, args)
    launch = prepare_launch(cfg, dep.unit(deployment.VLLM))
    parts = []
    if not args.quiet:
        parts.append(render_settings(cfg))
    parts.append("Preflight\n" + preflight.render(report, color=sys.stdout.isatty()))
    parts.append("vLLM command\n    " + launch.display())
    text, code = _verdict(parts, report, args)
    if code is not None:
        return code
    return _start(cfg, dep, text, launch, args)


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
    else:
        nodes, here = cluster.job_nodes()
    # SLURM's NodeAddr where it knows the nodes, for --nodes on a login node too: the dry run then
    # shows the addresses the job's units will listen on and the router will call.
    addresses = cluster.node_addresses(nodes) if len(nodes) > 1 else nodes
    node_rank = here if args.node_rank is None else args.node_rank
    if not 0 <= node_rank < len(nodes):
        raise UsageError(
            f"--node-rank {node_rank} is not one of the {len(nodes)} node(s)",
            fix=f"give 0..{len(nodes) - 1}",
        )
    gpus_on_node = report.inventory.count if report.inventory is not None else None
    return cluster.layout(cfg, nodes, addresses=addresses, gpus_on_node=gpus_on_node), node_rank


def _grouped(cfg: ServiceConfig, dep: Deployment, lay: cluster.Layout, node_rank: int, report, args) -> int:
    """Several replicas (or a data-parallel rank group) on this node: report, commands, start."""
    # "TP uses N of the M GPUs" is the single service's view; the Replicas lines say who gets which.
    tp_note = f"TENSOR_PARALLEL_SIZE={cfg.tensor_parallel_size} uses "
    report.findings[:] = [f for f in report.findings if not f.message.startswith(tp_note)]
    report.findings.extend(summary.findings(cfg, lay, report.plan))
    report.findings.extend(port_findings(cfg, dep, node_rank))
    parts = []
    if not args.quiet:
        parts.append(render_settings(cfg))
    parts.append("Preflight\n" + preflight.render(report, color=sys.stdout.isatty()))
    only = None if args.dry_run else node_rank
    parts.append("Commands per node\n" + dep.display(only_node=only))
    text, code = _verdict(parts, report, args)
    if code is not None:
        return code
    if lay.mode == "data-parallel":
        # No supervisor for a data-parallel rank group: the ranks share fate (one restarted alone
        # cannot rejoin the others); the unit of this node runs like the single service.
        (unit,) = dep.of_kind(deployment.VLLM, node_rank)
        return _start(cfg, dep, text, prepare_launch(cfg, unit), args)
    print(text, flush=True)
    return replicas.start_node(cfg, dep, node_rank, header=text, detach=args.detach)


def port_findings(cfg: ServiceConfig, dep: Deployment, node_rank: int) -> list[Finding]:
    """Whether this node's ports of DEP are free (the preflight checked PORT and MEDIA_PORT)."""
    out = []
    for unit in dep.on_node(node_rank):
        for p in unit.ports:
            if p.setting in ("PORT", "MEDIA_PORT"):
                continue
            holder = processes.port_holder(cfg.host, p.port)
            if holder is None:
                out.append(Finding("ok", "Ports", f"{p.what} ({p.setting}): {cfg.host}:{p.port} is free"))
                continue
            pid, cmd = holder
            who = f"pid {pid} ({cmd})" if pid else cmd
            out.append(
                Finding(
                    "error",
                    "Ports",
                    f"{p.what} ({p.setting}): {cfg.host}:{p.port} is held by {who}",
                    f"stop it, or move {p.setting.split('+')[0]}",
                )
            )
    return out


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
