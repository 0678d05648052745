"""cluster.layout() and the per-node commands: replicas behind the router, vLLM's data parallelism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import warm_vllm
from skips import vllm_missing

from qwen3_vl_service.core.errors import ConfigError
from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.deployment import cluster, deployment, router_command
from qwen3_vl_service.deployment.deployment import replica_config
from qwen3_vl_service.lifecycle import status
from qwen3_vl_service.planning.vllm_args import build
from qwen3_vl_service.settings import config, scope

REPO = Path(__file__).resolve().parents[1]


def load(**env: str):
    return config.load(REPO / "config.env", environ=env)


def flag(argv, name):
    return argv[list(argv).index(name) + 1]


def derive(cfg, lay, *, expert_parallel=False):
    return deployment.derive(cfg, None, lay, expert_parallel=expert_parallel)


@pytest.mark.unit
def test_replica_settings_are_validated_with_the_value_and_the_fix():
    assert load(REPLICAS="per-node").replicas == 0
    assert load(REPLICAS="per-node").display_value("REPLICAS") == "per-node"
    assert load(REPLICAS="3").replicas == 3
    with pytest.raises(ConfigError, match=r"REPLICAS='two'.*allowed: a number of replicas 1..256, or per"):
        load(REPLICAS="two")
    with pytest.raises(ConfigError, match=r"ROUTER_POLICY='fastest'.*round_robin, cache_aware, power_of_two"):
        load(ROUTER_POLICY="fastest")
    with pytest.raises(ConfigError, match="kv_aware needs vLLM's KV cache events"):
        load(ROUTER_POLICY="kv_aware")
    with pytest.raises(ConfigError, match="REPLICA_MODE='dp'"):
        load(REPLICA_MODE="dp")
    # The CPU build cannot run vLLM's data parallelism on this MoE model.
    with pytest.raises(ConfigError, match="all_gatherv"):
        load(REPLICAS="2", REPLICA_MODE="data-parallel", DEVICE="cpu", TENSOR_PARALLEL_SIZE="1")


@pytest.mark.unit
def test_one_replica_on_one_node_is_the_plain_service():
    lay = cluster.layout(load(), ("",), gpus_on_node=8, environ={})
    assert lay.mode == "single" and not lay.grouped


@pytest.mark.unit
def test_two_tp4_replicas_share_one_8_gpu_node_each_on_its_gpus_and_port():
    cfg = load(REPLICAS="2", TENSOR_PARALLEL_SIZE="4")
    lay = cluster.layout(cfg, ("",), gpus_on_node=8, environ={})
    assert lay.mode == "router" and lay.per_node == 2
    r0, r1 = lay.replicas
    assert (r0.gpus, r0.port) == (("0", "1", "2", "3"), 8010)
    assert (r1.gpus, r1.port) == (("4", "5", "6", "7"), 8011)
    # SLURM's CUDA_VISIBLE_DEVICES is honoured: replica k gets the k-th TP-sized slice of it.
    lay = cluster.layout(cfg, ("",), gpus_on_node=8, environ={"CUDA_VISIBLE_DEVICES": "7,6,5,4,3,2,1,0"})
    assert lay.replicas[1].gpus == ("3", "2", "1", "0")
    unit = derive(cfg, lay).unit("replica-1")
    assert unit.env["CUDA_VISIBLE_DEVICES"] == "3,2,1,0"
    assert flag(unit.argv, "--port") == "8011" and flag(unit.argv, "--tensor-parallel-size") == "4"
    rcfg = replica_config(cfg, 1, 8011)
    where = scope.paths(rcfg)  # the replica's own folders, below the service's
    own = scope.paths(cfg)
    assert where.run_dir == own.run_dir / "replica-1" == unit.run_dir
    assert where.log_dir == own.log_dir / "replica-1" and unit.log_file == where.service_log
    assert build(rcfg, expert_parallel=False, tag="t").env[RUN_DIR_ENV] == str(where.run_dir)


@pytest.mark.unit
def test_layout_refuses_what_cannot_work_naming_every_setting():
    with pytest.raises(ConfigError, match=r"2 x TENSOR_PARALLEL_SIZE=8 = 16 GPUs on each node, which has 8"):
        cluster.layout(load(REPLICAS="2"), ("",), gpus_on_node=8, environ={})
    with pytest.raises(ConfigError, match="REPLICAS=3 cannot be spread evenly over the job's 2 nodes"):
        cluster.layout(load(REPLICAS="3", HOST="0.0.0.0"), ("a", "b"), gpus_on_node=8, environ={})
    with pytest.raises(
        ConfigError, match=r"ROUTER_PORT=8011 \(the router\) is also PORT\+1 \(replica-1's API\)"
    ):
        cfg = load(REPLICAS="2", TENSOR_PARALLEL_SIZE="4", ROUTER_PORT="8011")
        derive(cfg, cluster.layout(cfg, ("",), gpus_on_node=8, environ={}))


@pytest.mark.unit
def test_per_node_replicas_are_reached_by_node_name_through_the_router():
    cfg = load(REPLICAS="per-node", HOST="0.0.0.0", ROUTER_POLICY="cache_aware")
    lay = cluster.layout(cfg, ("gpu01", "gpu02"), gpus_on_node=8, environ={})
    assert [(r.node, r.node_rank, r.port) for r in lay.replicas] == [("gpu01", 0, 8010), ("gpu02", 1, 8011)]
    urls = [cluster.worker_url(cfg, r, lay) for r in lay.replicas]
    assert urls == ["http://gpu01:8010", "http://gpu02:8011"]
    cmd = router_command.build(cfg, urls)
    argv = list(cmd.argv)
    assert argv[1:3] == ["-m", "vllm_router.launch_router"]
    i = argv.index("--worker-urls")
    assert argv[i + 1 : i + 3] == urls
    assert flag(argv, "--policy") == "cache_aware" and flag(argv, "--port") == "8040"
    assert flag(argv, "--host") == "0.0.0.0"
    assert flag(argv, "--worker-startup-timeout-secs") == str(cfg.startup_timeout)
    dep = derive(cfg, lay, expert_parallel=True)
    assert dep.unit("router").argv == cmd.argv and dep.api_url == "http://127.0.0.1:8040"
    text = dep.display()
    assert "node 0 (gpu01) - head" in text and "node 1 (gpu02)" in text
    assert text.count("router:") == 1  # on the head only


def _dp_layout(**env):
    cfg = load(REPLICAS="4", REPLICA_MODE="data-parallel", HOST="0.0.0.0", **env)
    return cfg, cluster.layout(cfg, ("gpu01", "gpu02"), gpus_on_node=16, environ={})


@pytest.mark.unit
def test_data_parallel_head_and_headless_commands():
    cfg, lay = _dp_layout()
    assert lay.mode == "data-parallel" and lay.per_node == 2 and lay.total == 4
    dep = derive(cfg, lay, expert_parallel=True)
    head, rest = dep.unit("dp-node-0").argv, dep.unit("dp-node-1", 1).argv
    assert head[1:4] == ("-m", "vllm.entrypoints.cli.main", "serve")
    for argv in (head, rest):
        assert flag(argv, "--data-parallel-size") == "4"
        assert flag(argv, "--data-parallel-size-local") == "2"
        assert flag(argv, "--data-parallel-address") == "gpu01"
        assert flag(argv, "--data-parallel-rpc-port") == "13345"
        assert "--enable-expert-parallel" in argv
    assert "--headless" not in head and "--data-parallel-start-rank" not in head
    assert "--headless" in rest and flag(rest, "--data-parallel-start-rank") == "2"


def _vllm_parse(child: warm_vllm.WarmVllm, argv: list[str]) -> dict:
    """ARGV (after `vllm serve`) through the pinned vLLM's own serve parser and its checks."""
    probe = (
        "import json, sys\n"
        "from vllm.entrypoints.cli.serve import ServeSubcommand\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "parser = FlexibleArgumentParser()\n"
        "sub = parser.add_subparsers(dest='subparser')\n"
        "ServeSubcommand().subparser_init(sub)\n"
        "ns = parser.parse_args(['serve', *sys.argv[1:]])\n"
        "ServeSubcommand().validate(ns)\n"
        "keys = ['headless','data_parallel_size','data_parallel_size_local','data_parallel_address',"
        "'data_parallel_rpc_port','data_parallel_start_rank','tensor_parallel_size','enable_expert_parallel',"
        "'port','host','model_tag']\n"
        "print(json.dumps({k: getattr(ns, k) for k in keys}))\n"
    )
    out = child.run(probe, *argv)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_pinned_vllm_serve_parser_accepts_every_nodes_data_parallel_command():
    child = warm_vllm.ready()
    cfg, lay = _dp_layout(TENSOR_PARALLEL_SIZE="8")
    dep = derive(cfg, lay, expert_parallel=True)
    head, rest = dep.unit("dp-node-0").argv, dep.unit("dp-node-1", 1).argv
    h, r = _vllm_parse(child, list(head[4:])), _vllm_parse(child, list(rest[4:]))
    assert h["headless"] is False and r["headless"] is True
    assert h["data_parallel_size"] == r["data_parallel_size"] == 4
    assert h["data_parallel_size_local"] == r["data_parallel_size_local"] == 2
    assert h["data_parallel_address"] == r["data_parallel_address"] == "gpu01"
    assert h["data_parallel_rpc_port"] == r["data_parallel_rpc_port"] == 13345
    assert h["data_parallel_start_rank"] is None and r["data_parallel_start_rank"] == 2
    assert h["tensor_parallel_size"] == 8 and h["enable_expert_parallel"] is True
    assert h["port"] == 8010 and h["model_tag"] == str(cfg.model_path)
    assert head[4] == str(cfg.model_path) and "--model" not in head  # positional, not the deprecated flag


