"""logtee: stdin -> terminal + rotated log file, surviving Ctrl+C, ending at EOF."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lifecycle_helpers import REPO, clean_env, gone, kill_pids, make_state, wait_until

from qwen3_vl_service.lifecycle import runstate
from qwen3_vl_service.machine import processes

pytestmark = pytest.mark.integration
PY = sys.executable


def tee(log: Path, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-m", "qwen3_vl_service.lifecycle.logtee", str(log), *args],
        stdin=subprocess.PIPE,
        stdout=stdout,
        cwd=REPO,
        env=clean_env(),
    )


def test_copies_bytes_to_stdout_and_lines_to_file(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "service.log"
    data = (
        b"INFO first line\n"
        b"windows line\r\n"
        b"Loading safetensors checkpoint shards:   0% Completed | 0/2 [00:00<?, ?it/s]\r"
        b"Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01]\r"
        b"Loading safetensors checkpoint shards: 100% Completed | 2/2 [00:02<00:00]\n"
        b"\x1b[32mINFO\x1b[0m coloured \xe2\x9c\x93 and invalid \xff utf-8\n"
        b"no newline at the end"
    )
    p = tee(log)
    out, _ = p.communicate(data, timeout=20)
    assert p.returncode == 0
    assert out == data  # the terminal gets the bytes unchanged (tqdm keeps its \r)
    assert log.read_text(encoding="utf-8").splitlines() == [
        "INFO first line",
        "windows line",
        "Loading safetensors checkpoint shards:   0% Completed | 0/2 [00:00<?, ?it/s]",
        "Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01]",
        "Loading safetensors checkpoint shards: 100% Completed | 2/2 [00:02<00:00]",
        "INFO coloured ✓ and invalid \ufffd utf-8",
        "no newline at the end",
    ]


def test_quiet_writes_only_the_file(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    p = tee(log, "--quiet")
    out, _ = p.communicate(b"hello\n", timeout=20)
    assert (p.returncode, out) == (0, b"")
    assert log.read_text() == "hello\n"


def test_appends_to_an_existing_log(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("earlier run\n")
    p = tee(log, "--quiet")
    p.communicate(b"this run\n", timeout=20)
    assert log.read_text() == "earlier run\nthis run\n"


def test_rotates_by_size(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    p = tee(log, "--max-bytes", "300", "--backups", "2", "--quiet")
    lines = [f"line {i:04d} " + "x" * 20 for i in range(100)]
    p.communicate(("\n".join(lines) + "\n").encode(), timeout=20)
    assert p.returncode == 0
    files = sorted(f.name for f in tmp_path.iterdir())
    assert files == ["service.log", "service.log.1", "service.log.2"]
    for f in tmp_path.iterdir():
        assert f.stat().st_size <= 300
    assert log.read_text().splitlines()[-1] == lines[-1]
    kept = (
        (tmp_path / "service.log.2").read_text() + (tmp_path / "service.log.1").read_text() + log.read_text()
    )
    assert kept.splitlines() == lines[-len(kept.splitlines()) :]  # in order, newest last


def test_no_backups_still_bounds_the_file(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    p = tee(log, "--max-bytes", "200", "--backups", "0", "--quiet")
    p.communicate(b"".join(b"line %04d abcdefghij\n" % i for i in range(100)), timeout=20)
    assert [f.name for f in tmp_path.iterdir()] == ["service.log"]
    assert log.stat().st_size <= 200
    assert log.read_text().splitlines()[-1] == "line 0099 abcdefghij"


def test_ignores_sigint_and_sigterm_and_ends_at_eof(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    p = tee(log, "--quiet")
    try:
        p.stdin.write(b"before\n")
        p.stdin.flush()
        assert wait_until(lambda: log.exists() and "before" in log.read_text())
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            p.send_signal(sig)
        time.sleep(0.3)
        assert p.poll() is None
        p.stdin.write(b"vLLM shutting down\n")
        p.stdin.close()
        assert p.wait(10) == 0
        assert log.read_text() == "before\nvLLM shutting down\n"
    finally:
        kill_pids([p.pid])


def test_keeps_the_file_when_the_terminal_goes(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    r, w = os.pipe()
    p = tee(log, stdout=w)
    os.close(w)
    os.close(r)  # the terminal is gone: writes to stdout fail with EPIPE
    p.stdin.write(b"".join(b"line %d\n" % i for i in range(2000)))
    p.stdin.close()
    assert p.wait(20) == 0
    assert len(log.read_text().splitlines()) == 2000


LAUNCHER = textwrap.dedent(
    """
    import os, sys
    from qwen3_vl_service.lifecycle import logtee
    proc = logtee.start_tee(sys.argv[1], max_bytes=10**6, backups=1)
    with open(sys.argv[2], "w") as fh:
        fh.write(str(proc.pid))
    print("launcher report: preflight ok", flush=True)
    child = (
        "import signal, sys, time\\n"
        "def bye(*a):\\n"
        "    print('vLLM: shutting down after Ctrl+C', flush=True); sys.exit(0)\\n"
        "signal.signal(signal.SIGINT, bye)\\n"
        "print('vLLM: serving', flush=True)\\n"
        "print('vLLM: to stderr', file=sys.stderr, flush=True)\\n"
        "time.sleep(60)\\n"
    )
    os.execvp(sys.executable, [sys.executable, "-c", child])
    """
)


def test_start_tee_then_exec_ctrl_c_reaches_vllm_and_is_recorded(tmp_path: Path) -> None:
    """The launcher's pattern: tee on a pipe, stdout/stderr onto it, exec; Ctrl+C to the whole group."""
    log = tmp_path / "service.log"
    tee_pid_file = tmp_path / "tee.pid"
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    p = subprocess.Popen(
        [PY, str(script), str(log), str(tee_pid_file)],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        start_new_session=True,  # its own process group, like a terminal job
    )
    tee_pid = None
    try:
        assert wait_until(lambda: log.exists() and "vLLM: serving" in log.read_text(), 20)
        tee_pid = int(tee_pid_file.read_text())
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl+C at the terminal does
        out, _ = p.communicate(timeout=20)
        assert p.returncode == 0
        assert wait_until(lambda: gone(tee_pid), 10), "the tee did not end at EOF"
        text = log.read_text()
        assert text.splitlines() == [
            "launcher report: preflight ok",
            "vLLM: serving",
            "vLLM: to stderr",
            "vLLM: shutting down after Ctrl+C",
        ]
        assert b"vLLM: shutting down after Ctrl+C" in out  # and the terminal saw it too
    finally:
        kill_pids([p.pid, tee_pid])
        p.wait(5)


