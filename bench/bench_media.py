"""Benchmark the media server against ``python -m http.server`` and nginx, on loopback, in one run.

Usage (from the repository root)::

    .venv/bin/python bench/bench_media.py                 # ~105 s on a 2-core node
    .venv/bin/python bench/bench_media.py --duration 2 --clients 1,16   # quicker look
    .venv/bin/python bench/bench_media.py --servers ours,nginx --big-mib 256
    .venv/bin/python bench/bench_media.py --workers 1,auto   # ours twice: one process, and auto

What it does:

* Writes a 1 GiB file and ``--small-files`` 1 MiB files (random bytes) into a
  private temporary folder, read once so that every server finds them in the
  page cache.
* Starts four servers on free loopback ports: ours (``python -m
  qwen3_vl_service.media``, settings as in production: access log on,
  ``--workers`` as given, else its default, auto; several values start one
  server each, named ours-w1, ours-wauto, ...),
  ``python -m http.server``, a private nginx (Debian's package; installed
  with ``apt-get install -y nginx`` when missing and we are root) with its own
  conf, pid file and logs in the temporary folder, ``worker_processes auto``,
  ``sendfile on``, access log on, and the asyncio floor (``--floor``, below)
  with as many processes as ours has workers. Every server is stopped by its
  pid at the end.
* For the 1 GiB file and for the many 1 MiB files, at 1, 16 and 64 concurrent
  keep-alive clients, runs the load generator for ``--duration`` seconds per
  server (the servers' order rotates from case to case, to spread the noise of
  a shared node) and prints MiB/s, requests/s, errors, the server's CPU
  seconds per GiB sent (all its processes: nginx's workers, our supervisor
  and workers), and the ratios ours/nginx, ours/http.server, ours/floor and
  floor/nginx.

The asyncio floor is not a server to use but a measuring stick: the least a
Python asyncio server does per response (split the request line, open,
fstat, write a status line and Content-Length, os.sendfile, close; no HTTP
parsing, checks, Range or log). floor/nginx is what Python's event loop
costs on this machine; ours/floor what aiohttp's HTTP handling, our path
checks and the access log cost on top.

The load generator is this script itself (``--load`` mode) in a separate
process: one blocking socket per client thread, ``recv_into`` a 4 MiB buffer
(the GIL is released while the kernel copies), so the client costs a few
system calls per MiB. ``wrk`` was tried first: it reads in 8 KiB pieces and
topped out near 1.5 GB/s on the 1 GiB file, under what nginx and ours can send
(about 3 GB/s here), so it measured itself. Bytes of responses cut off at the
end of a run count, as in wrk.

Exit code 0 if every server sent data and answered every request without error,
1 otherwise (the temporary folder with the servers' logs is then kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qwen3_vl_service.machine.processes import server_port  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB


# ---------------------------------------------------------------------------
# The load generator (runs in its own process: --load)


def _client(
    port: int, paths: list[str], offset: int, stop_at: float, out: dict, lock: threading.Lock
) -> None:
    buf = memoryview(bytearray(4 * MIB))
    requests = errors = received = 0
    i = offset
    sock = None
    try:
        while time.monotonic() < stop_at:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            path = paths[i % len(paths)]
            i += 1
            try:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed before the headers")
                    head += chunk
                header, _, body = head.partition(b"\r\n\r\n")
                lines = header.split(b"\r\n")
                status = int(lines[0].split()[1])
                length = next(
                    int(v)
                    for k, _, v in (x.partition(b":") for x in lines[1:])
                    if k.lower() == b"content-length"
                )
                got = len(body)
                received += got
                while got < length:
                    if time.monotonic() >= stop_at:
                        return  # cut off at the end: bytes count, the request does not
                    n = sock.recv_into(buf, min(len(buf), length - got))
                    if not n:
                        raise ConnectionError("closed mid-body")
                    got += n
                    received += n
                if status == 200:
                    requests += 1
                else:
                    errors += 1
                conn = next(
                    (
                        v.strip().lower()
                        for k, _, v in (x.partition(b":") for x in lines[1:])
                        if k.lower() == b"connection"
                    ),
                    b"",
                )
                if conn == b"close" or (lines[0].startswith(b"HTTP/1.0") and conn != b"keep-alive"):
                    # http.server speaks HTTP/1.0: one request per connection.
                    sock.close()
                    sock = None
            except (OSError, ValueError, StopIteration, IndexError):
                errors += 1
                if sock is not None:
                    sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()
        with lock:
            out["requests"] += requests
            out["errors"] += errors
            out["bytes"] += received


def load_main(port: int, paths: list[str], clients: int, duration: float) -> None:
    out = {"requests": 0, "errors": 0, "bytes": 0}
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + duration
    threads = [
        threading.Thread(target=_client, args=(port, paths, i * 7, stop_at, out, lock), daemon=True)
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 30)
    out["seconds"] = time.monotonic() - start
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------
# The asyncio floor (runs in its own processes: --floor)
#
# Not a server to use: a measuring stick. It is the least that a Python
# asyncio server does per response: split the request line, open, fstat,
# write the headers, os.sendfile() (the loop's sendfile for what does not fit
# the socket buffer), close. No HTTP parsing, no path checks, no Range, no
# log. Whatever ours costs above it is the price of a real HTTP library and of
# the checks; whatever it costs above nginx is the price of Python's loop.


class _FloorProtocol:
    """An asyncio.Protocol; one request per read, as the load generator sends them."""

    def __init__(self, root: str) -> None:
        self.root = root

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()

    def data_received(self, data: bytes) -> None:
        try:
            fd = os.open(self.root + data.split(b" ", 2)[1].decode(), os.O_RDONLY)
        except (OSError, IndexError, UnicodeDecodeError):
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()
            return
        size = os.fstat(fd).st_size
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        sent = 0
        if not self.transport.get_write_buffer_size():
            with contextlib.suppress(BlockingIOError):
                sent = os.sendfile(self.fd, fd, 0, size)
        if sent == size:
            os.close(fd)
            return
        import asyncio

        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._rest(os.fdopen(fd, "rb"), sent, size - sent))

    async def _rest(self, fobj, offset: int, count: int) -> None:
        import asyncio

        with fobj:
            await asyncio.get_running_loop().sendfile(self.transport, fobj, offset, count)
        self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        pass

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


def floor_main(port: int, root: str, processes: int) -> None:
    """PROCESSES event loops on one listening socket; SIGTERM to the first ends them all."""
    import asyncio

    sock = socket.create_server(("127.0.0.1", port), backlog=4096)
    children = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)

    def on_term(signum, frame) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: _FloorProtocol(root), sock=sock)
        await asyncio.Event().wait()

    asyncio.run(serve())


# ---------------------------------------------------------------------------
# The servers


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


def ensure_nginx() -> str | None:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("nginx is not installed and cannot be installed here (needs root and apt-get); skipping it")
        return None
    print("installing nginx: apt-get install -y nginx", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "nginx"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, capture_output=True)
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, log: Path, pid_file: Path | None = None) -> None:
        self.name, self.cmd, self.port, self.log, self.pid_file = name, cmd, port, log, pid_file
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, env=env, start_new_session=True
            )
        wait_port(self.port, self.proc)

    def pids(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        """TERM by pid, wait, KILL if needed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            # Its whole session (start_new_session): workers of ours or of the floor too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def nginx_server(nginx: str, tmp: Path, root: Path, port: int) -> Server:
    conf = tmp / "nginx.conf"
    # A private instance: its own prefix, pid file, logs and temp paths; no
    # 'user' line, so as root the workers run as nobody (hence chmod a+rX).
    conf.write_text(
        textwrap.dedent(
            f"""\
            worker_processes auto;
            daemon off;
            pid {tmp}/nginx.pid;
            error_log {tmp}/nginx_error.log warn;
            events {{ worker_connections 4096; }}
            http {{
                types {{ image/jpeg jpg; video/mp4 mp4; }}
                default_type application/octet-stream;
                sendfile on;
                tcp_nopush on;
                keepalive_requests 1000000;
                access_log {tmp}/nginx_access.log;
                client_body_temp_path {tmp}/nginx_body;
                proxy_temp_path {tmp}/nginx_proxy;
                fastcgi_temp_path {tmp}/nginx_fastcgi;
                uwsgi_temp_path {tmp}/nginx_uwsgi;
                scgi_temp_path {tmp}/nginx_scgi;
                server {{
                    listen 127.0.0.1:{port};
                    root {root};
                }}
            }}
            """
        )
    )
    return Server(
        "nginx", [nginx, "-p", str(tmp), "-c", str(conf)], port, tmp / "nginx_stdout.log", tmp / "nginx.pid"
    )


