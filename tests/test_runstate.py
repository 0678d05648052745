"""runstate: atomic state file, staleness, double-start refusal."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
from pathlib import Path

import psutil
import pytest
from lifecycle_helpers import PY, clean_env, environ_of, kill_pids, make_state
from skips import require

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.lifecycle import runstate

# ---------------------------------------------------------------------------
# The file


@pytest.mark.unit
def test_write_read_roundtrip_and_mode(tmp_path: Path) -> None:
    st = make_state(node="node-1", slurm_job_id="12")
    path = runstate.write(tmp_path / "run", st)
    assert path == tmp_path / "run" / "service.json"
    assert runstate.read(tmp_path / "run") == st
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["service.json"], "temp file left behind"


@pytest.mark.unit
def test_write_replaces_atomically(tmp_path: Path) -> None:
    runstate.write(tmp_path, make_state(pid=1))
    inode = (tmp_path / "service.json").stat().st_ino
    runstate.write(tmp_path, make_state(pid=2))
    assert runstate.read(tmp_path).pid == 2
    # A new file renamed over the old one, never the old one rewritten in place.
    assert (tmp_path / "service.json").stat().st_ino != inode


@pytest.mark.unit
@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "[]",
        '{"pid": 1}',
        json.dumps({**dataclasses.asdict(make_state()), "pid": "12"}),
        json.dumps({**dataclasses.asdict(make_state()), "pid": -4}),
        json.dumps({**dataclasses.asdict(make_state()), "detached": "no"}),
        json.dumps({**dataclasses.asdict(make_state()), "started_at": 1e20}),  # past any datetime
        json.dumps({**dataclasses.asdict(make_state()), "create_time": float("nan")}),
        json.dumps({**dataclasses.asdict(make_state()), "create_time": float("inf")}),
        b"\xff\xfe garbage".decode("latin-1"),
    ],
)
def test_corrupt_state_reads_as_none(tmp_path: Path, content: str) -> None:
    (tmp_path / "service.json").write_text(content, encoding="latin-1")
    assert runstate.read(tmp_path) is None
    assert runstate.exists(tmp_path)
    runstate.check_not_running(tmp_path)  # corrupt = stale: no traceback, no refusal
    assert runstate.clear_corrupt(tmp_path)
    assert not runstate.exists(tmp_path)


@pytest.mark.unit
def test_missing_state(tmp_path: Path) -> None:
    assert runstate.read(tmp_path / "nowhere") is None
    assert not runstate.clear(tmp_path / "nowhere", "x")


@pytest.mark.unit
def test_clear_only_by_owner(tmp_path: Path) -> None:
    runstate.write(tmp_path, make_state(tag="mine"))
    assert not runstate.clear(tmp_path, "someone-else")
    assert runstate.read(tmp_path) is not None
    assert runstate.clear(tmp_path, "mine")
    assert runstate.read(tmp_path) is None


@pytest.mark.unit
def test_new_tag_unique() -> None:
    tags = {runstate.new_tag() for _ in range(200)}
    assert len(tags) == 200
    assert all(t.startswith("q3vl-") for t in tags)


@pytest.mark.unit
def test_private_tmp_removed_only_when_ours(tmp_path: Path) -> None:
    tmp = runstate.make_private_tmp("q3vl-20250101-abcdef123456", base=tmp_path)
    assert Path(tmp).name.startswith(runstate.PRIVATE_TMP_PREFIX)
    assert stat.S_IMODE(Path(tmp).stat().st_mode) == 0o700
    (Path(tmp) / "ipc-socket").write_text("x")
    other = tmp_path / "not-ours"
    other.mkdir()
    link = tmp_path / f"{runstate.PRIVATE_TMP_PREFIX}link"
    link.symlink_to(other)
    assert not runstate.remove_private_tmp(str(other))
    assert not runstate.remove_private_tmp(str(link))
    assert not runstate.remove_private_tmp("")
    assert other.exists() and link.exists()
    assert runstate.remove_private_tmp(tmp)
    assert not Path(tmp).exists()


@pytest.mark.unit
def test_private_tmp_path_is_short_enough_for_ipc_sockets() -> None:
    tmp = runstate.make_private_tmp(runstate.new_tag())
    try:
        # vLLM adds ~40 characters of socket name; a Unix socket path holds 107 bytes.
        assert len(tmp) < 60
    finally:
        runstate.remove_private_tmp(tmp)


# ---------------------------------------------------------------------------
# Liveness, with real processes


@pytest.mark.integration
def test_live_process_checks_pid_time_and_tag(tmp_path: Path, procs) -> None:
    tag = runstate.new_tag()
    proc = procs(env=clean_env(**{TAG_ENV: tag, RUN_DIR_ENV: str(tmp_path)}))
    ct = psutil.Process(proc.pid).create_time()
    assert runstate.live_process(make_state(pid=proc.pid, create_time=ct, tag=tag)).pid == proc.pid
    # Same pid and time but another tag: not the recorded start.
    assert runstate.live_process(make_state(pid=proc.pid, create_time=ct, tag="q3vl-other")) is None
    # The tag decides where it can be read: a wall-clock step that shifts psutil's
    # start times does not make a running service look stale.
    assert runstate.live_process(make_state(pid=proc.pid, create_time=ct - 3600, tag=tag)).pid == proc.pid


@pytest.mark.integration
def test_live_process_wiped_environ_uses_start_time() -> None:
    """setproctitle without SPT_NOENV wipes /proc/<pid>/environ: then the start time decides."""
    require("setproctitle")
    code = (
        "import setproctitle, time; setproctitle.setproctitle('VLLM::APIServer'); "
        "print('ok', flush=True); time.sleep(120)"
    )
    p = subprocess.Popen([PY, "-c", code], env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ok"
        assert environ_of(p.pid) == {}
        ct = psutil.Process(p.pid).create_time()
        assert runstate.live_process(make_state(pid=p.pid, create_time=ct, tag="q3vl-any")).pid == p.pid
        assert runstate.live_process(make_state(pid=p.pid, create_time=ct - 3600, tag="q3vl-any")) is None
    finally:
        kill_pids([p.pid])
        p.wait(5)


@pytest.mark.integration
def test_live_process_untagged_program_on_recorded_pid(procs) -> None:
    proc = procs(env=clean_env())
    ct = psutil.Process(proc.pid).create_time()
    assert runstate.live_process(make_state(pid=proc.pid, create_time=ct, tag="q3vl-x")) is None


@pytest.mark.integration
def test_live_process_dead_pid() -> None:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    assert runstate.live_process(make_state(pid=p.pid, create_time=0.0)) is None


@pytest.mark.integration
def test_check_not_running_refuses_second_start(tmp_path: Path, procs) -> None:
    run_dir = tmp_path / "run"
    tag = runstate.new_tag()
    proc = procs(env=clean_env(**{TAG_ENV: tag, RUN_DIR_ENV: str(run_dir)}))
    st = make_state(pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), tag=tag)
    runstate.write(run_dir, st)
    with pytest.raises(CheckFailed) as info:
        runstate.check_not_running(run_dir)
    expected = f"service already running (pid {proc.pid}, since {st.started_at})"
    assert str(info.value) == f"{expected}; stop it with .venv/bin/python stop_service.py"
    assert info.value.exit_code == 1


@pytest.mark.integration
def test_stale_state_is_replaced(tmp_path: Path, procs) -> None:
    run_dir = tmp_path / "run"
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    runstate.write(run_dir, make_state(pid=dead.pid, create_time=1.0, tag="q3vl-old"))
    # A pid reused by another program (alive, but not the recorded one) is stale too.
    other = procs(env=clean_env())
    runstate.check_not_running(run_dir)
    runstate.write(run_dir, make_state(pid=other.pid, create_time=1.0, tag="q3vl-old2"))
    runstate.check_not_running(run_dir)

    tag = runstate.new_tag()
    new = procs(env=clean_env(**{TAG_ENV: tag, RUN_DIR_ENV: str(run_dir)}))
    runstate.write(
        run_dir, make_state(pid=new.pid, create_time=psutil.Process(new.pid).create_time(), tag=tag)
    )
    assert runstate.read(run_dir).tag == tag
    with pytest.raises(CheckFailed):
        runstate.check_not_running(run_dir)


@pytest.mark.integration
def test_check_not_running_refuses_leftovers_without_state(tmp_path: Path, procs) -> None:
    run_dir = tmp_path / "run"
    orphan = procs(env=clean_env(**{TAG_ENV: "q3vl-lost", RUN_DIR_ENV: str(run_dir)}))
    with pytest.raises(CheckFailed) as info:
        runstate.check_not_running(run_dir)
    assert f"{orphan.pid}" in str(info.value)
    assert "earlier run" in str(info.value)
    assert "stop_service.py" in str(info.value)
    # Processes of another checkout (another RUN_DIR) do not count.
    runstate.check_not_running(tmp_path / "other-run")


@pytest.mark.unit
def test_write_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        runstate.write(tmp_path, make_state())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_tolerated_spellings(tmp_path: Path) -> None:
    """A Unix time for started_at and null paths read fine (not as a corrupt, stale file)."""
    data = {
        **dataclasses.asdict(make_state()),
        "started_at": 1764410400.5,
        "config_path": None,
        "private_tmp": None,
    }
    (tmp_path / "service.json").write_text(json.dumps(data))
    st = runstate.read(tmp_path)
    assert st is not None
    assert st.config_path == "" and st.private_tmp == ""
    assert st.started_at.startswith("2025-11-29T")


@pytest.mark.unit
def test_launcher_tmp_prefix_is_removed(tmp_path: Path) -> None:
    d = tmp_path / "qwen3vl-abcdef12-xyz"
    d.mkdir()
    assert runstate.remove_private_tmp(str(d))
    assert not d.exists()


# ---------------------------------------------------------------------------
# RUN_DIR on a file system shared by several nodes


def _fake_squeue(tmp_path: Path, *, stdout: str = "", stderr: str = "", rc: int = 0) -> dict[str, str]:
    """A `squeue` on PATH (SLURM itself is not here): the edge of the system, faked."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "squeue"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nprintf '%s' '{stderr}' >&2\nexit {rc}\n")
    script.chmod(0o755)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.unit
