"""batch_service.py: run an OpenAI Batch input file through the running service, resumably.

    .venv/bin/python batch_service.py [--config F] IN.jsonl OUT.jsonl
    .venv/bin/python -m qwen3_vl_service.batch IN.jsonl OUT.jsonl --concurrency 32

IN is checked whole first (jobs.py: every malformed line, duplicate
custom_id or file outside MEDIA_ROOT is one error naming its line, and
nothing is sent). OUT gets one OpenAI Batch output line per answered
request, appended and flushed as each answer arrives; a rerun with the same
files skips every custom_id already in OUT (results.py). Failed requests
(after retries: sender.py) go to OUT.errors.jsonl. SIGTERM (a SLURM time
limit) or Ctrl+C stops sending and lets the requests in flight finish for
--grace seconds; a second one stops at once. Exit 0 only when every line
of IN is answered in OUT; 1 when some failed; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from tqdm import tqdm

from qwen3_vl_service.batch import jobs as jobs_mod
from qwen3_vl_service.batch import results
from qwen3_vl_service.batch.sender import Options, Outcome, Sender
from qwen3_vl_service.core import cli
from qwen3_vl_service.core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CheckFailed, UsageError
from qwen3_vl_service.core.hosts import local_url
from qwen3_vl_service.deployment import cluster
from qwen3_vl_service.lifecycle import registry
from qwen3_vl_service.planning import preflight
from qwen3_vl_service.settings import config as config_mod
from qwen3_vl_service.settings import scope
from qwen3_vl_service.settings.config import ServiceConfig

LOG_NAME = "batch.log"
# When neither MAX_NUM_SEQS nor the plan says how many sequences vLLM runs at once.
FALLBACK_CONCURRENCY = 16


def service_url(cfg: ServiceConfig, environ: Mapping[str, str] | None = None) -> str:
    """The base URL that serves CFG's API to this node: the router in front of replicas, else vLLM.

    The one place the batch tool decides it: on the head node, the API URL of the deployment the
    running start recorded (RUN_DIR/<service>/deployment.json); elsewhere, or before a start, from
    the deployment's own layout
    (cluster.layout over the SLURM job's nodes): in router mode vllm-router
    listens on ROUTER_PORT of the head node; a single service, and vLLM's own
    data parallelism (its API on node 0), on PORT. REPLICAS=per-node on one
    node is the single service.
    """
    nodes, rank = cluster.job_nodes(environ)
    lay = cluster.layout(cfg, nodes, environ=environ)
    here = rank == 0 or not lay.head  # the head node (or no SLURM job): loopback for a wildcard HOST
    recorded = registry.recorded_deployment(scope.paths(cfg).run_dir)
    if recorded is not None and here:
        return recorded.api_url  # what the running start recorded (deployment.derive's answer)
    if lay.mode == "router":
        return local_url(cfg.host if here else lay.head, cfg.router_port)
    return local_url(cfg.host if here else lay.head, cfg.port)


def _replica_count(cfg: ServiceConfig, environ: Mapping[str, str] | None = None) -> int:
    """vLLM engines behind service_url: replicas (router) or data-parallel ranks; 1 for a single service."""
    return cluster.layout(cfg, cluster.job_nodes(environ)[0], environ=environ).total


def default_concurrency(cfg: ServiceConfig) -> tuple[int, str]:
    """Requests in flight by default: the sequences vLLM runs at once (MAX_NUM_SEQS, or the plan's
    value for auto) times the replicas; more would only wait in vLLM's queue, fewer leave it idle."""
    seqs, why = cfg.max_num_seqs, "MAX_NUM_SEQS"
    if not seqs:
        report = preflight.run(cfg, check_ports=False)
        seqs, why = (report.plan.max_num_seqs if report.plan else 0), "MAX_NUM_SEQS=auto, the plan's"
    if not seqs:
        return FALLBACK_CONCURRENCY, "the plan gives no MAX_NUM_SEQS here; --concurrency sets it"
    replicas = _replica_count(cfg)
    if replicas == 1:
        return seqs, f"{why} {seqs}"
    return seqs * replicas, f"{why} {seqs} x {replicas} replicas"


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="batch_service.py",
        description="Send an OpenAI Batch input file (JSONL) through the running service; resumable.",
    )
    p.add_argument("input", metavar="IN.jsonl", help="one request a line: custom_id, method, url, body")
    p.add_argument("output", metavar="OUT.jsonl", help="answers, appended; a rerun skips those already there")
    p.add_config()
    p.add_argument(
        "--concurrency", type=_positive, metavar="N", help="requests in flight (default: MAX_NUM_SEQS)"
    )
    p.add_argument(
        "--timeout", type=cli.seconds(86400, least=1), default=600.0, metavar="S", help="per request (600)"
    )
    p.add_argument("--retries", type=_count, default=5, metavar="N", help="for 429, 5xx and timeouts (5)")
    p.add_argument(
        "--wait-service",
        type=cli.seconds(86400),
        metavar="S",
        help="how long to wait for a service that is down (default STARTUP_TIMEOUT + 60)",
    )
    p.add_argument(
        "--grace",
        type=cli.seconds(3600),
        default=30.0,
        metavar="S",
        help="after SIGTERM/Ctrl+C, wait this long for requests in flight (30)",
    )
    p.add_argument("--errors", metavar="FILE", help="failed requests (default OUT.errors.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary still prints)")
    return p


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least 1")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 or more")
    return value


