"""The small things a new user meets first (issue 24, item 5): the demo's own folders, what --help and
--quiet print."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lifecycle_helpers import free_port

from qwen3_vl_service.settings import config, scope

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_the_demo_and_the_production_config_never_share_a_service_folder() -> None:
    """Both serve on 8010: the demo keeps to run/demo/ and logs/demo/, so `status_service.py` of
    config.env never shows the demo's history (and a stop of one never reads the other's state)."""
    demo = scope.paths(config.load(REPO / "config.demo.env", environ={}))
    prod = scope.paths(config.load(REPO / "config.env", environ={}))
    assert config.load(REPO / "config.demo.env", environ={}).port == 8010
    assert demo.run_dir != prod.run_dir and demo.service_log != prod.service_log
    assert demo.media_pid_file != prod.media_pid_file
    assert demo.run_dir.is_relative_to(REPO / "run" / "demo")
    # scripts/demo.sh tells the user where the demo's log is.
    shown = re.search(r"tail -f (\S+)", (REPO / "scripts" / "demo.sh").read_text()).group(1)
    assert REPO / shown == demo.service_log


@pytest.mark.integration
def test_media_server_help_names_the_folders_its_files_are_in() -> None:
    out = subprocess.run(
        [sys.executable, "media_server.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    text = re.sub(r"\s+", "", out.stdout)  # argparse wraps the help wherever it likes
    node = socket.gethostname()
    assert out.returncode == 0
    assert f"LOG_DIR/media-PORT-{node}/media_server.log" in text
    assert f"RUN_DIR/media-PORT-{node}/media_server.pid" in text
    assert scope.media_folder(8080) == f"media-8080-{node}"


@pytest.mark.integration
def test_quiet_dry_run_prints_only_warnings_errors_and_the_verdict(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "RUN_DIR": str(tmp_path / "run"),
        "LOG_DIR": str(tmp_path / "logs"),
        "MODEL_PATH": str(tmp_path / "absent"),
        "PORT": str(free_port()),
        "MEDIA_PORT": str(free_port()),
    }
    cmd = [sys.executable, "start_service.py", "--dry-run", "--gpus", "8xH100-80GB", "--quiet"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert lines[0] == "Preflight" and lines[-1].startswith("would start:")
    assert all(line.startswith(("  warn ", "  error ")) for line in lines[1:-1]), lines
    assert "vLLM command" not in out.stdout and "Capacity per GPU" not in out.stdout
    full = subprocess.run(cmd[:-1], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "  ok    Capacity" in full.stdout and "vLLM command" in full.stdout
