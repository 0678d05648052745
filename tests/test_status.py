"""status_service.py against a real stand-in server (real HTTP, real processes)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from lifecycle_helpers import Standin, free_port, run_tool, write_config

from qwen3_vl_service.lifecycle import runstate, status

# The keys of `status_service.py --json`: always, and while the recorded start runs
# "gpu_note" comes besides, where NVML is unavailable ("gpus" is then null).
BASE_KEYS = {
    "running",
    "healthy",
    "service",
    "run_dir",
    "state_file",
    "urls",
    "model",
    "served_model_name",
    "log_file",
    "processes",
    "gpus",
    "media_answering",
}
RUNNING_KEYS = BASE_KEYS | {"pid", "tag", "started_at", "uptime_s", "detached", "config_path", "health"}


@pytest.fixture
def standins():
    started: list[Standin] = []
    yield started
    for s in started:
        s.cleanup()


@pytest.mark.integration
def test_status_running_and_healthy(tmp_path: Path, standins) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port=port, API_KEY="sk-test-secret-123456")
    s = Standin(
        tmp_path, port=port, tag=runstate.new_tag(), extra_env={"VLLM_API_KEY": "sk-test-secret-123456"}
    )
    standins.append(s)
    s.wait_ready()
    s.write_state()

    result = run_tool("status_service.py", "--config", str(cfg), "--json", "--sample", "0.5")
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads(result.stdout)
    assert info["running"] and info["healthy"]
    assert info["pid"] == s.proc.pid
    assert info["health"]["status"] == 200
    m = info["metrics"]
    assert m["requests_running"] == 2 and m["requests_waiting"] == 1
    assert m["kv_cache_usage"] == pytest.approx(0.25)
    # The stand-in adds 100 generated and 40 prompt tokens per scrape: rate x interval gives them back.
    assert m["sample_s"] > 0
    assert m["generation_tokens_per_s"] * m["sample_s"] == pytest.approx(100, rel=0.02)
    assert m["prompt_tokens_per_s"] * m["sample_s"] == pytest.approx(40, rel=0.02)
    assert m["generation_tokens_total"] >= 1000
    # The API key went to /v1 (the stand-in answers 401 without it).
    assert info["served_models"] == ["standin-model"]
    assert info["processes"] >= 4
    assert info["urls"]["api"] == f"http://127.0.0.1:{port}/v1"
    assert "sk-test-secret" not in result.stdout
    # The --json keys are an interface (scripts read them): exactly these, no more, no fewer.
    assert set(info) - {"gpu_note"} == RUNNING_KEYS | {"metrics", "served_models"}
    assert set(info["urls"]) == {"api", "health", "metrics", "media"}
    assert set(info["health"]) == {"status", "error", "latency_ms"}
    assert set(m) == {
        "requests_running",
        "requests_waiting",
        "kv_cache_usage",
        "generation_tokens_total",
        "prompt_tokens_total",
        "requests_total",
        "generation_tokens_per_s",
        "prompt_tokens_per_s",
        "sample_s",
    }

    text = run_tool("status_service.py", "--config", str(cfg), "--sample", "0")
    assert text.returncode == 0
    assert "running, healthy" in text.stdout
    assert "2 running, 1 waiting; KV cache 25.0% used" in text.stdout
    assert "sk-test-secret" not in text.stdout


@pytest.mark.integration
def test_status_wrong_api_key_is_reported(tmp_path: Path, standins) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port=port, API_KEY="wrong-key")
    s = Standin(tmp_path, port=port, tag=runstate.new_tag(), extra_env={"VLLM_API_KEY": "right-key"})
    standins.append(s)
    s.wait_ready()
    s.write_state()
    result = run_tool("status_service.py", "--config", str(cfg), "--sample", "0")
    assert result.returncode == 0  # healthy: /health needs no key
    assert "401 (wrong or missing API_KEY?)" in result.stdout


@pytest.mark.integration
def test_status_unhealthy_shows_phase(tmp_path: Path, standins) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port=port)
    s = Standin(tmp_path, port=port, tag=runstate.new_tag(), args=("--unhealthy", "--startup-delay", "0.4"))
    standins.append(s)
    s.wait_ready()
    s.write_state()
    result = run_tool("status_service.py", "--config", str(cfg), "--json")
    assert result.returncode == 1
    info = json.loads(result.stdout)
    assert info["running"] and not info["healthy"]
    assert info["health"]["status"] == 503
    assert info["phase"] == "ready"  # the stand-in logged startup complete but answers 503
    assert set(info) - {"gpu_note"} == RUNNING_KEYS | {"phase"}


@pytest.mark.integration
def test_status_not_running(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, port=free_port())
    result = run_tool("status_service.py", "--config", str(cfg))
    assert result.returncode == 1
    assert "not running" in result.stdout
    info = json.loads(run_tool("status_service.py", "--config", str(cfg), "--json").stdout)
    assert info["running"] is False and info["healthy"] is False
    assert set(info) - {"gpu_note"} == BASE_KEYS


@pytest.mark.integration
def test_status_stale_state_and_leftovers(tmp_path: Path, standins) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port=port)
    s = Standin(tmp_path, port=port, tag=runstate.new_tag())
    standins.append(s)
    pids = s.wait_ready()
    s.write_state()
    os.kill(pids["api"], signal.SIGKILL)
    s.proc.wait(5)
    result = run_tool("status_service.py", "--config", str(cfg))
    assert result.returncode == 1
    assert "not running" in result.stdout
    assert "stale" in result.stdout
    assert "leftovers" in result.stdout and str(pids["engine"]) in result.stdout
    assert "stop_service.py" in result.stdout


@pytest.mark.unit
def test_parse_metrics_sums_engines_and_skips_created() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 2.0\n'
        "# TYPE vllm:generation_tokens_total counter\n"
        'vllm:generation_tokens_total{engine="0",model_name="m"} 10.0\n'
        'vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
        "# TYPE vllm:other gauge\n"
        "vllm:other 7\n"
    )
    assert status.parse_metrics(text) == {
        "vllm:num_requests_running": 5.0,
        "vllm:generation_tokens": 10.0,
        "vllm:kv_cache_usage_perc": 0.5,
    }


HUNG = (
    "hung: no engine progress for 35 s (STALL_AFTER=30) with 8 running and 0 waiting in the engine, "
    "8 in flight in the API server: /metrics shows no token generated"
)


@pytest.mark.integration
def test_a_hung_engine_is_not_healthy_whatever_its_health_answers(tmp_path: Path, standins) -> None:
    """/health answers 200 while the engine behind it is stuck: the supervisor's liveness check says
    hung (its record's conditions), and status says so with the evidence, exit 1."""
    import subprocess
    import sys

    from lifecycle_helpers import REPO, clean_env, kill_pids, run_dir_of, wait_until

    from qwen3_vl_service.core.names import TAG_ENV

    port = free_port()
    cfg = write_config(tmp_path, port=port)
    s = Standin(tmp_path, port=port, tag=runstate.new_tag())
    standins.append(s)
    s.wait_ready()
    s.write_state()
    record = run_dir_of(tmp_path) / "supervisor.json"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from qwen3_vl_service.lifecycle.supervisor import Policy, Record\n"
        "r = Record(Path(sys.argv[1]), tag='q3vl-hung-1', policy=Policy(3, 900, 1))\n"
        "r.update(state='running', conditions={'vLLM': sys.argv[2]})\n"
        "time.sleep(120)\n"
    )
    sup = subprocess.Popen(
        [sys.executable, "-c", code, str(record), HUNG],
        env=clean_env(**{TAG_ENV: "q3vl-hung-1", "PYTHONPATH": str(REPO)}),
    )
    try:
        assert wait_until(lambda: record.exists(), 20)
        text = run_tool("status_service.py", "--config", str(cfg), "--sample", "0")
        assert text.returncode == 1, text.stdout + text.stderr
        assert "running, hung (its /health answers" in text.stdout, text.stdout
        assert f"vLLM         {HUNG}" in text.stdout, text.stdout
        as_json = run_tool("status_service.py", "--config", str(cfg), "--json", "--sample", "0")
        info = json.loads(as_json.stdout)
        assert info["health"]["status"] == 200 and not info["healthy"]
        assert info["supervisor"]["conditions"] == {"vLLM": HUNG}
    finally:
        kill_pids([sup.pid])


