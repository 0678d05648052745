"""The pinned vLLM imported once per pytest run; each test's snippet runs in a fresh fork of it.

Importing vLLM costs about 10 s of CPU on two cores, and the tests that ask vLLM's own
parser, ModelConfig or weight mapping about our commands each paid it in a child of their own.
``ready()`` gives them one server per pytest run (this file run as a script, shared by the
xdist workers through a Unix socket) that has imported vLLM's serve parser, engine arguments and
the Qwen3-VL-MoE model code once. ``run`` then answers as
``subprocess.run([python, "-c", CODE, *ARGV])`` would: CODE runs as ``__main__`` in a new process
forked from the server, with the caller's argv, environment, working folder and stdin, and its
exit status, stdout and stderr come back. A real process with the real vLLM, only without the
import. What vLLM reads from the environment at import time is the first caller's: nothing these
tests vary (VLLM_ALLOW_LONG_MAX_MODEL_LEN and the like are read when asked, through vllm.envs).

What only a cold child proves (the product runs vLLM's parser in a child of its own and never
imports vLLM itself) stays with tests/test_vllm_versions.py's dry run, which goes through
start_service.py.

The server ends by itself within a second of the pytest process that runs the session (xdist's
controller, or pytest itself without -n), removing its socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import select
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from skips import vllm_missing

# What the snippets import: the serve parser (0.32 under launchers/, 0.26 under openai/), the engine
# arguments and ModelConfig, and what tests/fp8_vllm_check.py maps weights with.
PRELOAD = (
    "vllm.entrypoints.cli.serve",
    "vllm.entrypoints.launchers.cli_args",
    "vllm.entrypoints.openai.cli_args",
    "vllm.engine.arg_utils",
    "vllm.utils.argparse_utils",
    "vllm.model_executor.layers.fused_moe.routed_experts",
    "vllm.model_executor.layers.quantization.fp8",
    "vllm.model_executor.layers.quantization.utils.quant_utils",
    "vllm.model_executor.models.qwen3_moe",
    "vllm.model_executor.models.qwen3_vl_moe",
)
REQUIRED = ("vllm.entrypoints.cli", "vllm.engine")  # without these the server has nothing to offer
START_TIMEOUT_S = 600  # the import, on a busy two-core machine with a cold file cache


class WarmVllm:
    """The client side: one connection per request to the run's server."""

    def __init__(self, address: Path) -> None:
        self.address = address
        self.missing: str = self._ask({}, 30)["missing"]  # why vLLM is not importable ("" when it is)

    def _ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(timeout)
            conn.connect(str(self.address))
            conn.sendall(json.dumps(request).encode() + b"\n")
            with conn.makefile("rb") as answers:
                line = answers.readline()
        if not line:
            raise RuntimeError(f"the warm vLLM server ({self.address}) closed the connection unanswered")
        return json.loads(line)

    def run(
        self,
        code: str,
        *argv: str,
        env: Mapping[str, str] | None = None,
        input: str = "",
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """CODE in a fresh fork of the warm server, as ``subprocess.run([python, "-c", CODE, *ARGV])``."""
        request = {
            "code": code,
            "argv": list(argv),
            "env": dict(os.environ if env is None else env),
            "cwd": os.getcwd(),
            "input": input,
            "timeout": max(1, int(timeout)),
        }
        cmd = [sys.executable, "-c", code, *argv]
        try:
            answer = self._ask(request, timeout + 30)
        except TimeoutError as exc:
            raise subprocess.TimeoutExpired(cmd, timeout) from exc
        if answer["returncode"] == -signal.SIGALRM:  # the fork's own alarm: past TIMEOUT
            raise subprocess.TimeoutExpired(cmd, timeout, answer["stdout"], answer["stderr"])
        return subprocess.CompletedProcess(cmd, answer["returncode"], answer["stdout"], answer["stderr"])


def _session_pid() -> int:
    """The pytest process that runs this session: xdist's controller (a worker's parent), or pytest."""
    return os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()


def _answers(address: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as conn:
        try:
            conn.connect(str(address))
        except OSError:
            return False
    return True


def _start(address: Path, log: Path) -> None:
    """Start the server for ADDRESS (own session: a Ctrl-C of pytest is not for it); wait until it listens."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(address), str(_session_pid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=out,
            start_new_session=True,
        )
    assert proc.stdout is not None
    with proc.stdout:
        ready = b""
        if select.select([proc.stdout], [], [], START_TIMEOUT_S)[0]:
            ready = proc.stdout.readline()  # written once it listens (or nothing: it ended)
        else:
            proc.kill()  # the one we started: its import hung
    if not ready:
        proc.wait(10)
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the warm vLLM server did not start (exit {proc.returncode}):\n{tail}")


@functools.cache
def warm() -> WarmVllm:
    """The server of this pytest run, started by the first worker that asks."""
    folder = Path(tempfile.gettempdir()) / f"qwen3-vl-warm-vllm-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    address = folder / f"{run}.sock"
    with open(folder / f"{run}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one start; the other workers wait for it, then connect
        if not _answers(address):
            address.unlink(missing_ok=True)
            _start(address, folder / f"{run}.log")
    return WarmVllm(address)


def ready() -> WarmVllm:
    """warm(); where vLLM is not importable, the test skips (fails under CI=true: tests/skips.py)."""
    server = warm()
    if server.missing:
        vllm_missing(server.missing)
    return server


# -- the server -----------------------------------------------------------------------------------


def _exec_main(code: str) -> int:
    """CODE as the ``__main__`` of ``python -c``: its exit status."""
    try:
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: BLE001 - printed as python -c prints it, without this frame
        traceback.print_exception(type(exc), exc, exc.__traceback__ and exc.__traceback__.tb_next)
        return 1
    return 0


def _forked(request: dict[str, Any], stdin: IO[bytes], stdout: IO[bytes], stderr: IO[bytes]) -> None:
    """In the fork: the request's stdio, environment, folder and argv, then its code; never returns."""
    status = 1
    try:
        for fh, fd in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fh.fileno(), fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["-c", *request["argv"]]
        sys.path[0] = ""  # as for python -c: the working folder first
        signal.alarm(request["timeout"])
        status = _exec_main(request["code"])
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    """Run REQUEST's code in a fork and wait for it: its exit status, stdout and stderr."""
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin.write(request["input"].encode())
        stdin.seek(0)
        pid = os.fork()
        if pid == 0:
            _forked(request, stdin, out, err)
        _, status = os.waitpid(pid, 0)
        texts = []
        for fh in (out, err):
            fh.seek(0)
            texts.append(fh.read().decode(errors="replace"))
    return {"returncode": os.waitstatus_to_exitcode(status), "stdout": texts[0], "stderr": texts[1]}


class _Server(socketserver.ForkingMixIn, socketserver.UnixStreamServer):
    missing = ""


class _Handler(socketserver.StreamRequestHandler):
    """In a fork of the server: one request a connection (no code: the question whether vLLM imports)."""

    server: _Server

    def handle(self) -> None:
        request = json.loads(self.rfile.readline())
        answer = _answer(request) if "code" in request else {"missing": self.server.missing}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _serve(address: Path, session_pid: int) -> None:
    """Import vLLM, listen on ADDRESS, say so on stdout; answer until SESSION_PID has ended."""
    missing = ""
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError as exc:
            if name.startswith(REQUIRED) and not missing:
                missing = f"vLLM is not importable here ({name}: {exc})"
    with _Server(str(address), _Handler) as server:
        server.missing = missing
        server.timeout = 1.0  # how often the session's pytest is looked at
        print("listening", flush=True)
        os.dup2(2, 1)  # the starter has its line; the rest goes to the log, and the pipe closes
        try:
            while _alive(session_pid):
                server.handle_request()
                server.collect_children()
        finally:
            address.unlink(missing_ok=True)
            for leftover in (address.with_suffix(".lock"), address.with_suffix(".log")):
                leftover.unlink(missing_ok=True)


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), int(sys.argv[2]))
    sys.stderr.flush()
    os._exit(0)  # nothing left to finish: skip the seconds of tearing down vLLM's, torch's modules
