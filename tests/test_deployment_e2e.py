"""The dry run's deployment is what runs (issue 21): the live processes of the session's demo service
against the dry run of the same settings, line by line. The replica group's counterpart is in
tests/test_slurm_multi_e2e.py (test_each_replica_runs_its_recorded_unit)."""

from __future__ import annotations

import shlex

import psutil
import pytest
from served import Served

from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.core.secrets import is_secret

pytestmark = pytest.mark.e2e
# What one start adds: its identity (vllm_args.identity_env), different at every start.
PER_START = {TAG_ENV, RUN_DIR_ENV, "VLLM_RPC_BASE_PATH", "TMPDIR"}


def shown_command(report: str, title: str = "vLLM command\n") -> tuple[dict[str, str], list[str]]:
    """(variables, argv) of the command a report shows under TITLE, as a shell would read them."""
    lines = []
    for line in report.split(title, 1)[1].splitlines():
        lines.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            break
    words = shlex.split(" ".join(lines))
    split = next(i for i, w in enumerate(words) if "=" not in w or w.startswith("-"))
    return dict(w.split("=", 1) for w in words[:split]), words[split:]


def test_the_live_service_runs_exactly_the_dry_runs_command(demo: Served) -> None:
    dry = demo.script("start_service.py", "--dry-run")
    # The service runs, so the dry run finds its port taken: a finding, the command is shown all the same.
    env, argv = shown_command(dry.stdout)
    api = psutil.Process(demo.state()["pid"])
    assert api.cmdline() == argv
    live = api.environ()
    for key, value in env.items():
        if key in PER_START:
            assert live[key], key
        elif is_secret(key):
            assert value != live[key]  # masked in the report, the real one in the process
        else:
            assert live.get(key) == value, key
    # And the supervisor runs the unit recorded at the start: the same argv again.
    record = demo.run_dir / "deployment.json"
    assert record.is_file() and str(record) in " ".join(psutil.Process(demo.supervisor_pid()).cmdline())
