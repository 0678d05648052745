"""scope.py: one config -> its own run and log folders; the media server shared per MEDIA_PORT."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import psutil
import pytest
import realmodel
from lifecycle_helpers import (
    clean_env,
    free_port,
    make_state,
    run_tool,
    start_fake_media_server,
    write_config,
)

from qwen3_vl_service.core.errors import ConfigError
from qwen3_vl_service.core.names import RECORD_FILE, RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.lifecycle import registry, runstate
from qwen3_vl_service.planning import plan
from qwen3_vl_service.planning.vllm_args import build
from qwen3_vl_service.settings import config, scope

REPO = Path(__file__).resolve().parents[1]


def _load(tmp_path: Path, **env: str) -> config.ServiceConfig:
    return config.load(REPO / "config.env", environ={"RUN_DIR": str(tmp_path / "run"), **env})


@pytest.mark.unit
def test_default_name_is_the_port_and_folders_follow_it(tmp_path: Path) -> None:
    p = scope.paths(_load(tmp_path))
    run = (tmp_path / "run").resolve()
    assert p.name == "port-8010"
    assert p.run_dir == run / "port-8010" and p.state_file == run / "port-8010" / "service.json"
    assert p.service_log == REPO / "logs" / "port-8010" / "service.log"
    assert p.launcher_log == REPO / "logs" / "port-8010" / "launcher.log"
    node = socket.gethostname()
    assert p.media_pid_file == run / f"media-8080-{node}" / "media_server.pid"
    assert p.media_log == REPO / "logs" / f"media-8080-{node}" / "media_server.log"
    assert (
        scope.media_folder(8080, "gpu02") == "media-8080-gpu02"
    )  # another node: another server, another pid file


@pytest.mark.unit
def test_second_config_differing_in_model_and_ports_gets_its_own_folders(tmp_path: Path) -> None:
    fp8 = _load(tmp_path)
    bf16 = config.load(REPO / "config.bf16.env", environ={"RUN_DIR": str(tmp_path / "run")})
    a, b = scope.paths(fp8), scope.paths(bf16)
    assert (a.name, b.name) == ("port-8010", "port-7001")
    assert a.run_dir != b.run_dir and a.log_dir != b.log_dir
    assert a.run_dir.parent == b.run_dir.parent, "one RUN_DIR for both, no new folder to pick"
    # Same MEDIA_PORT and root: one media server, one pid file.
    assert a.media_pid_file == b.media_pid_file
    # Each vLLM carries its own folder: stop_service.py of one never matches the other's processes.
    assert build(fp8, expert_parallel=True, tag="t").env[RUN_DIR_ENV] == str(a.run_dir)
    assert build(bf16, expert_parallel=True, tag="t").env[RUN_DIR_ENV] == str(b.run_dir)


@pytest.mark.unit
def test_service_name_setting(tmp_path: Path) -> None:
    assert scope.paths(_load(tmp_path, SERVICE_NAME="fp8")).run_dir.name == "fp8"
    assert _load(tmp_path, SERVICE_NAME="fp8").sources["SERVICE_NAME"] == "environment"
    assert _load(tmp_path, SERVICE_NAME="auto").display_value("SERVICE_NAME") == "auto"
    for bad in ("../x", "a b", "media-8080", "x" * 65):
        with pytest.raises(ConfigError) as err:
            _load(tmp_path, SERVICE_NAME=bad)
        assert "SERVICE_NAME" in err.value.message and repr(bad) in err.value.message
        assert err.value.exit_code == 2


@pytest.mark.integration
def test_media_users_are_the_other_live_services_on_that_media_port(tmp_path: Path, procs) -> None:
    cfg = config.load(write_config(tmp_path, port=free_port(), media_port=9090), environ={})
    run_root = cfg.run_dir
    assert registry.media_users(cfg) == []

    def service(name: str, media_port: int, *, live: bool, media_server: bool = True) -> None:
        tag = runstate.new_tag()
        run_dir = run_root / name
        proc = procs(env=clean_env(**{TAG_ENV: tag, RUN_DIR_ENV: str(run_dir)}))
        if not live:
            proc.kill()
            proc.wait(5)
        ct = psutil.Process(proc.pid).create_time() if live else 1.0
        state = make_state(pid=proc.pid, create_time=ct, tag=tag, media_port=media_port)
        runstate.write(run_dir, state.__class__(**{**state.__dict__, "media_server": media_server}))

    service("bf16", 9090, live=True)
    service("gone", 9090, live=False)
    service("elsewhere", 9191, live=True)
    service("no-media", 9090, live=True, media_server=False)
    service("svc", 9090, live=True)  # this config's own folder is never a "user" of itself
    assert [u.name for u in registry.media_users(cfg)] == ["bf16"]

    # A service whose supervisor is restarting vLLM has no service.json for that while: its
    # record names the media server, and it still counts (else a stop --all elsewhere ends it).
    def restarting(name: str, media: list | None) -> int:
        tag = runstate.new_tag()
        run_dir = run_root / name
        proc = procs(env=clean_env(**{TAG_ENV: tag, RUN_DIR_ENV: str(run_dir)}))
        record = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "tag": tag}
        record |= {"node": runstate.this_node(), "port": 7001, "media": media, "state": "restarting"}
        run_dir.mkdir(parents=True)
        (run_dir / RECORD_FILE).write_text(json.dumps(record))
        return proc.pid

    pid = restarting("restarting", [cfg.media_host, 9090])
    restarting("restarting-other-media", [cfg.media_host, 9191])
    restarting("restarting-no-media", None)
    users = registry.media_users(cfg)
    assert [u.name for u in users] == ["bf16", "restarting"]
    assert (users[1].port, users[1].pid) == (7001, pid)
    assert [name for name, _ in registry.services(run_root)] == [
        "bf16",
        "elsewhere",
        "gone",
        "no-media",
        "svc",
    ]


@pytest.mark.integration
def test_stop_all_leaves_the_media_server_while_another_service_uses_it(tmp_path: Path, procs) -> None:
    media_port = free_port()
    cfg_path = write_config(tmp_path, port=free_port(), media_port=media_port)
    cfg = config.load(cfg_path, environ={})
    fake = start_fake_media_server()
    try:
        where = scope.paths(cfg)
        where.media_dir.mkdir(parents=True)
        where.media_pid_file.write_text(f"{fake.pid}\n")
        other = "bf16"
        tag = runstate.new_tag()
        proc = procs(env=clean_env(**{TAG_ENV: tag, RUN_DIR_ENV: str(cfg.run_dir / other)}))
        ct = psutil.Process(proc.pid).create_time()
        runstate.write(
            cfg.run_dir / other, make_state(pid=proc.pid, create_time=ct, tag=tag, media_port=media_port)
        )

        result = run_tool("stop_service.py", "--config", str(cfg_path), "--all")
        assert result.returncode == 0, result.stderr
        assert f"the media server stays: still used by bf16 (port 8010, pid {proc.pid})" in result.stdout
        assert fake.poll() is None and proc.poll() is None

        runstate.clear(cfg.run_dir / other, tag)  # the other service is gone: now --all stops it
        result = run_tool("stop_service.py", "--config", str(cfg_path), "--all")
        assert result.returncode == 0, result.stderr
        assert fake.wait(10) == 0 and f"pid {fake.pid}" in result.stdout
    finally:
        if fake.poll() is None:
            fake.kill()
        fake.wait(5)


@pytest.mark.unit
def test_bf16_config_fits_on_8_h100_with_fewer_sequences(tmp_path: Path) -> None:
    """config.bf16.env's dry-run numbers (README): 472 GB of BF16 weights on 8 x H100 80GB."""
    from qwen3_vl_service.machine.gpus import parse_spec
    from qwen3_vl_service.planning.model import inspect

    model = realmodel.build_bf16(tmp_path / "bf16")
    cfg = config.load(REPO / "config.bf16.env", environ={"MODEL_PATH": str(model)})
    assert (cfg.port, cfg.served_model_name, cfg.model_repo) == (
        7001,
        "qwen3-vl-bf16",
        "Qwen/Qwen3-VL-235B-A22B-Thinking",
    )
    p = plan.make(cfg, parse_spec("8xH100-80GB"), inspect(model))
    assert not p.expert_parallel, "no FP8 blocks: nothing for expert parallelism to keep whole"
    assert f"{p.weights_per_gpu_bytes / 1024**3:.2f}" == "55.89"
    assert f"{p.kv_bytes_per_gpu / 1024**3:.2f}" == "10.80"
    assert p.kv_tokens == 240_832 and p.max_concurrency == 7
    # vLLM's 1024 sequences at once would get 235 KV tokens each: preemption likely, said (issue 22).
    (capacity,) = [f for f in p.findings if f.check == "Capacity"]
    assert capacity.level == "warn" and "MAX_NUM_SEQS=470" in capacity.fix
    # At the FP8 service's GPU_MEMORY_UTIL and length both would not fit one set of GPUs.
    fp8 = realmodel.build(tmp_path / "fp8")
    f = plan.make(
        config.load(REPO / "config.env", environ={"MODEL_PATH": str(fp8)}),
        parse_spec("8xH100-80GB"),
        inspect(fp8),
    )
    assert p.weights_per_gpu_bytes + f.weights_per_gpu_bytes > p.budget_per_gpu_bytes
