"""batch_service.py against a real HTTP stand-in of vLLM's API (tests/batch_standin.py); the real
vLLM has tests/test_batch_e2e.py.

Unit: the input's checks (each bad line one error naming it), media paths to
media-server URLs, the output's resume rules, the service URL and the default
concurrency. Integration: whole runs through real sockets: retries, a service
that goes away and comes back, a batch process killed (SIGKILL) or stopped
(SIGTERM) halfway and rerun, counted on the stand-in's side.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_standin import MODEL, StandIn, free_port, prompt_of
from lifecycle_helpers import clean_env, wait_until, write_config
from skips import require

from qwen3_vl_service.batch import command, jobs, results
from qwen3_vl_service.core.errors import UsageError
from qwen3_vl_service.settings import config

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SAMPLE_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def chat(cid: str, text: str, *parts: dict, model: str | None = None) -> dict:
    body: dict = {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]}
    if model:
        body["model"] = model
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def completion(cid: str, prompt: str, **extra) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"prompt": prompt, **extra}}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def out_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def setup(tmp_path):
    """A config whose PORT is a stand-in's and MEDIA_ROOT holds cat.png; the stand-ins stop after."""
    media = tmp_path / "media"
    (media / "frames").mkdir(parents=True)
    (media / "cat.png").write_bytes(SAMPLE_PNG)
    (media / "frames" / "f1.png").write_bytes(SAMPLE_PNG)
    api, media_srv = StandIn(), StandIn()
    cfg_path = write_config(tmp_path, port=api.port, media_port=media_srv.port, SERVED_MODEL_NAME=MODEL)
    yield tmp_path, cfg_path, api
    api.close()
    media_srv.close()


def load(cfg_path: Path, **env: str):
    return config.load(cfg_path, environ=clean_env(**env))


# -- the input -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_local_media_become_media_server_urls_and_the_model_is_filled_in(setup):
    tmp, cfg_path, _ = setup
    cfg = load(cfg_path)
    media = tmp / "media"
    src = write_jsonl(
        tmp / "in.jsonl",
        [
            chat("a", "abs", image(str(media / "cat.png"))),
            chat("b", "file", image((media / "frames" / "f1.png").as_uri())),
            chat("c", "rel", image("frames/f1.png"), {"type": "video_url", "video_url": "cat.png"}),
            chat("d", "remote", image("https://example.org/x.jpg"), model=MODEL),
            "",
            completion("e", "hi"),
        ],
    )
    batch = jobs.read(src, cfg)
    bodies = {j.custom_id: json.loads(j.payload) for j in batch.jobs}
    media_url = f"http://127.0.0.1:{cfg.media_port}"
    assert [j.line for j in batch.jobs] == [1, 2, 3, 4, 6]  # the blank line 5 is skipped
    assert all(b["model"] == MODEL for b in bodies.values())
    parts = bodies["c"]["messages"][0]["content"]
    assert bodies["a"]["messages"][0]["content"][0]["image_url"]["url"] == f"{media_url}/cat.png"
    assert bodies["b"]["messages"][0]["content"][0]["image_url"]["url"] == f"{media_url}/frames/f1.png"
    assert parts[0]["image_url"]["url"] == f"{media_url}/frames/f1.png"
    assert parts[1]["video_url"] == f"{media_url}/cat.png"
    assert bodies["d"]["messages"][0]["content"][0]["image_url"]["url"] == "https://example.org/x.jpg"
    assert batch.media_server_used


@pytest.mark.unit
def test_without_the_media_server_local_media_are_file_urls(setup):
    tmp, cfg_path, _ = setup
    cfg = load(cfg_path, MEDIA_SERVER="false")
    src = write_jsonl(tmp / "in.jsonl", [chat("a", "x", image("cat.png"))])
    batch = jobs.read(src, cfg)
    url = json.loads(batch.jobs[0].payload)["messages"][0]["content"][0]["image_url"]["url"]
    assert url == (tmp / "media" / "cat.png").resolve().as_uri()
    assert not batch.media_server_used