@pytest.mark.integration
def test_a_supervisor_restarting_vllm_is_no_leftover(tmp_path: Path) -> None:
    """Between two starts of vLLM (after a hang or a crash) the service is not running, and its
    supervisor, which carries the run folder, was listed as a leftover of an earlier run to stop."""
    import subprocess
    import sys

    from lifecycle_helpers import REPO, clean_env, kill_pids, run_dir_of, wait_until

    from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV

    cfg = write_config(tmp_path, port=free_port())
    record = run_dir_of(tmp_path) / "supervisor.json"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from qwen3_vl_service.lifecycle.supervisor import Policy, Record\n"
        "r = Record(Path(sys.argv[1]), tag='q3vl-restarting-1', policy=Policy(3, 900, 1))\n"
        "r.update(state='restarting', restarts=1, last_cause='vLLM: hung: no engine progress for 31 s')\n"
        "time.sleep(120)\n"
    )
    env = {TAG_ENV: "q3vl-restarting-1", RUN_DIR_ENV: str(run_dir_of(tmp_path)), "PYTHONPATH": str(REPO)}
    sup = subprocess.Popen([sys.executable, "-c", code, str(record)], env=clean_env(**env))
    try:
        assert wait_until(lambda: record.exists(), 20)
        text = run_tool("status_service.py", "--config", str(cfg), "--sample", "0")
        assert "not running" in text.stdout and "restarting; 1 restart(s)" in text.stdout, text.stdout
        assert "leftovers" not in text.stdout, text.stdout
    finally:
        kill_pids([sup.pid])


@pytest.mark.integration
def test_status_of_one_config_never_shows_another_services_processes(tmp_path: Path, standins) -> None:
    """Issue 21: two configs sharing one RUN_DIR and LOG_DIR; each status reads its own service's
    record and counts its own processes only: the running "svc" is neither "other"'s nor a leftover."""
    port = free_port()
    cfg_a = write_config(tmp_path, port=port)  # service "svc": the stand-in below runs it
    s = Standin(tmp_path, port=port, tag=runstate.new_tag())
    standins.append(s)
    s.wait_ready()
    s.write_state()
    (tmp_path / "b").mkdir()
    cfg_b = write_config(
        tmp_path / "b",
        port=free_port(),
        SERVICE_NAME="other",
        RUN_DIR=str(tmp_path / "run"),
        LOG_DIR=str(tmp_path / "logs"),
    )
    b = run_tool("status_service.py", "--config", str(cfg_b), "--json")
    info_b = json.loads(b.stdout)
    assert b.returncode == 1 and info_b["running"] is False and info_b["service"] == "other", b.stdout
    assert info_b["processes"] == 0 and "leftovers" not in info_b, info_b  # none of "svc"'s are "other"'s
    human = run_tool("status_service.py", "--config", str(cfg_b)).stdout
    assert "not running" in human and "leftovers" not in human, human
    a = json.loads(run_tool("status_service.py", "--config", str(cfg_a), "--json").stdout)
    assert a["running"] and a["pid"] == s.proc.pid and a["service"] == "svc"