@pytest.mark.integration
def test_pinned_vllm_router_parser_accepts_the_router_command():
    code = "import importlib.util,sys; sys.exit(importlib.util.find_spec('vllm_router') is None)"
    if subprocess.run([sys.executable, "-c", code], check=False).returncode != 0:
        vllm_missing("vllm-router is not installed (pip install -e '.[router]')")
    cfg = load(REPLICAS="per-node", HOST="0.0.0.0", ROUTER_POLICY="power_of_two")
    argv = list(router_command.build(cfg, ["http://gpu01:8010", "http://gpu02:8010"]).argv)[3:]
    probe = (
        "import json, sys\n"
        "from vllm_router.launch_router import parse_router_args\n"
        "a = parse_router_args(sys.argv[1:])\n"
        "print(json.dumps({'urls': a.worker_urls, 'policy': a.policy, 'port': a.port, 'host': a.host,"
        " 'prom': a.prometheus_port, 'hc': a.health_check_interval_secs}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "urls": ["http://gpu01:8010", "http://gpu02:8010"],
        "policy": "power_of_two",
        "port": 8040,
        "host": "0.0.0.0",
        "prom": 8041,
        "hc": router_command.HEALTH_CHECK_INTERVAL_S,
    }


@pytest.mark.unit
def test_job_nodes_from_slurm_variables():
    assert cluster.job_nodes({}) == (("",), 0)
    env = {"SLURM_JOB_NODELIST": "gpu01,gpu02", "SLURM_NODEID": "1"}
    assert cluster.job_nodes(env) == (("gpu01", "gpu02"), 1)
    with pytest.raises(ConfigError, match="'gpu 1' is not a host name"):
        cluster.parse_nodes("gpu 1,gpu2")