@dataclass
class Tally:
    """This run's results, for the progress bar and the summary."""

    answered: int = 0
    failed: int = 0
    interrupted: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Recorder:
    """Writes each outcome where it belongs and counts it."""

    def __init__(self, out: results.Appender, errors: results.Appender, bar: tqdm) -> None:
        self.out, self.errors, self.bar, self.tally = out, errors, bar, Tally()
        self.t0 = time.monotonic()

    def __call__(self, o: Outcome) -> None:
        t = self.tally
        if o.interrupted:
            t.interrupted += 1
            return
        if o.ok:
            self.out.write(results.record(o.job.custom_id, o.status, o.body, request_id=o.request_id))
            t.answered += 1
            prompt, completion = o.usage()
            t.prompt_tokens += prompt
            t.completion_tokens += completion
            self.bar.update(1)
        else:
            self.errors.write(
                results.record(
                    o.job.custom_id, o.status, o.body, request_id=o.request_id, error=o.error, code=_code(o)
                )
            )
            t.failed += 1
            self.bar.write(
                f"line {o.job.line} ({o.job.custom_id}): failed after {o.attempts} tries: {o.error}",
                file=sys.stderr,
            )
        rate = t.completion_tokens / max(1e-9, time.monotonic() - self.t0)
        self.bar.set_postfix_str(f"failed {t.failed}, {rate:.0f} out tok/s", refresh=False)


def _code(o: Outcome) -> str:
    return f"http_{o.status}" if o.status is not None else "no_answer"


