"""deployment.derive(): every unit from one pure step, the plan's decisions in each vLLM unit,
folders below the service's own, ports checked once (issue 21)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import realmodel
import warm_vllm
from lifecycle_helpers import clean_env

from qwen3_vl_service.core.errors import ConfigError
from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.deployment import cluster, deployment
from qwen3_vl_service.deployment.deployment import Deployment
from qwen3_vl_service.lifecycle import launcher, registry, runstate, stop
from qwen3_vl_service.machine.processes import TITLE_ENV
from qwen3_vl_service.planning import preflight
from qwen3_vl_service.settings import config, scope

REPO = Path(__file__).resolve().parents[1]
YARN = {"ROPE_SCALING": "yarn", "ROPE_FACTOR": "2", "MAX_MODEL_LEN": "300000", "KV_CACHE_DTYPE": "fp8"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return realmodel.build(tmp_path_factory.mktemp("model") / "m")


def _derive(model: Path, tmp: Path, nodes=("",), gpus="8xH200-141GB", **settings) -> Deployment:
    return _derive_planned(model, tmp, nodes, gpus, **settings)[0]


def _derive_planned(model: Path, tmp: Path, nodes=("",), gpus="8xH200-141GB", **settings):
    """(the Deployment, the preflight's report that planned it)."""
    path = realmodel.write_config_env(tmp / "config.env", model, **settings)
    cfg = config.load(path, environ={})
    report = preflight.run(cfg, gpu_spec=gpus)
    assert report.plan is not None
    lay = cluster.layout(cfg, nodes, gpus_on_node=report.inventory.count, environ={})
    return deployment.derive(cfg, report.plan, lay, expert_parallel=report.expert_parallel), report


def _flag(argv, name: str) -> str:
    return argv[list(argv).index(name) + 1]


def _vllm_units(dep: Deployment):
    units = dep.of_kind(deployment.VLLM)
    assert units
    return units


@pytest.mark.unit
@pytest.mark.parametrize(
    ("nodes", "settings"),
    [
        (("",), {"REPLICAS": 2, "TENSOR_PARALLEL_SIZE": 4}),  # two replicas on one node
        (("g1", "g2"), {"REPLICAS": "per-node", "HOST": "0.0.0.0"}),  # --nodes: one replica a node
        (("g1", "g2"), {"REPLICAS": 2, "REPLICA_MODE": "data-parallel", "HOST": "0.0.0.0"}),
    ],
    ids=["replicas", "nodes", "data-parallel"],
)
def test_every_vllm_unit_carries_the_plans_decisions(model, tmp_path, nodes, settings) -> None:
    """On main, replicas.node_command, supervisor_command and the data-parallel path built vLLM's
    command without the plan: no --hf-overrides, no VLLM_ALLOW_LONG_MAX_MODEL_LEN, no --max-num-seqs."""
    single = _derive(model, tmp_path, **YARN, MAX_NUM_SEQS=48)
    (ref,) = single.of_kind(deployment.VLLM)
    assert "--hf-overrides" in ref.argv and ref.env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] == "1"
    assert _flag(ref.argv, "--max-num-seqs") == "48" and "--enable-expert-parallel" in ref.argv
    dep, report = _derive_planned(model, tmp_path, nodes, **YARN, MAX_NUM_SEQS=48, **settings)
    for unit in _vllm_units(dep):
        assert _flag(unit.argv, "--hf-overrides") == _flag(ref.argv, "--hf-overrides"), unit.name
        assert unit.env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] == "1", unit.name
        assert _flag(unit.argv, "--kv-cache-dtype") == "fp8"
        assert _flag(unit.argv, "--max-num-seqs") == "48", unit.name
        # The plan's expert-parallel decision for this layout, in every unit.
        assert ("--enable-expert-parallel" in unit.argv) == report.expert_parallel, unit.name
    # MAX_NUM_SEQS=auto: no flag anywhere, vLLM's own default in every unit.
    auto = _derive(model, tmp_path, nodes=nodes, **YARN, **settings)
    assert not any("--max-num-seqs" in u.argv for u in _vllm_units(auto))


@pytest.mark.unit
def test_units_live_below_the_services_own_folders(model, tmp_path) -> None:
    dep = _derive(model, tmp_path, REPLICAS=2, TENSOR_PARALLEL_SIZE=4, SERVICE_NAME="fp8")
    own = dep.run_dir
    assert own.name == "fp8" and dep.service == "fp8"
    for unit in dep.units:
        if unit.kind == deployment.MEDIA:
            continue
        assert unit.run_dir.parent == own, unit.name  # RUN_DIR/fp8/replica-0, RUN_DIR/fp8/router
        assert dep.log_dir in unit.log_file.parents
    assert dep.unit("router").log_file == dep.log_dir / "router.log"
    assert dep.api_url.endswith(f":{dep.unit('router').ports[0].port}")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # The router's metrics port (ROUTER_PORT+1) landed on replica 0's port unchecked on main.
        ({"PORT": 8010, "ROUTER_PORT": 8009}, r"ROUTER_PORT\+1=8010 \(the router's metrics\) is also PORT"),
        (
            {"ROUTER_PORT": 8079, "MEDIA_PORT": 8080},
            r"MEDIA_PORT=8080 \(the media server\) is also ROUTER_PORT\+1",
        ),
        ({"ROUTER_PORT": 8011}, r"ROUTER_PORT=8011 \(the router\) is also PORT\+1"),
    ],
)
def test_every_port_of_a_deployment_is_checked_against_the_others(model, tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message) as err:
        _derive(model, tmp_path, REPLICAS=2, TENSOR_PARALLEL_SIZE=4, MEDIA_SERVER="true", **settings)
    assert "move " in err.value.fix


