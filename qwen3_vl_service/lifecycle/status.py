"""status_service.py: is the service running and healthy, and how busy is it.

Shows the recorded process (pid, uptime, model, URLs), ``/health``, the
requests running and waiting, KV cache usage and token throughput from
vLLM's ``/metrics`` (names from vllm/v1/metrics/loggers.py, vLLM 0.32), and
the memory of every GPU (NVML, where available). ``--json`` prints the same
as one JSON object. Exit 0 when running and healthy, 1 otherwise.

``/health`` and ``/metrics`` are open in vLLM even with an API key; the key
(API_KEY) is sent only to ``/v1`` endpoints.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

from qwen3_vl_service.core.cli import ArgumentParser, run, seconds
from qwen3_vl_service.core.errors import EXIT_FAILED, EXIT_OK
from qwen3_vl_service.core.hosts import connect_host, display_host, local_url, url_host
from qwen3_vl_service.core.units import format_duration
from qwen3_vl_service.deployment.deployment import Deployment, replica_config
from qwen3_vl_service.lifecycle import registry, runstate, stop, supervisor
from qwen3_vl_service.lifecycle.readiness import LogFollower
from qwen3_vl_service.machine import processes
from qwen3_vl_service.settings import config as config_mod
from qwen3_vl_service.settings import scope
from qwen3_vl_service.settings.config import ServiceConfig

GiB = 1024**3
# vLLM metric families (a counter's family name drops the "_total" of its sample).
M_RUNNING = "vllm:num_requests_running"
M_WAITING = "vllm:num_requests_waiting"
M_KV = "vllm:kv_cache_usage_perc"  # a fraction: 1 means 100 percent
M_GEN = "vllm:generation_tokens"
M_PROMPT = "vllm:prompt_tokens"
M_DONE = "vllm:request_success"  # finished requests, by finish reason (summed)
_WANTED = (M_RUNNING, M_WAITING, M_KV, M_GEN, M_PROMPT, M_DONE)


def parse_metrics(text: str) -> dict[str, float]:
    """Sum the wanted vLLM metrics over their labels (engines, models)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        name = family.name
        if name not in _WANTED and name.removesuffix("_total") not in _WANTED:
            continue
        key = name.removesuffix("_total")
        for sample in family.samples:
            # Counters also expose "<name>_created"; take only the value samples.
            if sample.name in (key, f"{key}_total"):
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def _get(
    session: requests.Session, url: str, timeout: float, headers: dict[str, str] | None = None
) -> tuple[requests.Response | None, float | None, str | None]:
    t0 = time.monotonic()
    try:
        resp = session.get(url, timeout=timeout, headers=headers or {})
        return resp, (time.monotonic() - t0) * 1000, None
    except requests.ConnectionError:
        return None, None, "connection refused"
    except requests.Timeout:
        return None, None, f"no answer within {timeout:g} s"
    except requests.RequestException as exc:
        return None, None, f"{type(exc).__name__}: {exc}"


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Urls:
    api: str
    health: str
    metrics: str
    media: str | None  # None: MEDIA_SERVER=false


@dataclass(frozen=True)
class Elsewhere:
    """A service recorded on another node whose SLURM job may still run."""

    node: str
    pid: int
    slurm_job_id: str


@dataclass(frozen=True)
class Leftover:
    pid: int
    what: str


@dataclass(frozen=True)
class Health:
    status: int | None  # the HTTP status of /health; None when it did not answer
    error: str | None
    latency_ms: float | None = None


@dataclass(frozen=True)
class Metrics:
    """vLLM's /metrics, summed over engines; rates from two reads SAMPLE_S apart."""

    error: str | None = None  # set alone when /metrics could not be read
    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage: float | None = None  # a fraction: 1 means 100 percent
    generation_tokens_total: float | None = None
    prompt_tokens_total: float | None = None
    requests_total: float | None = None  # finished since start (what a replica behind the router served)
    generation_tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    sample_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        out = {k: getattr(self, k) for k in _METRICS_ALWAYS}
        out.update({k: getattr(self, k) for k in _METRICS_SAMPLED if getattr(self, k) is not None})
        return out


_METRICS_ALWAYS = (
    "requests_running",
    "requests_waiting",
    "kv_cache_usage",
    "generation_tokens_total",
    "prompt_tokens_total",
    "requests_total",
)
_METRICS_SAMPLED = ("generation_tokens_per_s", "prompt_tokens_per_s", "sample_s")


