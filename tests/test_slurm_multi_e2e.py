"""slurm/serve_multi.sbatch with -N 2 under a real SLURM: a replica per node, the router on the head.

The session's one replica group. The private cluster of tests/slurm_cluster.py
with two node entries (node0, node1) on this one machine, each its own slurmd
on its own port, both reached at NodeAddr 127.0.0.1. ``sbatch -N 2
slurm/serve_multi.sbatch`` with REPLICAS=per-node and the CPU demo: srun
starts start_service.py on both nodes, each runs its preflight (the job
output shows both, labelled by srun), node0 runs replica-0 and vllm-router,
node1 replica-1 (port PORT+1: replica i listens on PORT+i, so the two
"nodes" of one machine do not collide), each under its own supervisor. In
order:

1. both nodes' preflights, the job's state files, requests through the
   router reach both replicas;
2. status shows the router and both replicas healthy;
3. every request kind of the README answers 200 through the router, and
   each replica's own /metrics shows that it served some;
4. ``kill -9`` of replica-1's engine: the router keeps answering from
   replica-0, while replica-1's supervisor restarts it on its port (status
   shows the restart and its cause) and the router sends it requests again;
5. ``kill -STOP`` of replica-1's engine under load through the router (a hang: its /health still
   answers 200): its supervisor finds it hung within STALL_AFTER (short here; status says so),
   takes it out of the router's rotation, SIGKILLs and restarts it; the router keeps answering
   from replica-0, errors only for requests already on replica-1, and it joins the rotation again
   once healthy (the suite's one hang: a single service's supervisor runs the same check);
6. ``scancel --batch --signal=TERM`` (the path of the time-limit warning,
   ``--signal=B:TERM@120``) stops every node's processes: nothing left of
   either replica nor of the router, every port free, the job COMPLETED.

The media server is off: two nodes on one machine would race to start it on
one port; images and videos go as base64 and as file:// under MEDIA_ROOT. A
test that needs a replica group goes here, before the last one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import slurm_cluster
from lifecycle_helpers import wait_until
from served import (
    DEMO_CONFIG,
    MODEL,
    REPO,
    bench_load,
    done_requests,
    end_stopped_engine_load,
    free_pair,
    healthy,
    ours,
    port_free,
)
from skips import require, vllm_missing
from test_deployment_e2e import PER_START, shown_command

from qwen3_vl_service.core.names import RUN_DIR_ENV, STATE_FILE
from qwen3_vl_service.deployment.deployment import Deployment
from qwen3_vl_service.lifecycle.supervisor import HEALTH_EVERY_S, record_path
from qwen3_vl_service.machine import processes

pytestmark = pytest.mark.e2e
# The hang test's load goes on this long after the kill (replica-0 answers), then stops.
LOAD_AFTER_KILL_S = 10
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@dataclass
class Group:
    cluster: slurm_cluster.Cluster
    job: str
    env: dict[str, str]
    out: Path
    port: int  # replica i on port + i
    router_port: int  # its metrics on router_port + 1
    run_dir: Path
    media_root: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def unit_dir(self, name: str) -> Path:
        """The run folder of a unit (replica-0, replica-1, router) under RUN_DIR, wherever it nests."""
        found = sorted(d for d in self.run_dir.rglob(name) if (d / STATE_FILE).exists())
        assert found, f"no {name}/{STATE_FILE} under {self.run_dir}"
        return found[0]

    def scopes(self) -> list[Path]:
        return [self.unit_dir(n) for n in ("replica-0", "replica-1", "router")]

    def everything(self) -> list[psutil.Process]:
        """Every live process of the group (they carry their unit's run folder)."""
        return [p for p in psutil.process_iter() if _carries(p, str(self.run_dir.resolve()))]

    def script(self, name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """NAME (status_service.py, ...) as a user on the head node runs it: outside the job."""
        env = {k: v for k, v in self.env.items() if not k.startswith("SLURM_")}
        argv = [sys.executable, str(REPO / name), "--config", str(DEMO_CONFIG), *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def report(self) -> str:
        text = self.out.read_text(errors="replace") if self.out.exists() else "(no job output)"
        logs = "\n".join(
            p.read_text(errors="replace")[-2000:] for p in Path(self.env["LOG_DIR"]).rglob("*.log")
        )
        state = self.cluster.job_state(self.job)
        return f"job {self.job} {state}\n{text[-6000:]}\n{logs}\n{self.cluster.logs()}"


def _carries(p: psutil.Process, run_root: str) -> bool:
    """P is alive and carries a run folder below RUN_ROOT."""
    with contextlib.suppress(psutil.Error):
        mine = p.environ().get(RUN_DIR_ENV, "").startswith(run_root + os.sep)
        return mine and p.status() != psutil.STATUS_ZOMBIE
    return False


@pytest.fixture(scope="module")
def group(tmp_path_factory, tiny_model: Path, demo_media: Path):
    why = slurm_cluster.missing()
    if why:
        vllm_missing(why)  # under CI=true (root, scripts/test.sh installs SLURM): a failure there
    require("vllm", "vllm_router")
    tmp = tmp_path_factory.mktemp("multi")
    port = free_pair()
    router_port = free_pair(avoid=(port, port + 1))
    env = {
        "CONFIG": str(DEMO_CONFIG),
        "PYTHON": sys.executable,
        "REPLICAS": "per-node",
        "ROUTER_POLICY": "round_robin",
        "PORT": str(port),
        "ROUTER_PORT": str(router_port),
        "MEDIA_SERVER": "false",
        "MODEL_PATH": str(tiny_model),
        "MEDIA_ROOT": str(demo_media),
        "RUN_DIR": str(tmp / "run"),
        "LOG_DIR": str(tmp / "logs"),
        # Two CPU engines share this machine's cores; a dead one comes back after 1 s.
        "OMP_NUM_THREADS": "1",
        "RESTART_BACKOFF": "1",
        # A hung engine (no progress with work in flight) is found after this long: the least allowed.
        "STALL_AFTER": "10",
    }
    cluster = slurm_cluster.Cluster(nodes=2).start()
    env = {**cluster.env, **env}
    g = None
    try:
        out = tmp / "job.out"
        cpus = str(os.cpu_count() or 1)
        submit = subprocess.run(
            ["sbatch", "--parsable", "-N", "2", "--time=15", "--gpus-per-node=0", f"--cpus-per-task={cpus}",
             f"--output={out}", str(REPO / "slurm" / "serve_multi.sbatch")],
            env=env, capture_output=True, text=True, timeout=30, cwd=REPO,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stderr
        g = Group(
            cluster, submit.stdout.strip().split(";")[0], env, out, port, router_port, tmp / "run", demo_media
        )
        up = wait_until(
            lambda: healthy(f"{g.base}/health", 2) or cluster.job_state(g.job) in ENDED, 600, step=1
        )
        assert up and healthy(f"{g.base}/health", 2), f"the router did not come up:\n{g.report()}"
        # The head starts the router once its own replica answers; node 1 loads on its own clock
        # (on a loaded machine minutes later), so its replica is waited for, within a bound.
        assert healthy(f"http://127.0.0.1:{port}/health")
        assert wait_until(lambda: healthy(f"http://127.0.0.1:{port + 1}/health", 2), 600, step=1), g.report()
        yield g
    finally:  # whatever failed: nothing of the group outlives the module
        subprocess.run(
            [sys.executable, str(REPO / "stop_service.py"), "--config", env["CONFIG"], "--all"],
            env=env, capture_output=True, timeout=180, cwd=REPO,
        )  # fmt: skip
        for proc in g.everything() if g else []:
            proc.kill()
        cluster.stop()


def chat_body(content, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def post(g: Group, path: str, body: dict) -> requests.Response:
    return requests.post(f"{g.base}{path}", json=body, timeout=300)


def test_two_nodes_each_run_their_preflight_and_serve_a_replica_behind_the_router(group: Group):
    g = group
    text = g.out.read_text()
    # Both nodes ran their own preflight inside the job (srun --label prefixes the task).
    for rank, node in enumerate(g.cluster.nodes):
        assert f"{rank}: " in text and f"ok    SLURM     job {g.job} on {node}" in text, g.report()
    assert "node 0 (node0) - head" in text and "node 1 (node1)" in text, g.report()
    # replica-0, replica-1 and the router were started by this job (their state files say so).
    jobs = {d.name: json.loads((d / STATE_FILE).read_text())["slurm_job_id"] for d in g.scopes()}
    assert set(jobs.values()) == {g.job}, jobs
    before = [done_requests(g.port), done_requests(g.port + 1)]
    for i in range(4):
        r = post(g, "/v1/chat/completions", chat_body(f"Hello {i}", max_tokens=4))
        assert r.status_code == 200, r.text
    served = [done_requests(g.port) - before[0], done_requests(g.port + 1) - before[1]]
    assert served == [2, 2], served


def test_each_replica_runs_its_recorded_unit(group: Group):
    """Issue 21: every live vLLM of the group runs the argv and environment of its unit in the
    deployment the start recorded (the one the dry run prints: deployment.derive), the plan's flags
    included; the router runs its unit's argv."""
    (record,) = group.run_dir.rglob("deployment.json")
    dep = Deployment.from_json(record.read_text())
    assert dep.mode == "router" and [u.name for u in dep.of_kind("vllm")] == ["replica-0", "replica-1"]
    for unit in (*dep.of_kind("vllm"), *dep.of_kind("router")):
        state = json.loads((group.unit_dir(unit.name) / STATE_FILE).read_text())
        proc = psutil.Process(state["pid"])
        if unit.kind == "vllm":  # vllm-router renames itself (setproctitle): no argv to read back
            assert proc.cmdline() == list(unit.argv), unit.name
        live = proc.environ()
        for key, value in unit.env.items():
            assert live.get(key) == value, (unit.name, key)
        assert live[RUN_DIR_ENV] == str(unit.run_dir)


def test_each_replica_runs_the_dry_runs_command_line_by_line(group: Group):
    """Issue 21: the dry run of the group's settings on a login node (``start_service.py --dry-run
    --nodes node0,node1``, outside the job) prints, per replica, the argv and the environment that
    its live vLLM runs, line by line, less what each start adds (its tag, run and IPC folders)."""
    # A login node: SLURM's configuration (its NodeAddr for each node), no job.
    env = {k: v for k, v in group.env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    argv = [
        sys.executable,
        "start_service.py",
        "--config",
        str(DEMO_CONFIG),
        "--dry-run",
        "--nodes",
        "node0,node1",
    ]
    dry = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "Commands per node" in dry.stdout, dry.stdout[-3000:] + dry.stderr[-2000:]
    (record,) = group.run_dir.rglob("deployment.json")
    replicas = Deployment.from_json(record.read_text()).of_kind("vllm")
    assert [u.name for u in replicas] == ["replica-0", "replica-1"]
    for unit in replicas:
        env, argv = shown_command(dry.stdout, title=f"  {unit.name}:\n")
        proc = psutil.Process(json.loads((group.unit_dir(unit.name) / STATE_FILE).read_text())["pid"])
        assert proc.cmdline() == argv, unit.name
        live = proc.environ()
        shown = {k: v for k, v in env.items() if k not in PER_START}
        assert shown and {k: live.get(k) for k in shown} == shown, unit.name


def test_status_shows_the_router_and_both_replicas_healthy(group: Group):
    proc = group.script("status_service.py", "--json", "--sample", "0", "--http-timeout", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(proc.stdout)
    assert status["router"]["healthy"] is True
    assert [r["name"] for r in status["replicas"]] == ["replica-0", "replica-1"]
    assert all(r["healthy"] for r in status["replicas"])
    assert {r["urls"]["api"] for r in status["replicas"]} == {
        f"http://127.0.0.1:{group.port}/v1",
        f"http://127.0.0.1:{group.port + 1}/v1",
    }
    human = group.script("status_service.py", "--sample", "0", "--http-timeout", "30")
    assert human.returncode == 0 and "replica-1" in human.stdout and "router" in human.stdout


def test_every_request_kind_answers_200_through_the_router_and_both_replicas_serve(group: Group):
    g = group
    before = [done_requests(g.port), done_requests(g.port + 1)]
    png = base64.b64encode((g.media_root / "sample.png").read_bytes()).decode()
    image_file = {"type": "image_url", "image_url": {"url": (g.media_root / "sample.jpg").as_uri()}}
    kinds = {
        "text": chat_body("Say hello."),
        "image by file:// under MEDIA_ROOT": chat_body(
            [image_file, {"type": "text", "text": "What is this?"}]
        ),
        "image as base64": chat_body(
            [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                {"type": "text", "text": "What is this?"},
            ]
        ),
        "video by file:// under MEDIA_ROOT": chat_body(
            [
                {"type": "video_url", "video_url": {"url": (g.media_root / "sample.mp4").as_uri()}},
                {"type": "text", "text": "Describe the clip."},
            ]
        ),
        "multi-turn": {
            "model": MODEL,
            "max_tokens": 8,
            "messages": [
                {"role": "user", "content": [image_file, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And the sky?"},
            ],
        },
    }
    for name, body in kinds.items():
        r = post(g, "/v1/chat/completions", body)
        assert r.status_code == 200, f"{name}: {r.status_code} {r.text[:300]}"
        assert r.json()["usage"]["completion_tokens"] > 0, name
    with requests.post(
        f"{g.base}/v1/chat/completions", json=chat_body("Count.", stream=True), stream=True, timeout=300
    ) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]" and len(events) >= 3
    r = post(g, "/v1/completions", {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    r = requests.get(f"{g.base}/v1/models", timeout=30)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]
    assert requests.get(f"{g.base}/health", timeout=30).status_code == 200

    after = [done_requests(g.port), done_requests(g.port + 1)]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 7, served  # five chats, the stream, the completion
    assert all(n >= 2 for n in served), f"round_robin should spread the 7 requests: {served}"


def test_kill_9_of_one_replicas_engine_the_router_keeps_answering_and_it_is_restarted(group: Group):
    g = group
    state_file = g.unit_dir("replica-1") / STATE_FILE
    api = psutil.Process(json.loads(state_file.read_text())["pid"])
    engines = [c for c in api.children(recursive=True) if "EngineCore" in " ".join(c.cmdline())]
    assert engines, "replica-1 should have a VLLM::EngineCore"
    for e in engines:
        e.send_signal(signal.SIGKILL)
    survivor_before = done_requests(g.port)
    codes = []
    for i in range(6):
        r = post(g, "/v1/chat/completions", chat_body(f"Request {i} after the kill."))
        codes.append(r.status_code)
    assert codes == [200] * 6, codes
    assert done_requests(g.port) - survivor_before == 6, "replica-0 answered them all"

    # Its supervisor restarts it on the same port: a new API server, /health 200 again.
    assert wait_until(lambda: _restarted(state_file, api.pid, g.port + 1), 600, step=1), (
        f"replica-1 was not restarted:\n{g.report()}"
    )
    assert not api.is_running() or api.status() == psutil.STATUS_ZOMBIE
    direct = requests.post(
        f"http://127.0.0.1:{g.port + 1}/v1/chat/completions", json=chat_body("Back?"), timeout=300
    )
    assert direct.status_code == 200, direct.text[:300]

    # A long --http-timeout: this machine is shared, a 3 s /health can miss under load.
    status = json.loads(
        g.script("status_service.py", "--json", "--sample", "0", "--http-timeout", "30").stdout
    )
    by_name = {r["name"]: r for r in status["replicas"]}
    assert by_name["replica-1"]["healthy"] is True, by_name["replica-1"]
    assert by_name["replica-0"]["healthy"] is True, by_name["replica-0"]
    sup = by_name["replica-1"]["supervisor"]
    assert sup["running"] is True and sup["restarts"] == 1, sup
    assert sup["last_cause"].startswith("replica-1 vLLM: "), sup
    assert "EngineCore" in sup["last_cause"] or "exited" in sup["last_cause"], sup
    assert by_name["replica-0"]["supervisor"]["restarts"] == 0
    assert status["router"]["running"] is True, status["router"]
    human = g.script("status_service.py", "--sample", "0", "--http-timeout", "30").stdout
    assert "1 restart(s)" in human and "replica-1 vLLM:" in human, human
    log = "\n".join(p.read_text(errors="replace") for p in Path(g.env["LOG_DIR"]).rglob("*.log"))
    assert "restarting replica-1 vLLM" in log, log[-3000:]

    # The router's health checks take it back: replica-1 serves requests through the router again.
    served_before = done_requests(g.port + 1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and done_requests(g.port + 1) == served_before:
        assert post(g, "/v1/chat/completions", chat_body("Round robin.")).status_code == 200
        time.sleep(1)
    assert done_requests(g.port + 1) > served_before, "the router never sent replica-1 a request again"


def _restarted(state_file: Path, old_pid: int, port: int) -> bool:
    """Whether the unit's state names a new API server, and it answers /health on PORT."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = json.loads(state_file.read_text())["pid"]
        return pid != old_pid and healthy(f"http://127.0.0.1:{port}/health", 10)
    return False


def _in_flight(port: int) -> int | None:
    """The requests the API server of the vLLM on PORT holds (its /load); None without an answer."""
    with contextlib.suppress(requests.RequestException, ValueError, KeyError, TypeError):
        return int(requests.get(f"http://127.0.0.1:{port}/load", timeout=5).json()["server_load"])
    return None


def _hung(record: Path) -> str:
    """What a supervisor's record says of a hang: a unit's condition now, or the last restart's cause."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(record.read_text())
        for text in (data.get("conditions") or {}).values():
            if text.startswith("hung"):
                return text
        cause = data.get("last_cause") or ""
        return cause if ": hung:" in cause else ""
    return ""


def _since(log: Path, offset: int) -> list[str]:
    """The lines LOG got after its first OFFSET bytes, colours stripped (the router's are coloured)."""
    with open(log, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode("utf-8", "replace")
    return re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()


def _logged_at(log: Path, offset: int, text: str) -> float | None:
    """The wall-clock second of the first supervisor line with TEXT after OFFSET bytes of LOG."""
    for line in _since(log, offset):
        m = re.match(r"\[supervisor (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] (.*)", line)
        if m and text in m.group(2):
            return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
    return None


def _stuck(run_dir: Path) -> str:
    """Each live process of the unit in RUN_DIR: state, where the kernel holds it, CPU time, title (a
    restart that never gets healthy)."""
    lines = []
    for p in ours(run_dir.resolve()):
        with contextlib.suppress(psutil.Error, OSError):
            stack = Path(f"/proc/{p.pid}/stack")
            where = stack.read_text().split("\n")[:6] if os.access(stack, os.R_OK) else []
            wchan = Path(f"/proc/{p.pid}/wchan").read_text()
            title = processes.cmdline_text(p)[:80]
            lines.append(f"pid {p.pid} {p.status()} wchan={wchan} cpu={p.cpu_times()} {title} {where}")
    return "\n".join(lines) or "(no process of it)"


def test_sigstop_of_one_replicas_engine_under_load_fails_only_its_requests_and_it_rejoins(group: Group):
    """Issue 23: a hang behind the router, the suite's one hang (a single service's supervisor runs the
    same liveness check: issue 25 folded test_hang_e2e in here, a vLLM restart less). ``kill -STOP`` of
    replica-1's EngineCore while 4 clients send
    image chats through the router: its API server keeps answering /health, so only its supervisor's
    liveness check (STALL_AFTER, short in this group) can tell. It leaves the router's rotation, is
    found hung, SIGKILLed and restarted; the router keeps answering from replica-0; the only requests
    that fail are those already on replica-1 (the router retries them on replica-0: its log counts
    them); the restarted replica joins the rotation again and serves requests through the router.

    The load stops LOAD_AFTER_KILL_S after the kill: replica-0's answers meanwhile show the router
    at work, and the restart does not share the two cores with the load (about twice as long)."""
    g = group
    port = g.port + 1
    stall_after = float(g.env["STALL_AFTER"])
    unit = g.unit_dir("replica-1")
    state_file, record = unit / STATE_FILE, record_path(unit)
    (log,) = Path(g.env["LOG_DIR"]).rglob("replica-1/service.log")
    (router_log,) = Path(g.env["LOG_DIR"]).rglob("router.log")
    api = psutil.Process(json.loads(state_file.read_text())["pid"])
    (engine,) = [p for p in api.children(recursive=True) if processes.cmdline_text(p) == "VLLM::EngineCore"]
    restarts = json.loads(record.read_text())["restarts"]
    stop = threading.Event()
    result: dict = {}

    def load() -> None:
        media = g.media_root.as_uri()  # images by file:// under MEDIA_ROOT (no media server here)
        result["load"] = bench_load().run_load(g.base, media, clients=4, seconds=900, timeout=120, stop=stop)

    runner = threading.Thread(target=load, daemon=True)
    runner.start()
    hung_at = None
    try:
        assert wait_until(lambda: (_in_flight(port) or 0) > 0, 120, step=0.2), "nothing reached replica-1"
        offsets = log.stat().st_size, router_log.stat().st_size
        stopped_at, stopped_wall = time.monotonic(), time.time()
        engine.send_signal(signal.SIGSTOP)
        at_stop = _in_flight(port) or 0
        on_it = at_stop  # the most replica-1's API server held until the kill (the probe included)
        while hung_at is None and time.monotonic() < stopped_at + stall_after + 60:
            on_it = max(on_it, _in_flight(port) or 0)
            if _hung(record):
                hung_at = time.monotonic()
            time.sleep(0.5)
        assert hung_at is not None, f"replica-1's supervisor never said hung:\n{g.report()}"
        # What a user sees meanwhile: the status view names the hang and its evidence (once: a Python
        # start, seconds of CPU on two shared cores).
        hung_status = g.script("status_service.py", "--sample", "0", "--http-timeout", "30").stdout
        time.sleep(max(0.0, hung_at + LOAD_AFTER_KILL_S - time.monotonic()))
    finally:
        end_stopped_engine_load(stop, runner, engine)

    assert wait_until(lambda: _restarted(state_file, api.pid, port), 480, step=1), (
        f"not restarted:\n{_stuck(unit)}\n{g.report()}"
    )
    back_at = time.monotonic()

    def served_through_the_router() -> bool:  # the new vLLM's own count (no probe in it)
        assert post(g, "/v1/chat/completions", chat_body("Round robin.")).status_code == 200
        return done_requests(port) > 0

    assert wait_until(served_through_the_router, 120, step=1), "the router never sent replica-1 one"
    rejoined_at = time.monotonic()

    load = result["load"]
    left_wall = _logged_at(log, offsets[0], "replica-1 vLLM: out of the router's rotation")
    assert left_wall is not None, log.read_text(errors="replace")[-3000:]
    left_at = left_wall - (stopped_wall - stopped_at)  # on the monotonic clock, within a second after
    errors = [o for o in load.outcomes if not o.ok]
    # The router's own count of the requests it had on replica-1 when it was killed (it retries them).
    failed = [x for x in _since(router_log, offsets[1]) if "Failed to send" in x and f":{port} " in x]
    print(
        f"\nSIGSTOP of replica-1's EngineCore under 4 clients through the router (STALL_AFTER="
        f"{stall_after:g}): out of the rotation after {left_at - stopped_at:.0f} s (+1, the log's second), "
        f"hung found after {hung_at - stopped_at:.1f} s, healthy again after {back_at - stopped_at:.1f} s, "
        f"serving through the router after {rejoined_at - stopped_at:.1f} s. On replica-1: {at_stop} "
        f"request(s) at the stop, {on_it} at most before the kill (with the supervisor's probe); the "
        f"router failed {len(failed)} on it at the kill; errors {len(errors)} of {len(load.outcomes)}"
    )
    print(f"load: {load.summary()}")
    # The looks right after the stop may still see the last steps' statistics arrive (17-20 s measured):
    # hung within STALL_AFTER and three of the supervisor's looks, 5 s apart, on a loaded machine.
    assert hung_at - stopped_at <= stall_after + 3 * HEALTH_EVERY_S + 5
    # Errors only for the requests on replica-1 (the router retries them on replica-0), none for a
    # request sent after it left the rotation; replica-0 answered those meanwhile.
    assert 1 <= len(failed) <= on_it and len(errors) <= len(failed), (failed, on_it, load.summary())
    assert all(o.started < left_at + 1 for o in errors), load.summary()
    assert any(o.ok and o.started > left_at + 1 for o in load.outcomes), "none answered while it was out"
    # Every request on the stopped engine ended once it was killed (none waited for its timeout).
    assert max(o.ended for o in load.outcomes) < hung_at + LOAD_AFTER_KILL_S + 30, load.summary()

    print(f"status while replica-1's record said hung:\n{hung_status}")
    assert "hung: no engine progress" in hung_status, hung_status
    # SIGKILLed (a stopped process holds SIGTERM pending), not left stopped beside the new one.
    assert not psutil.pid_exists(engine.pid) or engine.status() == psutil.STATUS_ZOMBIE

    # The supervisor's record and status: hung, the restart, its cause.
    status = json.loads(
        g.script("status_service.py", "--json", "--sample", "0", "--http-timeout", "30").stdout
    )
    by_name = {r["name"]: r for r in status["replicas"]}
    sup = by_name["replica-1"]["supervisor"]
    assert sup["restarts"] == restarts + 1 and by_name["replica-1"]["healthy"] is True, sup
    assert sup["last_cause"].startswith("replica-1 vLLM: hung: no engine progress"), sup
    assert by_name["replica-0"]["supervisor"]["restarts"] == 0 and by_name["replica-0"]["healthy"]
    assert _logged_at(log, offsets[0], "replica-1 vLLM is hung: SIGKILL")
    assert _logged_at(log, offsets[0], "replica-1 vLLM: back in the router's rotation")


def test_term_to_the_batch_script_stops_every_node(group: Group):
    g = group
    scopes = g.scopes()
    # The time-limit warning's path: SIGTERM to the batch script only.
    cancel = g.cluster.cli("scancel", "--batch", "--signal=TERM", g.job)
    assert cancel.returncode == 0, cancel.stderr
    assert wait_until(lambda: g.cluster.job_state(g.job) in ENDED, 300, step=2), g.report()
    assert g.cluster.job_state(g.job) == "COMPLETED", g.report()
    text = g.out.read_text()
    assert "stopping every node: SIGTERM (time limit or scancel)" in text, g.report()
    assert "the service was stopped" in text, g.report()
    assert not [p for d in scopes for p in ours(d.resolve())], g.report()
    assert g.everything() == [], g.report()
    for p in (g.port, g.port + 1, g.router_port, g.router_port + 1):
        assert port_free(p), f"{p}\n{g.report()}"
    assert not any(d.exists() for d in scopes), "the stop removes the emptied run folders"
    again = g.script("status_service.py", "--sample", "0")
    assert again.returncode == 1 and "not running" in again.stdout, again.stdout


def test_the_readmes_dry_run_job_plans_every_node_from_the_shipped_config(group: Group, tmp_path: Path):
    """Issue 24, item 2: `DRY_RUN=1 sbatch -N 2 slurm/serve_multi.sbatch` (README, "Several nodes
    under SLURM") with the shipped config.env: each node's preflight plans its part (a replica a
    node, REPLICAS=per-node) and the job ends well. After the group's job: its nodes are free."""
    g = group
    out = tmp_path / "dry.out"
    env = {
        **g.cluster.env,
        "DRY_RUN": "1",
        "CONFIG": str(REPO / "config.env"),
        "PYTHON": sys.executable,
        "RUN_DIR": str(tmp_path / "run"),
        "LOG_DIR": str(tmp_path / "logs"),
        "MODEL_PATH": str(tmp_path / "not-downloaded"),  # the published facts plan it (issue 24, item 1)
    }
    submit = subprocess.run(
        ["sbatch", "--parsable", "-N", "2", "--time=30", "--gpus-per-node=0",
         f"--cpus-per-task={os.cpu_count() or 1}", f"--output={out}",
         str(REPO / "slurm" / "serve_multi.sbatch"), "--gpus", "8xH100-80GB"],
        env=env, capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    assert wait_until(lambda: g.cluster.job_state(job) in ENDED, 300, step=1), g.cluster.logs()
    text = out.read_text(errors="replace")
    assert g.cluster.job_state(job) == "COMPLETED", text[-4000:]
    for rank in (0, 1):
        # srun --label: each node's report, with both nodes' commands and its verdict.
        assert f"{rank}: would start: once the model is downloaded" in text, text[-4000:]
        assert f"{rank}: node 1 (node1)" in text and f"{rank}: node 0 (node0) - head" in text
    assert "--worker-urls http://127.0.0.1:" in text
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("service.json"))
