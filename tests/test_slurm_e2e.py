"""slurm/serve.sbatch under a real SLURM: submitted with sbatch, serving, stopped at the time limit.

A private one-node cluster (tests/slurm_cluster.py: Debian's slurm-wlm and
munge, its own config, ports and folders) runs the batch script unchanged,
with the CPU demo: ``sbatch --time=5 slurm/serve.sbatch`` (the options a
cluster without GPUs needs given on the command line, as a user would). The
test checks that the job's preflight sees the job and its time left, that
the service answers, and that SLURM's warning signal before the time limit
(the script's ``--signal=B:TERM@120``) stops it through stop_service.py:
nothing of the service left, both ports free, the job COMPLETED.

About 3 minutes: the warning comes 120-180 s before the 5-minute limit
(SLURM may send it up to 60 s early), so the service has at least 2 minutes
to come up (about 45 s on two cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import slurm_cluster
from lifecycle_helpers import wait_until
from skips import vllm_missing
from test_e2e import _have_vllm, free_port, ours, port_free

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _healthy(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def cluster():
    why = slurm_cluster.missing()
    if why:
        vllm_missing(why)  # under CI=true (root, scripts/test.sh installs SLURM): a failure there
    c = slurm_cluster.Cluster().start()
    try:
        yield c
    finally:
        c.stop()


def test_sbatch_serves_and_the_time_limit_signal_stops_everything(cluster, tmp_path):
    if not _have_vllm():
        vllm_missing("vLLM is not installed here: run scripts/setup_env.sh (scripts/test.sh does)")
    from devtools import sample_media, tiny_model

    tiny_model.generate(tmp_path / "model")
    sample_media.write_samples(tmp_path / "media")
    port, media_port = free_port(), free_port()
    run_dir = tmp_path / "run" / f"port-{port}"  # the service's own folder (scope.py)
    out = tmp_path / "job.out"
    env = {
        **cluster.env,
        "CONFIG": str(REPO / "config.demo.env"),
        "PYTHON": sys.executable,
        "PORT": str(port),
        "MEDIA_PORT": str(media_port),
        "MODEL_PATH": str(tmp_path / "model"),
        "MEDIA_ROOT": str(tmp_path / "media"),
        "RUN_DIR": str(run_dir.parent),
        "LOG_DIR": str(tmp_path / "logs"),
    }
    try:
        _serve_until_the_time_limit(cluster, env, out, port, media_port, run_dir)
    finally:  # whatever failed: nothing of the service outlives the test
        subprocess.run(
            [sys.executable, str(REPO / "stop_service.py"), "--config", env["CONFIG"], "--all"],
            env=env, capture_output=True, timeout=120, cwd=REPO,
        )  # fmt: skip
        for proc in ours(run_dir.resolve()):
            proc.kill()


def _serve_until_the_time_limit(cluster, env, out: Path, port: int, media_port: int, run_dir: Path) -> None:
    cpus = str(os.cpu_count() or 1)
    submit = subprocess.run(
        ["sbatch", "--parsable", "--time=5", "--gpus-per-node=0", f"--cpus-per-task={cpus}",
         f"--output={out}", str(REPO / "slurm" / "serve.sbatch")],
        env=env, capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]

    def report() -> str:
        text = out.read_text(errors="replace") if out.exists() else "(no job output)"
        return f"job {job} {cluster.job_state(job)}\n{text[-6000:]}\n{cluster.logs()}"

    base = f"http://127.0.0.1:{port}"
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    up = wait_until(lambda: _healthy(f"{base}/health") or cluster.job_state(job) in ended, 240, step=1)
    assert up and _healthy(f"{base}/health"), f"the service did not come up:\n{report()}"
    head = out.read_text()
    assert f"job {job} on {cluster.node}" in head  # serve.sbatch's own line, and the preflight's:
    assert f"ok    SLURM     job {job} on {cluster.node} (partition test)" in head, head[:4000]
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

    # No scancel: SLURM itself warns the script 120 s before the 5-minute limit.
    assert wait_until(lambda: cluster.job_state(job) in ended, 300, step=2), report()
    assert cluster.job_state(job) == "COMPLETED", report()
    text = out.read_text()
    assert "stopping the service: SIGTERM (time limit or scancel)" in text, report()
    assert "the service was stopped" in text, report()
    assert not ours(run_dir.resolve()), report()
    assert port_free(port) and port_free(media_port), report()
