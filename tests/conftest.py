"""Shared pytest hooks and fixtures: the session's tiny model, sample media and demo service, and procs.

How a new end-to-end test uses them
-----------------------------------
A start of the real vLLM server costs 30-100 s on two cores; the suite's budget is a few of them.

- A running service: take ``demo`` (a ``served.Served``, session-scoped). It is the one supervised
  demo service of the session (config.demo.env, RESTART=on-failure, its log folder on a 16 MB
  tmpfs when root), started on first use and shared by every test that needs one running:
  send requests to ``demo.base``, media through ``demo.media``, run ``demo.script(...)``.
  Leave it as you found it, or mark the test:
  ``@pytest.mark.disrupts`` if it kills a part that the supervisor brings back (the engine, the
  media server, a hang): such tests run after every test that does not;
  ``@pytest.mark.ends_demo`` if it stops the service for good: these run after all others, in file
  order. tests/test_services_e2e.py ends it today, step by step (stop, --all, the media server):
  a test about the end belongs there.
- A service of your own (another setting, a failure on purpose): build a
  ``served.Served(tmp_path, model=tiny_model, media_root=demo_media, **settings)`` and ``start()``
  it; its ``stop_all()`` in a ``finally``. Use ``tiny_model``: one model path for every start of
  the session lets vLLM reuse its compile cache (the path is part of the cache key: another copy
  compiles again).
- A replica group behind the router: the ``group`` fixture of tests/test_slurm_multi_e2e.py (a
  two-node SLURM job, a replica on each, the router on the head): add the test to that file, before
  its last test (the job's end).
- Something that waits (a job's time limit): start it in an ``@pytest.mark.early`` test and check
  the end in a ``@pytest.mark.late`` one (tests/test_slurm_e2e.py), so the wait overlaps the others.

Order: early, then unmarked, disrupts, ends_demo, late; file order within each (a stable sort).
scripts/test.sh runs the group as two processes: the demo's tests in one, in that order (marked
``demo_side`` here), and the tests with services of their own in the other.
Tests end only what they started, by pid or by the run folder their service carries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lifecycle_helpers import PY, SLEEP, clean_env, environ_of, kill_pids, wait_until
from served import Served
from skips import in_ci, require

# Every vLLM a test starts traces the model with dynamo and runs it eagerly, without inductor's C++
# compile and the warm-up pass: vLLM's own switch for its CPU CI (vllm/platforms/cpu.py,
# VLLM_CPU_CI_ENV: "compilations consume too much time, even with torch compile cache"). Measured
# here: init engine 0.8 s instead of 12 s (47 s with a cold cache), a start to /health 15-25 s
# sooner (45-55 s cold). The tests are about our processes, not vLLM's kernels (scripts/demo.sh
# keeps vLLM's default path).
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")
# Several vLLMs run at once here (the two e2e processes side by side, replicas, restarts): vLLM's
# default thread binding (auto) pins each one's worker to the same first cores, where a start beside
# a busy worker got 1% of a core and sat in its start for minutes (issue 23's note); the kernel
# places the threads instead. A real node's vLLM keeps its binding.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

# The order of the end-to-end phases (see above); unmarked tests are "run".
_PHASES = ("early", "run", "disrupts", "ends_demo", "late")
# scripts/test.sh runs the end-to-end group as two pytest processes side by side, each in the order
# above: ``-m demo_side``, every test of the shared demo service (its phases hold in one process;
# test_services_e2e's foreground service B among them), and ``-m "not demo_side"``, the tests that
# start services of their own (the SLURM jobs, the smoke run, test_faults's crash loop).
# (Not pytest-xdist's --dist loadgroup: with pytest 9.2 it spreads a group over every worker,
# pytest-xdist issue #1386.)
# The demo service's log folder: a tmpfs this small fills in a second (the full-disk test).
TMPFS_MB = 16
# Where the demo's logs are copied at its end, under the session's (worker's) temporary folder:
# pytest_terminal_summary prints their ends after a failure.
KEPT_LOGS = "demo-logs-kept"
# The lines of each of them a failed session prints.
LOG_TAIL = 40


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Early tests first, then the rest, then those that disrupt or end the shared service, then late;
    and the end-to-end tests of the demo's side (those that use it) marked ``demo_side``. Before the
    mark plugin's own hook (tryfirst), so that ``-m demo_side`` selects them."""

    def phase(item: pytest.Item) -> int:
        marked = [i for i, name in enumerate(_PHASES) if item.get_closest_marker(name)]
        return marked[0] if marked else _PHASES.index("run")

    items.sort(key=phase)  # stable: file order within a phase
    for item in items:
        if item.get_closest_marker("e2e") and "demo" in item.fixturenames:
            item.add_marker(pytest.mark.demo_side)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3-VL-MoE of the CPU demo (devtools/tiny_model.py), generated once per session."""
    from devtools import tiny_model as generator  # torch and transformers: seconds to import

    return generator.generate(tmp_path_factory.mktemp("shared") / "tiny-model")


@pytest.fixture(scope="session")
def demo_media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MEDIA_ROOT of the session's services: the sample image, picture and clip (devtools/sample_media.py),
    the clip again as clips/clip.mp4; and outside it, beside it, outside/secret.png."""
    from devtools import sample_media  # numpy, Pillow and OpenCV

    root = tmp_path_factory.mktemp("media")
    media = root / "media"
    sample_media.write_samples(media)
    (media / "clips").mkdir()
    shutil.copy(media / "sample.mp4", media / "clips" / "clip.mp4")
    (root / "outside").mkdir()
    shutil.copy(media / "sample.png", root / "outside" / "secret.png")
    return media