@pytest.mark.unit
def test_the_data_parallel_rpc_port_is_checked_against_the_others(model, tmp_path):
    with pytest.raises(
        ConfigError, match=r"MEDIA_PORT=8080 \(the media server\) is also DATA_PARALLEL_RPC_PORT"
    ) as err:
        _derive(
            model, tmp_path, nodes=("g1", "g2"), REPLICAS=2, REPLICA_MODE="data-parallel", HOST="0.0.0.0",
            MEDIA_SERVER="true", MEDIA_PORT=8080, DATA_PARALLEL_RPC_PORT=8080,
        )  # fmt: skip
    assert "move " in err.value.fix


@pytest.mark.unit
def test_the_single_service_and_the_media_server_on_one_port_are_refused(model, tmp_path):
    with pytest.raises(
        ConfigError, match=r"MEDIA_PORT=8010 \(the media server\) is also PORT \(vLLM's API\)"
    ):
        _derive(model, tmp_path, PORT=8010, MEDIA_PORT=8010, MEDIA_SERVER="true")


@pytest.mark.unit
def test_ipv6_hosts_get_brackets_in_every_url(model, tmp_path):
    dep = _derive(model, tmp_path, HOST="::1", REPLICAS=2, TENSOR_PARALLEL_SIZE=4)
    assert dep.unit("replica-1").health_url == "http://[::1]:8011/health"
    assert dep.api_url == "http://[::1]:8040"
    assert "http://[::1]:8010" in dep.unit("router").argv
    wildcard = _derive(model, tmp_path, HOST="::")
    assert wildcard.unit("vllm").health_url == "http://[::1]:8010/health"


@pytest.mark.unit
def test_the_record_round_trips_without_secrets(model, tmp_path):
    dep = _derive(model, tmp_path, API_KEY="sk-deployment-secret", REPLICAS=2, TENSOR_PARALLEL_SIZE=4)
    assert dep.unit("replica-0").env["VLLM_API_KEY"] == "sk-deployment-secret"
    text = dep.to_json()
    assert "sk-deployment-secret" not in text
    again = Deployment.from_json(text)
    assert [u.argv for u in again.units] == [u.argv for u in dep.units]
    assert "VLLM_API_KEY" not in again.unit("replica-0").env


# -- stop and status act on this config's recorded units only ---------------------------------------


def _fake_replica(dep: Deployment, name: str) -> subprocess.Popen:
    """A process standing in for a replica's vLLM: tagged with the unit's run folder, recorded."""
    unit = dep.unit(name)
    tag = runstate.new_tag()
    env = {**clean_env(), **TITLE_ENV, TAG_ENV: tag, RUN_DIR_ENV: str(unit.run_dir)}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
    unit.run_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.load(None, environ={"PORT": str(unit.ports[0].port)})
    state = runstate.for_service(cfg, pid=proc.pid, tag=tag, log_file=unit.log_file, detached=True)
    runstate.write(unit.run_dir, state)
    return proc


