"""The media file server: local images and videos for vLLM over loopback HTTP.

vLLM fetches media by URL, so requests can point at local files as
``http://127.0.0.1:8080/videos/clip.mp4``. This replaces the
``python -m http.server`` of the original scripts (no Range, follows
symlinks out of its root, lists directories, binds every interface).

HTTP itself (sendfile, Range, HEAD, ETag and the conditional requests) is
aiohttp's ``FileResponse``; this module only decides *which* file a URL may
name. Everything refused is the same 404, so that a client cannot tell a
missing file from a forbidden one: paths outside the root (``..``, percent-
and double-encoded forms, backslashes, absolute paths, NUL and control
bytes), symlinks whose target leaves the root, hidden names, anything that is
not a regular readable file, directories (no listings) and extensions not in
the allowed list. Methods other than GET and HEAD get 405.

Commands (exit codes as everywhere: 0 ok, 1 runtime failure such as a busy
port, 2 bad usage or config, 130 interrupted)::

    python media_server.py                           # settings from ./config.env
    python media_server.py --config my.env --port 8081
    python media_server.py --root ./media --port 0   # any free port, printed
    python media_server.py --workers 1               # one process, no supervisor

The launcher calls ``ensure_running()``, which reuses a healthy server of ours
or starts a detached one (``--detach``: the server double-forks once its port
is bound, so it is never left a zombie of the process that execs vLLM), and
``stop_service.py --all`` stops it by its pid file. ``GET /health`` answers
JSON naming this service, its pid, root and allowed types.

Processes: ``--workers`` / MEDIA_WORKERS (auto: min(CPUs, 8)) event loops
share the one listening socket under a supervisor, whose pid is the one in
the pid file and in /health, and which alone writes the log (_Supervisor);
``--workers 1`` is a single process. bench/bench_media.py measures it against
nginx: large files go at nginx's speed (both are sendfile-bound). A 1 MiB
response costs nginx ~0.2 ms of CPU, nearly all of it the kernel's; ours the
same plus ~0.2 ms of aiohttp's request handling in Python, so one client at a
time gets 0.5-0.65x nginx's rate, while 16 or 64 clients on a 32-core GPU
host get 0.87-0.98x (on a 2-core machine, shared with the load generator,
0.6-0.7x). Far above what vLLM asks either way: a few fetches per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import http.client
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from . import __version__
from .cli import ArgumentParser, run
from .errors import CheckFailed, ConfigError, UsageError

if TYPE_CHECKING:  # aiohttp is imported only by the server itself, not by the launcher's checks
    from aiohttp import web

SERVICE_ID = "qwen3_vl_service.media"
DEFAULT_TYPES = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff", "mp4", "webm", "mov", "mkv", "avi")
DEFAULT_LOG_FILE = Path("logs/media_server.log")
PID_FILE_NAME = "media_server.pid"
LOG_FILE_NAME = "media_server.log"
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
# In-flight downloads get this long to finish after SIGTERM; the stop command
# waits longer than this before it escalates to SIGKILL.
SHUTDOWN_TIMEOUT_S = 5.0
LISTEN_BACKLOG = 1024
# --workers / MEDIA_WORKERS: 'auto' is min(CPUs, WORKERS_AUTO_MAX). 8, measured
# on a 32-core GPU host (bench/bench_media.py): 1 MiB files at 16 clients
# 0.87x nginx with 4 workers, 0.97x with 8; a 1 GiB file at 64 clients 0.80x
# and 1.08x. Idle workers cost only their memory (~30 MB each); the CPUs stay
# vLLM's unless media is being fetched.
WORKERS_AUTO_MAX = 8
WORKERS_MAX = 64
# A worker that dies unexpectedly is replaced, up to this many times in this window.
RESTARTS_MAX = 5
RESTART_WINDOW_S = 60.0
# The supervisor writes the workers' log records at most this often (batches).
RELAY_BATCH_S = 0.02

# Our own table rather than the host's /etc/mime.types, so that the
# Content-Type of the common formats does not depend on the node's packages.
# Other extensions fall back to Python's mimetypes (image/, video/, audio/ only).
MIME_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "avif": "image/avif",
    "heic": "image/heic",
    "mp4": "video/mp4",
    "m4v": "video/mp4",
    "webm": "video/webm",
    "mov": "video/quicktime",
    "mkv": "video/x-matroska",
    "avi": "video/x-msvideo",
}
_MEDIA_MAJOR = ("image/", "video/", "audio/")
_EXT_RE = re.compile(r"[a-z0-9]{1,16}")
# What is left of a segment after one round of percent-decoding must not be
# encoded again: "%252e%252e" decodes to "%2e%2e", which a second decoder
# anywhere downstream would turn into "..".
_STILL_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")
_MAX_PATH = 4096

log = logging.getLogger(SERVICE_ID)


# ---------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class MediaSettings:
    host: str
    port: int
    root: Path  # absolute, symlinks resolved
    allowed_types: tuple[str, ...]
    log_file: Path
    pid_file: Path | None
    workers: int = 1  # serving processes; above 1, a supervisor runs them (see _Supervisor)


def parse_types(value: str | Iterable[str]) -> tuple[str, ...]:
    """'jpg, .PNG mp4' or an iterable -> ('jpg', 'png', 'mp4'); ValueError says what is allowed."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    types: list[str] = []
    for item in items:
        ext = item.strip().lower().lstrip(".")
        if not _EXT_RE.fullmatch(ext):
            raise ValueError(f"{item!r} is not a file extension (letters and digits, like 'mp4')")
        if content_type_for(ext) is None:
            raise ValueError(f"{item!r} is not an image or video type")
        if ext not in types:
            types.append(ext)
    if not types:
        raise ValueError("the list is empty")
    return tuple(types)