def _mount_tmpfs(path: Path) -> bool:
    """A TMPFS_MB tmpfs at PATH when root can mount one; CI (root) must."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        if in_ci():
            pytest.fail(f"cannot mount a tmpfs as root: {r.stderr.strip()}")
        return False
    return True


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_media: Path):
    """The session's supervised demo service (see the top of this file), started on first use."""
    require("vllm")
    root = tmp_path_factory.mktemp("demo")
    s = Served(
        root,
        model=tiny_model,
        media_root=demo_media,
        RESTART="on-failure",
        # Every disrupts test that kills vLLM costs one (one today: test_faults's engine kill under
        # load and a batch); past MAX_RESTARTS in RESTART_WINDOW the supervisor gives up.
        MAX_RESTARTS="5",
        RESTART_WINDOW="900",
        RESTART_BACKOFF="1",
        HEALTH_FAIL_AFTER="30",
        # STALL_AFTER: config.demo.env's 30 s. The liveness check runs beside every test here and must
        # never find this busy, loaded service hung; a real hang is test_slurm_multi_e2e's SIGSTOP.
    )
    s.tmpfs = _mount_tmpfs(s.log_root)  # the service's and the media server's logs
    try:
        s.start()
        yield s
    finally:
        s.stop_all()
        # Its logs outlive the tmpfs: the session's summary shows their ends when a test failed.
        shutil.copytree(s.log_root, root / KEPT_LOGS, dirs_exist_ok=True)
        if s.tmpfs:
            subprocess.run(["umount", "-l", str(s.log_root)], check=False)


@pytest.fixture
def procs():
    """procs(code=SLEEP, env=None, **popen_kw): a `python -c CODE` process of this test, killed afterwards.

    Returned once its environment is readable in /proc (right after exec the
    kernel may not show it yet), or once it has exited.
    """
    started: list[subprocess.Popen] = []

    def start(code: str = SLEEP, env=None, **kw) -> subprocess.Popen:
        p = subprocess.Popen([PY, "-c", code], env=env or clean_env(), **kw)
        started.append(p)
        wait_until(lambda: p.poll() is not None or environ_of(p.pid))
        return p

    yield start
    kill_pids([p.pid for p in started])
    for p in started:
        p.wait(5)


def pytest_terminal_summary(terminalreporter):
    """Print each end-to-end request with its status and latency (the e2e issue's note); after a
    failure, the end of each log of the demo service (CI keeps nothing else of them)."""
    factory = getattr(terminalreporter.config, "_tmp_path_factory", None)
    if factory and (terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")):
        # xdist's workers have their folders under the controller's
        for folder in sorted(factory.getbasetemp().rglob(KEPT_LOGS)):
            for log in sorted(folder.rglob("*.log")):
                terminalreporter.section(f"demo log {log.relative_to(folder)}, last {LOG_TAIL} lines")
                for line in log.read_text(errors="replace").splitlines()[-LOG_TAIL:]:
                    terminalreporter.write_line(line)
    e2e = sys.modules.get("test_e2e") or sys.modules.get("tests.test_e2e")
    timings = getattr(e2e, "TIMINGS", None)
    if not timings:
        return
    terminalreporter.section("end-to-end requests")
    for name, status, seconds in timings:
        terminalreporter.write_line(f"{status:>4}  {seconds:7.2f} s  {name}")
