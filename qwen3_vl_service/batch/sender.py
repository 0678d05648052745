"""Sending the jobs: a fixed number in flight, retries with backoff, and a wait while the service is down.

- 429 and 5xx answers and per-request timeouts are retried up to RETRIES
  times, with exponential backoff and jitter (a Retry-After header is
  honoured); other answers (400: a bad request) are final.
- A refused or dropped connection means the service itself is down (the
  supervisor may be restarting vLLM: minutes for the 235B model): every
  worker waits on one shared /health poll for up to WAIT_SERVICE seconds,
  and an attempt cut short by the outage does not count against the
  request's retries. When the service stays away longer, the run stops
  sending; a rerun picks up what is left.
- ``stop`` (set on SIGTERM/SIGINT): no new request starts, a request
  waiting to retry gives up, those in flight finish (the caller bounds that
  with its grace period by cancelling the workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from qwen3_vl_service.batch.jobs import Job

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
HEALTH_POLL_S = 1.0


@dataclass(frozen=True)
class Options:
    base: str  # http://host:port of the service (or the router)
    headers: dict[str, str]
    concurrency: int
    timeout: float  # seconds per attempt
    retries: int  # extra attempts after the first, for 429/5xx/timeouts
    backoff: float  # seconds before the first retry; doubled each time
    max_backoff: float
    wait_service: float  # seconds to wait for a service that is down


@dataclass
class Outcome:
    job: Job
    status: int | None  # the HTTP status of the last attempt; None: no answer
    body: Any = None
    request_id: str = ""
    error: str | None = None
    attempts: int = 0
    interrupted: bool = False  # stopped before it was answered: neither written nor failed

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    def usage(self) -> tuple[int, int]:
        """(prompt, completion) tokens of an answer."""
        usage = self.body.get("usage") if isinstance(self.body, dict) else None
        if not isinstance(usage, dict):
            return 0, 0
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class ServiceGate:
    """One /health poll shared by every worker that found the service down."""

    def __init__(self, session: aiohttp.ClientSession, base: str, deadline_s: float, stop: asyncio.Event):
        self._session, self._url, self._deadline = session, f"{base}/health", deadline_s
        self._stop = stop
        self._poll: asyncio.Task[bool] | None = None
        self.gone = False  # the service stayed down past the deadline: stop sending

    async def wait_up(self) -> bool:
        """Whether the service answers /health again (at once, or within the deadline)."""
        if self.gone:
            return False
        if self._poll is None or self._poll.done():
            self._poll = asyncio.ensure_future(self._until_up())
        up = await asyncio.shield(self._poll)
        self.gone = self.gone or (not up and not self._stop.is_set())
        return up

    async def _until_up(self) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + self._deadline
        while not self._stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self._session.get(self._url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return True
            if loop.time() >= end:
                return False
            await _sleep(HEALTH_POLL_S, self._stop)
        return False


async def _sleep(seconds: float, stop: asyncio.Event) -> bool:
    """Sleep SECONDS; False (at once) when STOP is set meanwhile."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
        return False
    return True


def _retry_after(headers: Any) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After", "")))
    except (TypeError, ValueError):
        return 0.0


def _detail(body: Any, text: str) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else (err or body.get("message"))
        if msg:
            return str(msg)
    return text.strip()[:300] or "(empty answer)"


class Sender:
    def __init__(self, session: aiohttp.ClientSession, opts: Options, stop: asyncio.Event) -> None:
        self.session, self.opts, self.stop = session, opts, stop
        self.gate = ServiceGate(session, opts.base, opts.wait_service, stop)

    async def _attempt(self, job: Job) -> tuple[int, Any, str, str, float]:
        """One POST: (status, parsed body or None, text, request id, Retry-After s); raises on no answer."""
        headers = {"Content-Type": "application/json", **self.opts.headers}
        timeout = aiohttp.ClientTimeout(total=self.opts.timeout)
        async with self.session.post(
            self.opts.base + job.url, data=job.payload, headers=headers, timeout=timeout
        ) as resp:
            text = await resp.text()
            body = None
            with contextlib.suppress(ValueError):
                body = json.loads(text)
            rid = resp.headers.get("X-Request-Id") or (body.get("id", "") if isinstance(body, dict) else "")
            wait = _retry_after(resp.headers) if resp.status in RETRY_STATUS else 0.0
            return resp.status, body, text, str(rid), wait

    async def send(self, job: Job) -> Outcome:
        """JOB until it is answered, fails for good, or the run stops."""
        out = Outcome(job, None)
        tries = 0
        while True:
            if self.stop.is_set():
                out.interrupted = True
                return out
            out.attempts += 1
            tries += 1
            wait = 0.0
            try:
                status, body, text, rid, wait = await self._attempt(job)
                out.status, out.body, out.request_id, out.error = status, body, rid, None
                if status != 200:
                    out.error = f"HTTP {status}: {_detail(body, text)}"
                elif not isinstance(body, dict):
                    out.error = f"HTTP 200 with a body that is not a JSON object: {text.strip()[:200]}"
                if status not in RETRY_STATUS:
                    return out
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                out.status, out.error = None, f"no answer: {type(exc).__name__}: {exc}"
                was_up = await self._health_now()
                if not was_up:
                    tries -= 1  # the outage, not the request: this attempt does not count
                    if not await self.gate.wait_up():
                        out.interrupted = self.stop.is_set()
                        if self.gate.gone:
                            out.error = f"the service did not answer /health for {self.opts.wait_service:g} s"
                        return out
                    continue
            except asyncio.TimeoutError:
                out.status, out.error = None, f"no answer within {self.opts.timeout:g} s"
            if tries > self.opts.retries:
                return out
            delay = min(self.opts.max_backoff, self.opts.backoff * 2 ** (tries - 1)) * random.uniform(0.5, 1)
            if not await _sleep(max(delay, min(wait, self.opts.max_backoff)), self.stop):
                out.interrupted = True
                return out

    async def _health_now(self) -> bool:
        try:
            async with self.session.get(
                f"{self.opts.base}/health", timeout=aiohttp.ClientTimeout(total=5)
            ) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def run(self, jobs: Iterable[Job], on_outcome: Callable[[Outcome], None]) -> None:
        """Send JOBS with opts.concurrency in flight; ON_OUTCOME for each as it ends."""
        it: Iterator[Job] = iter(jobs)

        async def worker() -> None:
            while not self.stop.is_set() and not self.gate.gone:
                job = next(it, None)
                if job is None:
                    return
                on_outcome(await self.send(job))

        workers = [asyncio.ensure_future(worker()) for _ in range(max(1, self.opts.concurrency))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


__all__ = ["RETRY_STATUS", "Options", "Outcome", "Sender", "ServiceGate"]
