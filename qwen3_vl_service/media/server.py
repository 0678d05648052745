"""The media server's process: command line, socket, pid file, daemonising, and one or several workers.

vLLM fetches media by URL, so requests can point at local files as
``http://127.0.0.1:8080/videos/clip.mp4``. This replaces the
``python -m http.server`` of the original scripts (no Range, follows
symlinks out of its root, lists directories, binds every interface).

Commands (exit codes as everywhere: 0 ok, 1 runtime failure such as a busy
port, 2 bad usage or config, 130 interrupted)::

    .venv/bin/python media_server.py                           # settings from ./config.env
    .venv/bin/python media_server.py --config my.env --port 8081
    .venv/bin/python media_server.py --root ./media --port 0   # any free port, printed
    .venv/bin/python media_server.py --workers 1               # one process, no supervisor

The launcher calls ``client.ensure_running()``, which reuses a healthy server
of ours or starts a detached one (``--detach``: the server double-forks once
its port is bound, so it is never left a zombie of the process that execs
vLLM), and ``stop_service.py --all`` stops it by its pid file. ``GET /health``
answers JSON naming this service, its pid, root and allowed types.

Processes: ``--workers`` / MEDIA_WORKERS (auto: min(CPUs, 8)) event loops
share the one listening socket under a supervisor (workers.py), whose pid is
the one in the pid file and in /health, and which alone writes the log;
``--workers 1`` is a single process. bench/bench_media.py measures it against
nginx: large files go at nginx's speed (both are sendfile-bound); small ones
cost aiohttp's request handling in Python on top of the kernel's work.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen3_vl_service.core.cli import ArgumentParser, run
from qwen3_vl_service.core.errors import CheckFailed, ConfigError, UsageError
from qwen3_vl_service.core.fileio import write_atomic
from qwen3_vl_service.core.hosts import is_loopback, url_host
from qwen3_vl_service.core.names import MEDIA_LOG_FILE, MEDIA_PID_FILE, MEDIA_SERVICE_ID
from qwen3_vl_service.machine.processes import is_media_pid, port_holders, read_pid_file
from qwen3_vl_service.media.app import LISTEN_BACKLOG, MediaSettings, run_serving, serve_socket
from qwen3_vl_service.media.logs import lean_log_records, setup_logging
from qwen3_vl_service.media.policy import check_root
from qwen3_vl_service.media.workers import WORKERS_AUTO_MAX, Supervisor, auto_workers
from qwen3_vl_service.settings import config, scope

DEFAULT_LOG_FILE = Path("logs") / MEDIA_LOG_FILE

log = logging.getLogger(MEDIA_SERVICE_ID)


def write_pid_file(pid_file: Path, pid: int) -> None:
    """Atomically (fileio.write_atomic): a reader sees the old pid or the new one."""
    try:
        write_atomic(pid_file, f"{pid}\n")
    except OSError as exc:
        raise CheckFailed(
            f"cannot write the pid file {pid_file}: {exc.strerror}",
            fix="give a --pid-file in a folder you can write",
        ) from None


def _refuse_foreign_pid_file(pid_file: Path) -> None:
    """A --pid-file that exists must be one: a folder, or a file with other content than a pid, is
    someone's, and writing the pid over it (and removing it at the stop) would lose it."""
    try:
        st = pid_file.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CheckFailed(
            f"--pid-file {pid_file}: {exc.strerror}", fix="give a path in a folder of yours"
        ) from None
    if not stat.S_ISREG(st.st_mode) or (st.st_size and read_pid_file(pid_file) is None):
        raise CheckFailed(
            f"--pid-file {pid_file} exists and is not a pid file (it holds no pid): it is left as it is",
            fix="give the path of a new file (the launcher uses RUN_DIR/media-<port>-<node>/)",
        )


def remove_pid_file(pid_file: Path, pid: int) -> None:
    """Remove the pid file only if it is still ours."""
    if read_pid_file(pid_file) == pid:
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()


def _holders_text(host: str, port: int) -> str:
    holders = port_holders(host, port)
    return "; ".join(h.describe() for h in holders) or "another process (not visible to this user)"


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
                f"port {port} on {host} is in use by {_holders_text(host, port)}",
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


def _say_listening(settings: MediaSettings, sock: socket.socket, pid: int, announce: bool) -> None:
    host, port = sock.getsockname()[:2]
    url = f"http://{url_host(host)}:{port}"
    log.info(
        "listening on %s pid %d root %s types %s workers %d",
        url,
        pid,
        settings.root,
        ",".join(settings.allowed_types),
        settings.workers,
    )
    if not is_loopback(settings.host):
        log.warning("MEDIA_HOST=%s: media files are reachable from other machines", settings.host)
    if announce:
        print(f"media server listening on {url} (root {settings.root}, pid {pid})", flush=True)


