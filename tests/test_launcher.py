"""start_service.py: what it shows is what it runs; its run path imports no torch, vLLM or transformers."""

from __future__ import annotations

import ast
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import realmodel
from lifecycle_helpers import clean_env, free_port, run_tool, wait_until

from qwen3_vl_service.core.names import RUN_DIR_ENV, STATE_FILE, TAG_ENV
from qwen3_vl_service.deployment import cluster, deployment
from qwen3_vl_service.lifecycle import launcher, runstate
from qwen3_vl_service.settings import config, scope

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-launcher-test-0123456789"

# Stands in for VLLM_PYTHON (the one thing faked: vLLM itself, which test_e2e.py runs for real).
# Asked by the launcher's probe (-c ...) it names a vLLM; exec'd as vLLM's server it records the
# argv and the environment it was given, then exits.
FAKE_VLLM_PYTHON = """#!/bin/sh
if [ "$1" = "-c" ]; then echo "vllm 0.0.0-fake"; exit 0; fi
printf '%s\\0' "$0" "$@" > "{out}/argv"
env -0 > "{out}/environ"
cp "${run_dir_env}/{state_file}" "{out}/{state_file}"
"""


def _config(tmp_path: Path, **settings: object) -> Path:
    model = realmodel.build(tmp_path / "model")
    base = {
        "DEVICE": "cpu",
        "TENSOR_PARALLEL_SIZE": 1,
        "EXPERT_PARALLEL": "off",
        "HOST": "127.0.0.1",
        "PORT": free_port(),
        "MEDIA_SERVER": "false",
        "API_KEY": SECRET,
        # vLLM exec'd by the launcher; the supervisor (RESTART=on-failure) has tests/test_supervisor.py.
        "RESTART": "no",
    }
    return realmodel.write_config_env(tmp_path / "config.env", model, **{**base, **settings})


def _shown_command(log_text: str) -> list[str]:
    """The 'vLLM command' section of the report, as the words a shell would see."""
    lines = []
    for line in log_text.split("vLLM command\n", 1)[1].splitlines():
        lines.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(lines))


@pytest.mark.integration
def test_report_and_service_log_show_the_command_that_runs(tmp_path: Path) -> None:
    """Defect 4: the command in the report (and so in service.log) is the one exec'd, environment included:
    the tag and the IPC socket folder; the API key masked in the log only."""
    out = tmp_path / "seen"
    out.mkdir()
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_VLLM_PYTHON.format(out=out, run_dir_env=RUN_DIR_ENV, state_file=STATE_FILE))
    fake.chmod(0o755)
    cfg_path = _config(tmp_path, VLLM_PYTHON=fake)
    env = clean_env()
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "start_service.py"), "--config", str(cfg_path), "--quiet"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (out / "argv").exists(), proc.stdout + proc.stderr
        where = scope.paths(config.load(cfg_path, environ={}))  # the service's own folders
        state = runstate.read(out)  # the run's state, as the fake vLLM found it
        assert state is not None
        # Once the fake vLLM has exited, the tee tidies up after it: the state and private folder go.
        assert wait_until(lambda: runstate.read(where.run_dir) is None, 10)
        assert wait_until(lambda: not Path(state.private_tmp).exists(), 10)
        ran_argv = (out / "argv").read_text().split("\0")[:-1]
        ran_env = dict(item.split("=", 1) for item in (out / "environ").read_text().split("\0") if item)
        log = where.service_log.read_text()
    finally:
        run_tool("stop_service.py", "--config", str(cfg_path))

    words = _shown_command(log)
    split = next(i for i, w in enumerate(words) if "=" not in w)
    shown_env = dict(w.split("=", 1) for w in words[:split])
    assert words[split:] == ran_argv
    # Every variable the launcher sets is shown with the value vLLM got (the key masked).
    assert shown_env[TAG_ENV] == ran_env[TAG_ENV] == state.tag
    assert shown_env["VLLM_RPC_BASE_PATH"] == ran_env["VLLM_RPC_BASE_PATH"] == state.private_tmp
    assert shown_env[RUN_DIR_ENV] == ran_env[RUN_DIR_ENV]
    for key, value in shown_env.items():
        if key == "VLLM_API_KEY":
            assert ran_env[key] == SECRET and value != SECRET
        else:
            assert ran_env.get(key) == value, key
    assert SECRET not in log


@pytest.mark.unit
def test_dry_run_shows_the_launch_it_would_run(tmp_path: Path) -> None:
    cfg = config.load(_config(tmp_path, MEDIA_SERVER="true"), environ={})
    dep = deployment.derive(cfg, None, cluster.layout(cfg), expert_parallel=False)
    launch = launcher.prepare_launch(cfg, dep.unit(deployment.VLLM), environ={"NO_PROXY": "corp.example"})
    shown = launch.display()
    assert f"{TAG_ENV}={launch.tag}" in shown
    assert f"VLLM_RPC_BASE_PATH={launch.private_tmp}" in shown
    # vLLM's temp files in the start's folder, torch's compile cache where it was (runstate.temp_env).
    assert launch.env["TMPDIR"] == launch.private_tmp
    assert launch.env["TORCHINDUCTOR_CACHE_DIR"] == runstate.compile_cache_dir({})
    assert launch.private_tmp == runstate.private_tmp_path(launch.tag)
    assert not Path(launch.private_tmp).exists()  # made only when the start goes ahead
    assert launch.env["NO_PROXY"].startswith("corp.example,") and "NO_PROXY=corp.example," in shown
    assert SECRET not in shown and launch.env["VLLM_API_KEY"] == SECRET


@pytest.mark.integration
def test_dry_run_imports_neither_torch_nor_vllm_nor_transformers(tmp_path: Path) -> None:
    """The launcher's path, run as a user runs it, leaves these out of sys.modules."""
    cfg_path = _config(tmp_path, DEVICE="gpu", TENSOR_PARALLEL_SIZE=8, EXPERT_PARALLEL="auto")
    code = (
        "import json, runpy, sys\n"
        "sys.argv = ['start_service.py', '--config', sys.argv[1], '--dry-run', '--gpus', '8xH100-80GB']\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'vllm', 'transformers'})\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(cfg_path)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert "would start" in proc.stdout, proc.stdout + proc.stderr
    assert result["heavy"] == []


@pytest.mark.unit
def test_launcher_imports_at_module_level() -> None:
    """Every import of the launcher is at its top: what the run path loads is visible at a glance."""
    tree = ast.parse(Path(launcher.__file__).read_text())
    nested = [
        f"line {node.lineno}"
        for top in tree.body
        if isinstance(top, (ast.FunctionDef, ast.ClassDef))
        for node in ast.walk(top)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]
    assert nested == []


@pytest.mark.unit
def test_the_start_makes_media_root_without_the_media_server_too(tmp_path: Path) -> None:
    """vLLM gets MEDIA_ROOT as --allowed-local-media-path and (0.26, on the H100) answers every chat
    request 400 while that folder does not exist: the start makes it, media server or not."""
    from qwen3_vl_service.lifecycle.supervised import ensure_media

    root = tmp_path / "not-yet" / "media"
    cfg = config.load(_config(tmp_path, MEDIA_SERVER="false", MEDIA_ROOT=root), environ={})
    said: list[str] = []
    ensure_media(cfg, said.append)
    assert root.is_dir() and said == [f"created the media root {root}"]
