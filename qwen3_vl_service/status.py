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
from pathlib import Path
from typing import Any

import psutil

from . import processes, runstate
from .cli import ArgumentParser, run
from .errors import EXIT_FAILED, EXIT_OK
from .readiness import LogFollower, format_elapsed

GiB = 1024**3
# vLLM metric families (a counter's family name drops the "_total" of its sample).
M_RUNNING = "vllm:num_requests_running"
M_WAITING = "vllm:num_requests_waiting"
M_KV = "vllm:kv_cache_usage_perc"  # a fraction: 1 means 100 percent
M_GEN = "vllm:generation_tokens"
M_PROMPT = "vllm:prompt_tokens"
_WANTED = (M_RUNNING, M_WAITING, M_KV, M_GEN, M_PROMPT)


def probe_host(host: str) -> str:
    """Where to connect to a server bound to HOST (a wildcard means loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def display_host(host: str) -> str:
    """How others reach a server bound to HOST."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_metrics(text: str) -> dict[str, float]:
    """Sum the wanted vLLM metrics over their labels (engines, models)."""
    from prometheus_client.parser import text_string_to_metric_families

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


def _get(session, url: str, timeout: float, headers: dict[str, str] | None = None):
    import requests

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


def collect(cfg, *, sample: float = 1.0, http_timeout: float = 3.0) -> dict[str, Any]:
    """Everything status shows, as plain data."""
    import requests

    run_dir = cfg.run_dir
    state = runstate.read(run_dir)
    proc = runstate.live_process(state) if state else None
    info: dict[str, Any] = {
        "running": proc is not None,
        "healthy": False,
        "run_dir": str(run_dir),
        "state_file": str(runstate.state_path(run_dir)),
    }
    node = runstate.other_node(state) if state else None
    if state is None and runstate.exists(run_dir):
        info["stale_state"] = "the state file is unreadable"
    elif state is not None and node is not None:
        if runstate.elsewhere(state) is not None:
            info["elsewhere"] = {"node": node, "pid": state.pid, "slurm_job_id": state.slurm_job_id}
        else:
            info["stale_state"] = f"written on node {node} by SLURM job {state.slurm_job_id}, which has ended"
    elif state is not None and proc is None:
        info["stale_state"] = f"pid {state.pid} of the recorded start is gone"

    host = state.host if state and proc else cfg.host
    port = state.port if state and proc else cfg.port
    media_host = state.media_host if state and proc else cfg.media_host
    media_port = state.media_port if state and proc else cfg.media_port
    base = f"http://{_url_host(probe_host(host))}:{port}"
    shown = f"http://{_url_host(display_host(host))}:{port}"
    info["urls"] = {
        "api": f"{shown}/v1",
        "health": f"{shown}/health",
        "metrics": f"{shown}/metrics",
        "media": f"http://{_url_host(display_host(media_host))}:{media_port}/" if cfg.media_server else None,
    }
    info["model"] = state.model if state and proc else str(cfg.model_path)
    info["served_model_name"] = state.served_model_name if state and proc else cfg.served_model_name
    info["log_file"] = state.log_file if state and proc else str(Path(cfg.log_dir) / "service.log")

    ours: list[psutil.Process] = []
    if proc is not None and state is not None:
        info.update(
            pid=state.pid,
            tag=state.tag,
            started_at=state.started_at,
            uptime_s=round(time.time() - state.create_time, 1),
            detached=state.detached,
            config_path=state.config_path,
        )
        ours = processes.tree(proc.pid)
    group = {"group": state.pid, "group_started": state.create_time} if state and node is None else {}
    found = processes.find_ours(run_dir, state.tag if state else None, exclude_media=True, **group)
    tree_pids = {p.pid for p in ours}
    leftovers = [p for p in found if p.pid not in tree_pids]
    ours += leftovers
    info["processes"] = len(ours)
    if proc is None and leftovers:
        info["leftovers"] = [{"pid": p.pid, "what": processes.describe(p, 60)} for p in leftovers]

    session = requests.Session()
    session.trust_env = False  # the server is on this node: never through a proxy
    try:
        if proc is not None:
            resp, ms, err = _get(session, f"{base}/health", http_timeout)
            health = {"status": resp.status_code if resp is not None else None, "error": err}
            if ms is not None:
                health["latency_ms"] = round(ms, 1)
            info["health"] = health
            info["healthy"] = resp is not None and resp.status_code == 200
            if not info["healthy"]:
                info["phase"] = _phase(info["log_file"])
            else:
                info["metrics"] = _metrics(session, base, http_timeout, sample)
                headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
                resp, _, err = _get(session, f"{base}/v1/models", http_timeout, headers)
                if resp is not None and resp.status_code == 200:
                    with contextlib.suppress(ValueError, AttributeError):
                        info["served_models"] = [m.get("id") for m in resp.json().get("data", [])]
                elif resp is not None:
                    info["models_error"] = f"/v1/models answered {resp.status_code}" + (
                        " (wrong or missing API_KEY?)" if resp.status_code == 401 else ""
                    )
    finally:
        session.close()

    if cfg.media_server:
        info["media_answering"] = _port_open(probe_host(media_host), media_port)
    try:
        info["gpus"] = [
            {
                "index": g.index,
                "name": g.name,
                "used_bytes": g.used_bytes,
                "total_bytes": g.total_bytes,
                "ours_bytes": g.ours_bytes,
            }
            for g in processes.gpu_memory(p.pid for p in ours)
        ]
    except processes.NvmlUnavailable as exc:
        info["gpus"] = None
        info["gpu_note"] = str(exc)
    return info


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