BAD_LINES = [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}, "custom_id is missing"),
    ({"custom_id": "x", "url": "/v1/completions", "body": {"prompt": "x"}}, "method is None"),
    ({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}, "not a batch endpoint"),
    ({"custom_id": "x", "method": "POST", "url": "/v1/completions"}, "body is missing"),
    ({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {}}, "body.prompt is missing"),
    ({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}, "body.messages"),
    (completion("x", "a", stream=True), "body.stream is true"),
    (chat("x", "q", image("/etc/passwd")), "is not under MEDIA_ROOT"),
    (chat("x", "q", image("file:///etc/hostname")), "is not under MEDIA_ROOT"),
    (chat("x", "q", image("missing.png")), "does not exist"),
    (chat("x", "q", image("ftp://host/a.png")), "unsupported URL scheme 'ftp'"),
    (chat("x", "q", {"type": "image_url", "image_url": {}}), "a image_url part without a url"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_a_bad_line_is_one_error_naming_its_line(setup, line, message):
    tmp, cfg_path, _ = setup
    src = write_jsonl(tmp / "in.jsonl", [chat("ok", "fine"), line])
    with pytest.raises(UsageError) as err:
        jobs.read(src, load(cfg_path))
    text = err.value.one_line()
    assert text.startswith(f"{src}:2: ") and message in text and "\n" not in text, text


@pytest.mark.unit
def test_a_duplicate_custom_id_names_both_lines(setup):
    tmp, cfg_path, _ = setup
    src = write_jsonl(tmp / "in.jsonl", [chat("a", "1"), chat("b", "2"), chat("a", "3")])
    with pytest.raises(UsageError, match=r"in.jsonl:3: custom_id 'a' repeats line 1"):
        jobs.read(src, load(cfg_path))


@pytest.mark.unit
def test_a_type_the_media_server_does_not_serve_is_refused(setup):
    tmp, cfg_path, _ = setup
    (tmp / "media" / "notes.txt").write_text("x")
    src = write_jsonl(tmp / "in.jsonl", [chat("a", "1", image("notes.txt"))])
    with pytest.raises(UsageError, match=r"in\.jsonl:1: notes\.txt: the media server serves only"):
        jobs.read(src, load(cfg_path))


# -- the output ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_resume_cuts_a_torn_last_line_and_refuses_another_inputs_output(tmp_path):
    out = tmp_path / "out.jsonl"
    good = json.dumps(results.record("a", 200, {"x": 1})) + "\n"
    out.write_text(good + '{"id": "batch_req_1", "custom_id": "b", "resp')
    done = results.resume(out, {"a", "b"}, tmp_path / "in.jsonl")
    assert done.answered == {"a"} and done.torn_bytes > 0
    assert out.read_text() == good
    with pytest.raises(UsageError, match=r"out.jsonl:1: custom_id 'a' is not in .*in.jsonl"):
        results.resume(out, {"b"}, tmp_path / "in.jsonl")
    assert results.errors_path(out) == tmp_path / "out.errors.jsonl"


# -- where and how many ----------------------------------------------------------------------------


@pytest.mark.unit
def test_the_service_url_is_the_running_deployments(setup):
    """On the head node the recorded deployment answers (what the running start derived)."""
    from qwen3_vl_service.deployment import cluster, deployment
    from qwen3_vl_service.lifecycle.units import record

    _, cfg_path, _api = setup
    cfg = load(cfg_path, REPLICAS="2", ROUTER_PORT="8998")
    lay = cluster.layout(cfg, ("",), cpus=(0, 1), environ={})
    dep = deployment.derive(cfg, None, lay, expert_parallel=False)
    record(dep)
    try:
        assert command.service_url(cfg, environ={}) == dep.api_url == "http://127.0.0.1:8998"
    finally:
        dep.record_file.unlink()


@pytest.mark.unit
def test_the_service_url_is_the_router_in_front_of_replicas(setup):
    _, cfg_path, api = setup
    assert command.service_url(load(cfg_path)) == api.base
    assert command.service_url(load(cfg_path, REPLICAS="2", ROUTER_PORT="8999")) == "http://127.0.0.1:8999"
    assert command.service_url(load(cfg_path, HOST="0.0.0.0")) == api.base  # a wildcard: loopback
    assert command.service_url(load(cfg_path, REPLICAS="per-node")) == api.base  # one node: no router
    assert command.default_concurrency(load(cfg_path, MAX_NUM_SEQS="7")) == (7, "MAX_NUM_SEQS 7")
    n, why = command.default_concurrency(load(cfg_path, MAX_NUM_SEQS="7", REPLICAS="2", ROUTER_PORT="8999"))
    assert n == 14 and "2 replicas" in why
    # MAX_NUM_SEQS=auto and no model to plan with (a login node, a typo): a fixed number, said so.
    n, why = command.default_concurrency(load(cfg_path, DEVICE="cpu", TENSOR_PARALLEL_SIZE="1"))
    assert n == command.FALLBACK_CONCURRENCY and "--concurrency" in why


# -- whole runs (integration) ----------------------------------------------------------------------


def run_batch(cfg_path: Path, src: Path, out: Path, *args: str, capsys=None) -> tuple[int, str, str]:
    rc = command.main(["--config", str(cfg_path), str(src), str(out), "--no-progress", *args])
    captured = capsys.readouterr() if capsys else None
    return rc, captured.out if captured else "", captured.err if captured else ""


def mixed(n: int) -> list[dict]:
    lines = []
    for i in range(n):
        if i % 3 == 0:
            lines.append(chat(f"q{i}", f"text {i}"))
        elif i % 3 == 1:
            lines.append(chat(f"q{i}", f"image {i}", image("cat.png")))
        else:
            lines.append(completion(f"q{i}", f"p {i}"))
    return lines


@pytest.mark.integration
def test_a_whole_run_answers_every_line_once_in_the_batch_output_format(setup, capsys):
    tmp, cfg_path, api = setup
    src, out = write_jsonl(tmp / "in.jsonl", mixed(30)), tmp / "out.jsonl"
    rc, stdout, err = run_batch(cfg_path, src, out, "--concurrency", "4", capsys=capsys)
    assert rc == 0, stdout + err
    lines = out_lines(out)
    assert sorted(x["custom_id"] for x in lines) == sorted(f"q{i}" for i in range(30))
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in lines)
    assert all(x["id"].startswith("batch_req_") and x["response"]["request_id"] for x in lines)
    assert len(api.received) == 30 and set(api.answered.values()) == {1}
    sent_image = next(b for b in api.received if prompt_of(b) == "image 1")
    assert sent_image["messages"][0]["content"][0]["image_url"]["url"].endswith("/cat.png")
    assert "30 answered in this run, 0 failed" in stdout and "300 in, 120 out" in stdout
    rc, stdout, _ = run_batch(cfg_path, src, out, capsys=capsys)  # all answered: nothing to send
    assert rc == 0 and "30 already answered" in stdout and len(api.received) == 30


