"""The aiohttp application of the media server, and one event loop serving it on a socket.

HTTP (sendfile, Range, HEAD, ETag and the conditional requests) is aiohttp's
``FileResponse``, used through its public API only; policy.py decides which
file a URL names. Methods other than GET and HEAD get 405.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from qwen3_vl_service import __version__
from qwen3_vl_service.core.mediatypes import content_type_for
from qwen3_vl_service.core.names import MEDIA_SERVICE_ID
from qwen3_vl_service.media.policy import MAX_PATH, aiohttp_etag, clean_segments, range_decision, resolve_file

# In-flight downloads get this long to finish after SIGTERM; the stop command
# waits longer than this before it escalates to SIGKILL.
SHUTDOWN_TIMEOUT_S = 5.0
LISTEN_BACKLOG = 1024

log = logging.getLogger(MEDIA_SERVICE_ID)


@dataclass(frozen=True)
class MediaSettings:
    """What one media server runs with; every value already validated (config.py)."""

    host: str
    port: int
    root: Path  # absolute, symlinks resolved
    allowed_types: tuple[str, ...]
    log_file: Path
    pid_file: Path | None
    workers: int = 1  # serving processes; above 1, a supervisor runs them (workers.py)
    log_max_bytes: int = 100 * 1024 * 1024  # LOG_MAX_MB
    log_backups: int = 5  # LOG_BACKUPS


def not_found() -> web.Response:
    # One response for every refusal: no hint whether the file exists.
    return web.Response(status=404, text="404: Not Found")


class MediaFileResponse(web.FileResponse):
    """aiohttp's FileResponse for the file resolve_file() checked, minus the request headers in DROP.

    aiohttp would serve a "clip.mp4.gz" neighbour to a client that accepts
    gzip (its pre-compressed-file feature: a type we were not asked to serve),
    so Accept-Encoding is always dropped (a clone of the request: ~25 us);
    Range is dropped when it is to be ignored (policy.range_decision).
    """

    def __init__(self, path: str, drop: tuple[str, ...], headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self._drop = drop

    async def prepare(self, request: web.BaseRequest) -> Any:
        if any(k.lower() in self._drop for k in request.headers):
            kept = [(k, v) for k, v in request.headers.items() if k.lower() not in self._drop]
            request = request.clone(headers=kept)
        return await super().prepare(request)


def make_app(settings: MediaSettings, health_pid: int | None = None) -> web.Application:
    """GET/HEAD of the files under settings.root that the policy allows, and GET /health."""
    root = str(settings.root)
    allowed = frozenset(settings.allowed_types)
    # Every allowed type has one (config's MEDIA_ALLOWED_TYPES rule).
    ctypes = {ext: content_type_for(ext) or "application/octet-stream" for ext in allowed}
    health_body = json.dumps(
        {
            "service": MEDIA_SERVICE_ID,
            "status": "ok",
            "pid": health_pid or os.getpid(),  # the supervisor's, when workers answer
            "root": root,
            "allowed_types": sorted(allowed),
            "workers": settings.workers,
            "version": __version__,
        }
    )

    async def health(request: web.Request) -> web.Response:
        return web.Response(text=health_body, content_type="application/json")

    async def serve_file(request: web.Request) -> web.StreamResponse:
        segments = clean_segments(request.rel_url.raw_path)
        if segments is None:
            return not_found()
        found = resolve_file(root, segments, allowed)  # inline: see InlineExecutor
        if found is None:
            return not_found()
        real, st = found
        decision = range_decision(request.headers, aiohttp_etag(st))
        if decision == "unsatisfiable":
            return web.Response(status=416, headers={"Content-Range": f"bytes */{st.st_size}"})
        drop = ("accept-encoding", "range") if decision == "ignore" else ("accept-encoding",)
        ext = segments[-1].rpartition(".")[2].lower()
        headers = {"Content-Type": ctypes[ext], "X-Content-Type-Options": "nosniff"}
        return MediaFileResponse(real, drop, headers)

    app = web.Application(middlewares=[_no_tracebacks])
    app.router.add_get("/health", health)
    app.router.add_get("/{tail:.*}", serve_file)  # add_get also answers HEAD; the rest get 405
    return app


@web.middleware
async def _no_tracebacks(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:  # a client never sees a traceback; the log does
        log.exception("error while serving %s %s", request.method, request.rel_url.raw_path)
        return web.Response(status=500, text="500: Internal Server Error")


class AccessLogger(AbstractAccessLogger):
    """Combined-style line with the raw (still encoded) path, so that a
    crafted URL cannot forge log lines."""

    def log(self, request: Any, response: Any, time: float) -> None:
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %s %.4f %r',
            request.remote,
            request.method,
            request.rel_url.raw_path_qs[:MAX_PATH],
            request.version.major,
            request.version.minor,
            response.status,
            response.content_length if response.content_length is not None else "-",
            time,
            request.headers.get("User-Agent", "-")[:200],
        )


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor, running each call at once in the loop's thread.

    aiohttp's FileResponse hands stat(), open() and close() of every file to
    the default executor. On a local or page-cached file these take a few
    microseconds, while the round trip to a worker thread and back costs far
    more (GIL hand-over and a thread wake-up, worst on a busy node). This is
    nginx's default too (blocking metadata calls, no `aio threads`), and
    sendfile() already reads the file data in the loop's thread, so a slow
    file system stalls the loop with or without this.

    With DIRECT, the result comes back as an already finished asyncio future,
    which run_in_executor() passes through (asyncio.wrap_future returns
    asyncio futures as they are) and which `await` does not even yield on; a
    concurrent future would cost a self-pipe wake-up of the loop per call.
    serve_socket() checks that pass-through before it asks for it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(max_workers=1)
        self._loop = loop

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        loop = self._loop
        future: Any = (
            loop.create_future()
            if loop is not None and _running_loop() is loop
            else concurrent.futures.Future()
        )
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            future.set_exception(exc)
        return future


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _wrap_future_passes_through(loop: asyncio.AbstractEventLoop) -> bool:
    probe = loop.create_future()
    probe.set_result(None)
    try:
        return asyncio.wrap_future(probe, loop=loop) is probe
    except (AssertionError, TypeError):
        return False


class SendfileFirstLoop(asyncio.SelectorEventLoop):
    """The stock event loop, whose sendfile() first sends what the socket takes right away.

    aiohttp's FileResponse sends a file body with loop.sendfile(), the public
    asyncio API. The stock implementation always takes a round through the
    loop (pause_reading, a wait for an empty write buffer, a future, resume,
    lseek) before its first os.sendfile(). A file that fits the socket buffer
    (a 1 MiB image does, on loopback) goes here in one os.sendfile() call once
    the headers are in the kernel; the rest goes through the stock path.
    bench/bench_media.py, 1 MiB files: ~0.2 ms of CPU less per response.
    The stock asyncio loop, not uvloop: uvloop has no loop.sendfile() and
    aiohttp would fall back to read() + write() through a thread.
    """

    async def sendfile(
        self, transport: Any, file: Any, offset: int = 0, count: int | None = None, *, fallback: bool = True
    ) -> int:
        sock = transport.get_extra_info("socket")
        if not count or sock is None or transport.is_closing() or transport.get_write_buffer_size():
            return await super().sendfile(transport, file, offset, count, fallback=fallback)
        try:
            sent = os.sendfile(sock.fileno(), file.fileno(), offset, count)
        except OSError:  # EAGAIN: the buffer is full; any other error: the stock path reports it
            sent = 0
        if sent == count:
            file.seek(offset + sent)  # where the stock sendfile() leaves the file
            return sent
        return sent + await super().sendfile(transport, file, offset + sent, count - sent, fallback=fallback)


def run_serving(coro: Any) -> int:
    """Run CORO (serve_socket) to its end on a SendfileFirstLoop; its exit code."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=SendfileFirstLoop) as runner:
            return runner.run(coro)
    # Python 3.10 (requires-python): no asyncio.Runner yet; the same loop by hand.
    loop = SendfileFirstLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def serve_socket(
    settings: MediaSettings,
    sock: socket.socket,
    *,
    supervisor: int | None = None,
    on_listening: Callable[[], None] = lambda: None,
) -> int:
    """Serve on SOCK until SIGTERM (or SIGINT); the exit code (130 after SIGINT).

    With SUPERVISOR (its pid) this is one of its workers: /health names the
    supervisor, Ctrl+C is left to it, and the worker stops when it is gone.
    ON_LISTENING runs once the socket accepts.
    """
    loop = asyncio.get_running_loop()
    loop.set_default_executor(InlineExecutor(loop if _wrap_future_passes_through(loop) else None))
    stop = asyncio.Event()
    got: list[int] = []

    def on_signal(signum: int) -> None:  # only sets the flag; the loop below acts
        got.append(signum)
        stop.set()

    # A worker leaves Ctrl+C (sent to the whole process group) to the supervisor.
    for signum in (signal.SIGTERM,) if supervisor else (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if supervisor:

        def watch_supervisor() -> None:  # where PR_SET_PDEATHSIG is missing (childproc.die_with_parent)
            if os.getppid() != supervisor:
                on_signal(signal.SIGTERM)
            else:
                loop.call_later(1.0, watch_supervisor)

        loop.call_later(1.0, watch_supervisor)

    runner = web.AppRunner(
        make_app(settings, health_pid=supervisor),
        handle_signals=False,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("aiohttp.access"),
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    # SockSite listens again with its backlog: keep bind_socket()'s.
    await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
    on_listening()
    await stop.wait()
    if not supervisor:
        log.info("signal %d: stopping (in-flight requests get %.0f s)", got[0], SHUTDOWN_TIMEOUT_S)
    await runner.cleanup()
    return 130 if got[0] == signal.SIGINT else 0
