"""Every setting of the service: read from config.env, overridden by the environment.

``load()`` returns one frozen ``ServiceConfig``. Each setting has one small
parser that either returns the typed value or raises ``ValueError`` with what
is allowed; ``load()`` turns that into a ``ConfigError`` naming the key, the
value, where it came from and the fix (exit code 2). The file is read with
python-dotenv, never into ``os.environ``; the process environment overrides a
setting of the same name.

Besides the settings below, a config file may set variables for vLLM's own
environment: any key starting with one of ``PASSTHROUGH_PREFIXES`` (for
example ``VLLM_CPU_KVCACHE_SPACE`` or ``NCCL_P2P_DISABLE``) is handed to the
vLLM process as it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import ipaddress
import math
import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from qwen3_vl_service.core.errors import ConfigError, ServiceError
from qwen3_vl_service.core.mediatypes import content_type_for
from qwen3_vl_service.core.secrets import is_secret, mask
from qwen3_vl_service.machine.gpus import parse_spec
from qwen3_vl_service.settings import profiles

DEFAULT_CONFIG = "config.env"
# Keys with these prefixes are passed to vLLM's environment untouched.
PASSTHROUGH_PREFIXES = (
    "VLLM_",
    "NCCL_",
    "OMP_",
    "CUDA_",
    "TORCH_",
    "PYTORCH_",
    "TORCHINDUCTOR_",
    "TRITON_",
    "HF_",
    "TRANSFORMERS_",
)

# ---------------------------------------------------------------------------
# Parsers: str -> value, or ValueError("what is allowed")


def _int(lo: int | None = None, hi: int | None = None, extra: tuple[int, ...] = ()) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        allowed = _range_text(lo, hi, extra)
        try:
            value = int(raw.strip().replace("_", ""), 10)
        except ValueError:
            raise ValueError(f"not a whole number; allowed: {allowed}") from None
        if value in extra:
            return value
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"out of range; allowed: {allowed}")
        return value

    return parse


def _range_text(lo: float | None, hi: float | None, extra: tuple = ()) -> str:
    if lo is not None and hi is not None:
        text = f"{lo}..{hi}"
    elif lo is not None:
        text = f">= {lo}"
    elif hi is not None:
        text = f"<= {hi}"
    else:
        text = "any number"
    if extra:
        text += " or " + " or ".join(str(e) for e in extra)
    return text


def _float(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        bracket = "(" if lo_open else "["
        allowed = f"a number in {bracket}{lo}, {hi}]"
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"not a number; allowed: {allowed}") from None
        if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
            raise ValueError(f"out of range; allowed: {allowed}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"allowed: {', '.join(choices)}")
        return value

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("allowed: true/false (also yes/no, on/off, 1/0)")


def _text(raw: str) -> str:
    return raw.strip()


def _nonempty(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _served_name(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:-]*", value):
        raise ValueError("allowed: letters, digits and . _ - / : (not empty, no spaces)")
    return value


def _max_num_seqs(raw: str) -> int:
    # 0 stands for auto: vLLM's own default for the device, no flag passed (plan.vllm_defaults).
    value = raw.strip().lower()
    if value == "auto":
        return 0
    return _int(1, 4096)(value)


def _max_num_batched_tokens(raw: str) -> int:
    # 0 stands for auto: vLLM's own default for the device, no flag passed (plan.vllm_defaults).
    value = raw.strip().lower()
    if value == "auto":
        return 0
    return _int(256, 1_048_576)(value)


def _stall_after(raw: str) -> int:
    # Seconds without engine progress while work waits (lifecycle/liveness.py); off: 0. At least 10:
    # one engine step of a long prefill chunk takes seconds, and shorter would restart healthy engines.
    value = raw.strip().lower()
    if value in ("off", "0"):
        return 0
    try:
        return _int(10, 86_400)(value)
    except ValueError as exc:
        raise ValueError(f"{exc}, or off") from None


def _profile(raw: str) -> str:
    return profiles.parse(raw)


def _rope_factor(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("not a number; allowed: 2 or 3") from None
    if value == 4:
        # The model card: Qwen3-VL's interleaved MRoPE position ids grow more slowly than
        # plain RoPE's, so factor 2 or 3 (not the textbook 4) reaches 1M tokens.
        raise ValueError(
            "4 is refused: the model card advises 2 or 3 for Qwen3-VL (its interleaved MRoPE "
            "positions grow more slowly than plain RoPE; 3 already gives 786,432 positions, "
            "enough for 1M tokens of text and media)"
        )
    if value not in (2, 3):
        raise ValueError("allowed: 2 or 3 (the model card's YaRN factors on 262,144 positions)")
    return value


def _service_name(raw: str) -> str:
    # "" stands for auto: scope.service_name() derives port-<PORT>.
    value = raw.strip()
    if value.lower() in ("", "auto"):
        return ""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value) or value.startswith("media-"):
        raise ValueError(
            "allowed: auto, or a folder name of letters, digits and . _ - "
            "(at most 64, not starting with media-)"
        )
    return value


def _repo_id(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value):
        raise ValueError("allowed: a Hugging Face repo id like 'Qwen/Qwen3-VL-235B-A22B-Thinking-FP8'")
    return value


def _host(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty; use 127.0.0.1 (this node only) or 0.0.0.0 (all interfaces)")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
        raise ValueError("allowed: an IP address or a host name")
    return value


def _path(raw: str) -> str:
    # Resolved against the config file's folder in load(); kept as text here.
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("contains a NUL byte")
    return value


def _reasoning_parser(raw: str) -> str:
    value = raw.strip()
    if value.lower() in ("", "none", "off"):
        return ""
    if not re.fullmatch(r"[a-z0-9_]+", value):
        raise ValueError("allowed: a vLLM reasoning parser name such as deepseek_r1 or qwen3, or 'none'")
    return value


def _media_types(raw: str) -> tuple[str, ...]:
    # The one rule for MEDIA_ALLOWED_TYPES (and media_server.py --allowed-types):
    # extensions the media server has an image/video Content-Type for.
    parts = [p.strip().lower().lstrip(".") for p in re.split(r"[,\s]+", raw) if p.strip()]
    if not parts:
        raise ValueError("must list at least one file extension, e.g. jpg,png,mp4")
    for p in parts:
        if not re.fullmatch(r"[a-z0-9]{1,16}", p):
            raise ValueError(
                f"{p!r} is not a file extension; allowed: comma-separated extensions like jpg,png,mp4"
            )
        if content_type_for(p) is None:
            raise ValueError(f"{p!r} is not an image or video type; allowed: extensions like jpg,png,mp4")
    return tuple(dict.fromkeys(parts))


# vLLM flags the launcher sets from a setting: in EXTRA_VLLM_ARGS they would win (the last one
# counts) behind the launcher's back: another port than the one it waits on, a plan for other sizes,
# a secret on the command line.
OWN_FLAGS = {
    "--model": "MODEL_PATH",
    "--served-model-name": "SERVED_MODEL_NAME",
    "--host": "HOST",
    "--port": "PORT",
    "--api-key": "API_KEY",
    "--tensor-parallel-size": "TENSOR_PARALLEL_SIZE",
    "-tp": "TENSOR_PARALLEL_SIZE",
    "--max-model-len": "MAX_MODEL_LEN",
    "--gpu-memory-utilization": "GPU_MEMORY_UTIL",
    "--max-num-seqs": "MAX_NUM_SEQS",
    "--max-num-batched-tokens": "MAX_NUM_BATCHED_TOKENS",
    "--performance-mode": "PERFORMANCE_MODE",
    "--stream-interval": "STREAM_INTERVAL",
    "--kv-cache-dtype": "KV_CACHE_DTYPE",
}


def _extra_args(raw: str) -> tuple[str, ...]:
    try:
        args = tuple(shlex.split(raw))
    except ValueError as exc:
        raise ValueError(f"cannot be split like a shell command line ({exc})") from None
    if args and not args[0].startswith("-"):
        raise ValueError("must start with a flag, e.g. '--enable-prefix-caching --mm-processor-cache-gb 0'")
    for arg in args:
        flag = arg.split("=", 1)[0].replace("_", "-")
        if flag in OWN_FLAGS:
            raise ValueError(f"{flag} is the launcher's: set {OWN_FLAGS[flag]} instead")
        if flag.startswith("--") and is_secret(flag):
            # Every user of the node reads a command line (ps); the environment is the process owner's.
            raise ValueError(
                f"{flag} would put a secret on vLLM's command line, which every user sees in ps: "
                "set it in config.env as a variable instead (HF_TOKEN for --hf-token), which vLLM "
                "gets in its environment and every display masks"
            )
    return args


def _domains(raw: str) -> tuple[str, ...]:
    parts = tuple(p.strip().lower() for p in re.split(r"[,\s]+", raw) if p.strip())
    if "*" in parts:
        if len(parts) > 1:
            raise ValueError("'*' (any host) cannot be combined with other hosts")
        return parts
    for p in parts:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:]+\]", p):
            raise ValueError(
                f"{p!r} is not a host name; allowed: comma-separated host names, or '*' for any host"
            )
    return parts


def _workers(raw: str) -> int | None:
    # None is auto: the media server runs min(CPUs it may use, media.workers.WORKERS_AUTO_MAX = 8).
    # 0 is refused like any other number out of range (by the media server's --workers too).
    value = raw.strip().lower()
    if value in ("", "auto"):
        return None
    try:
        workers = int(value.replace("_", ""), 10)
    except ValueError:
        raise ValueError("allowed: auto, or a number of processes 1..64") from None
    if not 1 <= workers <= 64:
        raise ValueError("out of range; allowed: auto, or 1..64")
    return workers


# vllm-router 0.1.17's --policy choices, less kv_aware (it needs vLLM's KV event
# publisher wired per worker with --kv-event-source, which this service does not set up).
ROUTER_POLICIES = (
    "round_robin",
    "cache_aware",
    "power_of_two",
    "random",
    "consistent_hash",
    "sticky_least_loaded",
)


def _replicas(raw: str) -> int:
    # 0 stands for per-node: one replica on every node of the SLURM job.
    value = raw.strip().lower()
    if value in ("per-node", "per_node", "pernode"):
        return 0
    try:
        count = int(value.replace("_", ""), 10)
    except ValueError:
        raise ValueError("allowed: a number of replicas 1..256, or per-node (one on every node)") from None
    if not 1 <= count <= 256:
        raise ValueError("out of range; allowed: 1..256, or per-node")
    return count


def _router_policy(raw: str) -> str:
    value = raw.strip().lower()
    if value == "kv_aware":
        raise ValueError(
            "kv_aware needs vLLM's KV cache events wired to the router per worker, which this "
            f"service does not set up; allowed: {', '.join(ROUTER_POLICIES)}"
        )
    if value not in ROUTER_POLICIES:
        raise ValueError(f"allowed: {', '.join(ROUTER_POLICIES)}")
    return value


def _gpus(raw: str) -> str:
    value = raw.strip()
    if value.lower() in ("", "auto"):
        return ""
    # The spec is parsed (and checked) by gpus.parse_spec; keep the grammar in one place.
    parse_spec(value)
    return value


# ---------------------------------------------------------------------------
# The settings


@dataclass(frozen=True)
class Setting:
    key: str
    parse: Callable[[str], Any]
    default: str


SETTINGS: tuple[Setting, ...] = (
    Setting("MODEL_PATH", _path, "models/Qwen3-VL-235B-A22B-Thinking-FP8"),
    Setting("MODEL_REPO", _repo_id, "Qwen/Qwen3-VL-235B-A22B-Thinking-FP8"),
    Setting("MODEL_REVISION", _nonempty, "main"),
    Setting("SERVED_MODEL_NAME", _served_name, "qwen3-vl-fp8"),
    Setting("SERVICE_NAME", _service_name, "auto"),
    Setting("PROFILE", _profile, "balanced"),
    Setting("DEVICE", _choice("gpu", "cpu"), "gpu"),
    Setting("HOST", _host, "127.0.0.1"),
    Setting("PORT", _int(1, 65535), "8010"),
    Setting("API_KEY", _text, ""),
    Setting("TENSOR_PARALLEL_SIZE", _int(1, 64), "8"),
    Setting("EXPERT_PARALLEL", _choice("auto", "on", "off"), "auto"),
    Setting("MAX_MODEL_LEN", _int(128, 10_000_000), "32768"),
    Setting("GPU_MEMORY_UTIL", _float(0.0, 1.0, lo_open=True), "0.90"),
    Setting("MAX_NUM_SEQS", _max_num_seqs, "auto"),
    Setting("MAX_NUM_BATCHED_TOKENS", _max_num_batched_tokens, "auto"),
    Setting("PERFORMANCE_MODE", _choice("balanced", "interactivity", "throughput"), "balanced"),
    Setting("STREAM_INTERVAL", _int(1, 1024), "1"),
    Setting("DTYPE", _choice("auto", "bfloat16", "float16", "float32"), "auto"),
    Setting("KV_CACHE_DTYPE", _choice("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"), "auto"),
    Setting("ROPE_SCALING", _choice("none", "yarn"), "none"),
    Setting("ROPE_FACTOR", _rope_factor, "2"),
    Setting("TEMPERATURE", _float(0.0, 2.0), "0.7"),
    Setting("TOP_P", _float(0.0, 1.0, lo_open=True), "0.95"),
    Setting("TOP_K", _int(1, None, extra=(-1,)), "20"),
    Setting("MAX_TOKENS", _int(1, 10_000_000), "8192"),
    Setting("REASONING_PARSER", _reasoning_parser, "deepseek_r1"),
    Setting("LIMIT_IMAGES_PER_PROMPT", _int(0, 256), "4"),
    Setting("LIMIT_VIDEOS_PER_PROMPT", _int(0, 64), "1"),
    Setting("MM_ENCODER_TP_MODE", _choice("data", "weights"), "data"),
    Setting("ASYNC_SCHEDULING", _bool, "true"),
    Setting("ENFORCE_EAGER", _bool, "false"),
    Setting("EXTRA_VLLM_ARGS", _extra_args, ""),
    Setting("VLLM_PYTHON", _text, ""),
    Setting("GPUS", _gpus, "auto"),
    Setting("REQUIRE_SLURM", _bool, "false"),
    Setting("CHECK_INTERCONNECT", _bool, "false"),
    Setting("STARTUP_TIMEOUT", _int(10, 86_400), "1800"),
    Setting("SHUTDOWN_TIMEOUT", _int(0, 3600), "30"),
    Setting("RESTART", _choice("on-failure", "no"), "on-failure"),
    Setting("MAX_RESTARTS", _int(0, 1000), "3"),
    Setting("RESTART_WINDOW", _int(1, 86_400), "900"),
    Setting("RESTART_BACKOFF", _int(0, 3600), "10"),
    Setting("HEALTH_FAIL_AFTER", _int(5, 86_400), "60"),
    Setting("STALL_AFTER", _stall_after, "180"),
    Setting("MEDIA_SERVER", _bool, "true"),
    Setting("MEDIA_HOST", _host, "127.0.0.1"),
    Setting("MEDIA_PORT", _int(1, 65535), "8080"),
    Setting("MEDIA_ROOT", _path, "media"),
    Setting("MEDIA_ALLOWED_TYPES", _media_types, "jpg,jpeg,png,webp,gif,bmp,tiff,mp4,webm,mov,mkv,avi"),
    Setting("MEDIA_WORKERS", _workers, "auto"),
    Setting("ALLOWED_MEDIA_DOMAINS", _domains, ""),
    Setting("LOG_DIR", _path, "logs"),
    Setting("LOG_MAX_MB", _int(1, 100_000), "100"),
    Setting("LOG_BACKUPS", _int(0, 100), "5"),
    Setting("RUN_DIR", _path, "run"),
    Setting("REPLICAS", _replicas, "1"),
    Setting("REPLICA_MODE", _choice("router", "data-parallel"), "router"),
    Setting("ROUTER_POLICY", _router_policy, "round_robin"),
    Setting("ROUTER_PORT", _int(1, 65535), "8040"),
    Setting("DATA_PARALLEL_RPC_PORT", _int(1, 65535), "13345"),
)
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
# Our own keys that share a pass-through prefix: never forwarded to vLLM.
_OWN_PREFIXED = {k for k in SETTINGS_BY_KEY if k.startswith(PASSTHROUGH_PREFIXES)}


@dataclass(frozen=True)
class ServiceConfig:
    model_path: Path
    model_repo: str
    model_revision: str
    served_model_name: str
    service_name: str  # "": auto (port-<PORT>, see scope.py)
    profile: str
    device: str
    host: str
    port: int
    api_key: str = field(repr=False)
    tensor_parallel_size: int
    expert_parallel: str
    max_model_len: int
    gpu_memory_util: float
    max_num_seqs: int  # 0: auto (vLLM's default for the device)
    max_num_batched_tokens: int  # 0: auto (vLLM's default for the device)
    performance_mode: str  # vLLM's --performance-mode; balanced: not passed
    stream_interval: int  # vLLM's --stream-interval (tokens per streamed chunk); 1: not passed
    dtype: str
    kv_cache_dtype: str
    rope_scaling: str
    rope_factor: float
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    reasoning_parser: str
    limit_images_per_prompt: int
    limit_videos_per_prompt: int
    mm_encoder_tp_mode: str
    async_scheduling: bool
    enforce_eager: bool
    extra_vllm_args: tuple[str, ...]
    vllm_python: str
    gpus: str
    require_slurm: bool
    check_interconnect: bool
    startup_timeout: int
    shutdown_timeout: int
    restart: str  # "on-failure" or "no"
    max_restarts: int
    restart_window: int
    restart_backoff: int
    health_fail_after: int
    stall_after: int  # 0: off (no liveness check of the engine)
    media_server: bool
    media_host: str
    media_port: int
    media_root: Path
    media_allowed_types: tuple[str, ...]
    media_workers: int | None  # None: auto
    allowed_media_domains: tuple[str, ...]
    log_dir: Path
    log_max_mb: int
    log_backups: int
    run_dir: Path
    replicas: int  # 0: per-node (one on every node of the job)
    replica_mode: str
    router_policy: str
    router_port: int
    data_parallel_rpc_port: int
    # Where the values came from.
    config_path: Path | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    # VLLM_*, NCCL_*, ... from the config file, for vLLM's environment.
    vllm_env: Mapping[str, str] = field(default_factory=dict)

    def display_value(self, key: str) -> str:
        """The value of KEY as the user wrote it, secrets masked."""
        value = getattr(self, key.lower())
        if is_secret(key):  # API_KEY, and any setting whose name says key, token, secret or password
            return mask(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return ",".join(value) if key != "EXTRA_VLLM_ARGS" else shlex.join(value)
        if key in ("GPUS", "MEDIA_WORKERS", "SERVICE_NAME") and not value:  # "" and None: auto
            return "auto"
        if key == "REPLICAS" and not value:
            return "per-node"
        if key == "STALL_AFTER" and not value:
            return "off"
        if key in ("MAX_NUM_SEQS", "MAX_NUM_BATCHED_TOKENS") and not value:
            return "auto"
        if key == "ROPE_FACTOR":
            return f"{value:g}"
        if key == "REASONING_PARSER" and not value:
            return "none"
        return str(value)

    def replace(self, **changes: Any) -> ServiceConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------
# Loading


def _read_file(path: Path) -> dict[str, str]:
    """Parse a dotenv file, refusing malformed lines (dotenv only warns about them)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found", fix="create it (copy config.env) or pass --config FILE"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"config file {path} is a directory", fix="pass the path of a file to --config"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text", fix="save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}", fix="check its permissions"
        ) from None

    seen: dict[str, int] = {}
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            line_no = binding.original.line
            first = binding.original.string.strip().splitlines()[0] if binding.original.string.strip() else ""
            raise ConfigError(
                f"{path}:{line_no}: cannot parse line {first[:60]!r}",
                fix="write settings as KEY=value (comments start with #)",
            )
        if binding.key is None:
            continue
        if binding.key in seen:  # dotenv keeps the last one without a word
            raise ConfigError(
                f"{path}: {binding.key} is set twice (lines {seen[binding.key]} and {binding.original.line})",
                fix=f"keep one {binding.key}= line",
            )
        seen[binding.key] = binding.original.line
    # interpolate=False: a '$' in a value (an API key, say) stays as written.
    values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    return {k: ("" if v is None else v) for k, v in values.items()}


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key.upper(), list(SETTINGS_BY_KEY), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return "see config.env for the list of settings"