def content_type_for(ext: str) -> str | None:
    """The Content-Type served for a lower-case extension, or None if it is not media."""
    if ext in MIME_TYPES:
        return MIME_TYPES[ext]
    import mimetypes

    guessed = mimetypes.guess_type(f"x.{ext}", strict=False)[0]
    return guessed if guessed and guessed.startswith(_MEDIA_MAJOR) else None


def check_root(root: str | Path, setting: str = "--root") -> Path:
    path = Path(os.path.expandvars(str(root))).expanduser()
    real = Path(os.path.realpath(path))
    if not real.exists():
        raise ConfigError(
            f"media root {str(path)!r} does not exist", fix=f"create it (mkdir -p {path}) or change {setting}"
        )
    if not real.is_dir():
        raise ConfigError(f"media root {str(path)!r} is not a directory", fix=f"point {setting} at a folder")
    if not os.access(real, os.R_OK | os.X_OK):
        raise ConfigError(f"media root {str(path)!r} is not readable by this user", fix="fix its permissions")
    return real


# ---------------------------------------------------------------------------
# Which file a URL names (the whole security policy lives here)


def clean_segments(raw_path: str) -> list[str] | None:
    """The decoded path segments of a request, or None if the path must be refused.

    ``raw_path`` is the request target's path as sent (still percent-encoded).
    Decoding happens once, here, per segment, so an encoded "/" or "\\" can
    never create a new segment.
    """
    if not raw_path.startswith("/") or len(raw_path) > _MAX_PATH or "\\" in raw_path:
        return None
    segments = []
    for raw in raw_path[1:].split("/"):
        try:
            seg = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return None
        if (
            not seg  # "//etc/passwd", "a//b", trailing "/": absolute-path tricks and directories
            or seg.startswith(".")  # ".", "..", hidden files and folders
            or "/" in seg
            or "\\" in seg
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in seg)  # NUL and control bytes
            or _STILL_ENCODED.search(seg)  # double encoding
        ):
            return None
        segments.append(seg)
    return segments


def resolve_file(
    root: str, segments: Sequence[str], allowed: frozenset[str]
) -> tuple[str, os.stat_result] | None:
    """The real path and stat of the file the segments name under ROOT, or None to refuse.

    ROOT is already a real path. Symlinks inside the root are followed as long
    as the target stays inside it and is not hidden. Called in the loop's
    thread, like aiohttp's own stat() and open() here (see InlineExecutor).
    """
    if not segments:
        return None
    ext = segments[-1].rpartition(".")[2].lower() if "." in segments[-1] else ""
    if ext not in allowed:
        return None
    try:
        real, st = _real_path_and_stat(os.path.join(root, *segments))
        prefix = root if root.endswith(os.sep) else root + os.sep
        if not real.startswith(prefix):
            return None
        if any(part.startswith(".") for part in real[len(prefix) :].split(os.sep)):
            return None
        # Only regular files: a FIFO would block the open, a device is never media.
        if not stat.S_ISREG(st.st_mode) or not os.access(real, os.R_OK):
            return None
    except (OSError, ValueError):
        return None
    # There is a window between this check and aiohttp's open(); closing it
    # needs write access to the root, which only its owner has.
    return real, st


def _real_path_and_stat(path: str) -> tuple[str, os.stat_result]:
    """Symlinks resolved, and the target's stat, in one lookup.

    O_PATH opens no file (no device driver, no blocking FIFO), and the kernel
    names the object it found in /proc/self/fd: half the cost of the
    component-by-component os.path.realpath(), which remains the fallback.
    """
    if _O_PATH:
        fd = os.open(path, _O_PATH | os.O_CLOEXEC)
        try:
            return os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd)
        except FileNotFoundError:  # no /proc: fall through
            pass
        finally:
            os.close(fd)
    real = os.path.realpath(path, strict=True)
    return real, os.stat(real)


_O_PATH = getattr(os, "O_PATH", 0) if sys.platform.startswith("linux") else 0


def range_decision(headers: Any, etag: str) -> str:
    """'keep', 'ignore' or 'unsatisfiable' for the request's Range header.

    aiohttp parses a single byte range (and answers 416 when it is malformed
    or starts past the end); this covers what it gets wrong (RFC 9110 14.2):
    a unit other than bytes must be ignored, a range set with several ranges
    may be ignored (answered with the whole file: no client we serve needs
    multipart/byteranges, and ignoring them avoids the "Apache killer"
    overlapping-ranges amplification), ``bytes=-0`` is unsatisfiable (aiohttp
    would send the whole file as 206), and an If-Range entity tag that does
    not match means the whole file (aiohttp only understands If-Range dates).
    """
    rng = headers.get("Range")
    if rng is None:
        return "keep"
    unit, _, spec = rng.partition("=")
    if unit.strip().lower() != "bytes":
        return "ignore"
    if "," in spec:
        return "ignore"
    if_range = headers.get("If-Range")
    if if_range is not None:
        tag = if_range.strip()
        if tag.startswith(('"', "W/")) and tag != f'"{etag}"':
            return "ignore"
    if spec.strip() == "-0":
        return "unsatisfiable"
    return "keep"


