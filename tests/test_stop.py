"""stop_service.py against a real stand-in process tree, run as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from lifecycle_helpers import (
    PY,
    Standin,
    clean_env,
    free_port,
    gone,
    kill_pids,
    make_state,
    media_dir_of,
    run_dir_of,
    run_tool,
    start_decoy,
    start_fake_media_server,
    wait_until,
    write_config,
)
from skips import needs

from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.lifecycle import runstate
from qwen3_vl_service.machine import processes
from qwen3_vl_service.media.server import write_pid_file

pytestmark = pytest.mark.integration
needs_titles = needs("setproctitle")


@pytest.fixture
def cleanup():
    items: list = []
    yield items
    for item in items:
        if isinstance(item, Standin):
            item.cleanup()
        elif isinstance(item, subprocess.Popen):
            kill_pids([item.pid])
            item.wait(5)


@needs_titles
def test_stop_whole_tree_orphans_and_spares_decoys(tmp_path: Path, cleanup) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port=port)
    run_dir = run_dir_of(tmp_path)
    tag = runstate.new_tag()
    s = Standin(tmp_path, port=port, tag=tag, orphan=True)
    cleanup.append(s)
    pids = s.wait_ready()
    private_tmp = runstate.make_private_tmp(tag, base=tmp_path)
    s.write_state(private_tmp=private_tmp)

    # Orphan a worker: SIGKILL its parent, as a crash or `kill -9` would.
    os.kill(pids["spawner"], signal.SIGKILL)
    assert wait_until(lambda: gone(pids["spawner"]))
    assert pids["orphan"] not in {p.pid for p in processes.tree(pids["api"])}

    # Same titles, not ours: no tag at all, and another checkout's run dir.
    decoy = start_decoy("VLLM::EngineCore", clean_env())
    cleanup.append(decoy)
    other = start_decoy(
        "VLLM::Worker_TP0", clean_env(**{RUN_DIR_ENV: str(tmp_path / "other-run"), TAG_ENV: "x"})
    )
    cleanup.append(other)

    result = run_tool("stop_service.py", "--config", str(cfg), "--timeout", "3")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out

    ours = [pids["api"], pids["engine"], *pids["workers"], pids["orphan"]]
    for pid in ours:
        assert wait_until(lambda pid=pid: gone(pid), 2), f"pid {pid} survived stop:\n{out}"
    assert decoy.poll() is None and other.poll() is None, "stop touched a process that is not ours"

    # The TERM-ignoring worker needed SIGKILL, and the report says so.
    stubborn = pids["workers"][0]
    assert any(f"pid {stubborn}" in line and "SIGKILL" in line for line in out.splitlines()), out
    assert any(f"pid {pids['orphan']}" in line for line in out.splitlines()), out
    assert f"port 127.0.0.1:{port} is free" in out
    assert "stopped " in out and " s" in out  # "stopped N process(es) in X s"
    assert processes.port_holder("127.0.0.1", port) is None
    assert not runstate.exists(run_dir), "state file left behind"
    assert not Path(private_tmp).exists(), "private TMPDIR left behind"


def test_stop_with_nothing_running(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, port=free_port())
    result = run_tool("stop_service.py", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "nothing to stop" in result.stdout


def test_stop_removes_stale_state(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, port=free_port())
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    st = make_state(
        pid=dead.pid, create_time=1.0, tag="q3vl-stale", port=free_port(), config_path=str(cfg), detached=True
    )
    runstate.write(run_dir_of(tmp_path), st)
    result = run_tool("stop_service.py", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "nothing to stop" in result.stdout
    assert "stale state file" in result.stdout
    assert not runstate.exists(run_dir_of(tmp_path))


def test_stop_corrupt_state(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, port=free_port())
    run_dir_of(tmp_path).mkdir(parents=True)
    (run_dir_of(tmp_path) / "service.json").write_text("{garbage")
    result = run_tool("stop_service.py", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert not runstate.exists(run_dir_of(tmp_path))


@needs_titles
def test_stop_orphans_of_a_lost_state_file(tmp_path: Path, cleanup) -> None:
    """The API server was killed with SIGKILL and the state file lost: the EngineCore tree lives on."""
    port = free_port()
    cfg = write_config(tmp_path, port=port)
    s = Standin(tmp_path, port=port, tag=runstate.new_tag())
    cleanup.append(s)
    pids = s.wait_ready()
    os.kill(pids["api"], signal.SIGKILL)
    s.proc.wait(5)
    assert psutil.Process(pids["engine"]).is_running()
    result = run_tool("stop_service.py", "--config", str(cfg), "--timeout", "2")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "leftover" in out
    for pid in [pids["engine"], *pids["workers"]]:
        assert wait_until(lambda pid=pid: gone(pid), 2), out


@needs_titles
def test_stop_wiped_environ_by_group(tmp_path: Path, cleanup) -> None:
    """A vLLM started without SPT_NOENV, API server killed: its titled children are found by process group."""
    port = free_port()
    cfg = write_config(tmp_path, port=port)
    s = Standin(tmp_path, port=port, tag=runstate.new_tag(), keep_environ=False, new_session=True)
    cleanup.append(s)
    pids = s.wait_ready()
    s.write_state()
    os.kill(pids["api"], signal.SIGKILL)
    s.proc.wait(5)
    decoy = start_decoy("VLLM::EngineCore", clean_env())  # wiped environ too, but another group
    cleanup.append(decoy)
    result = run_tool("stop_service.py", "--config", str(cfg), "--timeout", "2")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for pid in [pids["engine"], *pids["workers"]]:
        assert wait_until(lambda pid=pid: gone(pid), 2), out
    assert decoy.poll() is None
    # The decoy is named as "looks like vLLM, not touched".
    assert f"pid {decoy.pid}" in out and "not touched" in out


def test_stop_all_stops_media_server_only_when_asked(tmp_path: Path, cleanup) -> None:
    media_port = free_port()
    cfg = write_config(tmp_path, port=free_port(), media_port=media_port)
    run_dir = media_dir_of(tmp_path, media_port)
    run_dir.mkdir(parents=True)
    media = start_fake_media_server()
    cleanup.append(media)
    write_pid_file(run_dir / processes.MEDIA_PID_FILE, media.pid)  # as the media server writes it
    assert wait_until(lambda: processes.media_server(run_dir) is not None)

    result = run_tool("stop_service.py", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert media.poll() is None, "plain stop must leave the media server running"

    result = run_tool("stop_service.py", "--config", str(cfg), "--all")
    assert result.returncode == 0, result.stderr
    assert media.wait(5) == 0
    assert f"pid {media.pid}" in result.stdout


def test_stop_all_refuses_pid_file_of_another_program(tmp_path: Path, cleanup) -> None:
    media_port = free_port()
    cfg = write_config(tmp_path, port=free_port(), media_port=media_port)
    run_dir = media_dir_of(tmp_path, media_port)
    run_dir.mkdir(parents=True)
    other = subprocess.Popen([PY, "-c", "import time; time.sleep(120)"], env=clean_env())
    cleanup.append(other)
    (run_dir / processes.MEDIA_PID_FILE).write_text(f"{other.pid}\n")
    result = run_tool("stop_service.py", "--config", str(cfg), "--all")
    assert result.returncode == 0, result.stderr
    assert other.poll() is None
    assert "media server was not running" in result.stdout


def test_stop_bad_usage(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, port=free_port())
    result = run_tool("stop_service.py", "--config", str(cfg), "--timeout", "soon")
    assert result.returncode == 2
    assert result.stderr.startswith("error:")


def test_stop_and_status_defer_to_the_node_that_runs_it(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, port=free_port())
    st = make_state(
        pid=os.getpid(),  # a live pid here, which must not be touched
        create_time=psutil.Process().create_time(),
        tag="q3vl-elsewhere",
        host="0.0.0.0",
        port=free_port(),
        config_path=str(cfg),
        detached=True,
        node="gpu-node-17",
    )
    runstate.write(run_dir_of(tmp_path), st)
    result = run_tool("stop_service.py", "--config", str(cfg))
    assert result.returncode == 1
    assert (
        "running on node gpu-node-17" in result.stderr and "run this command on gpu-node-17" in result.stderr
    )
    assert runstate.exists(run_dir_of(tmp_path))
    status = run_tool("status_service.py", "--config", str(cfg))
    assert status.returncode == 1
    assert "recorded as running on node gpu-node-17" in status.stdout
