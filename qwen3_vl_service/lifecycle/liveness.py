"""Is vLLM's engine making progress? A hung engine is a dead engine (STALL_AFTER).

vLLM's API server keeps answering ``/health`` (200) and ``/metrics`` while its
``VLLM::EngineCore`` is stuck: an NCCL collective that never returns, a stuck
kernel, a deadlocked worker, a ``kill -STOP``. ``/health`` only asks the API
server whether the engine has *reported* an error. What does tell: every value
below is written by the API server only when the engine sends the stats of a
finished step (vllm/v1/metrics/loggers.py, ``PrometheusStatLogger.record``;
the same names in vLLM 0.26 and 0.32), so while the engine is stuck they all
freeze, and while it works at least one of them moves at every step:

- ``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` (gauges) and
  ``vllm:kv_cache_usage_perc`` (gauge: grows with every chunk of a prefill);
- ``vllm:generation_tokens``, ``vllm:prompt_tokens``, ``vllm:request_success``,
  ``vllm:num_preemptions``, ``vllm:prefix_cache_queries`` (counters);
- ``vllm:iteration_tokens_total`` (histogram: one observation per step that produced output).

Hung = the engine has work (it says requests run or wait, or our probe is
out) and none of those values has changed for STALL_AFTER seconds. The probe
is a 1-token completion. It goes out when the API server's ``/load`` counts
requests in flight that the engine does not show: an engine stuck while idle
reports nothing new (its gauges froze at 0), and a request still in the API
server's hands (a video being fetched or decoded for minutes) is not the
engine's work, so only the engine's answer to the probe tells the two apart.
It also goes out every PROBE_IDLE_S seconds when nothing moves, so a hang
while idle is found before a user's request meets it.

A long prefill is not a hang. vLLM's V1 scheduler cuts every prompt into chunks
of at most ``--max-num-batched-tokens`` (chunked prefill is always on), and each
chunk allocates KV cache blocks for its tokens: ``vllm:kv_cache_usage_perc``
moves at every chunk, seconds apart, however long the prompt (a 1M-token prompt
is about 120 chunks of 8,192 tokens; on one H200 with 8 of 94 layers 790,000
tokens took 148.6 s, about 1.5 s a chunk, some 20 s at 94 layers and more for
the last chunks, whose attention spans the whole prompt). STALL_AFTER bounds one
engine step, not one request: keep it well above the longest step (default
180 s; vLLM itself gives a multi-GPU step VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS,
300 s, before it fails the engine).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import requests
from prometheus_client.parser import text_string_to_metric_families

# Families written from the engine's step stats (a counter's family name drops "_total").
ENGINE_FAMILIES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:generation_tokens",
    "vllm:prompt_tokens",
    "vllm:request_success",
    "vllm:num_preemptions",
    "vllm:prefix_cache_queries",
    "vllm:iteration_tokens_total",
)
RUNNING, WAITING = ENGINE_FAMILIES[0], ENGINE_FAMILIES[1]
PROBE_IDLE_S = 60.0  # with nothing in flight and nothing moving for this long, a probe goes out
UNSEEN_S = 4.0  # requests in flight that the engine does not show for this long: a probe goes out
HTTP_TIMEOUT_S = 5.0  # /metrics and /load: the API server answers them even when the engine is stuck


@dataclass(frozen=True)
class Sample:
    """What one read of /metrics and /load says."""

    progress: tuple[tuple[str, tuple[tuple[str, str], ...], float], ...]  # every engine-fed value
    running: float
    waiting: float
    in_flight: int | None  # the API server's /load; None when it does not say


def parse(metrics_text: str, in_flight: int | None = None) -> Sample:
    """A Sample from vLLM's /metrics text (ValueError when it is not Prometheus text)."""
    values: list[tuple[str, tuple[tuple[str, str], ...], float]] = []
    sums = {RUNNING: 0.0, WAITING: 0.0}
    for family in text_string_to_metric_families(metrics_text):
        if family.name not in ENGINE_FAMILIES:
            continue
        for s in family.samples:
            if s.name.endswith("_created"):  # when the series was made, not progress
                continue
            values.append((s.name, tuple(sorted(s.labels.items())), float(s.value)))
            if family.name in sums:
                sums[family.name] += float(s.value)
    return Sample(tuple(sorted(values)), sums[RUNNING], sums[WAITING], in_flight)


@dataclass(frozen=True)
class Verdict:
    state: str  # "live", "stalling" (no progress yet within STALL_AFTER) or "hung"
    evidence: str = ""


