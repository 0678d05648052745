"""slurm/serve.sbatch run by bash (no SLURM here): the TERM trap stops the service through stop_service.py.

A temporary "checkout" holds the real stop_service.py and a start_service.py
that behaves like the launcher (writes the run state, execs a stand-in vLLM
tree carrying the tag), so the batch script's signal handling is exercised
with real processes: the time-limit warning (``--signal=B:TERM@120``) is a
SIGTERM to the batch shell.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
from lifecycle_helpers import (
    PY,
    REPO,
    STANDIN,
    clean_env,
    free_port,
    gone,
    kill_pids,
    run_dir_of,
    wait_until,
    write_config,
)

from qwen3_vl_service.lifecycle import runstate
from qwen3_vl_service.machine import processes

pytestmark = pytest.mark.integration
SBATCH = REPO / "slurm" / "serve.sbatch"

FAKE_LAUNCHER = textwrap.dedent(
    """
    # Does what start_service.py does after its checks: state, then exec "vLLM".
    import os, sys
    import psutil
    from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
    from qwen3_vl_service.lifecycle import runstate
    from qwen3_vl_service.machine.processes import TITLE_ENV
    from qwen3_vl_service.settings import config, scope

    cfg = config.load(sys.argv[sys.argv.index("--config") + 1])
    run_dir = scope.paths(cfg).run_dir
    runstate.check_not_running(run_dir)
    tag = runstate.new_tag()
    me = psutil.Process()
    runstate.write(run_dir, runstate.RunState(
        pid=me.pid, create_time=me.create_time(), tag=tag, host=cfg.host, port=cfg.port,
        media_host=cfg.media_host, media_port=cfg.media_port, model=str(cfg.model_path),
        served_model_name=cfg.served_model_name, started_at=runstate.now_iso(),
        config_path=str(cfg.config_path), log_file="", private_tmp="", detached=False))
    env = dict(os.environ, **TITLE_ENV, **{TAG_ENV: tag, RUN_DIR_ENV: str(run_dir)})
    argv = [sys.executable, STANDIN, "--port", str(cfg.port), "--pids-file", PIDS]
    os.execve(sys.executable, argv, env)
    """
)


def test_bash_syntax() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def test_sbatch_requests_and_signal() -> None:
    text = SBATCH.read_text()
    for line in ("--gpus-per-node=8", "--signal=B:TERM@120", "--nodes=1", "--exclusive"):
        assert f"#SBATCH {line}" in text


@pytest.mark.parametrize("who", ["batch shell", "whole job"])
def test_term_stops_the_service(tmp_path: Path, who: str) -> None:
    """ "batch shell": the time-limit warning (or scancel --batch); "whole job": plain scancel."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "logs").mkdir()
    shutil.copy(REPO / "stop_service.py", checkout / "stop_service.py")
    pids_file = tmp_path / "pids.json"
    (checkout / "start_service.py").write_text(
        f"STANDIN = {str(STANDIN)!r}\nPIDS = {str(pids_file)!r}\n" + FAKE_LAUNCHER
    )
    port = free_port()
    cfg = write_config(tmp_path, port=port, MEDIA_SERVER="false")
    env = clean_env(
        QWEN3_VL_REPO=str(checkout),
        PYTHON=PY,
        CONFIG=str(cfg),
        PYTHONPATH=str(REPO),
        SLURM_JOB_ID="4242",
        # The script's own setting for stop_service.py --timeout: the stand-in's Worker_TP0 ignores
        # SIGTERM, and its SIGKILL comes after min(10, timeout) s, not stop's default 10.
        STOP_TIMEOUT="3",
    )
    out_file = tmp_path / "slurm.out"
    with open(out_file, "wb") as out:
        job = subprocess.Popen(
            ["bash", str(SBATCH)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    pids: dict = {}
    try:
        assert wait_until(lambda: pids_file.exists() or job.poll() is not None, 30), out_file.read_text()
        assert job.poll() is None, out_file.read_text()
        import json

        pids = json.loads(pids_file.read_text())
        assert runstate.read(run_dir_of(tmp_path)).slurm_job_id == "4242"

        if who == "batch shell":
            job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
        else:
            os.killpg(job.pid, signal.SIGTERM)  # scancel: every process of the job
        assert job.wait(60) == 0, out_file.read_text()
        text = out_file.read_text()
        assert "stopping the service: SIGTERM (time limit or scancel)" in text
        assert "the service was stopped" in text
        assert "SIGKILL after 3 s" in text  # STOP_TIMEOUT reached stop_service.py
        for pid in [pids["api"], pids["engine"], *pids["workers"]]:
            assert wait_until(lambda pid=pid: gone(pid), 30), text
        assert processes.port_holder("127.0.0.1", port) is None
        assert not runstate.exists(run_dir_of(tmp_path))
        assert text.count("stopping the service") == 1  # the EXIT trap did not stop it twice
    finally:
        kill_pids(
            [job.pid, *[p for p in (pids.get("api"), pids.get("engine"), *pids.get("workers", [])) if p]]
        )
        job.wait(5)
        for p in processes.find_ours(run_dir_of(tmp_path)):
            kill_pids([p.pid])


def test_missing_checkout_is_refused(tmp_path: Path) -> None:
    env = clean_env(QWEN3_VL_REPO=str(tmp_path))
    r = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "no start_service.py" in r.stderr
    assert os.listdir(tmp_path) == []