@pytest.mark.unit
def test_nodes_sharing_loopback_addresses_may_keep_host_on_loopback():
    """Two SLURM node entries on one machine (the test cluster): NodeAddr 127.0.0.1 for both."""
    cfg = load(REPLICAS="per-node")
    lay = cluster.layout(cfg, ("node0", "node1"), addresses=("127.0.0.1", "127.0.0.1"), environ={})
    urls = [cluster.worker_url(cfg, r, lay) for r in lay.replicas]
    assert urls == ["http://127.0.0.1:8010", "http://127.0.0.1:8011"]
    # HOST on loopback, nodes elsewhere: each replica listens on its node's address, the router on HOST.
    lay = cluster.layout(cfg, ("node0", "node1"), addresses=("10.0.0.1", "10.0.0.2"), environ={})
    dep = derive(cfg, lay)
    assert [flag(dep.unit(f"replica-{i}", i).argv, "--host") for i in (0, 1)] == ["10.0.0.1", "10.0.0.2"]
    assert flag(dep.unit("router").argv, "--host") == "127.0.0.1"
    assert "http://10.0.0.2:8011" in dep.unit("router").argv


@pytest.mark.unit
def test_cpu_replicas_of_a_node_get_their_own_cores():
    """vLLM's automatic OpenMP binding would put every CPU replica on the same core."""
    cfg = config.load(REPO / "config.demo.env", environ={"REPLICAS": "2"})
    lay = cluster.layout(cfg, ("",), cpus=(0, 1, 2, 3), environ={})
    assert [r.cpus for r in lay.replicas] == [(0, 1), (2, 3)]
    assert cluster.replica_env(lay.replicas[1]) == {"VLLM_CPU_OMP_THREADS_BIND": "2,3"}
    # Fewer cores than replicas: they share, one core each.
    lay = cluster.layout(cfg.replace(replicas=3), ("",), cpus=(5, 7), environ={})
    assert [r.cpus for r in lay.replicas] == [(5,), (7,), (5,)]
    single = cluster.layout(cfg.replace(replicas=1), ("",), cpus=(0, 1), environ={})
    assert single.replicas[0].cpus == ()  # the plain service keeps vLLM's own binding


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    import realmodel

    return realmodel.build(tmp_path_factory.mktemp("model") / "m")