@dataclass(frozen=True)
class GpuUse:
    index: int
    name: str
    used_bytes: int
    total_bytes: int
    ours_bytes: int


@dataclass(frozen=True)
class Status:
    """Everything status shows. ``to_dict()`` is the ``--json`` object: a key whose
    value is unknown or does not apply is left out, as the fields' comments say."""

    running: bool
    healthy: bool
    service: str  # the service's name (scope.py): SERVICE_NAME, or port-<PORT>
    run_dir: str
    state_file: str
    urls: Urls
    model: str
    served_model_name: str
    log_file: str
    processes: int  # ours: the recorded tree plus leftovers
    gpus: tuple[GpuUse, ...] | None  # None: NVML unavailable (gpu_note says why)
    gpu_note: str | None = None
    stale_state: str | None = None  # why the state file is stale, if it is
    elsewhere: Elsewhere | None = None
    # The recorded start; only while it runs.
    pid: int | None = None
    tag: str | None = None
    started_at: str | None = None
    uptime_s: float | None = None
    detached: bool | None = None
    config_path: str | None = None
    leftovers: tuple[Leftover, ...] = ()  # only while not running
    health: Health | None = None  # only while running
    phase: str | None = None  # while running but not healthy: the start-up phase from the log
    metrics: Metrics | None = None  # only when healthy
    served_models: tuple[str, ...] | None = None
    models_error: str | None = None
    media_answering: bool | None = None  # None: MEDIA_SERVER=false
    supervisor: dict[str, Any] | None = None  # supervisor.status(): None without a supervisor record

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``status_service.py --json`` (its keys are an interface: keep them)."""
        out: dict[str, Any] = {
            "running": self.running,
            "healthy": self.healthy,
            "service": self.service,
            "run_dir": self.run_dir,
            "state_file": self.state_file,
            "urls": asdict(self.urls),
            "model": self.model,
            "served_model_name": self.served_model_name,
            "log_file": self.log_file,
            "processes": self.processes,
            "gpus": None if self.gpus is None else [asdict(g) for g in self.gpus],
        }
        if self.elsewhere is not None:
            out["elsewhere"] = asdict(self.elsewhere)
        if self.leftovers:
            out["leftovers"] = [asdict(p) for p in self.leftovers]
        if self.health is not None:
            out["health"] = {
                k: v for k, v in asdict(self.health).items() if k != "latency_ms" or v is not None
            }
        if self.running and not self.healthy:
            out["phase"] = self.phase
        if self.metrics is not None:
            out["metrics"] = self.metrics.to_dict()
        if self.served_models is not None:
            out["served_models"] = list(self.served_models)
        for key in ("gpu_note", "stale_state", "pid", "tag", "started_at", "uptime_s", "detached"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in ("models_error", "media_answering", "supervisor"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.running:
            out["config_path"] = self.config_path
        return out


@dataclass(frozen=True)
class _Target:
    """Where the service is (the recorded start while it runs, else the config) and how to reach it."""

    host: str
    port: int
    media_host: str
    media_port: int
    base: str  # for our own requests: a wildcard host becomes loopback


def collect(cfg: ServiceConfig, *, sample: float = 1.0, http_timeout: float = 3.0) -> Status:
    """Everything status shows, as a Status."""
    where = scope.paths(cfg)
    current = runstate.assess(where.run_dir)
    state, proc = current.state, current.process
    live = state if proc is not None else None
    target = _target(cfg, live)
    ours = processes.tree(proc.pid) if proc is not None else []
    tree_pids = {p.pid for p in ours}
    # The running supervisor carries the run folder too: while it restarts vLLM it is no leftover of an
    # earlier run (its own line says "restarting").
    sup = supervisor.live(where.run_dir)
    tree_pids |= {sup.pid} if sup is not None else set()
    leftovers = [p for p in current.ours() if p.pid not in tree_pids]
    gpus, gpu_note = _gpus([*ours, *leftovers])
    status = Status(
        running=proc is not None,
        healthy=False,
        service=where.name,
        run_dir=str(where.run_dir),
        state_file=str(where.state_file),
        urls=_urls(cfg, target),
        model=live.model if live else str(cfg.model_path),
        served_model_name=live.served_model_name if live else cfg.served_model_name,
        log_file=live.log_file if live else str(where.service_log),
        processes=len(ours) + len(leftovers),
        gpus=gpus,
        gpu_note=gpu_note,
        stale_state=current.stale or None,
        elsewhere=(
            Elsewhere(current.node or "", state.pid, state.slurm_job_id)
            if current.elsewhere and state is not None
            else None
        ),
        leftovers=(
            tuple(Leftover(p.pid, processes.describe(p, 60)) for p in leftovers) if proc is None else ()
        ),
        media_answering=(
            _port_open(connect_host(target.media_host), target.media_port) if cfg.media_server else None
        ),
        supervisor=supervisor.status(where.run_dir),
    )
    if live is not None:
        status = replace(
            status,
            pid=live.pid,
            tag=live.tag,
            started_at=live.started_at,
            uptime_s=round(time.time() - live.create_time, 1),
            detached=live.detached,
            config_path=live.config_path,
        )
        status = _probe(status, cfg, target.base, sample=sample, http_timeout=http_timeout)
        if hung(status.supervisor):
            # /health answers while the engine behind it is stuck: the supervisor's liveness check
            # (liveness.py) is what tells, and a hung vLLM is not healthy whatever /health says.
            status = replace(status, healthy=False)
    return status


def hung(sup: dict[str, Any] | None) -> str:
    """The supervisor's "hung: evidence" of a unit (liveness.py), or ""."""
    conditions = (sup or {}).get("conditions") or {}
    return next((f"{name} {text}" for name, text in conditions.items() if text.startswith("hung")), "")