async def _served_models(session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> set[str]:
    url = f"{base}/v1/models"
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as r:
            if r.status == 401:
                raise CheckFailed(f"{url} answered 401", fix="set API_KEY in the config to the service's key")
            if r.status != 200:
                raise CheckFailed(f"{url} answered {r.status}", fix="see status_service.py")
            data = await r.json(content_type=None)
            return {m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise CheckFailed(
            f"nothing answers at {url} ({type(exc).__name__})",
            fix="start the service (.venv/bin/python start_service.py --detach) or check --config",
        ) from None


async def _check_media_server(session: aiohttp.ClientSession, cfg: ServiceConfig) -> None:
    url = f"{local_url(cfg.media_host, cfg.media_port)}/health"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status == 200:
                return
    except (aiohttp.ClientError, asyncio.TimeoutError):
        pass
    raise CheckFailed(
        f"the media server does not answer at {url}, and the input has local files for it",
        fix=(
            "start the service with MEDIA_SERVER=true "
            "(.venv/bin/python start_service.py starts the media server)"
        ),
    )


def _trap_signals(stop: asyncio.Event, grace: float, bar: tqdm) -> None:
    """First SIGTERM/SIGINT: stop sending, give the requests in flight GRACE s; the second: stop now."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_signal(name: str) -> None:  # runs in the loop (add_signal_handler), not in a signal frame
        if stop.is_set():
            main_task.cancel()
            return
        stop.set()
        bar.write(
            f"{name}: sending no more; waiting up to {grace:g} s for the requests in flight (again: now)",
            file=sys.stderr,
        )
        loop.call_later(grace, main_task.cancel)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)


@dataclass(frozen=True)
class Plan:
    """What one run does: the files, where to send, how."""

    input: Path
    output: Path
    errors: Path
    opts: Options
    why_concurrency: str
    grace: float
    progress: bool


async def _run(plan: Plan, cfg: ServiceConfig, say: Callable[[str], None]) -> int:
    batch = jobs_mod.read(plan.input, cfg)  # the whole input checked before anything is sent
    ids = {j.custom_id for j in batch.jobs}
    # No connection cap: aiohttp's default (100 per session) would silently hold --concurrency
    # below what was asked; the workers bound the requests in flight.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        batch.check_models(await _served_models(session, plan.opts.base, plan.opts.headers))
        if batch.media_server_used:
            await _check_media_server(session, cfg)
        done = results.resume(plan.output, ids, plan.input)
        if done.torn_bytes:
            say(f"{plan.output}: cut a torn last line ({done.torn_bytes} bytes) left by a killed run")
        todo = [j for j in batch.jobs if j.custom_id not in done.answered]
        say(
            f"batch: {len(batch.jobs)} lines in {plan.input}; {len(done.answered)} already answered in "
            f"{plan.output}, {len(todo)} to send to {plan.opts.base} "
            f"({plan.opts.concurrency} at once: {plan.why_concurrency})"
        )
        if not todo:
            return EXIT_OK
        return await _send(plan, session, todo, len(batch.jobs), len(done.answered), say)


async def _send(
    plan: Plan,
    session: aiohttp.ClientSession,
    todo: list[jobs_mod.Job],
    total: int,
    before: int,
    say: Callable[[str], None],
) -> int:
    stop = asyncio.Event()
    tty = sys.stderr.isatty()
    bar = tqdm(
        total=total,
        initial=before,
        unit="req",
        desc="batch",
        disable=not plan.progress,
        mininterval=0.5 if tty else 30.0,  # a SLURM log gets a line every 30 s, not a redraw
        dynamic_ncols=True,
    )
    out = results.Appender(plan.output)
    errors = results.Appender(plan.errors, truncate=True)
    record = Recorder(out, errors, bar)
    sender = Sender(session, plan.opts, stop)
    t0 = time.monotonic()
    cut_short = False
    try:
        _trap_signals(stop, plan.grace, bar)
        await sender.run(todo, record)
    except asyncio.CancelledError:
        cut_short = True  # the grace period ran out, or a second signal
    finally:
        bar.close()
        out.close()
        errors.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().remove_signal_handler(sig)
    wall = time.monotonic() - t0
    t = record.tally
    unsent = len(todo) - t.answered - t.failed
    say(_summary(t, wall, before + t.answered, total, unsent))
    if t.failed:
        say(f"failed requests: {plan.errors}; a rerun retries them")
    if sender.gate.gone:
        cli.error(
            f"the service at {plan.opts.base} stayed down; rerun once it is back: {unsent} line(s) left"
        )
    if stop.is_set() or cut_short:
        return EXIT_INTERRUPTED
    return EXIT_OK if before + t.answered == total else EXIT_FAILED


def _summary(t: Tally, wall: float, answered: int, total: int, unsent: int) -> str:
    tokens = t.prompt_tokens + t.completion_tokens
    return (
        f"done: {t.answered} answered in this run, {t.failed} failed, {unsent} not sent; "
        f"{answered} of {total} lines answered in all\n"
        f"tokens: {t.prompt_tokens:,} in, {t.completion_tokens:,} out; wall {wall:.1f} s; "
        f"{t.completion_tokens / max(wall, 1e-9):.1f} out tok/s, "
        f"{tokens / max(wall, 1e-9):.1f} tok/s in+out, {t.answered / max(wall, 1e-9):.2f} req/s"
    )


def _plan(args, cfg: ServiceConfig) -> Plan:
    src, out = Path(args.input).resolve(), Path(args.output).resolve()
    errors = Path(args.errors).resolve() if args.errors else results.errors_path(out)
    if len({src, out, errors}) < 3:
        raise UsageError(f"{args.input}, {args.output} and the errors file {errors} must differ")
    if out.is_dir() or errors.is_dir():
        raise UsageError(f"{out if out.is_dir() else errors} is a folder", fix="give a file name")
    if args.concurrency:
        concurrency, why = args.concurrency, "--concurrency"
    else:
        concurrency, why = default_concurrency(cfg)
    opts = Options(
        base=service_url(cfg),
        headers={"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {},
        concurrency=concurrency,
        timeout=args.timeout,
        retries=args.retries,
        backoff=1.0,
        max_backoff=60.0,
        wait_service=cfg.startup_timeout + 60 if args.wait_service is None else args.wait_service,
    )
    return Plan(src, out, errors, opts, why, args.grace, not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    log = [Path("logs") / LOG_NAME]

    def body() -> int:
        args = _parser().parse_args(argv)
        cfg = config_mod.load(args.config)
        log[0] = cfg.log_dir / LOG_NAME
        plan = _plan(args, cfg)
        return asyncio.run(_run(plan, cfg, lambda line: print(line, flush=True)))

    return cli.run(body, lambda: log[0])


__all__ = ["default_concurrency", "main", "service_url"]
