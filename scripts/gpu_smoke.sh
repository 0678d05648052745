#!/usr/bin/env bash
# The smoke test for a new GPU node, before downloading 236 GB: generates a checkpoint
# with the published block-FP8 layout at the real widths (cut to a few layers), serves
# it through start_service.py --detach with the production flags, sends every request
# kind, prints vLLM's FP8 kernel and KV cache lines, the status view, stops and checks
# that no process of ours holds a GPU. Exit 0 only if everything worked.
#
#   bash scripts/gpu_smoke.sh [OUT_DIR] [LAYERS] [more options of devtools.gpu_smoke]
#   bash scripts/gpu_smoke.sh /scratch/$USER/smoke 4 --tp 8 --bench
#
# PYTHON (default .venv/bin/python, else python3) must have the CUDA build of vLLM.
# --device cpu runs the same steps on vLLM's CPU build with the tiny bfloat16 model.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-smoke}
LAYERS=${2:-4}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
exec "$PY" -m devtools.gpu_smoke --out "$OUT" --layers "$LAYERS" --python "$(command -v "$PY" || echo "$PY")" "$@"