def serve(settings: MediaSettings, *, detach: bool = False) -> int:
    """Bind, (optionally) detach, serve until SIGTERM/SIGINT. Startup errors raise before detaching."""
    if settings.pid_file:
        _refuse_foreign_pid_file(settings.pid_file)
        other = read_pid_file(settings.pid_file)
        if other and other != os.getpid() and is_media_pid(other):
            raise CheckFailed(
                f"media server pid {other} already owns {settings.pid_file}",
                fix=f"stop it first (kill {other}) or use another --pid-file",
            )
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    sock = bind_socket(settings.host, settings.port)
    if detach:
        _detach(settings.log_file)
    handler = setup_logging(settings.log_file, settings.log_max_bytes, settings.log_backups)
    lean_log_records()
    _raise_fd_limit()
    pid = os.getpid()

    def listening() -> None:
        if settings.pid_file:
            write_pid_file(settings.pid_file, pid)
        _say_listening(settings, sock, pid, announce=not detach)

    try:
        if settings.workers > 1:
            return Supervisor(settings, sock, handler).run(on_listening=listening)
        code = run_serving(serve_socket(settings, sock, on_listening=listening))
        log.info("stopped")
        return code
    finally:
        if settings.pid_file:
            remove_pid_file(settings.pid_file, pid)


# ---------------------------------------------------------------------------
# Command line


# The flags that override a setting, each validated by that setting's one parser in config.py.
_SETTING_FLAGS = {
    "host": "MEDIA_HOST",
    "root": "MEDIA_ROOT",
    "allowed_types": "MEDIA_ALLOWED_TYPES",
    "workers": "MEDIA_WORKERS",
    "log_max_mb": "LOG_MAX_MB",
    "log_backups": "LOG_BACKUPS",
}


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
    # The launcher's own folder for this server, as named on this node (scope.media_folder:
    # media-<port>-<node>), with PORT for the port: what --help shows is where the files are.
    here = scope.media_folder(0).replace("-0-", "-PORT-", 1)
    p.add_argument("--log-file", help=f"log file (default LOG_DIR/{here}/{MEDIA_LOG_FILE})")
    p.add_argument("--log-max-mb", metavar="MB", help="rotate the log at this size (LOG_MAX_MB)")
    p.add_argument("--log-backups", metavar="N", help="rotated logs to keep (LOG_BACKUPS)")
    p.add_argument("--pid-file", help=f"pid file (default RUN_DIR/{here}/{MEDIA_PID_FILE})")
    p.add_argument(
        "--workers",
        metavar="N",
        help=f"serving processes: auto (min(CPUs, {WORKERS_AUTO_MAX})) or a number (MEDIA_WORKERS)",
    )
    p.add_argument("--detach", action="store_true", help="run in the background once the port is bound")
    return p


def settings_from_args(argv: Sequence[str] | None) -> tuple[MediaSettings, bool]:
    """The validated settings and --detach: flags first, then the config file (read only when needed)."""
    args = _parser().parse_args(argv)
    given = {
        key: config.parse_value(key, getattr(args, attr), name="--" + attr.replace("_", "-"))
        for attr, key in _SETTING_FLAGS.items()
        if getattr(args, attr) is not None
    }
    if args.port is not None and not 0 <= args.port <= 65535:
        # Not MEDIA_PORT's parser: 0 (any free port) is for this command line only.
        raise UsageError(f"--port {args.port} is out of range", fix="use 1..65535, or 0 for any free port")
    complete = len(given) == len(_SETTING_FLAGS) and None not in (args.port, args.log_file, args.pid_file)
    # Explicit arguments need no config file at all (the launcher gives them all).
    cfg = config.load(args.config) if args.config is not None or not complete else None

    def from_config(attr: str) -> Any:
        assert cfg is not None, "loaded whenever a flag is missing"
        return getattr(cfg, attr)

    def from_own(own: scope.ServicePaths | None, attr: str) -> Path:
        assert own is not None, "the config is loaded whenever --log-file or --pid-file is missing"
        return Path(getattr(own, attr))

    def value(key: str) -> Any:  # the setting's own type
        return given[key] if key in given else from_config(key.lower())

    workers = value("MEDIA_WORKERS")
    port = args.port if args.port is not None else from_config("media_port")
    # The same files as the launcher's media server: one server per MEDIA_PORT (scope.paths).
    own = scope.paths(cfg.replace(media_port=port)) if cfg is not None else None
    settings = MediaSettings(
        host=value("MEDIA_HOST"),
        port=port,
        root=check_root(value("MEDIA_ROOT"), "--root/MEDIA_ROOT"),
        allowed_types=value("MEDIA_ALLOWED_TYPES"),
        log_file=Path(args.log_file or from_own(own, "media_log")).resolve(),
        pid_file=Path(args.pid_file or from_own(own, "media_pid_file")).resolve(),
        workers=auto_workers() if workers is None else workers,
        log_max_bytes=value("LOG_MAX_MB") * 1024 * 1024,
        log_backups=value("LOG_BACKUPS"),
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