@pytest.mark.integration
def test_5xx_and_429_are_retried_a_400_fails_and_a_rerun_sends_only_the_failed_line(setup, capsys):
    tmp, cfg_path, api = setup
    api.faults = {"text 0": [503, 429, "drop"], "text 3": [400]}
    src, out = write_jsonl(tmp / "in.jsonl", mixed(6)), tmp / "out.jsonl"
    rc, stdout, err = run_batch(cfg_path, src, out, "--concurrency", "2", capsys=capsys)
    assert rc == 1, stdout + err
    assert sorted(x["custom_id"] for x in out_lines(out)) == ["q0", "q1", "q2", "q4", "q5"]
    failed = out_lines(tmp / "out.errors.jsonl")
    assert [(x["custom_id"], x["response"]["status_code"]) for x in failed] == [("q3", 400)]
    assert "planned 400" in failed[0]["error"]["message"]
    assert "line 4 (q3): failed after 1 tries: HTTP 400" in err
    before = len(api.received)
    rc, stdout, _ = run_batch(cfg_path, src, out, capsys=capsys)
    assert rc == 0 and len(api.received) == before + 1 and prompt_of(api.received[-1]) == "text 3"
    assert len(out_lines(out)) == 6 and out_lines(tmp / "out.errors.jsonl") == []


@pytest.mark.integration
def test_a_request_past_the_timeout_is_retried_then_failed_with_the_cause(setup, capsys):
    tmp, cfg_path, api = setup
    api.slow_s = 2.0
    api.faults = {"text 0": ["slow", "slow"], "text 3": ["slow"]}
    src, out = write_jsonl(tmp / "in.jsonl", mixed(6)), tmp / "out.jsonl"
    args = ("--concurrency", "2", "--timeout", "1", "--retries", "1")
    rc, stdout, err = run_batch(cfg_path, src, out, *args, capsys=capsys)
    assert rc == 1, stdout + err
    assert sorted(x["custom_id"] for x in out_lines(out)) == ["q1", "q2", "q3", "q4", "q5"]
    (failed,) = out_lines(tmp / "out.errors.jsonl")
    assert failed["custom_id"] == "q0" and failed["error"]["message"] == "no answer within 1 s"
    assert "line 1 (q0): failed after 2 tries: no answer within 1 s" in err
    sent = [prompt_of(b) for b in api.received]
    assert sent.count("text 0") == 2 and sent.count("text 3") == 2  # one retry each, no more
    assert wait_until(lambda: api.in_flight == 0, 10)  # the stand-in's late answers, before it closes


