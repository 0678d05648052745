"""bench/bench_side_by_side.py: its servers, its A B A B order and table, and a CPU smoke run (e2e)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from lifecycle_helpers import free_port
from skips import needs

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_side_by_side", REPO / "bench" / "bench_side_by_side.py")
assert _spec and _spec.loader
sbs = importlib.util.module_from_spec(_spec)
sys.modules["bench_side_by_side"] = sbs  # dataclasses look their module up there
_spec.loader.exec_module(sbs)

TEXT_CONFIG = {"num_hidden_layers": 8, "num_key_value_heads": 4, "head_dim": 128}


def args(*extra: str):
    return sbs.parse_args(["--model", "m", *extra])


@pytest.mark.unit
def test_bare_vllm_first_then_a_service_per_profile_and_variant():
    servers = sbs.servers_from(
        args("--profiles", "balanced,throughput", "--variant", "bt:MAX_NUM_BATCHED_TOKENS=16384")
    )
    assert [(s.name, s.settings, s.port) for s in servers] == [
        ("bare vLLM", {}, 8100),
        ("balanced", {"PROFILE": "balanced"}, 8101),
        ("throughput", {"PROFILE": "throughput"}, 8102),
        ("bt", {"MAX_NUM_BATCHED_TOKENS": "16384"}, 8103),
    ]
    assert servers[0].bare and not servers[1].bare


@pytest.mark.unit
def test_a_running_service_is_measured_beside_bare_vllm_and_starts_no_profile():
    servers = sbs.servers_from(args("--service", "http://127.0.0.1:8010/"))
    assert [(s.name, s.bare, s.url, s.base) for s in servers] == [
        ("bare vLLM", True, "", "http://127.0.0.1:8100"),
        ("service", False, "http://127.0.0.1:8010", "http://127.0.0.1:8010"),
    ]
    # A profile asked for as well is started beside it.
    names = [s.name for s in sbs.servers_from(args("--service", "http://h:1", "--profiles", "balanced"))]
    assert names == ["bare vLLM", "balanced", "service"]


@pytest.mark.unit
@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_each_profiles_config_is_one_the_service_accepts(tmp_path, device):
    """What the benchmark starts per profile (start_service.py --config): a file the service's own loader
    takes, with that profile, the shared port plan and max_model_len (the GPU visit runs it)."""
    from qwen3_vl_service.settings import config

    a = args("--device", device, "--max-model-len", "8192", "--port", "9100")
    a.model = tmp_path / "model"
    a.model.mkdir()
    for s in sbs.servers_from(a)[1:]:
        cfg = config.load(sbs.service_config(a, s, tmp_path, 1 << 30), environ={})
        assert (cfg.profile, cfg.port, cfg.max_model_len, cfg.device) == (s.name, s.port, 8192, device)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--profiles", "fastest"], "unknown fastest"),
        (["--variant", "nokeys"], "give NAME:KEY=VALUE"),
        (["--variant", ":A=1"], "give NAME:KEY=VALUE"),
        (["--service", "127.0.0.1:8010"], "give its URL"),
    ],
)
def test_bad_servers_are_usage_errors(extra, message):
    with pytest.raises(sbs.UsageError) as err:
        sbs.servers_from(args(*extra))
    assert message in err.value.message


@pytest.mark.unit
def test_runs_alternate_between_the_servers_a_b_a_b_after_a_warm_wave():
    a = args("--profiles", "balanced", "--rounds", "2", "--prompts-per-slot", "2", "--min-prompts", "8")
    servers = sbs.servers_from(a)
    jobs = sbs.plan_jobs(a, servers, ["text"], [1, 32])
    ids = [tuple(j["id"]) for j in jobs]
    assert ids[:2] == [("warm", "text", "bare vLLM", 32, 0), ("warm", "text", "balanced", 32, 0)]
    assert [(i[2], i[3], i[4]) for i in ids[2:6]] == [
        ("bare vLLM", 1, 0),
        ("balanced", 1, 0),
        ("bare vLLM", 1, 1),
        ("balanced", 1, 1),
    ]
    run = jobs[2]["argv"]
    assert run[run.index("--num-prompts") + 1] == "8" and run[run.index("--max-concurrency") + 1] == "1"
    assert run[run.index("--base-url") + 1] == "http://127.0.0.1:8100" and "random" in run
    image = sbs.plan_jobs(a, servers, ["image"], [64])[-1]["argv"]
    assert (
        image[image.index("--dataset-name") + 1] == "random-mm"
        and image[image.index("--num-prompts") + 1] == "128"
    )
    assert "{(512, 512, 1): 1.0}" in image
    # The CPU build has no Triton to warm up: the rounds alone.
    cpu = sbs.plan_jobs(args("--profiles", "balanced", "--device", "cpu"), servers, ["text"], [1])
    assert [j["id"][0] for j in cpu] == ["run"] * 4  # 2 rounds x 2 servers


@pytest.mark.unit
def test_ratio_is_the_mean_of_the_per_round_ratios_against_bare():
    servers = sbs.servers_from(args("--profiles", "balanced"))

    def r(server, rnd, tps, tpot, ttft):
        return {"kind": "text", "server": server, "concurrency": 8, "round": rnd, "output_throughput": tps,
                "mean_tpot_ms": tpot, "mean_ttft_ms": ttft}  # fmt: skip

    results = [
        r("bare vLLM", 0, 100.0, 2.0, 10.0),
        r("balanced", 0, 110.0, 2.0, 10.0),
        r("bare vLLM", 1, 200.0, 4.0, 20.0),  # the machine drifted: the ratio is taken per round
        r("balanced", 1, 180.0, 4.0, 30.0),
    ]
    lines = sbs.table(results, servers, ["text"], [8])
    (row,) = [ln for ln in lines if "balanced" in ln]
    assert "110 / 180" in row and row.rstrip().endswith("1.000  1.00  1.25")  # (1.10 + 0.90) / 2


@pytest.mark.unit
def test_kv_cache_holds_every_request_of_the_largest_level():
    a = args("--input-len", "512", "--output-len", "128", "--image-size", "512")
    per_token = 8 * 4 * 128 * 2 * 2
    tokens = 256 * (512 + 128 + 256 + 64)
    assert (
        sbs.kv_cache_bytes(a, {"text_config": TEXT_CONFIG}, [1, 256])
        == int(tokens * per_token * 1.5) + 256 * 2**20
    )
    assert sbs.kv_cache_bytes(args("--kv-cache-gib", "2"), {}, [1]) == 2 * 2**30


@pytest.mark.integration
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--concurrency", "1,x"], "--concurrency '1,x': give whole numbers"),
        (["--kinds", "video"], "--kinds 'video': allowed text, image"),
        (["--rounds", "0"], "--rounds 0: at least 1"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, extra, message):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_side_by_side.py"), "--model", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") <= 2


@pytest.mark.e2e
@needs("vllm")
def test_side_by_side_on_the_cpu_build(tmp_path, demo):
    """The whole benchmark on the tiny model: bare vLLM beside the session's running demo service
    (--service), text and an image, concurrency 2, one round; a smoke run (no timed assertion). Bare
    vLLM is the one start it costs; the demo stays as it was."""
    port = free_port()
    out = tmp_path / "result.json"
    before = demo.state()["pid"]
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "bench" / "bench_side_by_side.py"), "--model", str(demo.model),
            "--device", "cpu", "--service", demo.base, "--concurrency", "2", "--kinds", "text,image",
            "--rounds", "1", "--input-len", "32", "--output-len", "8", "--image-size", "128",
            "--min-prompts", "2", "--port", str(port), "--work", str(tmp_path / "work"), "--json", str(out),
        ],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(("text ", "image"))]
    assert len(rows) == 2 * 1 * 2, proc.stdout  # kinds x levels x servers
    assert all(ln.split("|")[-1].strip() for ln in rows if "service" in ln), "every service row has a ratio"
    results = json.loads(out.read_text())["results"]
    assert {(r["kind"], r["server"]) for r in results} == {
        (k, s) for k in ("text", "image") for s in ("bare vLLM", "service")
    }
    assert all(r["completed"] >= 2 and r["output_throughput"] > 0 for r in results)
    # Bare vLLM is gone with its port; the running service is untouched.
    assert not sbs.healthy(port)
    assert demo.state()["pid"] == before and sbs.healthy(demo.base)
