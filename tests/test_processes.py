"""processes: finding ours by environment, TERM -> KILL, port and GPU holders."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pynvml
import pytest
from lifecycle_helpers import (
    PY,
    SLEEP,
    Standin,
    clean_env,
    free_port,
    gone,
    kill_pids,
    run_dir_of,
    start_decoy,
    wait_until,
)
from skips import needs

from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.lifecycle import runstate
from qwen3_vl_service.machine import processes
from qwen3_vl_service.media.server import write_pid_file

needs_titles = needs("setproctitle")

IGNORE_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(120)"
)


@pytest.mark.integration
def test_find_ours_by_run_dir_and_tag(tmp_path: Path, procs) -> None:
    run_dir = tmp_path / "run"
    a = procs(SLEEP, clean_env(**{RUN_DIR_ENV: str(run_dir), TAG_ENV: "t1"}))
    b = procs(SLEEP, clean_env(**{TAG_ENV: "t2"}))  # tag only
    other_checkout = procs(SLEEP, clean_env(**{RUN_DIR_ENV: str(tmp_path / "elsewhere"), TAG_ENV: "t3"}))
    untagged = procs(SLEEP)
    assert wait_until(lambda: all(psutil.Process(p.pid).environ() for p in (a, b)))
    by_dir = {p.pid for p in processes.find_ours(run_dir)}
    assert a.pid in by_dir
    assert b.pid not in by_dir and other_checkout.pid not in by_dir and untagged.pid not in by_dir
    by_tag = {p.pid for p in processes.find_ours(None, "t2")}
    assert by_tag == {b.pid}
    both = {p.pid for p in processes.find_ours(run_dir, "t2")}
    assert both == {a.pid, b.pid}
    with pytest.raises(ValueError):
        processes.find_ours(None, None)


@pytest.mark.integration
def test_find_ours_never_returns_itself_or_ancestors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    code = (
        "import sys; from qwen3_vl_service.machine import processes; "
        f"print(len(processes.find_ours({str(tmp_path)!r})))"
    )
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


@pytest.mark.integration
@needs_titles
def test_same_name_is_not_ours(tmp_path: Path) -> None:
    port = free_port()
    s = Standin(tmp_path, port=port, tag=runstate.new_tag())
    decoy = start_decoy("VLLM::EngineCore", clean_env())
    try:
        pids = s.wait_ready()
        ours = {p.pid for p in processes.find_ours(run_dir_of(tmp_path))}
        assert {pids["api"], pids["engine"], *pids["workers"]} <= ours
        assert decoy.pid not in ours
        assert psutil.Process(pids["engine"]).cmdline()[0] == "VLLM::EngineCore"
        assert psutil.Process(decoy.pid).cmdline()[0] == "VLLM::EngineCore"
    finally:
        s.cleanup()
        kill_pids([decoy.pid])
        decoy.wait(5)


@pytest.mark.integration
def test_tree(procs) -> None:
    code = (
        "import subprocess, sys, time; "
        f"c = subprocess.Popen([sys.executable, '-c', {SLEEP!r}]); print(c.pid, flush=True); time.sleep(120)"
    )
    parent = procs(code, stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    try:
        assert [p.pid for p in processes.tree(parent.pid)] == [parent.pid, child_pid]
        assert processes.tree(999_999_999) == []
    finally:
        kill_pids([child_pid])


@pytest.mark.integration
def test_terminate_reports_term_and_kill(procs) -> None:
    polite = procs(SLEEP)
    stubborn = procs(IGNORE_TERM, stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"
    result = processes.terminate([psutil.Process(polite.pid), psutil.Process(stubborn.pid)], timeout=1.0)
    assert [p.pid for p in result.terminated] == [polite.pid]
    assert [p.pid for p in result.killed] == [stubborn.pid]
    assert result.survivors == []
    assert 1.0 <= result.elapsed < 8
    # psutil reaped them (our children), so Popen sees no exit status: check the pids.
    assert gone(stubborn.pid) and gone(polite.pid)


@pytest.mark.integration
def test_terminate_without_kill_reports_survivor(procs) -> None:
    stubborn = procs(IGNORE_TERM, stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"
    result = processes.terminate([psutil.Process(stubborn.pid)], timeout=0.3, kill_after=False)
    assert [p.pid for p in result.survivors] == [stubborn.pid]
    assert stubborn.poll() is None


@pytest.mark.integration
def test_terminate_gone_and_zombie() -> None:
    p = subprocess.Popen([PY, "-c", "pass"], env=clean_env())  # not reaped until the end: a zombie
    try:
        p_obj = psutil.Process(p.pid)
        assert wait_until(lambda: p_obj.status() == psutil.STATUS_ZOMBIE)
        # A zombie (exited, not reaped) counts as gone: nothing to signal.
        assert not processes.is_alive(p_obj)
        result = processes.terminate([p_obj], timeout=1.0)
        assert result.stopped == [] and result.survivors == []
    finally:
        p.wait(5)


@pytest.mark.integration
def test_orphan_found_after_parent_sigkill(tmp_path: Path) -> None:
    s = Standin(tmp_path, port=free_port(), tag=runstate.new_tag(), orphan=True)
    try:
        pids = s.wait_ready()
        psutil.Process(pids["spawner"]).send_signal(signal.SIGKILL)
        assert wait_until(lambda: gone(pids["spawner"]))
        orphan = psutil.Process(pids["orphan"])
        assert wait_until(lambda: orphan.ppid() != pids["spawner"])
        assert pids["orphan"] not in {p.pid for p in processes.tree(pids["api"])}
        assert pids["orphan"] in {p.pid for p in processes.find_ours(run_dir_of(tmp_path))}
    finally:
        s.cleanup()


@pytest.mark.integration
def test_port_holder_listening_bound_and_free() -> None:
    port = free_port()
    assert processes.port_holder("127.0.0.1", port) is None
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        pid, cmd = processes.port_holder("0.0.0.0", port)
        assert pid == os.getpid()
        assert "python" in cmd or "pytest" in cmd
        (holder,) = processes.port_holders("127.0.0.1", port)
        assert holder.pid == os.getpid() and holder.describe().startswith(f"pid {os.getpid()} (")
        assert processes.port_holders("127.0.0.2", port) == []  # another address: not this listener
    assert processes.port_holder("127.0.0.1", port) is None


@pytest.mark.integration
def test_media_server_needs_pidfile_and_cmdline(tmp_path: Path, procs) -> None:
    fake_media = procs(SLEEP)  # a live pid that is not the media server
    (tmp_path / processes.MEDIA_PID_FILE).write_text(f"{fake_media.pid}\n")
    assert processes.media_server(tmp_path) is None
    code = "import sys, time; sys.argv[0]='media_server.py'; time.sleep(120)"
    media = subprocess.Popen([PY, "-c", code, "qwen3_vl_service.media"], env=clean_env())
    try:
        write_pid_file(tmp_path / processes.MEDIA_PID_FILE, media.pid)  # as the media server writes it
        assert processes.media_server(tmp_path).pid == media.pid
        (tmp_path / processes.MEDIA_PID_FILE).write_text("garbage")
        assert processes.media_server(tmp_path) is None
    finally:
        kill_pids([media.pid])
        media.wait(5)


@pytest.mark.integration
def test_describe_keeps_to_its_width(procs) -> None:
    p = psutil.Process(procs("import time; time.sleep(120)  # " + "x" * 200).pid)
    full = processes.describe(p)
    assert full.startswith(f"{Path(PY).name} -c import time") and 30 < len(full) <= 80
    for width in (30, 12):
        text = processes.describe(p, width)
        assert len(text) == width and text.endswith("…"), text


@pytest.mark.unit
def test_pid_file_has_one_format(tmp_path: Path) -> None:
    """What the media server writes (a bare pid) is what is read; anything else names no process."""
    path = tmp_path / "media_server.pid"
    write_pid_file(path, 4321)
    assert processes.read_pid_file(path) == 4321
    for text in ('{"pid": 4321}', "", "0", "-5", "garbage", "12abc"):
        path.write_text(text)
        assert processes.read_pid_file(path) is None, text


# ---------------------------------------------------------------------------
# NVML, faked at the hardware edge


def _fake_pynvml(procs_by_gpu: dict[int, list[tuple[int, int]]], *, init_error: Exception | None = None):
    mod = types.ModuleType("pynvml")
    mod.NVMLError = pynvml.NVMLError  # the real error class: what gpus.nvml_session catches
    state = {"init": 0, "shutdown": 0}

    def nvmlInit():
        if init_error:
            raise init_error
        state["init"] += 1

    mod.nvmlInit = nvmlInit
    mod.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)
    mod.nvmlDeviceGetCount = lambda: len(procs_by_gpu)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in procs_by_gpu[h]
    ]
    mod.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=70 * 2**30, total=80 * 2**30)
    mod.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    mod.state = state
    return mod


@pytest.mark.unit
def test_gpu_holders_with_fake_nvml(monkeypatch) -> None:
    fake = _fake_pynvml({0: [(100, 5 * 2**30), (200, 1)], 1: [(100, 2**64 - 1)], 2: []})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    holders = processes.gpu_holders([100, 300])
    assert holders == [
        processes.GpuHolder(gpu_index=0, pid=100, used_bytes=5 * 2**30),
        processes.GpuHolder(gpu_index=1, pid=100, used_bytes=None),  # "not available" sentinel
    ]
    assert fake.state == {"init": 1, "shutdown": 1}
    mem = processes.gpu_memory([100])
    assert [g.ours_bytes for g in mem] == [5 * 2**30, 0, 0]
    assert mem[0].name == "NVIDIA H100 80GB HBM3"


@pytest.mark.unit
def test_gpu_holders_without_nvml(monkeypatch) -> None:
    monkeypatch.setitem(
        sys.modules, "pynvml", _fake_pynvml({}, init_error=OSError("libnvidia-ml.so.1 not found"))
    )
    with pytest.raises(processes.NvmlUnavailable, match="libnvidia-ml"):
        processes.gpu_holders([1])
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    with pytest.raises(processes.NvmlUnavailable, match="not installed"):
        processes.gpu_memory()


@pytest.mark.integration
def test_gpu_holders_on_this_machine_never_crashes() -> None:
    """Real NVML here: either it works (GPU node: init, pid 1, holds no GPU memory) or it says why not."""
    try:
        holders = processes.gpu_holders([1])
    except processes.NvmlUnavailable as exc:
        assert str(exc)
    else:
        assert holders == []


@pytest.mark.integration
def test_wait_gone_times_out(procs) -> None:
    p = procs(SLEEP)
    t0 = time.monotonic()
    assert [x.pid for x in processes.wait_gone([psutil.Process(p.pid)], 0.3)] == [p.pid]
    assert time.monotonic() - t0 < 2


@pytest.mark.integration
@needs_titles
def test_wiped_environ_found_by_process_group(tmp_path: Path) -> None:
    """Without SPT_NOENV, setproctitle wipes the titled children's environment: the group finds them."""
    s = Standin(tmp_path, port=free_port(), tag=runstate.new_tag(), keep_environ=False, new_session=True)
    try:
        pids = s.wait_ready()
        engine = psutil.Process(pids["engine"])
        assert engine.environ() == {}, "setproctitle no longer wipes environ: simplify find_ours"
        titled = {pids["engine"], *pids["workers"]}
        by_env = {p.pid for p in processes.find_ours(run_dir_of(tmp_path))}
        assert pids["api"] in by_env and not titled & by_env
        started = psutil.Process(pids["api"]).create_time()
        found = processes.find_ours(run_dir_of(tmp_path), s.tag, group=pids["api"], group_started=started)
        assert titled <= {p.pid for p in found}
        # A live leader that is not the recorded start (another tag): the pid was reused.
        reused = processes.find_ours(
            run_dir_of(tmp_path), "q3vl-other", group=pids["api"], group_started=started
        )
        assert not titled & {p.pid for p in reused}
        # Unidentifiable vLLM-titled processes are listed, for the user to decide.
        assert titled <= {p.pid for p in processes.unidentified_vllm()}
    finally:
        s.cleanup()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "label"),
    [
        (["VLLM::EngineCore"], "VLLM::EngineCore"),
        (
            ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "x"],
            "python -m vllm.entrypoints.openai.api_server",
        ),
        (
            ["/usr/bin/python3", "-B", "-c", "from multiprocessing.resource_tracker import main;main(31)"],
            "python3 -c from multiprocessing.resource_tracker im…",
        ),
        (
            ["/usr/bin/python3", "-c", "\nimport time\ntime.sleep(1)\n"],
            "python3 -c import time; time.sleep(1)",
        ),
        (["/venv/bin/python", "/work/tests/standin_server.py", "--port", "1"], "python standin_server.py"),
        ([], "name"),
    ],
)
def test_labels(argv, label) -> None:
    assert processes.label_of(argv, "name") == label