@pytest.mark.integration
def test_one_configs_stop_never_reaches_anothers_replicas(model, tmp_path):
    """On main, stop_service.py stopped every replica-* and router folder under RUN_DIR, whoever's."""
    a = realmodel.write_config_env(
        tmp_path / "a.env",
        model,
        SERVICE_NAME="a",
        REPLICAS=2,
        DEVICE="cpu",
        TENSOR_PARALLEL_SIZE=1,
        PORT=18010,
        ROUTER_PORT=18040,
        MEDIA_SERVER="false",
    )
    b = realmodel.write_config_env(
        tmp_path / "b.env",
        model,
        SERVICE_NAME="b",
        REPLICAS=2,
        DEVICE="cpu",
        TENSOR_PARALLEL_SIZE=1,
        PORT=18110,
        ROUTER_PORT=18140,
        MEDIA_SERVER="false",
    )
    deps = {}
    for name, path in (("a", a), ("b", b)):
        cfg = config.load(path, environ={})
        lay = cluster.layout(cfg, ("",), cpus=(0, 1), environ={})
        deps[name] = deployment.derive(cfg, None, lay, expert_parallel=False)
        launcher.record(deps[name])
    procs = {name: _fake_replica(deps[name], "replica-1") for name in deps}
    try:
        assert stop.main(["--config", str(b), "--timeout", "5"]) == 0
        assert procs["b"].wait(10) is not None
        assert procs["a"].poll() is None, "b's stop ended a's replica"
        assert runstate.read(deps["a"].unit("replica-1").run_dir) is not None
        assert registry.recorded_deployment(deps["a"].run_dir) is not None
        assert stop.main(["--config", str(a), "--timeout", "5"]) == 0
        assert procs["a"].wait(10) is not None
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.integration
def test_a_media_server_is_shared_by_port_whatever_host_each_service_names(model, tmp_path):
    """MEDIA_HOST 0.0.0.0 in one config and 127.0.0.1 in another is one server on MEDIA_PORT: a
    stop --all of one must see the other as its user (on main the (host, port) pair differed)."""
    common = {"MEDIA_SERVER": "true", "MEDIA_PORT": 18080, "DEVICE": "cpu", "TENSOR_PARALLEL_SIZE": 1}
    a = config.load(
        realmodel.write_config_env(
            tmp_path / "a.env", model, SERVICE_NAME="a", MEDIA_HOST="0.0.0.0", **common
        ),
        environ={},
    )
    b = config.load(
        realmodel.write_config_env(
            tmp_path / "b.env", model, SERVICE_NAME="b", PORT=18110, MEDIA_HOST="127.0.0.1", **common
        ),
        environ={},
    )
    run_dir = scope.paths(b).run_dir
    env = {**clean_env(), **TITLE_ENV, TAG_ENV: "q3vl-b", RUN_DIR_ENV: str(run_dir)}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
    try:
        run_dir.mkdir(parents=True)
        state = runstate.for_service(
            b, pid=proc.pid, tag="q3vl-b", log_file=tmp_path / "b.log", detached=True, media_server=True
        )
        runstate.write(run_dir, state)
        assert [u.name for u in registry.media_users(a)] == ["b"]
    finally:
        proc.kill()
        proc.wait()


# -- the dry run's commands are what runs -------------------------------------------------------------


@pytest.mark.integration
def test_dry_run_prints_the_deployment_that_derive_gives(model, tmp_path):
    path = realmodel.write_config_env(tmp_path / "c.env", model, REPLICAS=2, TENSOR_PARALLEL_SIZE=4, **YARN)
    env = {k: v for k, v in clean_env().items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "start_service.py"),
            "--config",
            str(path),
            "--dry-run",
            "--gpus",
            "8xH200-141GB",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    blocks = out.stdout.split("Commands per node\n")[1]
    for name in ("replica-0", "replica-1"):
        block = blocks.split(f"  {name}:\n")[1].split("\n  replica-")[0].split("\n  router:")[0]
        assert "--hf-overrides" in block and "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" in block, block


PARSE_ALL = """
import json, sys
from vllm.entrypoints.cli.serve import ServeSubcommand
try:  # vLLM 0.32 moved the server's parser; 0.26 has it under openai/
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

out = []
for argv in json.loads(sys.stdin.read()):
    if argv[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"]:
        parser = FlexibleArgumentParser()
        ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
        ns = parser.parse_args(["serve", *argv[4:]])
        ServeSubcommand().validate(ns)
    else:
        ns = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[3:])
        validate_parsed_serve_args(ns)
    out.append({k: getattr(ns, k, None) for k in ("max_num_seqs", "hf_overrides", "kv_cache_dtype",
                                                   "data_parallel_size", "headless", "port",
                                                   "enable_expert_parallel")})
print(json.dumps(out, default=str))
"""


@pytest.mark.integration
def test_every_vllm_units_argv_passes_vllms_own_parser_with_the_plans_flags(model, tmp_path):
    """The data-parallel ranks and the --nodes replicas, as the pinned vLLM parses them."""
    units = [
        *_derive(
            model,
            tmp_path,
            nodes=("g1", "g2"),
            REPLICAS=2,
            REPLICA_MODE="data-parallel",
            HOST="0.0.0.0",
            MAX_NUM_SEQS=48,
            **YARN,
        ).of_kind(deployment.VLLM),
        *_derive(
            model, tmp_path, nodes=("g1", "g2"), REPLICAS="per-node", HOST="0.0.0.0", MAX_NUM_SEQS=48, **YARN
        ).of_kind(deployment.VLLM),
    ]
    got = warm_vllm.ready().run(PARSE_ALL, input=json.dumps([list(u.argv) for u in units]), env=clean_env())
    assert got.returncode == 0, got.stderr[-3000:]
    parsed = json.loads(got.stdout.strip().splitlines()[-1])
    assert len(parsed) == 4
    for unit, ns in zip(units, parsed, strict=True):
        assert ns["hf_overrides"], unit.name  # YaRN reached every unit
        assert ns["kv_cache_dtype"] == "fp8"
        assert ns["max_num_seqs"] == 48 and ns["enable_expert_parallel"] is True, unit.name
    assert [ns["data_parallel_size"] for ns in parsed[:2]] == [2, 2]
    assert [bool(ns["headless"]) for ns in parsed[:2]] == [False, True]