def _target(cfg: ServiceConfig, live: runstate.RunState | None) -> _Target:
    host = live.host if live else cfg.host
    port = live.port if live else cfg.port
    return _Target(
        host=host,
        port=port,
        media_host=live.media_host if live else cfg.media_host,
        media_port=live.media_port if live else cfg.media_port,
        base=local_url(host, port),
    )


def _urls(cfg: ServiceConfig, target: _Target) -> Urls:
    shown = f"http://{url_host(display_host(target.host))}:{target.port}"
    media = f"http://{url_host(display_host(target.media_host))}:{target.media_port}/"
    return Urls(
        api=f"{shown}/v1",
        health=f"{shown}/health",
        metrics=f"{shown}/metrics",
        media=media if cfg.media_server else None,
    )


def _probe(status: Status, cfg: ServiceConfig, base: str, *, sample: float, http_timeout: float) -> Status:
    """/health; when healthy /metrics and /v1/models (with the API key), else the phase from the log."""
    session = requests.Session()
    session.trust_env = False  # the server is on this node: never through a proxy
    try:
        resp, ms, err = _get(session, f"{base}/health", http_timeout)
        health = Health(
            status=resp.status_code if resp is not None else None,
            error=err,
            latency_ms=round(ms, 1) if ms is not None else None,
        )
        healthy = resp is not None and resp.status_code == 200
        status = replace(status, health=health, healthy=healthy)
        if not healthy:
            return replace(status, phase=_phase(status.log_file))
        status = replace(status, metrics=_metrics(session, base, http_timeout, sample))
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        resp, _, err = _get(session, f"{base}/v1/models", http_timeout, headers)
        if resp is not None and resp.status_code == 200:
            with contextlib.suppress(ValueError, AttributeError):
                status = replace(
                    status, served_models=tuple(m.get("id") for m in resp.json().get("data", []))
                )
        elif resp is not None:
            status = replace(
                status,
                models_error=f"/v1/models answered {resp.status_code}"
                + (" (wrong or missing API_KEY?)" if resp.status_code == 401 else ""),
            )
        return status
    finally:
        session.close()


def _gpus(ours: list[psutil.Process]) -> tuple[tuple[GpuUse, ...] | None, str | None]:
    try:
        return tuple(
            GpuUse(g.index, g.name, g.used_bytes, g.total_bytes, g.ours_bytes)
            for g in processes.gpu_memory(p.pid for p in ours)
        ), None
    except processes.NvmlUnavailable as exc:
        return None, str(exc)


def _phase(log_file: str) -> str | None:
    path = Path(log_file)
    try:
        size = path.stat().st_size
    except OSError:
        return None
    follower = LogFollower(path, offset=max(0, size - 512 * 1024))
    follower.poll()
    follower.flush_partial()
    return follower.tracker.phase