RUN_LAUNCHER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from qwen3_vl_service.core.names import TAG_ENV
    from qwen3_vl_service.lifecycle import logtee, runstate
    sys.path.insert(0, sys.argv[4])
    from lifecycle_helpers import make_state
    run_dir, tag, case = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    private = runstate.make_private_tmp(tag, base=run_dir.parent)
    open(os.path.join(private, "vllm_dist_1"), "w").close()  # gloo's file store, say
    logtee.start_tee(run_dir / "service.log", max_bytes=10**6, backups=1, end=(run_dir, tag))
    runstate.write(run_dir, make_state(pid=os.getpid(), tag=tag, private_tmp=private))
    os.environ[TAG_ENV] = tag  # vLLM carries the run's tag (the launcher's own_env)
    child = (
        "import os, signal, subprocess, sys, time\\n"
        "case = sys.argv[1]\\n"
        "if case == 'a tagged process lives on':\\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\\n"
        "        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)\\n"
        "def bye(*a):\\n"
        "    print('vLLM: shut down', flush=True); sys.exit(0)\\n"
        "signal.signal(signal.SIGINT, bye)\\n"
        "print('vLLM: serving', flush=True)\\n"
        "time.sleep(60)\\n"
    )
    os.execvp(sys.executable, [sys.executable, "-c", child, case])
    """
)


@pytest.mark.parametrize("case", ["ours", "a newer run's state", "a tagged process lives on"])
def test_the_end_of_a_foreground_run_removes_its_private_folder_and_state(tmp_path: Path, case: str) -> None:
    """--end-of-run: at EOF (vLLM gone after Ctrl+C), the run's private temp folder and its state
    file go; not another run's state, and nothing while a process still carries the run's tag."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tag = "q3vl-20261206120000-0123456789ab"
    private = Path(runstate.private_tmp_path(tag, base=tmp_path))
    script = tmp_path / "launcher.py"
    script.write_text(RUN_LAUNCHER)
    p = subprocess.Popen(
        [PY, str(script), str(run_dir), tag, case, str(Path(__file__).parent)],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    left: list[int] = []
    try:
        assert wait_until(lambda: "vLLM: serving" in _text(run_dir / "service.log"), 20)
        assert private.is_dir() and runstate.read(run_dir).tag == tag
        if case == "a newer run's state":
            runstate.write(run_dir, make_state(tag="q3vl-20261206130000-ba9876543210"))
        if case == "a tagged process lives on":
            left = [proc.pid for proc in processes.find_tagged(tag) if proc.pid != p.pid]
            assert left, "the stand-in's own child carries the tag"
        os.killpg(p.pid, signal.SIGINT)
        assert p.wait(20) == 0
        assert wait_until(lambda: "vLLM: shut down" in _text(run_dir / "service.log"), 10)
        if case == "ours":
            assert wait_until(lambda: not private.exists() and runstate.read(run_dir) is None, 10)
        else:
            time.sleep(2)  # the tee has had its EOF: what it would remove is gone by now
            assert private.is_dir()
            state = runstate.read(run_dir)
            assert state is not None
            assert state.tag == (tag if left else "q3vl-20261206130000-ba9876543210")
    finally:
        kill_pids([p.pid, *left])
        p.wait(5)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_bad_arguments(tmp_path: Path) -> None:
    r = subprocess.run(
        [PY, "-m", "qwen3_vl_service.lifecycle.logtee", str(tmp_path / "x.log"), "--max-bytes", "-1"],
        cwd=REPO,
        capture_output=True,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2


# -- the log never stops the service ----------------------------------------------------


def test_a_full_disk_drops_lines_says_so_once_and_keeps_reading(tmp_path: Path) -> None:
    """/dev/full answers every write with ENOSPC, like a log folder whose disk filled."""
    p = subprocess.Popen(
        [PY, "-m", "qwen3_vl_service.lifecycle.logtee", "/dev/full", "--max-bytes", "0", "--quiet"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=clean_env(),
    )
    _, err = p.communicate(b"".join(b"vLLM line %d\n" % i for i in range(5000)), timeout=30)
    assert p.returncode == 0
    notices = err.decode().splitlines()
    assert len(notices) == 1, notices
    assert "cannot write /dev/full" in notices[0] and "No space left on device" in notices[0]
    assert "vLLM keeps running" in notices[0]


def test_a_file_size_limit_does_not_kill_the_tee(tmp_path: Path) -> None:
    """ulimit -f: the kernel sends SIGXFSZ (default action: terminate) and fails the write."""
    import resource

    log = tmp_path / "service.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    p = subprocess.Popen(
        [PY, "-m", "qwen3_vl_service.lifecycle.logtee", str(log), "--max-bytes", "0", "--quiet"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=clean_env(),
        preexec_fn=limit,
    )
    _, err = p.communicate(b"".join(b"line %04d\n" % i for i in range(1000)), timeout=30)
    assert p.returncode == 0, err
    assert 0 < log.stat().st_size <= 2000
    assert err.decode().count("cannot write") == 1, err


def test_a_removed_log_file_is_created_anew(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "service.log"
    p = subprocess.Popen(
        [PY, "-m", "qwen3_vl_service.lifecycle.logtee", str(log), "--quiet"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=clean_env(),
    )
    try:
        p.stdin.write(b"before\n")
        p.stdin.flush()
        assert wait_until(lambda: log.exists() and "before" in log.read_text())
        log.unlink()
        log.parent.rmdir()
        time.sleep(1.2)  # the tee looks at the file at most once a second
        p.stdin.write(b"after\n")
        p.stdin.close()
        assert p.wait(20) == 0
        assert log.read_text() == "after\n"
        err = p.stderr.read().decode()
        assert err.count("was removed or replaced") == 1, err
    finally:
        kill_pids([p.pid])


def test_a_stuck_terminal_never_blocks_the_writer_of_the_pipe(tmp_path: Path) -> None:
    """Nobody reads the tee's stdout (a paused terminal): vLLM's prints must not block.

    Without the queue, the tee would block in its write to the terminal after 64 KiB,
    stop reading, and vLLM would block once the pipe's 64 KiB filled.
    """
    import threading

    log = tmp_path / "service.log"
    r, w = os.pipe()  # never read: the "terminal" is full after 64 KiB
    p = subprocess.Popen(
        [PY, "-m", "qwen3_vl_service.lifecycle.logtee", str(log)],
        stdin=subprocess.PIPE,
        stdout=w,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=clean_env(),
    )
    os.close(w)

    def produce() -> None:
        line = b"x" * 1023 + b"\n"
        for _ in range(40 * 1024):  # 40 MiB, far more than the pipe and the queue hold
            p.stdin.write(line)
        p.stdin.close()

    producer = threading.Thread(target=produce, daemon=True)
    try:
        producer.start()
        producer.join(120)
        assert not producer.is_alive(), "the writer of the pipe was blocked"
        assert p.wait(30) == 0
        err = p.stderr.read().decode()
        assert err.count("dropping vLLM's output") == 1, err
        assert "byte(s) of output were dropped" in err
    finally:
        os.close(r)
        kill_pids([p.pid])