@pytest.mark.integration
def test_the_progress_bar_and_the_summary_show_the_rates(setup, capsys):
    tmp, cfg_path, api = setup
    api.delay = 0.2
    src, out = write_jsonl(tmp / "in.jsonl", mixed(12)), tmp / "out.jsonl"
    rc = command.main(["--config", str(cfg_path), str(src), str(out), "--concurrency", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    bar = captured.err.replace("\r", "\n").strip().splitlines()[-1]  # tqdm's last state, on stderr
    assert re.match(r"batch: 100%.*\| 12/12 \[.*req/s, failed 0, \d+ out tok/s\]$", bar), bar
    m = re.search(r"tokens: 120 in, 48 out; wall ([\d.]+) s; ([\d.]+) out tok/s, ([\d.]+) tok/s in\+out, "
                  r"([\d.]+) req/s", captured.out)  # fmt: skip
    assert m, captured.out
    wall, out_rate, all_rate, req_rate = (float(x) for x in m.groups())
    assert wall >= 4 * 0.2 - 0.05  # 12 requests, 3 at a time, 200 ms each
    # Each rate over the same wall time: 4 answer tokens a request, 14 in and out.
    assert out_rate / req_rate == pytest.approx(4, rel=0.02) and all_rate / out_rate == pytest.approx(
        3.5, rel=0.02
    )
    assert out_rate == pytest.approx(48 / wall, rel=0.1)


@pytest.mark.integration
def test_a_service_that_goes_away_and_comes_back_loses_nothing(setup, capsys):
    tmp, cfg_path, api = setup
    api.delay = 0.05
    src, out = write_jsonl(tmp / "in.jsonl", mixed(40)), tmp / "out.jsonl"

    def restart():
        wait_until(lambda: len(api.received) >= 10, 20)
        api.stop()  # a restart of vLLM: refused connections for 2 s
        time.sleep(2)
        api.start()

    import threading

    t = threading.Thread(target=restart)
    t.start()
    rc, stdout, err = run_batch(cfg_path, src, out, "--concurrency", "4", capsys=capsys)
    t.join()
    assert rc == 0, stdout + err
    assert sorted(x["custom_id"] for x in out_lines(out)) == sorted(f"q{i}" for i in range(40))
    assert sum(api.answered.values()) >= 40 and len(api.answered) == 40


@pytest.mark.integration
def test_the_concurrency_asked_for_is_the_concurrency_sent(setup, capsys):
    """More than aiohttp's default 100 connections per session: all of them in flight at once."""
    tmp, cfg_path, api = setup
    api.delay = 1.5
    src, out = write_jsonl(tmp / "in.jsonl", [chat(f"c{i}", f"c {i}") for i in range(150)]), tmp / "out.jsonl"
    rc, stdout, err = run_batch(cfg_path, src, out, "--concurrency", "150", capsys=capsys)
    assert rc == 0, stdout + err
    assert api.peak == 150


@pytest.mark.integration
def test_a_bad_input_or_no_service_is_one_line_and_nothing_is_sent(setup, capsys):
    tmp, cfg_path, api = setup
    src, out = write_jsonl(tmp / "in.jsonl", [chat("a", "1"), chat("a", "2")]), tmp / "out.jsonl"
    rc, _, err = run_batch(cfg_path, src, out, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "in.jsonl:2: custom_id 'a' repeats line 1" in err
    src = write_jsonl(tmp / "in.jsonl", [chat("a", "1", model="other")])
    rc, _, err = run_batch(cfg_path, src, out, capsys=capsys)
    assert rc == 2 and "in.jsonl:1: body.model 'other' is not served here" in err
    assert api.received == [] and not out.exists()
    api.stop()
    src = write_jsonl(tmp / "in.jsonl", [chat("a", "1")])
    rc, _, err = run_batch(cfg_path, src, out, capsys=capsys)
    assert rc == 1 and err.startswith("error: nothing answers at") and err.count("\n") == 1


@pytest.mark.integration
def test_the_api_key_is_sent(tmp_path, capsys):
    api = StandIn(api_key="s3cret")
    try:
        cfg_path = write_config(tmp_path, port=api.port, API_KEY="s3cret", SERVED_MODEL_NAME=MODEL)
        src = write_jsonl(tmp_path / "in.jsonl", [chat("a", "1")])
        rc, stdout, err = run_batch(cfg_path, src, tmp_path / "out.jsonl", capsys=capsys)
        assert rc == 0, stdout + err
    finally:
        api.close()


def start_batch(cfg_path: Path, src: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, str(REPO / "batch_service.py"), "--config", str(cfg_path), str(src), str(out), *args],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.integration
def test_kill_9_halfway_then_a_rerun_sends_only_what_was_not_written(setup):
    tmp, cfg_path, api = setup
    api.delay = 0.1
    src, out = write_jsonl(tmp / "in.jsonl", mixed(60)), tmp / "out.jsonl"
    proc = start_batch(cfg_path, src, out, "--concurrency", "4", "--no-progress")
    try:
        assert wait_until(lambda: len(out_lines(out)) >= 25, 60)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=30)
    time.sleep(0.3)  # the requests in flight reach the stand-in's handler and end
    written = {x["custom_id"] for x in out_lines(out)}
    sent_before = len(api.received)
    rerun = start_batch(cfg_path, src, out, "--concurrency", "4")
    stdout, stderr = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, stdout + stderr
    assert f"{len(written)} already answered" in stdout
    lines = out_lines(out)
    assert len(lines) == 60 and len({x["custom_id"] for x in lines}) == 60
    assert len(api.received) - sent_before == 60 - len(written)  # the rerun sent each missing line once
    twice = [p for p, n in api.answered.items() if n > 1]
    assert len(twice) <= 4, twice  # at most the requests in flight at the kill were answered twice


@pytest.mark.integration
def test_sigterm_lets_the_requests_in_flight_finish_and_loses_nothing(setup):
    tmp, cfg_path, api = setup
    api.delay = 0.3
    src, out = write_jsonl(tmp / "in.jsonl", mixed(40)), tmp / "out.jsonl"
    proc = start_batch(cfg_path, src, out, "--concurrency", "4", "--no-progress")
    assert wait_until(lambda: len(out_lines(out)) >= 8, 60)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "SIGTERM: sending no more" in stderr
    # Every request the stand-in answered is in OUT: those in flight finished and were written.
    assert len(out_lines(out)) == sum(api.answered.values()) < 40
    rerun = start_batch(cfg_path, src, out, "--concurrency", "4", "--no-progress")
    stdout, stderr = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, stdout + stderr
    assert len(out_lines(out)) == 40 == len(api.received) and set(api.answered.values()) == {1}


@pytest.mark.integration
def test_the_module_entry_and_the_script_agree(tmp_path):
    for argv in ([PY, "-m", "qwen3_vl_service.batch", "--help"], [PY, "batch_service.py", "--help"]):
        r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "IN.jsonl" in r.stdout and "OUT.jsonl" in r.stdout, r.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.integration
def test_through_the_router_in_front_of_two_replicas(tmp_path, capsys):
    """REPLICAS=2 (router mode): the batch goes to ROUTER_PORT, and vllm-router spreads it over both."""
    require("vllm_router")
    workers = [StandIn(), StandIn()]
    router_port = free_port()
    argv = [PY, "-m", "vllm_router.launch_router", "--host", "127.0.0.1", "--port", str(router_port)]
    argv += ["--worker-urls", *(w.base for w in workers), "--policy", "round_robin"]
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    argv += ["--worker-startup-timeout-secs", "60", "--worker-startup-check-interval", "1"]
    log = tmp_path / "router.log"
    with open(log, "wb") as fh:
        router = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=clean_env())
    try:
        cfg_path = write_config(
            tmp_path,
            port=workers[0].port,
            REPLICAS="2",
            ROUTER_PORT=str(router_port),
            SERVED_MODEL_NAME=MODEL,
        )
        up = wait_until(
            lambda: router.poll() is None and StandIn.answers(f"http://127.0.0.1:{router_port}"), 60
        )
        assert up, log.read_text()[-3000:]
        src, out = (
            write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}", f"via router {i}") for i in range(20)]),
            tmp_path / "out.jsonl",
        )
        rc, stdout, err = run_batch(cfg_path, src, out, "--concurrency", "4", capsys=capsys)
        assert rc == 0, stdout + err
        assert f"to send to http://127.0.0.1:{router_port}" in stdout
        assert len(out_lines(out)) == 20
        assert [len(w.received) for w in workers] == [10, 10]  # round robin: both replicas served
    finally:
        router.terminate()
        router.wait(10)
        for w in workers:
            w.close()