@pytest.mark.unit
def test_dry_run_shows_every_nodes_command_and_capacity_per_replica_and_in_total(
    real_model, tmp_path, capsys, monkeypatch
):
    import realmodel

    from qwen3_vl_service.lifecycle import launcher

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = realmodel.write_config_env(
        tmp_path / "config.env", real_model, REPLICAS=4, TENSOR_PARALLEL_SIZE=4, HOST="0.0.0.0"
    )
    rc = launcher.main(["--config", str(cfg), "--dry-run", "--gpus", "8xH100-80GB", "--nodes", "g1,g2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (
        "4 replicas behind vllm-router (round_robin) on port 8040 of g1: 2 node(s) x 2 replica(s) x TP 4"
        in out
    )
    assert "replica-3 on g2: GPUs 4,5,6,7, port 8013" in out
    assert "per replica: 243,824 KV tokens, 7 full-length sequences" in out
    # MAX_NUM_SEQS=auto: the plan's number per replica (vLLM's GPU default, issue 22), 4 x in all.
    seqs = int(out.split("per replica: ")[1].split("MAX_NUM_SEQS=auto: ")[1].split(";")[0])
    total = f"in total (4): 975,296 KV tokens, 28 full-length sequences, up to {4 * seqs} requests decoded"
    assert total in out
    assert "node 0 (g1) - head" in out and "node 1 (g2)" in out
    assert "--worker-urls http://g1:8010 http://g1:8011 http://g2:8012 http://g2:8013" in out
    assert "uses 4 of the 8 GPUs" not in out

    cfg = realmodel.write_config_env(
        tmp_path / "dp.env", real_model, REPLICAS=2, REPLICA_MODE="data-parallel", HOST="0.0.0.0"
    )
    rc = launcher.main(["--config", str(cfg), "--dry-run", "--gpus", "8xH100-80GB", "--nodes", "g1,g2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "data parallel: 2 ranks over 2 node(s) (1 per node x TP 8, 16 GPUs); head g1" in out
    node1 = out.split("node 1 (g2)")[1]
    assert "--headless" in node1 and "--data-parallel-start-rank 1" in node1
    assert "--headless" not in out.split("node 1 (g2)")[0]


@pytest.mark.unit
def test_a_data_parallel_rank_runs_without_the_supervisor(monkeypatch, tmp_path, real_model):
    """The ranks share fate: no supervisor restarts one alone; this node's unit runs as recorded."""
    import argparse

    import realmodel

    from qwen3_vl_service.lifecycle import launcher

    seen = {}
    monkeypatch.setattr(
        launcher, "_start", lambda cfg, dep, text, launch, args: seen.update(dep=dep, launch=launch) or 0
    )
    cfg_path = realmodel.write_config_env(
        tmp_path / "dp.env", real_model, REPLICAS=2, REPLICA_MODE="data-parallel", HOST="0.0.0.0"
    )
    cfg = config.load(cfg_path, environ={})
    assert cfg.restart == "on-failure"
    lay = cluster.layout(cfg, ("g1", "g2"), gpus_on_node=8, environ={})
    report = launcher.preflight.run(cfg, gpu_spec="8xH100-80GB")
    dep = deployment.derive(cfg, report.plan, lay, expert_parallel=True)
    args = argparse.Namespace(dry_run=False, quiet=True, detach=False)
    monkeypatch.setattr(launcher.preflight.Report, "ok", property(lambda self: True))
    assert launcher._grouped(cfg, dep, lay, 1, report, args) == 0
    unit = seen["launch"].unit
    assert not unit.supervised and unit == dep.unit("dp-node-1", 1)
    assert "--headless" in unit.argv and flag(unit.argv, "--data-parallel-start-rank") == "1"


@pytest.mark.unit
def test_a_replicas_supervisor_runs_the_recorded_unit_on_its_gpus_and_port(tmp_path):
    from qwen3_vl_service.lifecycle.supervised import supervisor_command

    cfg = load(REPLICAS="2", TENSOR_PARALLEL_SIZE="4", RESTART="on-failure")
    lay = cluster.layout(cfg, ("",), gpus_on_node=8, environ={"CUDA_VISIBLE_DEVICES": "7,6,5,4,3,2,1,0"})
    dep = derive(cfg, lay)
    unit = dep.unit("replica-1")
    assert unit.supervised
    argv, env = supervisor_command(cfg, dep.record_file, unit, tag="t-123", detached=True)
    assert argv[1:3] == ["-m", "qwen3_vl_service.lifecycle.supervised"]
    assert flag(argv, "--deployment") == str(dep.record_file) and flag(argv, "--unit") == "replica-1"
    # Found by stop_service.py through the replica's tag and run folder.
    assert env[TAG_ENV] == "t-123"
    assert env[RUN_DIR_ENV] == str(scope.paths(cfg).run_dir / "replica-1")
    # The record keeps the unit whole, its GPUs included, and nothing secret.
    again = deployment.Deployment.from_json(dep.to_json())
    assert again == dep and again.unit("replica-1").env["CUDA_VISIBLE_DEVICES"] == "3,2,1,0"


@pytest.mark.unit
def test_replica_status_shows_its_supervisors_restarts_and_last_cause():
    sup = {
        "running": True,
        "state": "running",
        "pid": 42,
        "started_at": "2026-12-01T22:00:00Z",
        "restarts": 1,
        "last_cause": "replica-1 vLLM: VLLM::EngineCore (pid 7) is gone: killed or crashed",
        "last_restart_at": "2026-12-01T22:05:00Z",
    }
    group = {"replicas": [{"name": "replica-1", "running": False, "supervisor": sup}]}
    text = "\n".join(status.render_group(group))
    assert "replica-1    not running" in text
    assert "pid 42, running; 1 restart(s)" in text
    assert "replica-1 vLLM: VLLM::EngineCore (pid 7) is gone" in text
