"""supervisor: the restart policy, the loop (with units made of plain code), the record, the command."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from lifecycle_helpers import REPO, clean_env, kill_pids, wait_until

from qwen3_vl_service.core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from qwen3_vl_service.core.names import TAG_ENV
from qwen3_vl_service.lifecycle import supervisor
from qwen3_vl_service.lifecycle.supervisor import Failures, Policy, Record, Supervisor


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(supervisor, "CHECK_S", 0.01)


# -- the policy ---------------------------------------------------------------------------


@pytest.mark.unit
def test_backoff_doubles_and_the_failure_after_max_restarts_gives_up():
    f = Failures(Policy(max_restarts=3, window=60, backoff=2))
    assert [f.add(t) for t in (0, 1, 2)] == [2, 4, 8]
    assert f.add(3) is None


@pytest.mark.unit
def test_failures_older_than_the_window_are_forgotten():
    f = Failures(Policy(max_restarts=1, window=10, backoff=1))
    assert f.add(0) == 1
    assert f.add(11) == 1  # the first one left the window
    assert f.add(12) is None


@pytest.mark.unit
def test_no_restarts_allowed_gives_up_at_the_first_failure():
    assert Failures(Policy(max_restarts=0, window=10, backoff=1)).add(0) is None


@pytest.mark.unit
def test_backoff_is_capped():
    f = Failures(Policy(max_restarts=100, window=1e9, backoff=60))
    delays = [f.add(t) for t in range(10)]
    assert max(delays) == supervisor.BACKOFF_CAP_S


# -- the loop -----------------------------------------------------------------------------


class Unit:
    """A unit whose failures the test scripts: check() returns the next scripted cause."""

    def __init__(self, name: str, causes=(), after=None) -> None:
        self.name = name
        self.causes = list(causes)
        self.after = after  # called when the causes run out (e.g. to stop the supervisor)
        self.log: list[str] = []

    def start(self) -> None:
        self.log.append("start")

    def check(self, now: float):
        if self.causes:
            return self.causes.pop(0)
        if self.after:
            self.after()
            self.after = None
        return None

    def cleanup(self) -> None:
        self.log.append("cleanup")

    def stop(self) -> None:
        self.log.append("stop")


def _run(units, tmp_path: Path, policy=None, **kw):
    policy = policy or Policy(max_restarts=2, window=60, backoff=0)
    record = Record(tmp_path / "supervisor.json", tag="q3vl-test", policy=policy)
    lines: list[str] = []
    sup = Supervisor(units, policy, record, echo=lines.append)
    return sup, lines


def _stop_soon(sup: Supervisor, sig=signal.SIGTERM):
    return lambda: sup._on_signal(sig, None)


@pytest.mark.unit
def test_a_failed_unit_is_cleaned_up_restarted_and_recorded(tmp_path):
    u = Unit("vLLM", causes=[None, "VLLM::EngineCore (pid 42) is gone"])
    sup, lines = _run([u], tmp_path)
    u.after = _stop_soon(sup)
    assert sup.run() == EXIT_OK
    assert u.log == ["start", "cleanup", "start", "stop"]
    rec = json.loads((tmp_path / "supervisor.json").read_text())
    assert rec["restarts"] == 1 and rec["state"] == "stopped"
    assert rec["last_cause"] == "vLLM: VLLM::EngineCore (pid 42) is gone"
    assert rec["history"][0]["cause"] == "VLLM::EngineCore (pid 42) is gone"
    assert any("restarting vLLM in 0 s (restart 1 of at most 2" in line for line in lines)


@pytest.mark.unit
def test_a_crash_loop_gives_up_with_the_cause_and_exit_1(tmp_path, capsys):
    u = Unit("vLLM", causes=["exited with status 1"] * 5)
    media = Unit("media server")
    sup, _ = _run([media, u], tmp_path)
    assert sup.run() == EXIT_FAILED
    assert u.log == ["start", "cleanup", "start", "cleanup", "start", "cleanup"]  # 3 tries, then cleaned up
    assert media.log == ["start", "stop"]  # the others are stopped as on a stop request
    rec = json.loads((tmp_path / "supervisor.json").read_text())
    assert rec["state"] == "gave up" and rec["restarts"] == 2
    assert (
        "vLLM failed 3 times within 60 s (MAX_RESTARTS=2); last cause: exited with status 1" in rec["gave_up"]
    )
    assert "gave up" in capsys.readouterr().err


@pytest.mark.unit
def test_a_stop_during_the_backoff_restarts_nothing(tmp_path):
    u = Unit("vLLM", causes=["exited with status -9"])
    policy = Policy(max_restarts=3, window=60, backoff=30)
    sup, _ = _run([u], tmp_path, policy=policy)
    threading.Timer(0.3, _stop_soon(sup, signal.SIGINT)).start()
    t0 = time.monotonic()
    assert sup.run() == EXIT_INTERRUPTED
    assert time.monotonic() - t0 < 20, "the backoff was not interrupted"
    assert u.log == ["start", "cleanup", "stop"]


@pytest.mark.unit
def test_a_clean_exit_is_no_failure_the_supervisor_ends_with_0(tmp_path):
    class Stopped(Unit):
        def check(self, now: float):
            raise supervisor.Finished("vLLM (pid 7) exited by itself with status 0")

    media, u = Unit("media server"), Stopped("vLLM")
    sup, lines = _run([media, u], tmp_path)
    assert sup.run() == EXIT_OK
    assert u.log == ["start", "stop"] and media.log == ["start", "stop"]
    assert any("exited by itself with status 0; not restarted" in line for line in lines)
    assert json.loads((tmp_path / "supervisor.json").read_text())["restarts"] == 0


@pytest.mark.unit
def test_units_stop_in_reverse_order(tmp_path):
    order: list[str] = []

    class Named(Unit):
        def stop(self) -> None:
            order.append(self.name)

    a, b = Named("media server"), Named("vLLM")
    sup, _ = _run([a, b], tmp_path)
    b.after = _stop_soon(sup)
    sup.run()
    assert order == ["vLLM", "media server"]


# -- the record, seen from stop and status -------------------------------------------------


@pytest.mark.integration
def test_status_and_request_stop_find_the_recorded_supervisor_by_its_tag(tmp_path):
    from qwen3_vl_service.core.names import TAG_ENV

    code = (
        "import sys, time, signal\n"
        "from pathlib import Path\n"
        "from qwen3_vl_service.lifecycle.supervisor import Policy, Record\n"
        # The handler before the record: a stop that finds the
        # record must find the handler too (SIGTERM's default would end it with -15).
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "r = Record(Path(sys.argv[1]), tag='q3vl-t1', policy=Policy(1, 60, 1))\n"
        "r.update(state='running')\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "supervisor.json")],
        env=clean_env(**{TAG_ENV: "q3vl-t1", "PYTHONPATH": str(REPO)}),
    )
    try:
        assert wait_until(lambda: (tmp_path / "supervisor.json").exists(), 20)
        st = supervisor.status(tmp_path)
        assert st["running"] and st["state"] == "running" and st["pid"] == p.pid
        assert supervisor.request_stop(tmp_path).pid == p.pid
        assert p.wait(10) == 0
        assert supervisor.status(tmp_path)["state"] == "gone (killed?)"
        assert supervisor.request_stop(tmp_path) is None
    finally:
        kill_pids([p.pid])


@pytest.mark.integration
def test_a_reused_pid_is_not_the_supervisor(tmp_path, procs):
    other = procs()  # a process of ours without the tag
    (tmp_path / "supervisor.json").write_text(
        json.dumps({"pid": other.pid, "tag": "q3vl-x", "state": "running"})
    )
    assert supervisor.live(tmp_path) is None
    assert supervisor.request_stop(tmp_path) is None
    assert other.poll() is None


@pytest.mark.integration
def test_the_command_refuses_to_run_without_the_tag(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen3_vl_service.lifecycle.supervised",
            "--deployment",
            "x.json",
            "--unit",
            "vllm",
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert f"{TAG_ENV} is not set" in r.stderr and "start_service.py" in r.stderr


@pytest.mark.unit
def test_settings_are_validated_in_config(tmp_path):
    from qwen3_vl_service.core.errors import ConfigError
    from qwen3_vl_service.settings.config import load

    cfg = load(None, environ={"RESTART": "no", "MAX_RESTARTS": "5", "HEALTH_FAIL_AFTER": "30"})
    assert (cfg.restart, cfg.max_restarts, cfg.health_fail_after) == ("no", 5, 30)
    for key, bad in (("RESTART", "always"), ("MAX_RESTARTS", "-1"), ("HEALTH_FAIL_AFTER", "1")):
        with pytest.raises(ConfigError, match=key):
            load(None, environ={key: bad})


# -- defects found by review (issue 23): each test failed on the code before the fix ------------


def _locks_taken(call) -> list[str]:
    """The locks CALL acquires (C-level acquire/__enter__ on a lock object), seen by a profiler."""
    taken: list[str] = []

    def profile(_frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") in ("acquire", "__enter__"):
            owner = type(getattr(arg, "__self__", None)).__name__
            if "lock" in owner.lower():
                taken.append(f"{owner}.{arg.__name__}")

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return taken


@pytest.mark.unit
def test_the_signal_handler_takes_no_lock(tmp_path):
    """A handler runs between two bytecodes of the main thread: one that takes a lock the interrupted
    code holds (Event.set() takes its Condition's Lock, which wait() and clear() hold) waits for
    itself for ever. The handler may only queue the signal and write a byte to a pipe."""
    sup, _ = _run([Unit("vLLM")], tmp_path)
    assert _locks_taken(lambda: sup._on_signal(signal.SIGTERM, None)) == []
    assert list(sup.signals) == [signal.SIGTERM]
    assert sup._wait(5.0)  # and the loop sees it at once


@pytest.mark.unit
def test_an_error_in_the_loop_stops_what_it_started(tmp_path):
    """An unexpected exception (a bug) used to end the supervisor with 'internal error' and vLLM
    running on in its own session, unsupervised: now what was started is stopped first."""

    class Broken(Unit):
        def check(self, now: float):
            raise RuntimeError("a bug")

    media, u = Unit("media server"), Broken("vLLM")
    sup, lines = _run([media, u], tmp_path)
    with pytest.raises(RuntimeError, match="a bug"):
        sup.run()
    assert u.log == ["start", "stop"] and media.log == ["start", "stop"]
    assert any("internal error in the supervisor (RuntimeError: a bug)" in line for line in lines)
    assert json.loads((tmp_path / "supervisor.json").read_text())["state"] == "stopped"


@pytest.mark.unit
def test_a_record_that_cannot_be_written_does_not_stop_the_supervision(tmp_path, capsys):
    """A full disk (here: the record's folder is a file) made the record's write raise out of the
    loop, which left vLLM unsupervised. The record is what status shows: supervising goes on."""
    blocked = tmp_path / "run"
    blocked.write_text("a file where the record's folder should be")
    u = Unit("vLLM", causes=[None, "VLLM::EngineCore (pid 42) is gone"])
    policy = Policy(max_restarts=2, window=60, backoff=0)
    sup = Supervisor([u], policy, Record(blocked / "supervisor.json", tag="t", policy=policy), echo=print)
    u.after = _stop_soon(sup)
    assert sup.run() == EXIT_OK
    assert u.log == ["start", "cleanup", "start", "stop"]  # restarted, then stopped on the signal
    err = capsys.readouterr().err
    assert err.count("cannot write the supervisor's record") == 1 and "supervising goes on" in err


# A supervisor whose second start of its unit is slow (the start of a new vLLM after a failure:
# folders, the command, then Popen) and whose stop is graceful (in-flight requests finish).
_SLOW_RESTART = """
import os, subprocess, sys, time
from pathlib import Path
from qwen3_vl_service.core.names import TAG_ENV
from qwen3_vl_service.lifecycle.supervisor import Policy, Record, Supervisor
run_dir = Path(sys.argv[1])

class Slow:
    name = "vLLM"
    def __init__(self):
        self.child, self.starts, self.failed = None, 0, False
    def start(self):
        self.starts += 1
        if self.starts == 2:
            (run_dir / "restarting").write_text("")  # the test's cue: stop now
            time.sleep(0.5)
        self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        (run_dir / f"child-{self.starts}").write_text(str(self.child.pid))
    def check(self, now):
        if self.failed:
            return None
        self.failed = True
        return "VLLM::EngineCore (pid 1) is gone"
    def cleanup(self):
        self.child.kill()
        self.child.wait()
    def stop(self):
        time.sleep(5)  # longer than the stop's grace for orphans
        self.child.terminate()
        self.child.wait()

policy = Policy(2, 60, 0)
record = Record(run_dir / "supervisor.json", tag=os.environ[TAG_ENV], policy=policy)
sys.exit(Supervisor([Slow()], policy, record, echo=lambda s: None).run())
"""


@pytest.mark.integration
def test_a_stop_during_a_restart_leaves_no_vllm_behind(tmp_path):
    """A stop that landed while the supervisor was starting a new vLLM looked for our processes
    before that vLLM existed, then SIGKILLed the supervisor GRACE seconds later, halfway through
    its own graceful stop of the new vLLM: that vLLM ran on, unsupervised. Now the stop waits for
    the supervisor, and looks for what is left only once it is gone."""
    from lifecycle_helpers import free_port, gone

    from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
    from qwen3_vl_service.lifecycle import stop

    run_dir = tmp_path.resolve()
    env = clean_env(**{TAG_ENV: "q3vl-restart-1", RUN_DIR_ENV: str(run_dir), "PYTHONPATH": str(REPO)})
    sup = subprocess.Popen([sys.executable, "-c", _SLOW_RESTART, str(run_dir)], env=env)
    pids = [sup.pid]
    try:
        assert wait_until(lambda: (run_dir / "restarting").exists(), 30)
        report = stop.stop_service(
            run_dir, host="127.0.0.1", port=free_port(), timeout=30, grace=2, echo=print
        )
        assert wait_until(lambda: (run_dir / "child-2").exists(), 5)
        child = int((run_dir / "child-2").read_text())
        pids.append(child)
        assert gone(child), "the vLLM started during the stop is still running"
        assert sup.wait(5) == EXIT_OK  # it stopped what it started, and was not killed
        assert not report.survivors
    finally:
        kill_pids(pids)
