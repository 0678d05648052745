"""The one "service under test" of the end-to-end tests: a demo service run through the project's commands.

``Served(root, model=..., media_root=..., **settings)`` is a service as a user
starts it (``start_service.py --config config.demo.env``), with its ports,
model, media root and run/log folders given through the environment, and
SETTINGS on top (``RESTART="no"``, ``ROPE_SCALING="yarn"``, ...). It runs the
project's scripts against that environment and finds the service's processes
by the run folder they carry, so a test ends only what it started.

The shared instances (one supervised demo service per session, the tiny
model, the sample media) are fixtures in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from lifecycle_helpers import clean_env, free_port

from qwen3_vl_service.core.names import MEDIA_PID_FILE, RECORD_FILE, RUN_DIR_ENV, STATE_FILE, TAG_ENV
from qwen3_vl_service.machine import processes
from qwen3_vl_service.settings import scope

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "config.demo.env"
MODEL = "qwen3-vl-fp8"  # SERVED_MODEL_NAME of config.demo.env


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:PORT now."""
    return processes.port_free("127.0.0.1", port)


def free_pair(avoid: tuple[int, ...] = ()) -> int:
    """A port P with P and P+1 free and apart from AVOID (two replicas; a router and its metrics port)."""
    for _ in range(200):
        port = free_port()
        if port < 65000 and port_free(port + 1) and not {port, port + 1} & set(avoid):
            return port
    raise RuntimeError("no two consecutive free ports")


def alive(pid: int) -> bool:
    """PID runs (a zombie waiting for init to reap it holds nothing: no memory, no port, no GPU)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ours(run_dir: Path) -> list[psutil.Process]:
    """Every live process that carries RUN_DIR (a service's own run folder) in its environment."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(RUN_DIR_ENV) == str(run_dir) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def healthy(url: str, timeout: float = 5) -> bool:
    """URL (a /health) answers 200."""
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def bench_load():
    """bench/bench_load.py as a module (its run_load: client threads of image chats, each outcome timed)."""
    spec = importlib.util.spec_from_file_location("bench_load", REPO / "bench" / "bench_load.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = mod
    spec.loader.exec_module(mod)
    return mod


def done_requests(port: int) -> float:
    """The requests the vLLM on PORT finished for clients: vllm:request_success_total over every finish
    reason, less those that asked for one token (vllm:request_params_max_tokens, le=1): the
    supervisor's liveness probes (lifecycle/liveness.py), which vLLM counts too; tests ask for more."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "vllm:request_success":
            total += sum(s.value for s in fam.samples if s.name == "vllm:request_success_total")
        elif fam.name == "vllm:request_params_max_tokens":
            total -= sum(
                s.value
                for s in fam.samples
                if s.name.endswith("_bucket") and float(s.labels.get("le", "nan")) == 1.0
            )
    return total


class Served:
    """A demo service under test: its folders below ROOT, its own ports unless given."""

    def __init__(
        self,
        root: Path,
        *,
        model: Path,
        media_root: Path,
        port: int | None = None,
        media_port: int | None = None,
        **settings: str,
    ) -> None:
        self.root = root
        self.port = port or free_port()
        self.media_port = media_port or free_port()
        while self.media_port == self.port:
            self.media_port = free_port()
        self.model = model
        self.media_root = media_root
        self.run_root = root / "run"
        self.log_root = root / "logs"
        # The service's own folders (settings/scope.py: SERVICE_NAME auto is port-<PORT>).
        self.run_dir = self.run_root / f"port-{self.port}"
        self.log_dir = self.log_root / f"port-{self.port}"
        self.tmpfs = False  # log_root on a small tmpfs (the full-disk test needs it)
        self.start_seconds = 0.0  # how long start() took, to /health 200
        self.media_pid_file = self.run_root / scope.media_folder(self.media_port) / MEDIA_PID_FILE
        self.env = clean_env(
            PORT=str(self.port),
            MEDIA_PORT=str(self.media_port),
            MEDIA_ROOT=str(media_root),
            MODEL_PATH=str(model),
            RUN_DIR=str(self.run_root),
            LOG_DIR=str(self.log_root),
            PYTHONUNBUFFERED="1",
            **settings,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.media = f"http://127.0.0.1:{self.media_port}"

    # -- the project's commands, against this service's settings ------------------------

    def script(self, name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / name), "--config", str(DEMO_CONFIG), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def start(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """``start_service.py --detach --quiet ARGS``; on failure its output and logs fail the test,
        and nothing it started is left running."""
        t0 = time.monotonic()
        try:
            proc = self.script("start_service.py", "--detach", "--quiet", *args, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess([], returncode=-1, stdout="(start timed out)", stderr="")
        if proc.returncode != 0:
            logs = "\n".join(p.read_text(errors="replace")[-4000:] for p in self.log_root.rglob("*.log"))
            self.stop_all()
            pytest.fail(
                f"start failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
            )
        self.start_seconds = time.monotonic() - t0
        return proc

    def stop_all(self) -> None:
        """``stop_service.py --all``, then SIGKILL whatever of this service survived it (a cleanup)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.script("stop_service.py", "--all")
        for p in ours(self.run_dir):
            with contextlib.suppress(psutil.Error):
                p.kill()

    def state(self) -> dict:
        return json.loads((self.run_dir / STATE_FILE).read_text())

    def status(self, *args: str) -> dict:
        """``status_service.py --json --sample 0``: what the user sees, as JSON."""
        proc = self.script("status_service.py", "--json", "--sample", "0", *args)
        return json.loads(proc.stdout)

    def supervisor_pid(self) -> int:
        return json.loads((self.run_dir / RECORD_FILE).read_text())["pid"]

    def engine_core(self) -> psutil.Process:
        """Our VLLM::EngineCore: the process so titled that carries this run's tag."""
        tag = self.state()["tag"]
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get(TAG_ENV) == tag and " ".join(p.cmdline()).startswith("VLLM::EngineCore"):
                    return p
        raise AssertionError(f"no VLLM::EngineCore carries tag {tag}")

    def ours(self) -> list[psutil.Process]:
        return ours(self.run_dir)

    def chat(self, content, max_tokens: int = 8, **extra) -> requests.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        return requests.post(f"{self.base}/v1/chat/completions", json={**body, **extra}, timeout=300)


def end_stopped_engine_load(stop, runner, engine: psutil.Process) -> None:
    """The end of a SIGSTOP test: its load clients told to stop and joined, and the engine killed if
    its supervisor did not end it (never left stopped)."""
    stop.set()
    with contextlib.suppress(psutil.Error):
        if engine.is_running():
            engine.kill()
    runner.join(300)
