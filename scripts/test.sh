#!/usr/bin/env bash
# Set everything up from nothing (idempotent) and run the whole test suite,
# the end-to-end tests against the real vLLM CPU server included.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m unit         # one group: unit | integration | e2e
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup_env.sh
PY=.venv/bin/python

echo "== lint"
"$PY" -m ruff check --force-exclude qwen3_vl_service tests bench scripts *.py
"$PY" -m ruff format --check --force-exclude qwen3_vl_service tests bench scripts *.py

echo "== tests"
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    # pytest's 5 means "no tests collected": a suite that tested nothing has not passed.
    echo "error: pytest collected no tests; check the -m/-k selection or the tests/ folder" >&2
    exit 1
fi
exit "$rc"
