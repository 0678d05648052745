"""End to end: two services of one checkout at once (vLLM's CPU build), one with YaRN past its native
length; then the shared demo service's end, and the second's.

Service A is the session's shared demo service (``demo``, supervised); service
B differs in model and port: the tiny model with only 1024 native positions,
served with ROPE_SCALING=yarn, ROPE_FACTOR=2 and MAX_MODEL_LEN=2048, and
RESTART=no (vLLM alone). Both share RUN_DIR, LOG_DIR and one media server
(same MEDIA_PORT and MEDIA_ROOT). B answers a prompt longer than its native
1024 positions, and vLLM's own log shows the 2048 it serves. Then, in order:
``stop_service.py`` of A ends its supervisor and nothing restarts it;
``--all`` of A leaves the media server to B, which keeps answering; ``kill
-9`` of B's API server, then ``stop_service.py``, leaves no orphaned engine;
B's ``--all`` takes the media server down and frees every port.

Every test here ends or needs the end of the shared service: the whole module
runs after all others (``ends_demo``, tests/conftest.py).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
from served import Served, alive, port_free
from skips import require
from test_yarn import short_context_copy

from qwen3_vl_service.core.names import RECORD_FILE
from qwen3_vl_service.machine.processes import read_pid_file

# A second vLLM start: a minute or two on two shared cores.
pytestmark = [pytest.mark.e2e, pytest.mark.ends_demo, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, demo: Served, tiny_model: Path, demo_media: Path):
    require("vllm")
    short = short_context_copy(tiny_model, tmp_path_factory.mktemp("pair") / "model-1k", 1024)
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
    try:
        b.start()
        print(f"started service B on {b.port} in {b.start_seconds:.0f} s")
        yield demo, b
    finally:
        b.stop_all()


def media_pid(s: Served) -> int:
    pid = read_pid_file(s.media_pid_file)
    assert pid, s.media_pid_file
    return pid


def test_each_service_has_its_own_state_and_log_and_they_share_one_media_server(pair):
    a, b = pair
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
    _, b = pair
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


def test_stop_ends_the_supervisor_and_nothing_is_restarted(pair):
    a, _ = pair
    sup_pid = a.supervisor_pid()
    assert alive(sup_pid)
    t0 = time.monotonic()
    proc = a.script("stop_service.py")
    print(f"\nstop_service.py (supervised, idle): {time.monotonic() - t0:.1f} s\n{proc.stdout}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stopping the supervisor" in proc.stdout
    assert not alive(sup_pid)
    time.sleep(5)  # a restart would have begun by now (RESTART_BACKOFF=1)
    assert [p for p in a.ours() if "media" not in " ".join(p.cmdline())] == []
    assert port_free(a.port)
    rec = json.loads((a.run_dir / RECORD_FILE).read_text())
    assert rec["state"] == "stopped", rec


def test_stop_all_of_one_leaves_the_other_and_the_shared_media_server(pair):
    a, b = pair
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


def test_kill_9_of_the_api_server_then_stop_leaves_nothing(pair):
    _, b = pair
    state = b.state()
    api = psutil.Process(state["pid"])
    children = api.children(recursive=True)
    titles = " ".join(" ".join(c.cmdline()) for c in children)
    assert "VLLM::EngineCore" in titles, titles
    api.send_signal(signal.SIGKILL)
    api.wait(timeout=30)
    time.sleep(1.0)
    orphans = [c for c in children if alive(c.pid)]
    assert orphans, "vLLM's engine should survive a SIGKILL of its API server (vLLM #55510)"

    t0 = time.monotonic()
    proc = b.script("stop_service.py")
    print(f"\nstop_service.py after kill -9: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any(alive(c.pid) for c in orphans)
    assert [p for p in b.ours() if "media" not in " ".join(p.cmdline())] == []
    assert port_free(b.port)
    assert alive(media_pid(b)), "without --all the media server stays"
    assert not Path(state["private_tmp"]).exists(), "the run's IPC socket folder is removed"


def test_stop_all_stops_the_media_server_and_frees_both_ports(pair):
    a, b = pair
    pid = media_pid(b)
    proc = b.script("stop_service.py", "--all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert b.ours() == [] and not alive(pid)
    assert port_free(b.port) and port_free(b.media_port) and port_free(a.port)
    again = b.script("stop_service.py", "--all")
    assert again.returncode == 0 and "not running" in (again.stdout + again.stderr).lower()
