"""slurm/serve.sbatch under a real SLURM: submitted with sbatch, serving, stopped at the time limit.

A private one-node cluster (tests/slurm_cluster.py: Debian's slurm-wlm and
munge, its own config, ports and folders) runs the batch script unchanged,
with the CPU demo: ``sbatch --time=5 slurm/serve.sbatch`` (the options a
cluster without GPUs needs given on the command line, as a user would). The
test checks that the job's preflight sees the job and its time left, that
the service answers, and that SLURM's warning signal before the time limit
(the script's ``--signal=B:TERM@120``) stops it through stop_service.py:
nothing of the service left, both ports free, the job COMPLETED.

The job runs about 3 minutes, most of it waiting for the warning (120-180 s
before the 5-minute limit: SLURM may send it up to 60 s early). So the first
test submits it and checks the service as soon as it answers, and runs
before every other test (``early``); the second checks the end, after all
others (``late``): the wait overlaps the rest of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import slurm_cluster
from lifecycle_helpers import free_port, wait_until
from served import DEMO_CONFIG, REPO, healthy, ours, port_free
from skips import require, vllm_missing

pytestmark = pytest.mark.e2e
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@dataclass
class Job:
    cluster: slurm_cluster.Cluster
    id: str
    env: dict[str, str]
    out: Path
    port: int
    media_port: int
    run_dir: Path

    def report(self) -> str:
        text = self.out.read_text(errors="replace") if self.out.exists() else "(no job output)"
        return f"job {self.id} {self.cluster.job_state(self.id)}\n{text[-6000:]}\n{self.cluster.logs()}"


@pytest.fixture(scope="session")
def time_limit_job(tmp_path_factory, tiny_model: Path, demo_media: Path):
    """``sbatch --time=5 slurm/serve.sbatch`` on a private cluster; at the session's end, nothing of it
    is left (stop_service.py --all, then SIGKILL of what carries its run folder) and the cluster stops."""
    why = slurm_cluster.missing()
    if why:
        vllm_missing(why)  # under CI=true (root, scripts/test.sh installs SLURM): a failure there
    require("vllm")
    tmp = tmp_path_factory.mktemp("slurm")
    port, media_port = free_port(), free_port()
    run_dir = tmp / "run" / f"port-{port}"  # the service's own folder (settings/scope.py)
    cluster = slurm_cluster.Cluster().start()
    env = {
        **cluster.env,
        "CONFIG": str(DEMO_CONFIG),
        "PYTHON": sys.executable,
        "PORT": str(port),
        "MEDIA_PORT": str(media_port),
        "MODEL_PATH": str(tiny_model),
        "MEDIA_ROOT": str(demo_media),
        "RUN_DIR": str(run_dir.parent),
        "LOG_DIR": str(tmp / "logs"),
    }
    try:
        cpus = str(os.cpu_count() or 1)
        out = tmp / "job.out"
        submit = subprocess.run(
            ["sbatch", "--parsable", "--time=5", "--gpus-per-node=0", f"--cpus-per-task={cpus}",
             f"--output={out}", str(REPO / "slurm" / "serve.sbatch")],
            env=env, capture_output=True, text=True, timeout=30, cwd=REPO,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stderr
        yield Job(cluster, submit.stdout.strip().split(";")[0], env, out, port, media_port, run_dir)
    finally:  # whatever failed: nothing of the service outlives the session
        subprocess.run(
            [sys.executable, str(REPO / "stop_service.py"), "--config", env["CONFIG"], "--all"],
            env=env, capture_output=True, timeout=120, cwd=REPO,
        )  # fmt: skip
        for proc in ours(run_dir.resolve()):
            proc.kill()
        cluster.stop()


@pytest.mark.early
def test_sbatch_serves_with_the_jobs_preflight(time_limit_job: Job):
    job = time_limit_job
    base = f"http://127.0.0.1:{job.port}"
    up = wait_until(
        lambda: healthy(f"{base}/health", 2) or job.cluster.job_state(job.id) in ENDED, 240, step=1
    )
    assert up and healthy(f"{base}/health", 2), f"the service did not come up:\n{job.report()}"
    head = job.out.read_text()
    node = job.cluster.node
    assert f"job {job.id} on {node}" in head  # serve.sbatch's own line, and the preflight's:
    assert f"ok    SLURM     job {job.id} on {node} (partition test)" in head, head[:4000]
    # Its time left: from SLURM_JOB_END_TIME, or (where it is not exported, as in 22.05) from squeue.
    assert "time limit unknown" not in head and " left" in head.split("ok    SLURM", 1)[1].split("\n")[0]
    models = requests.get(f"{base}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "qwen3-vl-fp8"
    chat = requests.post(
        f"{base}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
        timeout=120,
    )
    assert chat.status_code == 200, chat.text


@pytest.mark.late
def test_the_time_limit_signal_stops_everything(time_limit_job: Job):
    # No scancel: SLURM itself warns the script 120 s before the 5-minute limit.
    job = time_limit_job
    assert wait_until(lambda: job.cluster.job_state(job.id) in ENDED, 420, step=2), job.report()
    assert job.cluster.job_state(job.id) == "COMPLETED", job.report()
    text = job.out.read_text()
    assert "stopping the service: SIGTERM (time limit or scancel)" in text, job.report()
    assert "the service was stopped" in text, job.report()
    assert not ours(job.run_dir.resolve()), job.report()
    assert port_free(job.port) and port_free(job.media_port), job.report()