def aiohttp_etag(st: os.stat_result) -> str:
    # The strong ETag that aiohttp's FileResponse sends, for If-Range above.
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


# ---------------------------------------------------------------------------
# The aiohttp application


def _sendfile_now(out_fd: int, in_fd: int, offset: int, count: int) -> int:
    """As much of the range as the socket takes right now (0 if none)."""
    try:
        return os.sendfile(out_fd, in_fd, offset, count)
    except OSError:  # EAGAIN: the buffer is full; any other error: loop.sendfile() reports it
        return 0


def _has_method(cls: type, name: str, params: list[str]) -> bool:
    """Whether CLS still has method NAME with exactly these parameters (aiohttp internals we refine)."""
    import inspect

    fn = getattr(cls, name, None)
    if not callable(fn):
        return False
    try:
        return list(inspect.signature(fn).parameters) == params
    except (TypeError, ValueError):
        return False


def make_app(settings: MediaSettings, health_pid: int | None = None) -> web.Application:
    from aiohttp import web, web_fileresponse

    root = str(settings.root)
    allowed = frozenset(settings.allowed_types)
    ctypes = {ext: content_type_for(ext) for ext in allowed}
    health_body = json.dumps(
        {
            "service": SERVICE_ID,
            "status": "ok",
            "pid": health_pid or os.getpid(),  # the supervisor's, when workers answer
            "root": root,
            "allowed_types": sorted(allowed),
            "workers": settings.workers,
            "version": __version__,
        }
    )
    # Two refinements of aiohttp's FileResponse, each used only while the
    # method it replaces still exists with the same parameters; otherwise
    # aiohttp's own runs (correct, a little slower: see below).
    own_lookup = _has_method(web.FileResponse, "_get_file_path_stat_encoding", ["self", "accept_encoding"])
    fast_sendfile = _has_method(web.FileResponse, "_sendfile", ["self", "request", "fobj", "offset", "count"])

    def not_found() -> web.Response:
        # One response for every refusal: no hint whether the file exists.
        return web.Response(status=404, text="404: Not Found")

    class MediaFileResponse(web.FileResponse):
        """aiohttp's FileResponse for the file resolve_file() checked.

        aiohttp would serve a "clip.mp4.gz" neighbour to a client that accepts
        gzip (its pre-compressed-file feature: a type we were not asked to
        serve). The lookup that finds it is replaced by one that returns our
        file and the stat resolve_file() already took; with an aiohttp where
        that lookup is gone, Accept-Encoding is dropped from the request
        instead (a clone of the request: 25 us, and vLLM's client always sends
        it). Range is dropped when it is to be ignored.
        """

        def __init__(
            self, path: str, st: os.stat_result, drop: tuple[str, ...], headers: dict[str, str]
        ) -> None:
            super().__init__(path, headers=headers)
            self._st = st
            self._drop = drop

        async def prepare(self, request: web.BaseRequest) -> Any:
            if self._drop:
                kept = [(k, v) for k, v in request.headers.items() if k.lower() not in self._drop]
                request = request.clone(headers=kept)
            return await super().prepare(request)

        if own_lookup:

            def _get_file_path_stat_encoding(self, accept_encoding: str) -> tuple[Any, os.stat_result, None]:
                return self._path, self._st, None

        if fast_sendfile:

            async def _sendfile(self, request: Any, fobj: Any, offset: int, count: int) -> Any:
                """aiohttp's _sendfile (headers, loop.sendfile(), EOF), with a first os.sendfile() right away.

                A file that fits the socket buffer (1 MiB does, on loopback)
                goes in that one call, which spares loop.sendfile()'s round:
                pause_reading, add_writer, a wake-up of the loop, remove_writer,
                resume_reading, lseek (-0.08 ms CPU per 1 MiB response here).
                What does not fit goes through loop.sendfile() as before.
                (TCP_CORK around headers and body, nginx's tcp_nopush, was
                measured too: it cost more CPU than the header packet it saves.)
                """
                transport = request.transport
                closing = transport is None or transport.is_closing()
                sock = None if closing else transport.get_extra_info("socket")
                if sock is None or web_fileresponse.NOSENDFILE or self.compression:
                    return await super()._sendfile(request, fobj, offset, count)
                writer = await web.StreamResponse.prepare(self, request)
                # Only once the headers are in the kernel may the body follow them there.
                if writer is not None and writer.output_size and not transport.get_write_buffer_size():
                    sent = _sendfile_now(sock.fileno(), fobj.fileno(), offset, count)
                    offset, count = offset + sent, count - sent
                if count > 0:
                    try:
                        await asyncio.get_running_loop().sendfile(transport, fobj, offset, count)
                    except NotImplementedError:
                        return await self._sendfile_fallback(writer, fobj, offset, count)
                await web.StreamResponse.write_eof(self)
                return writer

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
        drop = ("range",) if decision == "ignore" else ()
        if not own_lookup and "accept-encoding" in request.headers:
            drop += ("accept-encoding",)
        ext = segments[-1].rpartition(".")[2].lower()
        headers = {"Content-Type": ctypes[ext], "X-Content-Type-Options": "nosniff"}
        return MediaFileResponse(real, st, drop, headers)

    @web.middleware
    async def no_tracebacks(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:  # a client never sees a traceback; the log does
            log.exception("error while serving %s %s", request.method, request.rel_url.raw_path)
            return web.Response(status=500, text="500: Internal Server Error")

    app = web.Application(middlewares=[no_tracebacks])
    app.router.add_get("/health", health)
    app.router.add_get("/{tail:.*}", serve_file)  # add_get also answers HEAD; the rest get 405
    return app


def _access_logger_class() -> type:
    from aiohttp.abc import AbstractAccessLogger

    class AccessLogger(AbstractAccessLogger):
        """Combined-style line with the raw (still encoded) path, so that a
        crafted URL cannot forge log lines."""

        def log(self, request: Any, response: Any, time: float) -> None:
            self.logger.info(
                '%s "%s %s HTTP/%d.%d" %d %s %.4f %r',
                request.remote,
                request.method,
                request.rel_url.raw_path_qs[:_MAX_PATH],
                request.version.major,
                request.version.minor,
                response.status,
                response.content_length if response.content_length is not None else "-",
                time,
                request.headers.get("User-Agent", "-")[:200],
            )

    return AccessLogger


# ---------------------------------------------------------------------------
# Process plumbing: logging, pid file, socket, signals


class _SizeRotatingHandler(RotatingFileHandler):
    """RotatingFileHandler without the per-record os.path.exists()/isfile()
    and second format() of Python 3.11's shouldRollover: one access-log line
    per request, so this is on the hot path. Rotates once the file has
    reached maxBytes."""

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        if self.stream is None:
            self.stream = self._open()
        return 0 < self.maxBytes <= self.stream.tell()


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
    _serve() checks that pass-through before it asks for it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(max_workers=1)
        self._loop = loop

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        direct = self._loop is not None and _running_loop() is self._loop
        future: Any = self._loop.create_future() if direct else concurrent.futures.Future()
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


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOGGERS = (SERVICE_ID, "aiohttp.access", "aiohttp.server", "aiohttp.web", "asyncio")


class _LogFormatter(logging.Formatter):
    """LOG_FORMAT, with the date formatted once a second rather than once a
    line; and records relayed from workers (already formatted) as they are."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)
        self._second = -1
        self._date = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._date = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._date},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "relayed", False):
            return record.msg
        return super().format(record)


def setup_logging(log_file: Path) -> RotatingFileHandler:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = _SizeRotatingHandler(
        log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
    )
    handler.setFormatter(_LogFormatter())
    _route_logs(handler)
    return handler


def _route_logs(handler: logging.Handler) -> None:
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _lean_log_records() -> None:
    """Gather for each record only what LOG_FORMAT shows (the logging HOWTO,
    "Optimization"): no caller frame, thread, process or multiprocessing name.
    For the server process only: one access-log record per request."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # Python 3.12+


class _RelayHandler(logging.Handler):
    """A worker's handler: each record, formatted as the log file has it and
    ended by a NUL byte, goes down this worker's own pipe to the supervisor,
    which alone writes and rotates the file (see _Supervisor)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.setFormatter(_LogFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record).replace("\0", "\\0")
            data = memoryview((text + "\0").encode("utf-8", "backslashreplace"))
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            pass  # the supervisor is gone; this worker follows it (_die_with)
        except Exception:  # noqa: BLE001 - a bad log call, as logging reports it
            self.handleError(record)


def read_pid(pid_file: Path | None) -> int | None:
    from .processes import read_pid_file

    return read_pid_file(Path(pid_file)) if pid_file else None


def write_pid_file(pid_file: Path, pid: int) -> None:
    """Write atomically (temp file + rename): a reader sees the old pid or the new one."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = pid_file.with_name(f".{pid_file.name}.{pid}.tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(f"{pid}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, pid_file)


def remove_pid_file(pid_file: Path, pid: int) -> None:
    """Remove the pid file only if it is still ours."""
    if read_pid(pid_file) == pid:
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()


def _is_media_process(pid: int) -> bool:
    from .processes import is_media_pid

    return is_media_pid(pid)


def port_holder(host: str, port: int) -> str:
    """'pid 123 (python3 -m http.server 8080)' for the listener on HOST:PORT, as far as we may see."""
    from .processes import port_holder as holder

    found = holder(host, port)
    if found is None or found[0] is None:
        return "another process (its owner is not visible to this user)"
    return f"pid {found[0]} ({found[1][:120] or '?'})"


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            f"media host {host!r} cannot be resolved ({exc.strerror})", fix="use 127.0.0.1"
        ) from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CheckFailed(
                f"port {port} on {host} is in use by {port_holder(host, port)}",
                fix="stop that process or set MEDIA_PORT (--port) to a free port",
            ) from None
        if exc.errno == errno.EACCES:
            raise CheckFailed(f"no permission to bind {host}:{port}", fix="use a port above 1023") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"{host} is not an address of this node", fix="use 127.0.0.1") from None
        raise CheckFailed(
            f"cannot listen on {host}:{port}: {exc.strerror}", fix="choose another port"
        ) from None
    sock.setblocking(False)
    return sock