def test_write_records_node_and_job(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    runstate.write(tmp_path, make_state())
    st = runstate.read(tmp_path)
    assert st.node == runstate.this_node()
    assert st.slurm_job_id == "4242"
    assert runstate.other_node(st) is None


@pytest.mark.unit
def test_state_of_another_node_refuses_start(tmp_path: Path, monkeypatch) -> None:
    runstate.write(tmp_path, make_state(pid=os.getpid(), node="gpu-node-17"))
    st = runstate.read(tmp_path)
    assert runstate.other_node(st) == "gpu-node-17"
    assert runstate.live_process(st) is None  # its pid means nothing here
    with pytest.raises(CheckFailed) as info:
        runstate.check_not_running(tmp_path)
    assert "running on node gpu-node-17" in str(info.value)
    assert str(runstate.state_path(tmp_path)) in str(info.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("squeue", "refused"),
    [
        ({"stdout": "RUNNING\n"}, True),
        ({"stdout": ""}, False),  # the job left the queue
        ({"stderr": "slurm_load_jobs error: Invalid job id specified", "rc": 1}, False),
        ({"stderr": "slurm_load_jobs error: Unable to contact slurm controller", "rc": 1}, True),
    ],
)
def test_state_of_another_node_and_its_job(tmp_path: Path, monkeypatch, squeue, refused) -> None:
    monkeypatch.setenv("PATH", _fake_squeue(tmp_path, **squeue)["PATH"])
    runstate.write(tmp_path / "run", make_state(node="gpu-node-17", slurm_job_id="777"))
    if refused:
        with pytest.raises(CheckFailed, match="SLURM job 777"):
            runstate.check_not_running(tmp_path / "run")
    else:
        runstate.check_not_running(tmp_path / "run")  # that job ended: stale