# ---------------------------------------------------------------------------
# The run


def make_files(root: Path, big_mib: int, small_files: int) -> tuple[list[str], list[str]]:
    (root / "small").mkdir(parents=True)
    block = os.urandom(MIB)
    with open(root / "big.mp4", "wb") as fh:
        for i in range(big_mib):
            fh.write(block[i % 251 :] + block[: i % 251])  # not one page repeated
    for i in range(small_files):
        (root / "small" / f"f{i:04d}.jpg").write_bytes(os.urandom(MIB))
    for dirpath, _subdirs, filenames in os.walk(root.parent):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return ["/big.mp4"], [f"/small/f{i:04d}.jpg" for i in range(small_files)]


def run_load(port: int, paths: list[str], clients: int, duration: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--load", str(port), str(clients), str(duration)]
    proc = subprocess.run(cmd, input="\n".join(paths), capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_settled(servers: list[Server], timeout: float = 10.0) -> None:
    """Until each server's process count has stopped changing (ours forks its workers after the bind)."""
    deadline = time.monotonic() + timeout
    counts = None
    while time.monotonic() < deadline:
        now = [len(s.pids()) for s in servers]
        if now == counts:
            return
        counts = now
        time.sleep(0.5)


def report(case: str, servers: list[Server], results: dict[str, dict]) -> list[str]:
    """One line per server: MiB/s, requests/s, errors, server CPU s per GiB; ours gets the ratios."""
    speed = {n: r["bytes"] / r["seconds"] / MIB for n, r in results.items()}
    lines = []
    for s in servers:
        r = results[s.name]
        gib = r["bytes"] / GIB
        cpu = r["cpu"] / gib if gib else 0.0
        ratios = ""
        if s.name.startswith("ours") or s.name == "asyncio-floor":
            peers = ["nginx"] if s.name == "asyncio-floor" else ["nginx", "http.server", "asyncio-floor"]
            peers = [n for n in peers if speed.get(n)]
            ratios = "  ".join(f"{speed[s.name] / speed[n]:5.2f}x {n}" for n in peers)
        rps = r["requests"] / r["seconds"]
        lines.append(
            f"{case:<18} {s.name:<12} {speed[s.name]:9.0f} {rps:8.1f} {r['errors']:6d} {cpu:9.2f}  {ratios}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=4.0, help="seconds per server per case (default 4)")
    p.add_argument("--clients", default="1,16,64", help="concurrent clients (default 1,16,64)")
    p.add_argument("--big-mib", type=int, default=1024, help="size of the big file in MiB (default 1024)")
    p.add_argument("--small-files", type=int, default=256, help="number of 1 MiB files (default 256)")
    p.add_argument(
        "--servers",
        default="ours,nginx,http.server,asyncio-floor",
        help="which servers (default: ours,nginx,http.server,asyncio-floor)",
    )
    p.add_argument(
        "--workers", help="ours' --workers (default: its own, auto); a list (1,auto): one server each"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    p.add_argument("--nginx", help="the nginx binary to use (default: nginx on PATH, else Debian's package)")
    p.add_argument("--load", nargs=3, metavar=("PORT", "CLIENTS", "SECONDS"), help=argparse.SUPPRESS)
    p.add_argument("--floor", nargs=3, metavar=("PORT", "ROOT", "PROCESSES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load:
        paths = sys.stdin.read().split()
        load_main(int(args.load[0]), paths, int(args.load[1]), float(args.load[2]))
        return 0
    if args.floor:
        floor_main(int(args.floor[0]), args.floor[1], int(args.floor[2]))
        return 0

    clients = [int(c) for c in args.clients.split(",")]
    wanted = args.servers.split(",")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench_media_"))
    servers: list[Server] = []
    failed = False
    try:
        root = tmp / "root"
        print(f"writing {args.big_mib} MiB + {args.small_files} x 1 MiB into {root}", flush=True)
        big, small = make_files(root, args.big_mib, args.small_files)
        workers = args.workers.split(",") if args.workers else [""]
        for w in workers if "ours" in wanted else []:
            name = "ours" if len(workers) == 1 else f"ours-w{w}"
            port = server_port()
            cmd = [sys.executable, "-m", "qwen3_vl_service.media", "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--root", str(root), "--allowed-types", "jpg,mp4", "--log-file", str(tmp / f"{name}.log")]
            cmd += ["--pid-file", str(tmp / f"{name}.pid")] + (["--workers", w] if w else [])
            servers.append(Server(name, cmd, port, tmp / f"{name}_stdout.log", tmp / f"{name}.pid"))
        if "nginx" in wanted:
            nginx = args.nginx or ensure_nginx()
            if nginx:
                servers.append(nginx_server(nginx, tmp, root, server_port()))
        if "http.server" in wanted:
            port = server_port()
            cmd = [
                sys.executable,
                "-m",
                "http.server",
                str(port),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(root),
            ]
            servers.append(Server("http.server", cmd, port, tmp / "http_server.log"))
        if "asyncio-floor" in wanted:
            # As many processes as ours has workers (the first --workers value).
            from qwen3_vl_service.media.workers import auto_workers
            from qwen3_vl_service.settings.config import parse_value

            processes = parse_value("MEDIA_WORKERS", workers[0] or "auto", name="--workers") or auto_workers()
            port = server_port()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--floor", str(port), str(root)]
            cmd.append(str(processes))
            servers.append(Server("asyncio-floor", cmd, port, tmp / "asyncio_floor.log"))
        for s in servers:
            s.start()
        wait_settled(servers)
        names = ", ".join(f"{s.name} :{s.port} ({len(s.pids())} processes)" for s in servers)
        print(f"servers: {names}; {os.cpu_count()} CPUs; load average {os.getloadavg()}")
        print(f"{'case':<18} {'server':<12} {'MiB/s':>9} {'req/s':>8} {'errors':>6} {'cpu s/GiB':>9}  ratios")
        case_no = 0
        big_label = "1 GiB file" if args.big_mib == 1024 else f"{args.big_mib} MiB file"
        for label, paths in ((big_label, big), ("1 MiB files", small)):
            for c in clients:
                case_no += 1
                order = servers[case_no % len(servers) :] + servers[: case_no % len(servers)]
                results = {}
                for s in order:
                    cpu0 = s.cpu_seconds()
                    r = run_load(s.port, paths, c, args.duration)
                    r["cpu"] = s.cpu_seconds() - cpu0
                    results[s.name] = r
                    if r["errors"] or not r["bytes"]:  # (a 1 GiB file at c=64 may finish no request in time)
                        failed = True
                        print(f"{s.name}: {r['errors']} errors, {r['bytes']} bytes received (log: {tmp})")
                for line in report(f"{label} c={c}", servers, results):
                    print(line, flush=True)
        print(f"total {time.monotonic() - started:.0f} s; load average now {os.getloadavg()}")
    except BaseException:
        failed = True  # keep the servers' logs
        raise
    finally:
        for s in servers:
            s.stop()
        if args.keep or failed:
            print(f"kept {tmp} (the servers' logs; remove it when done)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