def _raise_fd_limit() -> None:
    # Many concurrent downloads need a socket and a file each; 1024 is a low default.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _detach(log_file: Path) -> None:
    """Second fork of the daemon: the caller's child exits at once, we go on.

    The launcher started us with start_new_session=True; after this fork we
    are no session leader (no controlling terminal) and no child of the
    launcher, which execs vLLM and would never reap us.
    """
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)  # closes the pipe the launcher reads our startup errors from
    os.close(devnull)
    os.close(out)


async def _serve(
    settings: MediaSettings, sock: socket.socket, announce: bool, supervisor: int | None = None
) -> int:
    """Serve on SOCK until SIGTERM (or SIGINT): the whole server, or with SUPERVISOR one of its workers."""
    from aiohttp import web

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

        def watch_supervisor() -> None:  # where PR_SET_PDEATHSIG is missing (see _die_with)
            if os.getppid() != supervisor:
                on_signal(signal.SIGTERM)
            else:
                loop.call_later(1.0, watch_supervisor)

        loop.call_later(1.0, watch_supervisor)

    runner = web.AppRunner(
        make_app(settings, health_pid=supervisor),
        handle_signals=False,
        access_log_class=_access_logger_class(),
        access_log=logging.getLogger("aiohttp.access"),
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    # SockSite listens again with its backlog: keep bind_socket()'s.
    site = web.SockSite(runner, sock, backlog=LISTEN_BACKLOG)
    await site.start()
    pid = os.getpid()
    if supervisor:
        log.info("worker pid %d serving", pid)
    else:
        if settings.pid_file:
            write_pid_file(settings.pid_file, pid)
        _say_listening(settings, sock, pid, announce)
    try:
        await stop.wait()
        if not supervisor:
            log.info("signal %d: stopping (in-flight requests get %.0f s)", got[0], SHUTDOWN_TIMEOUT_S)
        await runner.cleanup()
    finally:
        if settings.pid_file and not supervisor:
            remove_pid_file(settings.pid_file, pid)
    if not supervisor:
        log.info("stopped")
    return 130 if got and got[0] == signal.SIGINT else 0


def _say_listening(settings: MediaSettings, sock: socket.socket, pid: int, announce: bool) -> None:
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    log.info(
        "listening on %s pid %d root %s types %s workers %d",
        url,
        pid,
        settings.root,
        ",".join(settings.allowed_types),
        settings.workers,
    )
    if settings.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("MEDIA_HOST=%s: media files are reachable from other machines", settings.host)
    if announce:
        print(f"media server listening on {url} (root {settings.root}, pid {pid})", flush=True)


# ---------------------------------------------------------------------------
# Several processes: a supervisor and its workers


def auto_workers() -> int:
    """min(CPUs this process may use, WORKERS_AUTO_MAX): the 'auto' of --workers / MEDIA_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))  # a SLURM job's share, not the node's count
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, WORKERS_AUTO_MAX))


def parse_workers(value: str | int) -> int:
    """'auto' (or 0) -> auto_workers(); else 1..WORKERS_MAX. ValueError says what is allowed."""
    allowed = f"auto or 1..{WORKERS_MAX}"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return auto_workers()
        try:
            value = int(text, 10)
        except ValueError:
            raise ValueError(f"{text!r} is not a number of processes; allowed: {allowed}") from None
    if value == 0:
        return auto_workers()
    if not 1 <= value <= WORKERS_MAX:
        raise ValueError(f"{value} is out of range; allowed: {allowed}")
    return value


def _die_with(parent: int) -> None:
    """SIGTERM for this worker when PARENT (the supervisor) dies, even by SIGKILL.

    Linux's PR_SET_PDEATHSIG; elsewhere _serve() looks at the parent pid once
    a second. SIGTERM, not SIGKILL: downloads in flight still get their
    SHUTDOWN_TIMEOUT_S, the listening socket closes at once.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl
        os._exit(0)


def _worker_main(
    settings: MediaSettings, sock: socket.socket, parent: int, log_fd: int, close: list[int]
) -> None:
    """A worker, in the child of a fork: the supervisor's signal handling and
    descriptors off, logging through the pipe, then the same server as one process."""
    _die_with(parent)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for fd in close:
        with contextlib.suppress(OSError):
            os.close(fd)
    file_handlers = {h for name in _LOGGERS for h in logging.getLogger(name).handlers}
    _route_logs(_RelayHandler(log_fd))
    for handler in file_handlers:  # the supervisor's file: never written from here
        with contextlib.suppress(Exception):
            handler.close()
    try:
        code = asyncio.run(_serve(settings, sock, announce=False, supervisor=parent))
    except Exception:
        log.exception("worker pid %d failed", os.getpid())
        code = 1
    sys.exit(code)


class _Supervisor:
    """Runs settings.workers serving processes on one listening socket, and nothing else.

    The socket is bound once, before the workers are forked, and inherited:
    one accept queue (a worker that dies takes no waiting connection with it)
    and no second bind (SO_REUSEPORT would let any process of this user join
    the port, an old media server of ours included). The supervisor answers
    no request; /health from any worker names the supervisor's pid, the one
    in the pid file, so that ensure_running() and stop_service.py see one
    server. SIGTERM (or SIGINT) here: the socket closes, each worker gets
    SIGTERM and its SHUTDOWN_TIMEOUT_S for downloads in flight, stragglers get
    SIGKILL, the pid file goes. A worker that dies otherwise is replaced
    (RESTARTS_MAX in RESTART_WINDOW_S, then the supervisor gives up: exit 1).

    Logging: one writer. Each worker formats its records (the access log
    line: as cheap as writing it) and sends them, NUL-terminated, down a pipe
    of its own; here whole records are written in batches through the one
    RotatingFileHandler, so that rotation is never raced, a record is never
    cut by another's, and each worker's order is kept. Pickled LogRecords
    through multiprocessing.Queue/QueueHandler cost twice as much per record
    in the worker (format, copy, pickle, a feeder thread) and once more here.
    """

    def __init__(self, settings: MediaSettings, sock: socket.socket, handler: logging.Handler) -> None:
        import multiprocessing
        import selectors

        self.settings = settings
        self.sock = sock
        self.handler = handler
        self.pid = os.getpid()
        self.ctx = multiprocessing.get_context("fork")
        self.selector = selectors.DefaultSelector()
        self.procs: dict[int, Any] = {}  # slot -> multiprocessing.Process
        self.pipes: dict[int, bytearray] = {}  # read end of a worker's log pipe -> unfinished record
        self.failures: list[float] = []
        self.signals: list[int] = []
        self.deadline: float | None = None
        self.code = 0
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)

    def run(self, announce: bool) -> int:
        import selectors

        from aiohttp import web  # noqa: F401 - imported once here, shared by the forked workers

        def on_signal(signum: int, frame: Any) -> None:
            self.signals.append(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        signal.set_wakeup_fd(self.wake_w)
        self.selector.register(self.wake_r, selectors.EVENT_READ, ("wake", -1))
        try:
            for slot in range(self.settings.workers):
                self._spawn(slot)
            if self.settings.pid_file:
                write_pid_file(self.settings.pid_file, self.pid)
            _say_listening(self.settings, self.sock, self.pid, announce)
            while self.procs or self.pipes:
                timeout = 1.0 if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                events = self.selector.select(timeout)
                # Signals first: a worker that stop_service.py stopped at the same time is no failure.
                with contextlib.suppress(OSError):
                    while os.read(self.wake_r, 512):
                        pass
                if self.signals and self.deadline is None:
                    self._stop(f"signal {self.signals[0]}")
                relayed = False
                for key, _ in events:
                    kind, slot = key.data
                    if kind == "log":
                        self._relay(key.fd)
                        relayed = True
                    elif kind == "exit":
                        self._reap(slot)
                if relayed and self.deadline is None:
                    # Let records gather: one wake-up and write per batch rather than per request.
                    time.sleep(RELAY_BATCH_S)
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    for proc in self.procs.values():
                        log.warning("worker pid %d still running: SIGKILL", proc.pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(proc.pid, signal.SIGKILL)
                    self.deadline = time.monotonic() + 5.0
        finally:
            for proc in self.procs.values():  # only after an error of our own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
            if self.settings.pid_file:
                remove_pid_file(self.settings.pid_file, self.pid)
        log.info("stopped")
        if self.code:
            return self.code
        return 130 if self.signals and self.signals[0] == signal.SIGINT else 0

    def _spawn(self, slot: int) -> None:
        import selectors

        r, w = os.pipe()
        with contextlib.suppress(ImportError, AttributeError, OSError):
            import fcntl

            fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for bursts: a full pipe blocks the worker
        close = [r, self.wake_r, self.wake_w, self.selector.fileno(), *self.pipes]
        proc = self.ctx.Process(
            target=_worker_main,
            args=(self.settings, self.sock, self.pid, w, close),
            name=f"media-worker-{slot}",
        )
        try:
            proc.start()
        finally:
            os.close(w)  # the worker's end: EOF here once it exits
        os.set_blocking(r, False)
        self.pipes[r] = bytearray()
        self.selector.register(r, selectors.EVENT_READ, ("log", slot))
        self.selector.register(proc.sentinel, selectors.EVENT_READ, ("exit", slot))
        self.procs[slot] = proc

    def _relay(self, fd: int) -> None:
        """Write the whole records that arrived on a worker's pipe; keep a partial one."""
        buf = self.pipes[fd]
        eof = False
        try:
            while len(buf) < (1 << 22):
                data = os.read(fd, 1 << 16)
                if not data:
                    eof = True
                    break
                buf += data
        except BlockingIOError:
            pass
        end = len(buf) if eof else buf.rfind(b"\0") + 1
        if end > 0:
            text = bytes(buf[:end]).decode("utf-8", "replace").rstrip("\0").replace("\0", "\n")
            del buf[:end]
            if text:
                record = logging.makeLogRecord({"msg": text, "relayed": True, "levelno": logging.INFO})
                self.handler.handle(record)
        if eof:
            self.selector.unregister(fd)
            os.close(fd)
            del self.pipes[fd]

    def _reap(self, slot: int) -> None:
        proc = self.procs.pop(slot)
        self.selector.unregister(proc.sentinel)
        proc.join()
        if self.deadline is not None:
            return
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        now = time.monotonic()
        self.failures = [t for t in self.failures if now - t < RESTART_WINDOW_S] + [now]
        if len(self.failures) > RESTARTS_MAX:
            log.error(
                "worker pid %d %s: %d failures in %.0f s, giving up",
                proc.pid,
                how,
                len(self.failures),
                RESTART_WINDOW_S,
            )
            self.code = 1
            self._stop("too many worker failures")
            return
        log.warning("worker pid %d %s; starting another", proc.pid, how)
        self._spawn(slot)

    def _stop(self, why: str) -> None:
        log.info("%s: stopping (in-flight requests get %.0f s)", why, SHUTDOWN_TIMEOUT_S)
        self.sock.close()  # our copy; the workers close theirs at SIGTERM
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        self.deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S + 5.0


def serve(settings: MediaSettings, *, detach: bool = False) -> int:
    """Bind, (optionally) detach, serve until SIGTERM/SIGINT. Startup errors raise before detaching."""
    if settings.pid_file:
        other = read_pid(settings.pid_file)
        if other and other != os.getpid() and _is_media_process(other):
            raise CheckFailed(
                f"media server pid {other} already owns {settings.pid_file}",
                fix=f"stop it first (kill {other}) or use another --pid-file",
            )
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    sock = bind_socket(settings.host, settings.port)
    if detach:
        _detach(settings.log_file)
    handler = setup_logging(settings.log_file)
    _lean_log_records()
    _raise_fd_limit()
    if settings.workers > 1:
        return _Supervisor(settings, sock, handler).run(announce=not detach)
    # The stock asyncio loop, not uvloop: aiohttp's FileResponse uses
    # loop.sendfile(), which uvloop does not implement (it would fall back to
    # read() + write() through a thread).
    return asyncio.run(_serve(settings, sock, announce=not detach))


# ---------------------------------------------------------------------------
# For the launcher and status: probe, ensure_running


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def probe(host: str, port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """The /health JSON if our media server answers on HOST:PORT, else None.

    http.client on purpose: urllib would route loopback through $http_proxy
    on nodes that set one.
    """
    conn = http.client.HTTPConnection(_probe_host(host), port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read(65536)
        if resp.status != 200:
            return None
        info = json.loads(body)
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    return info if isinstance(info, dict) and info.get("service") == SERVICE_ID else None


def is_ours_healthy(
    host: str,
    port: int,
    timeout: float = 2.0,
    *,
    root: str | Path | None = None,
    pid_file: Path | None = None,
) -> bool:
    """True if our media server answers /health on HOST:PORT (and serves ROOT, and is the pid in PID_FILE)."""
    info = probe(host, port, timeout)
    if info is None:
        return False
    if root is not None and info.get("root") != os.path.realpath(root):
        return False
    return not (pid_file is not None and read_pid(pid_file) != info.get("pid"))


def ensure_running(
    host: str,
    port: int,
    root: str | Path,
    allowed_types: Iterable[str],
    log_file: str | Path,
    pid_file: str | Path,
    python: str = sys.executable,
    timeout: float = 10.0,
    workers: int | str | None = None,
) -> tuple[int | None, bool]:
    """(pid, started_now): reuse our healthy server on HOST:PORT, or start a detached one.

    Raises CheckFailed (one line with the fix) when the port belongs to
    someone else, when a server of ours serves another root, or when the new
    server does not come up within TIMEOUT seconds. WORKERS (auto, 0 = auto,
    or a number) applies to a server started here; a running one is reused
    whatever its number of workers.
    """
    real_root = str(check_root(root, "MEDIA_ROOT"))
    try:
        types = parse_types(allowed_types)
    except ValueError as exc:
        raise ConfigError(
            f"MEDIA_ALLOWED_TYPES: {exc}", fix="list image/video extensions like jpg,png,mp4"
        ) from None
    log_file, pid_file = Path(log_file).resolve(), Path(pid_file).resolve()
    wanted = (real_root, sorted(types))

    def ours(info: dict[str, Any] | None) -> bool:
        return info is not None and info.get("pid") == read_pid(pid_file)

    info = probe(host, port, timeout=min(2.0, timeout))
    if info is None:
        recorded = read_pid(pid_file)
        if recorded and _is_media_process(recorded):
            # Ours by its pid file but silent: still starting, or stuck.
            info = _wait_healthy(host, port, pid_file, deadline=time.monotonic() + timeout)
            if info is None:
                raise CheckFailed(
                    f"media server pid {recorded} (from {pid_file}) does not answer /health on {host}:{port}",
                    fix=f"see {log_file}; stop it (kill {recorded}) and start again",
                )
    if info is not None:
        pid = info.get("pid")
        if not ours(info):
            raise CheckFailed(
                f"port {port} on {host} is held by another media server (pid {pid}, root {info.get('root')}) "
                f"not recorded in {pid_file}",
                fix=f"stop it (kill {pid}) or set MEDIA_PORT to a free port",
            )
        if (info.get("root"), sorted(info.get("allowed_types", []))) != wanted:
            raise CheckFailed(
                f"the media server on {host}:{port} (pid {pid}) serves {info.get('root')} "
                f"types {','.join(info.get('allowed_types', []))}, not {real_root} types {','.join(types)}",
                fix=f"stop it (kill {pid}) so that it restarts with the new settings, or set MEDIA_PORT",
            )
        return pid, False

    cmd = [python, "-m", "qwen3_vl_service.media", "--detach", "--host", host, "--port", str(port)]
    cmd += ["--root", real_root, "--allowed-types", ",".join(types)]
    cmd += ["--log-file", str(log_file), "--pid-file", str(pid_file)]
    if workers is not None:
        try:
            parse_workers(workers)
        except ValueError as exc:
            raise ConfigError(
                f"MEDIA_WORKERS: {exc}", fix="use auto or a number of processes like 2"
            ) from None
        cmd += ["--workers", "auto" if workers in (0, "0") else str(workers).strip().lower()]
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    except OSError as exc:
        raise CheckFailed(
            f"cannot run {python}: {exc.strerror}", fix="check VLLM_PYTHON / the venv"
        ) from None
    try:
        # Returns once the first process exits (right after the port is bound)
        # and the daemon has moved its output to the log.
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CheckFailed(
            f"the media server did not start within {timeout:.0f} s", fix=f"see {log_file}"
        ) from None
    text = output.decode("utf-8", "replace").strip()
    if text:
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    if proc.returncode != 0:
        last = text.splitlines()[-1] if text else f"exit code {proc.returncode}"
        raise CheckFailed(f"the media server did not start: {last.removeprefix('error: ')}")
    info = _wait_healthy(host, port, pid_file, deadline)
    if info is None:
        raise CheckFailed(
            f"the media server did not answer /health on {host}:{port} within {timeout:.0f} s",
            fix=f"see {log_file}",
        )
    return info["pid"], True


def _wait_healthy(host: str, port: int, pid_file: Path, deadline: float) -> dict[str, Any] | None:
    while True:
        info = probe(host, port, timeout=1.0)
        if info is not None and info.get("pid") == read_pid(pid_file):
            return info
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# Command line


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="media_server.py",
        description="Serve local images and videos to vLLM over loopback HTTP (GET/HEAD, Range, /health).",
    )
    p.add_config("./config.env if present")
    p.add_argument("--host", help="address to bind (MEDIA_HOST, default 127.0.0.1: this node only)")
    p.add_argument("--port", type=int, help="port (MEDIA_PORT, default 8080; 0 picks a free one)")
    p.add_argument("--root", help="folder to serve (MEDIA_ROOT)")
    p.add_argument("--allowed-types", metavar="EXTS", help="e.g. jpg,png,mp4 (MEDIA_ALLOWED_TYPES)")
    p.add_argument("--log-file", help="log file (default LOG_DIR/media_server.log)")
    p.add_argument("--pid-file", help="pid file (default RUN_DIR/media_server.pid)")
    p.add_argument(
        "--workers",
        metavar="N",
        help=f"serving processes: auto (min(CPUs, {WORKERS_AUTO_MAX})) or 1..{WORKERS_MAX} (MEDIA_WORKERS)",
    )
    p.add_argument("--detach", action="store_true", help="run in the background once the port is bound")
    return p


def settings_from_args(argv: Sequence[str] | None) -> tuple[MediaSettings, bool]:
    args = _parser().parse_args(argv)
    explicit = (args.host, args.port, args.root, args.allowed_types, args.log_file, args.pid_file)
    cfg = None
    if args.config is not None or any(v is None for v in explicit):
        from . import config  # lazily: explicit arguments need no config at all

        cfg = config.load(args.config)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is out of range", fix="use 1..65535, or 0 for any free port")
    try:
        types = parse_types(args.allowed_types if args.allowed_types is not None else cfg.media_allowed_types)
    except ValueError as exc:
        where = "--allowed-types" if args.allowed_types is not None else "MEDIA_ALLOWED_TYPES"
        raise UsageError(f"{where}: {exc}", fix="list image/video extensions like jpg,png,mp4") from None
    root = check_root(args.root if args.root is not None else cfg.media_root, "--root/MEDIA_ROOT")
    log_file = Path(args.log_file) if args.log_file else cfg.log_dir / LOG_FILE_NAME
    pid_file = Path(args.pid_file) if args.pid_file else cfg.run_dir / PID_FILE_NAME
    # Explicit arguments need no config file: then MEDIA_WORKERS is not read either.
    workers_value = args.workers if args.workers is not None else getattr(cfg, "media_workers", "auto")
    try:
        workers = parse_workers(workers_value)
    except ValueError as exc:
        where = "--workers" if args.workers is not None else "MEDIA_WORKERS"
        raise UsageError(f"{where}: {exc}", fix="use auto or a number of processes like 2") from None
    settings = MediaSettings(
        host=args.host if args.host is not None else cfg.media_host,
        port=args.port if args.port is not None else cfg.media_port,
        root=root,
        allowed_types=types,
        log_file=log_file.resolve(),
        pid_file=pid_file.resolve(),
        workers=workers,
    )
    return settings, args.detach


def _log_file_hint(argv: Sequence[str] | None) -> Path:
    # Where run() puts a traceback, known before the arguments are validated.
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--log-file" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--log-file="):
            return Path(arg.split("=", 1)[1])
    return DEFAULT_LOG_FILE


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        settings, detach = settings_from_args(argv)
        return serve(settings, detach=detach)

    return run(body, _log_file_hint(argv))


if __name__ == "__main__":
    raise SystemExit(main())