def _metrics(session, base: str, timeout: float, sample: float) -> dict[str, Any]:
    resp, _, err = _get(session, f"{base}/metrics", timeout)
    if resp is None or resp.status_code != 200:
        return {"error": err or f"/metrics answered {resp.status_code}"}
    try:
        first = parse_metrics(resp.text)
    except ImportError:
        return {"error": "prometheus_client is not installed"}
    except ValueError as exc:
        return {"error": f"cannot parse /metrics: {exc}"}
    t0 = time.monotonic()
    out: dict[str, Any] = {
        "requests_running": first.get(M_RUNNING),
        "requests_waiting": first.get(M_WAITING),
        "kv_cache_usage": first.get(M_KV),
        "generation_tokens_total": first.get(M_GEN),
        "prompt_tokens_total": first.get(M_PROMPT),
    }
    if sample > 0:
        time.sleep(sample)
        resp, _, _ = _get(session, f"{base}/metrics", timeout)
        if resp is not None and resp.status_code == 200:
            try:
                second = parse_metrics(resp.text)
            except ValueError:
                second = {}
            dt = time.monotonic() - t0
            for key, name in (("generation_tokens_per_s", M_GEN), ("prompt_tokens_per_s", M_PROMPT)):
                if name in first and name in second and dt > 0:
                    out[key] = round(max(0.0, second[name] - first[name]) / dt, 1)
            out["sample_s"] = round(dt, 2)
            for key, name in (
                ("requests_running", M_RUNNING),
                ("requests_waiting", M_WAITING),
                ("kv_cache_usage", M_KV),
            ):
                if name in second:
                    out[key] = second[name]
    return out


def _num(value: float | None, fmt: str = "{:g}") -> str:
    return "?" if value is None else fmt.format(value)