class Stall:
    """The decision, pure: the caller gives each Sample with its time."""

    def __init__(self, stall_after: float) -> None:
        self.stall_after = stall_after
        self.progress: tuple | None = None
        self.changed_at = 0.0
        self.busy_since: float | None = None

    def observe(self, now: float, sample: Sample, *, probe_out_since: float | None = None) -> Verdict:
        if sample.progress != self.progress:
            self.progress, self.changed_at = sample.progress, now
        busy = sample.running + sample.waiting > 0 or probe_out_since is not None
        if not busy:
            self.busy_since = None
            return Verdict("live")
        if self.busy_since is None:
            self.busy_since = now if probe_out_since is None else min(now, probe_out_since)
        quiet = now - max(self.changed_at, self.busy_since)
        what = (
            f"{sample.running:.0f} running and {sample.waiting:.0f} waiting in the engine, "
            f"{'?' if sample.in_flight is None else sample.in_flight} in flight in the API server"
        )
        if probe_out_since is not None:
            what += f", a 1-token probe unanswered for {now - probe_out_since:.0f} s"
        if quiet < self.stall_after:
            return (
                Verdict("live")
                if quiet < min(30.0, self.stall_after / 2)
                else Verdict("stalling", f"no engine progress for {quiet:.0f} s ({what})")
            )
        return Verdict(
            "hung",
            f"no engine progress for {quiet:.0f} s (STALL_AFTER={self.stall_after:g}) with {what}: "
            "/metrics shows no token generated, no prompt chunk (KV cache use unchanged) and no request "
            "finished while /health still answers",
        )

    def idle_for(self, now: float) -> float:
        """How long nothing has moved and nothing was in flight (0 while busy)."""
        return 0.0 if self.busy_since is not None else now - self.changed_at


class Probe:
    """One 1-token completion at a time, in a thread: the supervisor's loop never waits for it."""

    def __init__(self, url: str, *, model: str, api_key: str, timeout: float) -> None:
        self.url, self.model, self.api_key, self.timeout = url, model, api_key, timeout
        self.sent_at: float | None = None  # monotonic time of the probe out, None when none is
        self.last_error = ""
        self._lock = threading.Lock()  # between this loop and the probe's thread (no signal handler)

    def out_since(self) -> float | None:
        with self._lock:
            return self.sent_at

    def send(self, now: float) -> None:
        with self._lock:
            if self.sent_at is not None:
                return
            self.sent_at = now
        threading.Thread(target=self._run, name="liveness-probe", daemon=True).start()

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "prompt": "ping", "max_tokens": 1, "temperature": 0}
        error = ""
        try:
            with requests.Session() as session:
                session.trust_env = False  # the server is on this node: never through a proxy
                resp = session.post(self.url, json=body, headers=headers, timeout=self.timeout)
            if resp.status_code != 200:
                error = f"answered {resp.status_code}"
        except requests.RequestException as exc:
            error = type(exc).__name__
        with self._lock:
            self.sent_at, self.last_error = None, error


class Liveness:
    """Reads /metrics and /load of one vLLM, sends the idle probe, and says live, stalling or hung."""

    def __init__(
        self,
        base_url: str,
        *,
        stall_after: float,
        model: str,
        api_key: str = "",
        probe_idle_s: float = PROBE_IDLE_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.stall = Stall(stall_after)
        self.probe = Probe(
            f"{self.base_url}/v1/completions", model=model, api_key=api_key, timeout=stall_after + 30
        )
        self.probe_idle_s = probe_idle_s
        self.verdict = Verdict("live")
        self.unseen_since: float | None = (
            None  # requests in flight that the (idle, unmoving) engine does not show
        )

    def check(self, now: float | None = None) -> Verdict:
        """One look (two short GETs); the Verdict, also kept in .verdict. No answer: the last one stands
        (a dead API server is /health's business)."""
        now = time.monotonic() if now is None else now
        sample = self._sample()
        if sample is None:
            return self.verdict
        if not sample.progress:
            # No engine statistics at all (EXTRA_VLLM_ARGS=--disable-log-stats): nothing to judge by,
            # and a frozen-looking engine is no evidence. Live, and no probes.
            self.verdict = Verdict("live", "vLLM's /metrics has no engine statistics (--disable-log-stats?)")
            return self.verdict
        self.verdict = self.stall.observe(now, sample, probe_out_since=self.probe.out_since())
        if sample.running + sample.waiting == 0 and (sample.in_flight or 0) > 0:
            if self.unseen_since is None or self.stall.changed_at > self.unseen_since:
                self.unseen_since = now
        else:
            self.unseen_since = None
        # A request reaches the engine milliseconds after it arrives: one still unseen at the next look
        # (UNSEEN_S), with nothing moved meanwhile, is worth asking the engine about. Not at the first
        # look: every arrival would send a probe, and probes count as requests in vLLM's metrics.
        unseen = self.unseen_since is not None and now - self.unseen_since >= UNSEEN_S
        if self.verdict.state == "live" and (self.stall.idle_for(now) >= self.probe_idle_s or unseen):
            self.probe.send(now)
        return self.verdict

    def _sample(self) -> Sample | None:
        with requests.Session() as session:
            session.trust_env = False
            try:
                resp = session.get(f"{self.base_url}/metrics", timeout=HTTP_TIMEOUT_S)
                if resp.status_code != 200:
                    return None
                text = resp.text
            except requests.RequestException:
                return None
            in_flight = None
            with contextlib.suppress(requests.RequestException, ValueError, KeyError, TypeError):
                load = session.get(f"{self.base_url}/load", timeout=HTTP_TIMEOUT_S)
                if load.status_code == 200:
                    in_flight = int(load.json()["server_load"])
        try:
            return parse(text, in_flight)
        except ValueError:
            return None


__all__ = ["ENGINE_FAMILIES", "Liveness", "Probe", "Sample", "Stall", "Verdict", "parse"]
