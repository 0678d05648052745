"""liveness: a hung engine (no progress while work waits) is told from a busy one and from an idle one."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from qwen3_vl_service.lifecycle import liveness
from qwen3_vl_service.lifecycle.liveness import Liveness, Stall, parse


def metrics_text(
    running=0, waiting=0, kv=0.0, gen=0, prompt=0, done=0, preempted=0, queries=0, steps=0, model="m"
) -> str:
    """/metrics as vLLM 0.32 writes these families (labels model_name and engine; counters' _total and
    _created samples; a histogram's buckets, count and sum)."""
    lab = f'engine="0",model_name="{model}"'
    return f"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{{lab}}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{{lab}}} {waiting}
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{{lab}}} {kv}
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{{lab}}} {gen}
vllm:generation_tokens_created{{{lab}}} 1.7e9
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{{lab}}} {prompt}
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="length",model_name="{model}"}} {done}
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{{{lab}}} {preempted}
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{{lab}}} {queries}
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{{{lab},le="1.0"}} {steps}
vllm:iteration_tokens_total_bucket{{{lab},le="+Inf"}} {steps}
vllm:iteration_tokens_total_count{{{lab}}} {steps}
vllm:iteration_tokens_total_sum{{{lab}}} {steps}
# HELP http_requests_total Total number of requests by method, status and handler.
# TYPE http_requests_total counter
http_requests_total{{handler="/metrics",method="GET",status="2xx"}} {time.monotonic()}
"""


@pytest.mark.unit
def test_parse_sums_the_engine_gauges_and_ignores_what_the_api_server_moves_alone():
    a = parse(metrics_text(running=3, waiting=2, kv=0.25, gen=100), in_flight=5)
    assert (a.running, a.waiting, a.in_flight) == (3, 2, 5)
    b = parse(metrics_text(running=3, waiting=2, kv=0.25, gen=100))
    assert a.progress == b.progress  # http_requests_total moved (every read does): not progress
    assert parse(metrics_text(running=3, waiting=2, kv=0.25, gen=101)).progress != a.progress


@pytest.mark.unit
def test_decoding_is_live_and_a_frozen_engine_with_requests_running_is_hung():
    s = Stall(stall_after=60)
    for t in range(0, 300, 5):  # tokens every 5 s: live throughout
        assert s.observe(t, parse(metrics_text(running=8, gen=t * 10))).state == "live"
    frozen = parse(metrics_text(running=8, gen=2960))  # the last token at 300
    states = {t: s.observe(t, frozen).state for t in range(300, 420, 5)}
    assert states[300] == states[325] == "live"
    assert states[330] == "stalling"  # half of STALL_AFTER (at most 30 s) without progress
    assert states[355] == "stalling" and states[360] == "hung"
    v = s.observe(365, frozen)
    assert "no engine progress for 65 s (STALL_AFTER=60)" in v.evidence and "8 running" in v.evidence


@pytest.mark.unit
def test_a_long_prefill_is_not_a_hang():
    """A 1M-token prompt: chunks of 8,192 tokens, each seconds apart (the last ones slower, their
    attention spanning the whole prompt), no token generated for minutes: only the KV cache use
    moves at every chunk. Never hung, however long the prompt."""
    s = Stall(stall_after=60)
    t, blocks_per_chunk, total_blocks = 0.0, 8192 // 16, 1_707_584 // 16
    for chunk in range(123):
        t += 2.0 + chunk * 0.3  # 2 s for the first chunk, ~39 s for the last one
        kv = (chunk + 1) * blocks_per_chunk / total_blocks
        for dt in (0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0):
            if dt < 2.0 + chunk * 0.3:  # looks between two chunks: nothing moved since the last one
                v = s.observe(t + dt, parse(metrics_text(running=1, kv=kv, prompt=0), in_flight=1))
                assert v.state != "hung", (chunk, dt, v)


@pytest.mark.unit
def test_idle_is_live_and_requests_queued_before_a_frozen_engine_are_hung_once_the_probe_waits():
    """The engine stopped while idle: its gauges say 0 running, 0 waiting for ever; the requests that
    arrive wait in the API server (/load counts them), and so does the probe that they trigger."""
    s = Stall(stall_after=60)
    idle = parse(metrics_text(gen=500, done=10), in_flight=0)
    assert all(s.observe(t, idle).state == "live" for t in range(0, 600, 5))
    queued = parse(metrics_text(gen=500, done=10), in_flight=4)
    assert s.observe(600, queued).state == "live"  # not the engine's work yet: the probe asks it
    assert s.observe(605, queued, probe_out_since=600).state == "live"
    assert s.observe(659, queued, probe_out_since=600).state == "stalling"
    v = s.observe(660, queued, probe_out_since=600)
    assert v.state == "hung" and "4 in flight in the API server" in v.evidence


@pytest.mark.unit
def test_a_request_in_the_api_servers_hands_for_minutes_is_not_a_hang():
    """A video fetched and decoded for minutes: /load counts it, the engine has nothing to do. The
    probe it triggers is answered (the engine moves), so it is never hung."""
    s = Stall(stall_after=60)
    gen = 500
    for t in range(0, 600, 5):
        if t % 60 == 5:
            gen += 1  # the probe's token
        v = s.observe(
            t, parse(metrics_text(gen=gen), in_flight=1), probe_out_since=t if t % 60 == 0 else None
        )
        assert v.state != "hung", (t, v)


@pytest.mark.unit
def test_an_unanswered_probe_while_idle_is_hung_counted_from_when_it_was_sent():
    s = Stall(stall_after=60)
    idle = parse(metrics_text(gen=500), in_flight=None)  # a vLLM without /load
    assert s.observe(0, idle).state == "live"
    assert s.idle_for(100) == 100
    assert s.observe(100, idle, probe_out_since=100).state == "live"
    v = s.observe(160, idle, probe_out_since=100)
    assert v.state == "hung" and "a 1-token probe unanswered for 60 s" in v.evidence


class _Vllm(http.server.ThreadingHTTPServer):
    """Serves /metrics, /load and /v1/completions like vLLM's API server; STUCK: the engine is."""

    daemon_threads = True

    def __init__(self) -> None:
        self.stuck = False
        self.gen = 0
        self.completions: list[dict] = []
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Vllm

    def log_message(self, *args) -> None:
        pass

    def _send(self, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/metrics":
            self._send(metrics_text(gen=self.server.gen).encode(), "text/plain")
        elif self.path == "/load":
            self._send(json.dumps({"server_load": 0}).encode())
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.completions.append({**body, "auth": self.headers.get("Authorization")})
        if self.server.stuck:
            self.server.release.wait(30)  # the engine never answers
            return
        self.server.gen += 1
        self._send(json.dumps({"choices": [{"text": "x"}]}).encode())


@pytest.mark.integration
def test_the_idle_probe_answers_while_live_and_finds_a_stuck_engine(monkeypatch):
    server = _Vllm()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        live = Liveness(server.url, stall_after=2, model="qwen3-vl-fp8", api_key="sk-x", probe_idle_s=0.2)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            assert live.check().state == "live"
            time.sleep(0.1)
        assert server.completions, "no probe went out while idle"
        probe = server.completions[0]
        assert (
            probe["max_tokens"] == 1 and probe["model"] == "qwen3-vl-fp8" and probe["auth"] == "Bearer sk-x"
        )
        assert server.gen >= 1  # answered: its token moved the metrics

        server.stuck = True
        time.sleep(0.5)  # the next probe goes out and hangs
        deadline = time.monotonic() + 10
        verdict = live.check()
        while verdict.state != "hung" and time.monotonic() < deadline:
            time.sleep(0.1)
            verdict = live.check()
        assert verdict.state == "hung", verdict
        assert "probe unanswered" in verdict.evidence
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.unit
def test_the_families_are_vllms_names():
    """The names read are the ones vLLM 0.32 registers (vllm/v1/metrics/loggers.py)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("vllm")  # located, not imported (that takes seconds)
    assert spec is not None and spec.origin is not None
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    for family in liveness.ENGINE_FAMILIES:
        assert f'"{family}"' in source, family


@pytest.mark.integration
def test_without_engine_statistics_nothing_is_judged_and_no_probe_goes_out():
    """vLLM started with --disable-log-stats writes none of the families: never hung, never probed."""

    class Bare(_Handler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(b"# TYPE http_requests_total counter\nhttp_requests_total 7.0\n", "text/plain")
            elif self.path == "/load":
                self._send(json.dumps({"server_load": 3}).encode())  # requests in flight, stuck or not

    server = _Vllm()
    server.RequestHandlerClass = Bare
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        live = Liveness(server.url, stall_after=1, model="m", probe_idle_s=0.1)
        for _ in range(15):
            assert live.check().state == "live"
            time.sleep(0.1)
        assert server.completions == []
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_requests_the_engine_does_not_show_send_a_probe_only_at_the_next_look(monkeypatch):
    """A request is in the API server's hands for milliseconds before the engine shows it: a probe at
    the first look would follow most arrivals (and count as a request). One still unseen at the next
    look, with nothing moved, is asked about."""
    monkeypatch.setattr(liveness, "UNSEEN_S", 0.5)

    class Busy(_Handler):
        def do_GET(self) -> None:
            if self.path == "/load":
                self._send(json.dumps({"server_load": 2}).encode())
            else:
                super().do_GET()

    server = _Vllm()
    server.RequestHandlerClass = Busy
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        live = Liveness(server.url, stall_after=30, model="m", probe_idle_s=3600)
        assert live.check().state == "live"
        time.sleep(0.2)
        assert live.check().state == "live"
        assert server.completions == []  # not yet: it may be on its way to the engine
        time.sleep(0.5)
        live.check()
        assert wait_for(lambda: len(server.completions) == 1), server.completions
    finally:
        server.shutdown()
        server.server_close()


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
