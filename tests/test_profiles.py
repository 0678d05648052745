"""PROFILE: named sets of settings under the user's own; sizes from the capacity plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import realmodel
from lifecycle_helpers import clean_env

from qwen3_vl_service.core.errors import ConfigError
from qwen3_vl_service.machine.gpus import parse_spec
from qwen3_vl_service.planning import plan
from qwen3_vl_service.planning.model import inspect
from qwen3_vl_service.settings import config, profiles

REPO = Path(__file__).resolve().parents[1]
# On 8 x H100 80GB with the real checkpoint's facts, per profile: the full-length sequences that fit
# (information; see test_plan for the arithmetic of balanced), and MAX_NUM_SEQS=auto, vLLM's default
# for the GPU (1024), passed as no flag at all.
H100_FULL = {"balanced": 26, "throughput": 57, "long-context": 13, "low-latency": 26, "creative": 26}
H100_SEQS = dict.fromkeys(H100_FULL, 1024)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return realmodel.build(tmp_path_factory.mktemp("fp8") / "model")


def load(env: dict[str, str], path: Path = REPO / "config.env") -> config.ServiceConfig:
    return config.load(path, environ=env)


@pytest.mark.unit
@pytest.mark.parametrize("name", list(profiles.PROFILES))
def test_each_profile_fills_what_the_user_left_unset(name: str) -> None:
    cfg = load({"PROFILE": name})
    want = profiles.settings(name)
    for key, value in want.items():
        assert cfg.sources[key] == f"profile {name}", key
        assert config.parse_value(key, value) == getattr(cfg, key.lower()), key
    assert cfg.sources["PROFILE"] == "environment"
    assert cfg.max_num_seqs == 0, "every profile leaves MAX_NUM_SEQS to vLLM's default"


@pytest.mark.unit
def test_recipes_of_the_original_readme() -> None:
    assert load({"PROFILE": "throughput"}).gpu_memory_util == 0.95
    assert load({"PROFILE": "long-context"}).max_model_len == 65536
    low = load({"PROFILE": "low-latency"})
    assert (low.temperature, low.max_tokens) == (0.3, 512)
    creative = load({"PROFILE": "creative"})
    assert (creative.temperature, creative.top_p, creative.top_k) == (1.0, 0.95, 50)


@pytest.mark.unit
def test_an_explicit_setting_wins_over_the_profile(tmp_path: Path) -> None:
    path = tmp_path / "my.env"
    path.write_text("PROFILE=long-context\nMAX_MODEL_LEN=49152\n")
    cfg = config.load(path, environ={"TEMPERATURE": "0.5"})
    assert cfg.max_model_len == 49152 and cfg.sources["MAX_MODEL_LEN"] == "file my.env"
    assert cfg.temperature == 0.5 and cfg.sources["TEMPERATURE"] == "environment"
    assert cfg.top_k == 20 and cfg.sources["TOP_K"] == "profile long-context"
    # The environment picks the profile over the file's.
    cfg = config.load(path, environ={"PROFILE": "creative"})
    assert cfg.profile == "creative" and cfg.top_k == 50 and cfg.max_model_len == 49152


@pytest.mark.unit
def test_unknown_profile_is_one_line_with_the_list() -> None:
    with pytest.raises(ConfigError) as err:
        load({"PROFILE": "fast"})
    assert "PROFILE='fast' (from environment) is invalid" in err.value.message
    assert "balanced, throughput, long-context, low-latency, creative" in err.value.message
    assert err.value.exit_code == 2


@pytest.mark.unit
@pytest.mark.parametrize("name", list(profiles.PROFILES))
def test_max_num_seqs_is_vllms_default_never_below_it(name: str, model_dir: Path) -> None:
    cfg = load({"PROFILE": name, "MODEL_PATH": str(model_dir)})
    p = plan.make(cfg, parse_spec("8xH100-80GB"), inspect(model_dir))
    assert p.max_concurrency == H100_FULL[name] and p.max_num_seqs == H100_SEQS[name] >= 1024
    # A larger GPU holds more full-length sequences; vLLM's batch stays its own.
    big = plan.make(cfg, parse_spec("8xH200-141GB"), inspect(model_dir))
    assert (big.max_concurrency or 0) > (p.max_concurrency or 0) and big.max_num_seqs == p.max_num_seqs


@pytest.mark.unit
def test_explicit_max_num_seqs_is_passed_as_given(model_dir: Path) -> None:
    cfg = load({"PROFILE": "throughput", "MODEL_PATH": str(model_dir), "MAX_NUM_SEQS": "8"})
    p = plan.make(cfg, parse_spec("8xH100-80GB"), inspect(model_dir))
    assert cfg.sources["MAX_NUM_SEQS"] == "environment" and p.max_num_seqs == 8


def dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "start_service.py"), "--dry-run", *args],
        env=clean_env(PYTHONPATH=str(REPO), **env),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def setting_line(out: str, key: str) -> str:
    return next(line for line in out.splitlines() if line.split()[:1] == [key])


@pytest.mark.integration
@pytest.mark.parametrize("name", list(profiles.PROFILES))
def test_dry_run_per_profile_shows_values_and_sources(name: str, model_dir: Path) -> None:
    r = dry_run("--gpus", "8xH100-80GB", PROFILE=name, MODEL_PATH=str(model_dir))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert setting_line(r.stdout, "PROFILE").split()[1:] == [name, "environment"]
    for key, value in profiles.settings(name).items():
        line = setting_line(r.stdout, key)
        assert line.endswith(f"profile {name}"), line
        assert line.split()[1] == (value if key != "GPU_MEMORY_UTIL" else f"{float(value):g}"), (
            line
        )  # shown as parsed
    assert f"MAX_NUM_SEQS=auto: {H100_SEQS[name]}, vLLM's default on H100" in r.stdout
    # Issue 22: no --max-num-seqs below vLLM's 1024, here none at all.
    assert "--max-num-seqs" not in r.stdout


@pytest.mark.integration
def test_dry_run_shows_an_override_of_the_profile(tmp_path: Path, model_dir: Path) -> None:
    path = tmp_path / "config.env"
    path.write_text(f"MODEL_PATH={model_dir}\nPROFILE=long-context\nMAX_MODEL_LEN=98304\n")
    r = dry_run("--config", str(path), "--gpus", "8xH100-80GB", MAX_NUM_SEQS="4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert setting_line(r.stdout, "MAX_MODEL_LEN").split()[1:] == ["98304", "file", "config.env"]
    assert setting_line(r.stdout, "MAX_NUM_SEQS").split()[1:] == ["4", "environment"]
    assert setting_line(r.stdout, "TEMPERATURE").split()[1:] == ["0.7", "profile", "long-context"]
    assert "--max-model-len 98304 " in r.stdout and "--max-num-seqs 4 " in r.stdout


@pytest.mark.integration
def test_bad_profile_exits_2_with_one_line() -> None:
    r = dry_run(PROFILE="turbo")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "PROFILE='turbo'" in r.stderr and "Traceback" not in r.stderr
    assert os.environ.get("PROFILE") != "turbo"


@pytest.mark.unit
def test_low_latency_warns_that_its_cap_cuts_a_thinking_models_reasoning(model_dir: Path) -> None:
    def answers(env: dict[str, str]) -> list[str]:
        cfg = load({"MODEL_PATH": str(model_dir), **env})
        p = plan.make(cfg, parse_spec("8xH100-80GB"), inspect(model_dir))
        return [f.level + ": " + f.message for f in p.findings if f.check == "Answers"]

    (warning,) = answers({"PROFILE": "low-latency"})
    assert warning.startswith("warn: MAX_TOKENS=512 caps the reasoning as well as the answer")
    assert answers({"PROFILE": "balanced"}) == []
    assert answers({"PROFILE": "low-latency", "REASONING_PARSER": ""}) == []  # no thinking to cut


@pytest.mark.unit
def test_profiles_pass_the_vllm_knobs_they_were_measured_with(model_dir: Path) -> None:
    from qwen3_vl_service.planning import vllm_args

    def argv(name: str) -> str:
        cfg = load({"PROFILE": name, "MODEL_PATH": str(model_dir)})
        return " ".join(vllm_args.build(cfg, expert_parallel=True).argv) + " "

    # docs/benchmarks.md, "Side by side": STREAM_INTERVAL=8 everywhere, throughput's batched tokens.
    balanced, thr, low = argv("balanced"), argv("throughput"), argv("low-latency")
    assert "--stream-interval 8 " in balanced and "--max-num-batched-tokens" not in balanced
    assert "--max-num-batched-tokens 16384 " in thr and "--stream-interval 8 " in thr
    assert "--stream-interval 8 " in low and "--max-num-batched-tokens" not in low
    assert "--performance-mode" not in balanced + thr + low and "--max-num-seqs" not in thr