def load(config_path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Build the validated config from FILE (default ./config.env) and ENVIRON (default os.environ).

    A missing default config.env is allowed (built-in defaults); a missing
    file named explicitly is an error.
    """
    env = os.environ if environ is None else environ
    explicit = config_path is not None
    path = Path(DEFAULT_CONFIG if config_path is None else config_path).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    if explicit or path.exists():
        file_values = _read_file(path)
        base_dir = path.parent
        used_path: Path | None = path
    else:
        file_values, base_dir, used_path = {}, Path.cwd(), None
    where_file = f"file {path.name}"

    raw: dict[str, str] = {}
    sources: dict[str, str] = {}
    vllm_env: dict[str, str] = {}
    for key, value in file_values.items():
        if key in SETTINGS_BY_KEY:
            raw[key], sources[key] = value, where_file
        elif key.startswith(PASSTHROUGH_PREFIXES):
            vllm_env[key] = value
        else:
            raise ConfigError(
                f"unknown setting {key} in {path}",
                fix=f"{_suggest(key)} (or remove the line)",
            )
    for key in SETTINGS_BY_KEY:
        if key in env:
            raw[key], sources[key] = env[key], "environment"
    # A profile fills in what neither the file nor the environment set (profiles.py).
    if "PROFILE" in raw:
        profile = parse_value("PROFILE", raw["PROFILE"], source=sources["PROFILE"])
    else:
        profile = raw["PROFILE"] = profiles.DEFAULT_PROFILE
        sources["PROFILE"] = "default"
    profiles.apply(profile, raw, sources)
    for setting in SETTINGS:
        if setting.key not in raw:
            raw[setting.key], sources[setting.key] = setting.default, "default"

    values = {s.key.lower(): parse_value(s.key, raw[s.key], source=sources[s.key]) for s in SETTINGS}

    for key in ("model_path", "media_root", "log_dir", "run_dir"):
        p = Path(os.path.expandvars(values[key])).expanduser()
        values[key] = (p if p.is_absolute() else base_dir / p).resolve()

    cfg = ServiceConfig(**values, config_path=used_path, sources=sources, vllm_env=vllm_env)
    _check_together(cfg)
    return cfg


def parse_value(key: str, text: str, *, source: str = "", name: str = "") -> Any:
    """Setting KEY's validated value from TEXT, by its one parser.

    ConfigError (exit 2) otherwise, naming NAME (default KEY; a command-line
    flag that overrides the setting passes its own), the value, SOURCE and
    what is allowed.
    """
    name = name or key
    shown = mask(text) if is_secret(key) else repr(text)
    secret_flag = any(w.startswith("--") and is_secret(w.split("=", 1)[0]) for w in text.split())
    if secret_flag or re.search(r"api[-_]key", text, re.IGNORECASE):  # a secret where it does not belong
        shown = "(not shown: it names a secret)"
    where = f" (from {source})" if source else ""
    try:
        return SETTINGS_BY_KEY[key].parse(text)
    except ValueError as exc:
        raise ConfigError(f"{name}={shown}{where} is invalid: {exc}", fix=f"fix {name}") from None
    except ServiceError as exc:  # a parser that delegates (GPUS -> gpus.parse_spec)
        raise ConfigError(
            f"{name}={shown}{where} is invalid: {exc.message}", fix=exc.fix or f"fix {name}"
        ) from None


def _check_together(cfg: ServiceConfig) -> None:
    """Checks that involve several settings; each message names all of them."""
    # Ports against each other: deployment.check_ports, once for every port a deployment opens.
    if cfg.device == "cpu" and cfg.tensor_parallel_size != 1:
        raise ConfigError(
            f"DEVICE=cpu with TENSOR_PARALLEL_SIZE={cfg.tensor_parallel_size}",
            fix="set TENSOR_PARALLEL_SIZE=1 for the CPU backend",
        )
    if cfg.vllm_python and not Path(cfg.vllm_python).is_absolute():
        raise ConfigError(
            f"VLLM_PYTHON={cfg.vllm_python!r} is not an absolute path",
            fix="give the full path of the python that has vLLM installed, or leave it empty",
        )
    _check_replicas(cfg)
    clash = sorted(k for k in cfg.vllm_env if k in ("VLLM_API_KEY",))
    if clash:
        raise ConfigError(
            "VLLM_API_KEY in the config file",
            fix="set API_KEY instead (it is passed to vLLM in its environment and masked in output)",
        )


def _check_replicas(cfg: ServiceConfig) -> None:
    """REPLICAS / REPLICA_MODE against the device (the node count: cluster.py; the ports: deployment.py)."""
    several = cfg.replicas != 1
    if several and cfg.replica_mode == "data-parallel" and cfg.device == "cpu":
        # vllm-cpu 0.32 fails at start with --data-parallel-size 2 on this MoE model:
        # all_gatherv in the CPU communicator raises NotImplementedError
        # (naive_dp_ep.prepare -> cpu_communicator.dispatch).
        raise ConfigError(
            f"REPLICA_MODE=data-parallel with DEVICE=cpu (REPLICAS={cfg.display_value('REPLICAS')})",
            fix="use REPLICA_MODE=router on the CPU build (vLLM's CPU communicator has no all_gatherv)",
        )


__all__ = ["SETTINGS", "ServiceConfig", "load", "parse_value"]
