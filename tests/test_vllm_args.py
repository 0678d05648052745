"""vllm_args.build(): the exact command line and environment, checked against vLLM's own parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import warm_vllm

from qwen3_vl_service.core.names import TAG_ENV
from qwen3_vl_service.lifecycle import runstate
from qwen3_vl_service.planning import vllm_args
from qwen3_vl_service.settings import config

REPO = Path(__file__).resolve().parents[1]


def cfg_from(tmp_path: Path, text: str = ""):
    path = tmp_path / "config.env"
    path.write_text(text)
    return config.load(path, environ={})


def flag(argv, name):
    i = argv.index(name)
    return argv[i + 1]


@pytest.mark.unit
def test_default_command_has_every_flag_the_issue_names(tmp_path):
    cfg = config.load(REPO / "config.env", environ={})
    cmd = vllm_args.build(cfg, expert_parallel=True, tag="t1")
    argv = list(cmd.argv)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == str(cfg.model_path)
    assert flag(argv, "--served-model-name") == "qwen3-vl-fp8"
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--port") == "8010"
    assert flag(argv, "--tensor-parallel-size") == "8"
    assert flag(argv, "--max-model-len") == "32768"
    assert flag(argv, "--gpu-memory-utilization") == "0.9"
    assert "--max-num-seqs" not in argv, "MAX_NUM_SEQS=auto without a plan: vLLM's own default"
    assert flag(argv, "--dtype") == "auto"
    assert json.loads(flag(argv, "--limit-mm-per-prompt")) == {"image": 4, "video": 1}
    assert flag(argv, "--allowed-local-media-path") == str(cfg.media_root)
    assert flag(argv, "--mm-encoder-tp-mode") == "data"
    assert "--async-scheduling" in argv and "--enable-expert-parallel" in argv
    assert flag(argv, "--reasoning-parser") == "deepseek_r1"
    gen = json.loads(flag(argv, "--override-generation-config"))
    assert gen == {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "max_new_tokens": 8192}
    assert flag(argv, "--shutdown-timeout") == "30"
    assert cmd.env[TAG_ENV] == "t1"
    assert cmd.env["VLLM_ENGINE_READY_TIMEOUT_S"] == "1800"


@pytest.mark.unit
def test_extra_args_come_last_and_expert_parallel_follows_the_plan(tmp_path):
    cfg = cfg_from(tmp_path, "EXTRA_VLLM_ARGS=--enable-prefix-caching --mm-processor-cache-gb 0\n")
    argv = list(vllm_args.build(cfg, expert_parallel=False).argv)
    assert argv[-3:] == ["--enable-prefix-caching", "--mm-processor-cache-gb", "0"]
    assert "--enable-expert-parallel" not in argv


@pytest.mark.unit
def test_api_key_only_in_environment_and_masked_in_display(tmp_path):
    cfg = cfg_from(tmp_path, "API_KEY=sk-topsecret-0123456789\n")
    cmd = vllm_args.build(cfg, expert_parallel=False)
    assert not any("topsecret" in a for a in cmd.argv)
    assert cmd.env["VLLM_API_KEY"] == "sk-topsecret-0123456789"
    assert "topsecret" not in cmd.display()


@pytest.mark.unit
def test_media_domains_restrict_fetches_to_our_media_server(tmp_path):
    argv = list(vllm_args.build(cfg_from(tmp_path), expert_parallel=False).argv)
    i = argv.index("--allowed-media-domains")
    assert argv[i + 1 : i + 3] == ["127.0.0.1", "localhost"]
    argv = list(vllm_args.build(cfg_from(tmp_path, "ALLOWED_MEDIA_DOMAINS=*\n"), expert_parallel=False).argv)
    assert "--allowed-media-domains" not in argv
    argv = list(
        vllm_args.build(
            cfg_from(tmp_path, "ALLOWED_MEDIA_DOMAINS=images.example.org\n"), expert_parallel=False
        ).argv
    )
    i = argv.index("--allowed-media-domains")
    assert argv[i + 1 : i + 4] == ["127.0.0.1", "localhost", "images.example.org"]


@pytest.mark.unit
def test_no_proxy_is_merged_with_the_users(tmp_path):
    cmd = vllm_args.build(cfg_from(tmp_path), expert_parallel=False)
    env = vllm_args.with_inherited(cmd.env, {"NO_PROXY": "corp.example", "PATH": "/bin"})
    assert env["NO_PROXY"].split(",") == ["corp.example", "127.0.0.1", "localhost"]
    assert env["PATH"] == "/bin"


@pytest.mark.unit
def test_cpu_device_leaves_out_gpu_only_flags(tmp_path):
    cfg = cfg_from(tmp_path, "DEVICE=cpu\nTENSOR_PARALLEL_SIZE=1\nVLLM_CPU_KVCACHE_SPACE=1\n")
    cmd = vllm_args.build(cfg, expert_parallel=False)
    assert "--gpu-memory-utilization" not in cmd.argv and "--mm-encoder-tp-mode" not in cmd.argv
    assert cmd.env["VLLM_CPU_KVCACHE_SPACE"] == "1"


@pytest.mark.integration
def test_pinned_vllm_parser_accepts_the_command(tmp_path):
    """Every flag we emit exists in the pinned vLLM and parses to the intended value."""
    child = warm_vllm.ready()
    cfg = config.load(REPO / "config.env", environ={})
    argv = list(vllm_args.build(cfg, expert_parallel=True).argv)[3:]
    probe = (
        "import json, sys\n"
        "try:\n"
        "    from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
        "except ImportError:  # vLLM before the launchers package\n"
        "    from vllm.entrypoints.openai.cli_args import make_arg_parser\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "ns = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])\n"
        "keys = ['model','served_model_name','tensor_parallel_size','enable_expert_parallel',"
        "'limit_mm_per_prompt',"
        "'allowed_media_domains','mm_encoder_tp_mode','async_scheduling','reasoning_parser',"
        "'override_generation_config','shutdown_timeout','max_num_seqs','gpu_memory_utilization']\n"
        "print(json.dumps({k: getattr(ns, k) for k in keys}, default=str))\n"
    )
    out = child.run(probe, *argv)
    assert out.returncode == 0, out.stderr[-2000:]
    ns = json.loads(out.stdout.strip().splitlines()[-1])
    assert ns["served_model_name"] == ["qwen3-vl-fp8"]
    assert ns["tensor_parallel_size"] == 8 and ns["enable_expert_parallel"] is True
    assert ns["limit_mm_per_prompt"] == {"image": 4, "video": 1}
    assert ns["allowed_media_domains"] == ["127.0.0.1", "localhost"]
    assert ns["mm_encoder_tp_mode"] == "data" and ns["async_scheduling"] is True
    assert ns["reasoning_parser"] == "deepseek_r1"
    assert ns["override_generation_config"]["max_new_tokens"] == 8192
    assert ns["shutdown_timeout"] == 30


@pytest.mark.unit
def test_vllms_temp_files_go_to_the_private_folder_and_torchs_compile_cache_stays(tmp_path):
    # IPC sockets and gloo's file store (vllm_dist_*): the folder stop_service.py removes.
    env = runstate.temp_env("/tmp/qwen3vl-x", {})
    assert env["VLLM_RPC_BASE_PATH"] == env["TMPDIR"] == "/tmp/qwen3vl-x"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == runstate.compile_cache_dir({})
    users = runstate.temp_env("/tmp/qwen3vl-x", {"TORCHINDUCTOR_CACHE_DIR": "/c"})
    assert "TORCHINDUCTOR_CACHE_DIR" not in users  # with_inherited passes the user's own on
    # torch's compile caches (precompiled headers) stay where torch keeps them without our TMPDIR.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # torch: seconds to import

    assert runstate.compile_cache_dir({}) == default_cache_dir()
    # A folder the user chose is theirs: not overridden.
    assert runstate.compile_cache_dir({"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}) == ""
