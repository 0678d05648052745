"""slurm/serve_multi.sbatch with -N 2 under a real SLURM: a replica per node, the router on the head.

The private cluster of tests/slurm_cluster.py with two node entries (node0,
node1) on this one machine, each its own slurmd on its own port, both reached
at NodeAddr 127.0.0.1. ``sbatch -N 2 slurm/serve_multi.sbatch`` with
REPLICAS=per-node and the CPU demo: srun starts start_service.py on both
nodes, each runs its preflight (the job output shows both, labelled by
srun), node0 runs replica-0 and vllm-router, node1 replica-1 (port PORT+1:
replica i listens on PORT+i, so the two "nodes" of one machine do not
collide). Requests through the router reach both replicas. Then
``scancel --batch --signal=TERM`` (the path of the time-limit warning,
``--signal=B:TERM@120``) stops every node's processes: nothing left, the
job COMPLETED. The media server is off: two nodes on one machine would race
to start it on one port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import slurm_cluster
from lifecycle_helpers import wait_until
from skips import vllm_missing
from test_e2e import _have_vllm, ours, port_free
from test_replicas_e2e import done_requests, free_pair

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _healthy(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def cluster2():
    why = slurm_cluster.missing()
    if why:
        vllm_missing(why)  # under CI=true (root, scripts/test.sh installs SLURM): a failure there
    c = slurm_cluster.Cluster(nodes=2).start()
    try:
        yield c
    finally:
        c.stop()


def test_two_nodes_each_serve_a_replica_behind_the_router_and_term_stops_both(cluster2, tmp_path):
    if not _have_vllm():
        vllm_missing("vLLM is not installed here: run scripts/setup_env.sh (scripts/test.sh does)")
    from devtools import tiny_model

    tiny_model.generate(tmp_path / "model")
    port, router_port = free_pair(), free_pair()
    while abs(router_port - port) < 2:
        router_port = free_pair()
    run_dir = tmp_path / "run"
    env = {
        **cluster2.env,
        "CONFIG": str(REPO / "config.demo.env"),
        "PYTHON": sys.executable,
        "REPLICAS": "per-node",
        "ROUTER_POLICY": "round_robin",
        "PORT": str(port),
        "ROUTER_PORT": str(router_port),
        "MEDIA_SERVER": "false",
        "MODEL_PATH": str(tmp_path / "model"),
        "MEDIA_ROOT": str(tmp_path / "media"),
        "RUN_DIR": str(run_dir),
        "LOG_DIR": str(tmp_path / "logs"),
        "OMP_NUM_THREADS": "1",
    }
    scopes = [run_dir / "replica-0", run_dir / "replica-1", run_dir / "router"]
    try:
        _serve_then_term(cluster2, env, tmp_path / "job.out", port, router_port, scopes)
    finally:  # whatever failed: nothing of the service outlives the test
        subprocess.run(
            [sys.executable, str(REPO / "stop_service.py"), "--config", env["CONFIG"], "--all"],
            env=env, capture_output=True, timeout=180, cwd=REPO,
        )  # fmt: skip
        for d in scopes:
            for proc in ours(d.resolve()):
                proc.kill()


def _serve_then_term(cluster, env, out: Path, port: int, router_port: int, scopes: list[Path]) -> None:
    cpus = str(os.cpu_count() or 1)
    submit = subprocess.run(
        ["sbatch", "--parsable", "-N", "2", "--time=15", "--gpus-per-node=0", f"--cpus-per-task={cpus}",
         f"--output={out}", str(REPO / "slurm" / "serve_multi.sbatch")],
        env=env, capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]

    def report() -> str:
        text = out.read_text(errors="replace") if out.exists() else "(no job output)"
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in Path(env["LOG_DIR"]).rglob("*.log"))
        return f"job {job} {cluster.job_state(job)}\n{text[-6000:]}\n{logs}\n{cluster.logs()}"

    router = f"http://127.0.0.1:{router_port}"
    up = wait_until(lambda: _healthy(f"{router}/health") or cluster.job_state(job) in ENDED, 600, step=1)
    assert up and _healthy(f"{router}/health"), f"the router did not come up:\n{report()}"
    text = out.read_text()
    # Both nodes ran their own preflight inside the job (srun --label prefixes the task).
    for rank, node in enumerate(cluster.nodes):
        assert f"{rank}: " in text and f"ok    SLURM     job {job} on {node}" in text, report()
    assert "node 0 (node0) - head" in text and "node 1 (node1)" in text, report()
    # replica-0, replica-1 and the router were started by this job (their state files say so).
    jobs = {d.name: json.loads((d / "service.json").read_text())["slurm_job_id"] for d in scopes}
    assert set(jobs.values()) == {job}, jobs
    # The head starts the router once its own replica answers; node 1 loads on its own clock
    # (on a loaded machine minutes later), so its replica is waited for, within a bound.
    assert _healthy(f"http://127.0.0.1:{port}/health")
    assert wait_until(lambda: _healthy(f"http://127.0.0.1:{port + 1}/health"), 600, step=1), report()

    before = [done_requests(port), done_requests(port + 1)]
    for i in range(4):
        r = requests.post(
            f"{router}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 4},
            timeout=300,
        )
        assert r.status_code == 200, r.text
    served = [done_requests(port) - before[0], done_requests(port + 1) - before[1]]
    assert served == [2, 2], served

    # The time-limit warning's path: SIGTERM to the batch script only.
    cancel = cluster.cli("scancel", "--batch", "--signal=TERM", job)
    assert cancel.returncode == 0, cancel.stderr
    assert wait_until(lambda: cluster.job_state(job) in ENDED, 300, step=2), report()
    assert cluster.job_state(job) == "COMPLETED", report()
    text = out.read_text()
    assert "stopping every node: SIGTERM (time limit or scancel)" in text, report()
    assert "the service was stopped" in text, report()
    assert not [p for d in scopes for p in ours(d.resolve())], report()
    for p in (port, port + 1, router_port, router_port + 1):
        assert port_free(p), f"{p}\n{report()}"