def _count(value: float | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def render(info: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if info.get("elsewhere"):
        e = info["elsewhere"]
        job = f", SLURM job {e['slurm_job_id']}" if e["slurm_job_id"] else ""
        lines.append(f"Qwen3-VL service: recorded as running on node {e['node']} (pid {e['pid']}{job})")
        lines.append(f"  run status_service.py on {e['node']}: this node cannot see its processes")
    elif not info["running"]:
        lines.append("Qwen3-VL service: not running")
        if info.get("stale_state"):
            lines.append(f"  state        stale ({info['stale_state']}); the next start replaces it")
        if info.get("leftovers"):
            shown = ", ".join(f"{p['pid']} {p['what']}" for p in info["leftovers"][:5])
            lines.append(f"  leftovers    {len(info['leftovers'])} process(es) of an earlier run: {shown}")
            lines.append("               stop them with python stop_service.py")
    else:
        verdict = "healthy" if info["healthy"] else "NOT healthy"
        lines.append(f"Qwen3-VL service: running, {verdict}")
        up = format_elapsed(info["uptime_s"])
        since, count = info["started_at"], info["processes"]
        lines.append(f"  pid          {info['pid']} (up {up}, since {since}, {count} processes)")
    lines.append(f"  model        {info['model']} (served as {info['served_model_name']})")
    if info["running"]:
        lines.append(f"  API          {info['urls']['api']}")
        h = info.get("health", {})
        if h.get("status") is not None:
            lines.append(
                f"  health       {info['urls']['health']} -> {h['status']} ({h.get('latency_ms', '?')} ms)"
            )
        else:
            lines.append(f"  health       {info['urls']['health']} -> {h.get('error')}")
        if info.get("phase"):
            lines.append(f"  phase        {info['phase']} (from the log)")
        m = info.get("metrics")
        if m:
            if m.get("error"):
                lines.append(f"  metrics      {m['error']}")
            else:
                kv = m.get("kv_cache_usage")
                lines.append(
                    f"  requests     {_num(m.get('requests_running'), '{:.0f}')} running, "
                    f"{_num(m.get('requests_waiting'), '{:.0f}')} waiting; KV cache "
                    f"{'?' if kv is None else f'{kv * 100:.1f}%'} used"
                )
                if "generation_tokens_per_s" in m:
                    lines.append(
                        f"  throughput   {m['generation_tokens_per_s']:.1f} generated tok/s, "
                        f"{m.get('prompt_tokens_per_s', 0.0):.1f} prompt tok/s "
                        f"(over {m.get('sample_s', 0):.1f} s)"
                    )
                lines.append(
                    f"  tokens       {_count(m.get('generation_tokens_total'))} generated, "
                    f"{_count(m.get('prompt_tokens_total'))} prompt since start"
                )
        if info.get("models_error"):
            lines.append(f"  models       {info['models_error']}")
    if info.get("urls", {}).get("media"):
        state = "answering" if info.get("media_answering") else "not answering"
        lines.append(f"  media        {info['urls']['media']} {state}")
    if info.get("gpus") is not None:
        for g in info["gpus"]:
            ours = f" (ours {g['ours_bytes'] / GiB:.1f} GiB)" if g["ours_bytes"] else ""
            used, total = g["used_bytes"] / GiB, g["total_bytes"] / GiB
            lines.append(f"  GPU {g['index']:<8} {g['name']}: {used:.1f} / {total:.1f} GiB used{ours}")
    elif info.get("gpu_note"):
        lines.append(f"  GPUs         not shown: {info['gpu_note']}")
    lines.append(f"  log          {info['log_file']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        from . import config as config_mod

        parser = ArgumentParser(
            prog="status_service.py", description="Show the state of the Qwen3-VL service."
        )
        parser.add_config()
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument(
            "--sample",
            type=float,
            default=1.0,
            metavar="S",
            help="seconds between two /metrics reads for the throughput (0: totals only; default 1)",
        )
        parser.add_argument(
            "--http-timeout", type=float, default=3.0, metavar="S", help="per request (default 3)"
        )
        args = parser.parse_args(argv)
        if args.sample < 0 or args.http_timeout <= 0:
            parser.error("--sample must be >= 0 and --http-timeout > 0")
        cfg = config_mod.load(args.config)
        info = collect(cfg, sample=args.sample, http_timeout=args.http_timeout)
        if args.json:
            print(json.dumps(info, indent=2, sort_keys=True))
        else:
            print("\n".join(render(info)))
        return EXIT_OK if info["running"] and info["healthy"] else EXIT_FAILED

    from .stop import _log_path

    return run(body, _log_path(argv, "status.log"))


__all__ = ["collect", "main", "parse_metrics", "render"]