def _metrics(session: requests.Session, base: str, timeout: float, sample: float) -> Metrics:
    resp, _, err = _get(session, f"{base}/metrics", timeout)
    if resp is None or resp.status_code != 200:
        return Metrics(error=err or f"/metrics answered {resp.status_code if resp is not None else '?'}")
    try:
        first = parse_metrics(resp.text)
    except ValueError as exc:
        return Metrics(error=f"cannot parse /metrics: {exc}")
    t0 = time.monotonic()
    out = Metrics(
        requests_running=first.get(M_RUNNING),
        requests_waiting=first.get(M_WAITING),
        kv_cache_usage=first.get(M_KV),
        generation_tokens_total=first.get(M_GEN),
        prompt_tokens_total=first.get(M_PROMPT),
        requests_total=first.get(M_DONE),
    )
    if sample <= 0:
        return out
    time.sleep(sample)
    resp, _, _ = _get(session, f"{base}/metrics", timeout)
    if resp is None or resp.status_code != 200:
        return out
    try:
        second = parse_metrics(resp.text)
    except ValueError:
        second = {}
    dt = time.monotonic() - t0
    rates: dict[str, Any] = {
        key: round(max(0.0, second[name] - first[name]) / dt, 1)
        for key, name in (("generation_tokens_per_s", M_GEN), ("prompt_tokens_per_s", M_PROMPT))
        if name in first and name in second and dt > 0
    }
    latest: dict[str, Any] = {
        key: second[name]
        for key, name in (
            ("requests_running", M_RUNNING),
            ("requests_waiting", M_WAITING),
            ("kv_cache_usage", M_KV),
            ("requests_total", M_DONE),
        )
        if name in second
    }
    return replace(out, sample_s=round(dt, 2), **rates, **latest)


def _num(value: float | None, fmt: str = "{:g}") -> str:
    return "?" if value is None else fmt.format(value)


