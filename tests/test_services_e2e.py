"""End to end: two services of one checkout at once (vLLM's CPU build), one with YaRN past its native
length and in the foreground; then the shared demo service's end, and the second's.

Service A is the session's shared demo service (``demo``, supervised, detached); service
B differs in model and port: the tiny model with only 1024 native positions,
served with ROPE_SCALING=yarn, ROPE_FACTOR=2 and MAX_MODEL_LEN=2048, and
RESTART=no, started in the foreground as a user does in a terminal
(``start_service.py`` without --detach, in a process group of its own): the
launcher execs vLLM and tees its output to the terminal and service.log. Both
share RUN_DIR, LOG_DIR and one media server (same MEDIA_PORT and MEDIA_ROOT).
B answers a prompt longer than its native 1024 positions, and vLLM's own log
shows the 2048 it serves. Then, in order: ``kill -9`` of A's supervisor and of
its API server leaves vLLM's engine orphaned, and ``stop_service.py`` ends it
and leaves nothing; ``--all`` of A leaves the media server to B, which keeps
answering; Ctrl+C (SIGINT to B's process group) stops every process of B; B's
``--all`` takes the media server down and frees every port.

Every test here ends or needs the end of the shared service: the whole module
runs after all others (``ends_demo``, tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from lifecycle_helpers import wait_until
from served import DEMO_CONFIG, REPO, Served, alive, healthy, port_free
from skips import require
from test_e2e import TIMINGS
from test_yarn import short_context_copy

from qwen3_vl_service.core.names import TAG_ENV
from qwen3_vl_service.machine.processes import read_pid_file

# A second vLLM start: a minute or two on two shared cores.
pytestmark = [pytest.mark.e2e, pytest.mark.ends_demo, pytest.mark.timeout(1800)]


class Foreground:
    """Service B's ``start_service.py`` in the foreground: the process (vLLM's API server once the
    launcher has exec'd it) and the file that stands for its terminal."""

    def __init__(self, b: Served, terminal: Path) -> None:
        self.terminal = terminal
        with terminal.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "start_service.py"), "--config", str(DEMO_CONFIG), "--quiet"],
                env=b.env,
                cwd=b.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a terminal would give it
            )

    def text(self) -> str:
        return self.terminal.read_text(errors="replace")

    def end(self) -> None:
        """SIGKILL to its process group while its leader, ours, is not yet reaped (a cleanup; what
        outlives a leader that has gone, the fixture's stop_all() ends by the run folder)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, demo: Served, tiny_model: Path, demo_media: Path):
    require("vllm")
    folder = tmp_path_factory.mktemp("pair")
    short = short_context_copy(tiny_model, folder / "model-1k", 1024)
    b = Served(
        demo.root,  # the same RUN_DIR and LOG_DIR
        model=short,
        media_root=demo_media,
        media_port=demo.media_port,
        RESTART="no",
        ROPE_SCALING="yarn",
        ROPE_FACTOR="2",
        MAX_MODEL_LEN="2048",
    )
    fg = Foreground(b, folder / "terminal.txt")
    try:
        t0 = time.monotonic()
        up = wait_until(lambda: fg.proc.poll() is not None or healthy(f"{b.base}/health", 2), 900, step=0.5)
        assert up and fg.proc.poll() is None, f"service B did not come up:\n{fg.text()[-4000:]}"
        b.start_seconds = time.monotonic() - t0
        TIMINGS.append(("start_service.py in the foreground (to /health 200): service B", 0, b.start_seconds))
        print(f"started service B in the foreground on {b.port} in {b.start_seconds:.0f} s")
        yield demo, b, fg
    finally:
        fg.end()
        b.stop_all()


def media_pid(s: Served) -> int:
    pid = read_pid_file(s.media_pid_file)
    assert pid, s.media_pid_file
    return pid


def test_the_foreground_start_execs_vllm_and_tees_its_output(pair):
    """Without --detach and with RESTART=no, the launcher's pid becomes vLLM's API server, and its
    report and vLLM's own lines reach the terminal and service.log alike."""
    _, b, fg = pair
    # exec: the pid we started is vLLM's API server now.
    assert "vllm.entrypoints.openai.api_server" in " ".join(psutil.Process(fg.proc.pid).cmdline())
    state = b.state()
    assert state["pid"] == fg.proc.pid
    log = b.log_dir / "service.log"
    # The tee writes both as vLLM prints: the last line may lag /health by a moment.

    def texts() -> tuple[str, str]:  # the terminal's, the log's
        return fg.text(), log.read_text(errors="replace")

    assert wait_until(lambda: all("Application startup complete" in t for t in texts()), 30), texts()
    for text in texts():
        assert "Preflight" in text and "exec vLLM" in text
        # The command shown is the one that ran: its tag and IPC socket folder (issue 16, defect 4).
        assert f"{TAG_ENV}={state['tag']}" in text
        assert f"VLLM_RPC_BASE_PATH={state['private_tmp']}" in text


