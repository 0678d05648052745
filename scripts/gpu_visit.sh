#!/usr/bin/env bash
# Issue 12's whole H200 visit in one command: a real-shape block-FP8 checkpoint cut to LAYERS
# text layers, scripts/gpu_smoke.sh on it (every request kind, FP8 kernel and KV lines, status,
# stop, no GPU process left) with bench/bench_gpu.py run against the live service before the
# stop, the capacity plan of the dry run, and the logs copied into $OUT (at most 8 files).
#
# For the integrator, with the gpu-kit built (../shared/gpu-kit/README.md, step 1):
#   1. run(command="bash .gpu-kit/transfer1/stage1.sh", carry=[".gpu-kit/transfer1"])
#   2. within 30 s of the first call's return:
#      run(command='v=$(bash .gpu-kit/transfer2/stage2.sh) && eval "$v" && bash scripts/gpu_visit.sh',
#          carry=[".gpu-kit/transfer2"], timeout_s=600)
#   While the machine stays warm, a rerun needs no transfer (env.sh's line, as stage2.sh prints it):
#      run(command='test -d /tmp/site/vllm || exit 3; export PYTHONPATH=/tmp/site VLLM_USE_DEEP_GEMM=0
#          NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1;
#          bash scripts/gpu_visit.sh', timeout_s=600)
#   LAYERS=N (default 8) and WORK (default /tmp/qwen3-vl-visit) may be set in front of the script;
#   BENCH=0 leaves out bench_gpu.py, CRASH=0 the kill -9 of the EngineCore and the restart;
#   YARN=3 serves 786,432 positions (YaRN factor 3) and sends a prompt past the native 262,144.
#   VISIT=side-by-side runs bench/bench_side_by_side.py instead (issue 22): bare vLLM with the recipe's
#   flags and a service per profile, all resident on the GPU (3 layers on an H100 80GB, 8 on an H200),
#   runs alternating A B A B; SBS_ARGS passes its options (e.g. "--kinds text --rounds 2
#   --time-limit 480"), SBS_TIMEOUT (default 540 s) ends it in time to stop every server and copy the
#   logs; side_by_side.json, the bare server's log and each service's log come back.
#   The files come back from $OUT: gpu_visit.txt (everything printed), service.log, media_server.log,
#   launcher.log, config.env, model_config.json.
#
# LAYERS=8 (default): about 22 GB of checkpoint (8 x 2.4 GB of FP8 experts + 2.5 GB of BF16
# embeddings and lm_head), generated on the GPU in well under a minute; load, compile and CUDA
# graphs about 2-3 minutes; requests, the benchmark (concurrency 1, 8, 32 and the image TTFT),
# the crash (the restart loads again, with the compile cache warm: about 2 minutes) and the stop
# about 4 more: inside the 10-minute limit of one call.
# Exit code: gpu_smoke's (0 only if every step worked).
set -uo pipefail
cd "$(dirname "$0")/.."
LAYERS_SET=${LAYERS:-}
LAYERS=${LAYERS:-8}
WORK=${WORK:-/tmp/qwen3-vl-visit}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
export PYTHON=${PYTHON:-python3}
# env.sh sets VLLM_USE_FLASHINFER_SAMPLER=0; unset it so that the launcher's own probe finds
# flashinfer missing and sets it (the preflight line says so): that is what users get.
unset VLLM_USE_FLASHINFER_SAMPLER
REPORT="$OUT/gpu_visit.txt"
{
  echo "== $(date -u +%FT%TZ) $(hostname) LAYERS=$LAYERS"
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv
  "$PYTHON" -c 'import importlib.metadata as m, torch; print("vllm", m.version("vllm"), "torch", torch.__version__)'
} > "$REPORT" 2>&1
cat "$REPORT"