def _count(value: float | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def render(status: Status) -> list[str]:
    lines = _render_head(status)
    lines.append(f"  model        {status.model} (served as {status.served_model_name})")
    if status.running:
        lines += _render_running(status)
    lines += supervisor_lines(status.supervisor)
    if status.urls.media:
        answering = "answering" if status.media_answering else "not answering"
        lines.append(f"  media        {status.urls.media} {answering}")
    if status.gpus is not None:
        for g in status.gpus:
            ours = f" (ours {g.ours_bytes / GiB:.1f} GiB)" if g.ours_bytes else ""
            used, total = g.used_bytes / GiB, g.total_bytes / GiB
            lines.append(f"  GPU {g.index:<8} {g.name}: {used:.1f} / {total:.1f} GiB used{ours}")
    elif status.gpu_note:
        lines.append(f"  GPUs         not shown: {status.gpu_note}")
    lines.append(f"  log          {status.log_file}")
    return lines


def supervisor_lines(sup: dict[str, Any] | None) -> list[str]:
    """The supervisor's state and its restarts, with the last cause (RESTART=on-failure)."""
    if not sup:
        return []
    n, since = sup.get("restarts") or 0, sup.get("started_at")
    lines = [f"  supervisor   pid {sup.get('pid')}, {sup.get('state')}; {n} restart(s) since {since}"]
    if sup.get("gave_up"):
        lines.append(f"  gave up      {sup['gave_up']}")
    elif sup.get("last_cause"):
        lines.append(f"  last restart {sup.get('last_restart_at')}: {sup['last_cause']}")
    for name, text in (sup.get("conditions") or {}).items():
        lines.append(f"  {name:<12} {text}")  # "hung: no engine progress for 185 s ..." (liveness.py)
    return lines


def _render_head(status: Status) -> list[str]:
    e = status.elsewhere
    if e is not None:
        job = f", SLURM job {e.slurm_job_id}" if e.slurm_job_id else ""
        return [
            f"Qwen3-VL service: recorded as running on node {e.node} (pid {e.pid}{job})",
            f"  run status_service.py on {e.node}: this node cannot see its processes",
        ]
    if not status.running:
        lines = [f"Qwen3-VL service {status.service}: not running"]
        if status.stale_state:
            lines.append(f"  state        stale ({status.stale_state}); the next start replaces it")
        if status.leftovers:
            shown = ", ".join(f"{p.pid} {p.what}" for p in status.leftovers[:5])
            lines.append(f"  leftovers    {len(status.leftovers)} process(es) of an earlier run: {shown}")
            lines.append("               stop them with .venv/bin/python stop_service.py")
        return lines
    verdict = "healthy" if status.healthy else "NOT healthy"
    if hung(status.supervisor):
        verdict = "hung (its /health answers; the engine behind it makes no progress)"
    up = format_duration(status.uptime_s or 0.0)
    return [
        f"Qwen3-VL service {status.service}: running, {verdict}",
        f"  pid          {status.pid} (up {up}, since {status.started_at}, {status.processes} processes)",
    ]


def _render_running(status: Status) -> list[str]:
    lines = [f"  API          {status.urls.api}"]
    h = status.health
    if h is not None and h.status is not None:
        latency = "?" if h.latency_ms is None else h.latency_ms
        lines.append(f"  health       {status.urls.health} -> {h.status} ({latency} ms)")
    else:
        lines.append(f"  health       {status.urls.health} -> {h.error if h else None}")
    if status.phase:
        lines.append(f"  phase        {status.phase} (from the log)")
    m = status.metrics
    if m is not None and m.error:
        lines.append(f"  metrics      {m.error}")
    elif m is not None:
        kv = m.kv_cache_usage
        lines.append(
            f"  requests     {_num(m.requests_running, '{:.0f}')} running, "
            f"{_num(m.requests_waiting, '{:.0f}')} waiting; KV cache "
            f"{'?' if kv is None else f'{kv * 100:.1f}%'} used"
        )
        if m.generation_tokens_per_s is not None:
            lines.append(
                f"  throughput   {m.generation_tokens_per_s:.1f} generated tok/s, "
                f"{m.prompt_tokens_per_s or 0.0:.1f} prompt tok/s "
                f"(over {m.sample_s or 0:.1f} s)"
            )
        lines.append(
            f"  tokens       {_count(m.generation_tokens_total)} generated, "
            f"{_count(m.prompt_tokens_total)} prompt since start"
        )
    if status.models_error:
        lines.append(f"  models       {status.models_error}")
    return lines


def group_status(cfg: ServiceConfig, dep: Deployment, *, sample: float, http_timeout: float) -> dict:
    """The router's and every replica's status on this node (collect on each recorded unit)."""
    out: dict = {"replicas": []}
    for u in stop.group_units(dep):
        # The unit's own folders: RUN_DIR/<service>/<unit> (deployment.replica_config).
        port = u.ports[0].port if u.ports else cfg.port
        scoped = replica_config(cfg, 0, port, name=u.name).replace(media_server=False)
        if u.kind == "router":
            info = collect(scoped, sample=0, http_timeout=http_timeout).to_dict()
            info.pop("metrics", None)  # vLLM's metric names: the router has its own (ROUTER_PORT + 1)
            info["log_file"] = str(u.log_file)
            out["router"] = info
        else:
            info = collect(scoped, sample=sample, http_timeout=http_timeout).to_dict()
            info["name"] = u.name
            out["replicas"].append(info)
    return out


def group_healthy(group: dict) -> bool:
    """The router (where this node runs one) and every replica answer /health."""
    parts = [*group["replicas"], *([group["router"]] if "router" in group else [])]
    return bool(parts) and all(p["running"] and p["healthy"] for p in parts)


def render_group(group: dict) -> list[str]:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        parser = ArgumentParser(
            prog="status_service.py", description="Show the state of the Qwen3-VL service."
        )
        parser.add_config()
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument(
            "--sample",
            type=seconds(300),
            default=1.0,
            metavar="S",
            help="seconds between two /metrics reads for the throughput (0: totals only; default 1)",
        )
        parser.add_argument(
            "--http-timeout",
            type=seconds(600, least=0.001),
            default=3.0,
            metavar="S",
            help="per request (default 3)",
        )
        args = parser.parse_args(argv)
        if args.sample < 0 or args.http_timeout <= 0:
            parser.error("--sample must be >= 0 and --http-timeout > 0")
        cfg = config_mod.load(args.config)
        dep = registry.recorded_deployment(scope.paths(cfg).run_dir)
        if dep is not None and dep.grouped and stop.group_units(dep):
            # Replicas behind the router: each replica's state and the router's.
            group = group_status(cfg, dep, sample=args.sample, http_timeout=args.http_timeout)
            if args.json:
                print(json.dumps(group, indent=2, sort_keys=True))
            else:
                print("\n".join(render_group(group)))
            return EXIT_OK if group_healthy(group) else EXIT_FAILED
        status = collect(cfg, sample=args.sample, http_timeout=args.http_timeout)
        if args.json:
            print(json.dumps(status.to_dict(), indent=2, sort_keys=True))
        else:
            print("\n".join(render(status)))
        return EXIT_OK if status.running and status.healthy else EXIT_FAILED

    return run(body, stop.command_log(argv, "status.log"))


__all__ = [
    "Status",
    "collect",
    "group_healthy",
    "group_status",
    "main",
    "parse_metrics",
    "render",
    "render_group",
]