def test_each_service_has_its_own_state_and_log_and_they_share_one_media_server(pair):
    a, b, _ = pair
    states = [s.state() for s in (a, b)]
    assert states[0]["pid"] != states[1]["pid"] and {st["port"] for st in states} == {a.port, b.port}
    logs = [s.log_dir / "service.log" for s in (a, b)]
    assert logs[0].exists() and logs[1].exists() and logs[0] != logs[1]
    assert a.ours() and b.ours()
    assert not {p.pid for p in a.ours()} & {p.pid for p in b.ours()}
    assert a.media_pid_file == b.media_pid_file and alive(media_pid(b))
    for s in (a, b):
        st = s.script("status_service.py")
        assert st.returncode == 0 and f"service port-{s.port}: running, healthy" in st.stdout, st.stdout


def test_yarn_serves_a_prompt_longer_than_the_native_positions(pair):
    _, b, _ = pair
    from tokenizers import Tokenizer

    # Sized with the model's own tokenizer (about 15 tokens a sentence): ~1,500 tokens, past
    # the 1,024 native positions and inside the 2,048 that YaRN (factor 2) allows.
    tok = Tokenizer.from_file(str(b.model / "tokenizer.json"))
    sentence = "the cat sat on the mat near a blue door"

    def prompt_of(tokens: int) -> str:
        reps = tokens // len(tok.encode(" " + sentence).ids)
        return " ".join([sentence] * reps)

    r = b.chat(prompt_of(1500))
    assert r.status_code == 200, r.text[:500]
    used = r.json()["usage"]["prompt_tokens"]
    assert 1024 < used < 2048, used  # past the model's own 1024 positions
    log = (b.log_dir / "service.log").read_text(errors="replace")
    assert "max_seq_len=2048" in log, "vLLM's engine config shows the length YaRN allows"
    # The same request to a length past 2048 is refused by vLLM, not crashed.
    too_long = b.chat(prompt_of(3000))
    assert too_long.status_code == 400 and b.chat("hi").status_code == 200


def test_kill_9_of_the_supervisor_and_the_api_server_then_stop_leaves_nothing(pair):
    """A's supervisor and vLLM's API server SIGKILLed (the OOM killer, say): vLLM's engine lives on,
    orphaned, with nothing left to reap it; stop_service.py finds it by its run's tag and ends it."""
    a, _, _ = pair
    sup = psutil.Process(a.supervisor_pid())
    state = a.state()
    api = psutil.Process(state["pid"])
    children = api.children(recursive=True)
    titles = " ".join(" ".join(c.cmdline()) for c in children)
    assert "VLLM::EngineCore" in titles, titles
    for p in (sup, api):
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    time.sleep(1.0)
    orphans = [c for c in children if alive(c.pid)]
    assert orphans, "vLLM's engine should survive a SIGKILL of its API server (vLLM #55510)"

    t0 = time.monotonic()
    proc = a.script("stop_service.py")
    print(f"\nstop_service.py after kill -9 of the supervisor and API server: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any(alive(c.pid) for c in orphans)
    assert [p for p in a.ours() if "media" not in " ".join(p.cmdline())] == []
    assert port_free(a.port)
    assert alive(media_pid(a)), "without --all the media server stays"
    assert not Path(state["private_tmp"]).exists(), "the run's IPC socket folder is removed"


def test_stop_all_of_one_leaves_the_other_and_the_shared_media_server(pair):
    a, b, _ = pair
    pid = media_pid(b)
    r = a.script("stop_service.py", "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"the media server stays: still used by port-{b.port}" in r.stdout
    assert a.ours() == [] and port_free(a.port)
    assert alive(pid)
    image = [
        {"type": "image_url", "image_url": {"url": f"{b.media}/sample.png"}},
        {"type": "text", "text": "What is in this picture?"},
    ]
    assert b.chat(image).status_code == 200, "B answers, with an image through the shared media server"
    assert a.script("status_service.py").returncode == 1


def test_ctrl_c_stops_every_process_of_the_foreground_service(pair):
    """Ctrl+C: SIGINT to the terminal's process group, B's alone (the media server is A's, and
    shared): vLLM shuts down, the tee writes its last lines, and nothing of B is left."""
    _, b, fg = pair
    state = b.state()
    tree = [psutil.Process(fg.proc.pid), *psutil.Process(fg.proc.pid).children(recursive=True)]
    os.killpg(fg.proc.pid, signal.SIGINT)
    fg.proc.wait(timeout=120)
    assert wait_until(lambda: not any(alive(p.pid) for p in tree), 30), [p.pid for p in tree if alive(p.pid)]
    assert b.ours() == []
    assert port_free(b.port)
    assert alive(media_pid(b)), "the shared media server is not in B's process group"
    assert not Path(state["private_tmp"]).exists(), "the run's IPC socket folder is removed"
    log = (b.log_dir / "service.log").read_text(errors="replace")
    for text in (fg.text(), log):
        assert "Application startup complete" in text and "shutdown" in text.lower()


def test_stop_all_stops_the_media_server_and_frees_both_ports(pair):
    a, b, _ = pair
    pid = media_pid(b)
    proc = b.script("stop_service.py", "--all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert b.ours() == [] and not alive(pid)
    assert port_free(b.port) and port_free(b.media_port) and port_free(a.port)
    again = b.script("stop_service.py", "--all")
    assert again.returncode == 0 and "not running" in (again.stdout + again.stderr).lower()