if [[ ${VISIT:-smoke} == side-by-side ]]; then
  # Issue 22: bench/bench_side_by_side.py, the service's profiles against bare vLLM with the recipe's
  # flags, all resident on the one GPU at once (each GPU_MEMORY_UTIL SBS_UTIL and the same KV cache).
  # Four servers fit an H200 at 8 layers (about 30 GiB each); an H100 80GB takes 3 layers.
  total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  if [[ -z ${LAYERS_SET:-} ]]; then LAYERS=$(( total_mib >= 120000 ? 8 : 3 )); fi
  SBS_UTIL=${SBS_UTIL:-0.25}
  echo "== side by side: $LAYERS layers, GPU memory ${total_mib} MiB, GPU_MEMORY_UTIL $SBS_UTIL each" | tee -a "$REPORT"
  t0=$(date +%s)
  if [[ ! -f $WORK/model/config.json ]]; then  # a second call on the warm machine reuses it
    "$PYTHON" -m devtools.tiny_model "$WORK/model" --fp8 --real-shapes --layers "$LAYERS" 2>&1 | tail -1 | tee -a "$REPORT"
  fi
  echo "== checkpoint ready in $(( $(date +%s) - t0 )) s: $(du -sh "$WORK/model" | cut -f1)" | tee -a "$REPORT"
  # shellcheck disable=SC2086  # SBS_ARGS is a list of options
  timeout -s TERM "${SBS_TIMEOUT:-540}" "$PYTHON" bench/bench_side_by_side.py --model "$WORK/model" \
    --python "$(command -v "$PYTHON")" --work "$WORK/sbs" --gpu-memory-util "$SBS_UTIL" \
    --json "$OUT/side_by_side.json" ${SBS_ARGS:-} 2>&1 | tee -a "$REPORT"
  rc=${PIPESTATUS[0]}
  for f in "$WORK"/sbs/bare-*.log "$WORK"/sbs/logs/bench-*/service.log; do
    [[ -f $f ]] && tail -c 400000 "$f" > "$OUT/$(basename "$(dirname "$f")")-$(basename "$f")"
  done
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee -a "$REPORT"
  echo "== exit $rc" | tee -a "$REPORT"
  exit "$rc"
fi

SMOKE_ARGS=()
[[ ${BENCH:-1} == 1 ]] && SMOKE_ARGS+=(--bench --bench-args "--concurrency 1,8,32")
[[ ${CRASH:-1} == 1 ]] && SMOKE_ARGS+=(--crash)
[[ -n ${YARN:-} ]] && SMOKE_ARGS+=(--yarn "$YARN")
TEMP_ROOT=$("$PYTHON" -c 'import tempfile; print(tempfile.gettempdir())')
touch "$WORK/.smoke-start"
bash scripts/gpu_smoke.sh "$WORK" "$LAYERS" "${SMOKE_ARGS[@]}" 2>&1 | tee -a "$REPORT"
rc=${PIPESTATUS[0]}

{
  # What vLLM would leave in the temp folder (its IPC sockets, gloo's vllm_dist_* file store) goes to
  # each start's private folder, removed at the stop: nothing of the smoke's starts is left there.
  left=$(find "$TEMP_ROOT" -maxdepth 1 -newer "$WORK/.smoke-start" \( -name 'vllm_dist_*' -o -type s -o -name 'qwen3-vl-service-*' \) | wc -l)
  echo "== vLLM's files left in $TEMP_ROOT by the smoke's starts (IPC sockets, vllm_dist_*, private folders): $left"
  echo "== the capacity plan (start_service.py --dry-run) for the KV comparison"
  "$PYTHON" start_service.py --config "$WORK/config.env" --dry-run --quiet 2>&1 | sed -n '/Preflight/,/vLLM command/p'
  echo "== checkpoint: $(du -sh "$WORK/model" | cut -f1), $(ls "$WORK"/model/*.safetensors | wc -l) shards"
  echo "== exit $rc"
} 2>&1 | tee -a "$REPORT"

# The service logs under its own folder (scope.py: LOG_DIR/<service>/), the media server under media-<port>-<node>/.
cp "$WORK"/logs/port-*/service.log "$OUT/service.log" 2>/dev/null
cp "$WORK"/logs/media-*/media_server.log "$OUT/media_server.log" 2>/dev/null
cp "$WORK"/logs/port-*/launcher.log "$OUT/launcher.log" 2>/dev/null
cp "$WORK/config.env" "$OUT/config.env" 2>/dev/null
cp "$WORK/model/config.json" "$OUT/model_config.json" 2>/dev/null
exit "$rc"
