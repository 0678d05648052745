#!/usr/bin/env bash
# Set everything up from nothing (idempotent) and run the whole test suite,
# the end-to-end tests against the real vLLM CPU server included.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m unit         # one group: unit | integration | e2e
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup_env.sh
PY=.venv/bin/python

# tests/test_slurm_e2e.py runs slurm/serve.sbatch on a private one-node cluster
# of Debian's slurm-wlm and munge (no daemon of the system is started or used).
if ! command -v sbatch >/dev/null || [ ! -x /usr/sbin/slurmd ] || [ ! -x /usr/sbin/munged ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing slurm-wlm and munge (Debian) for the SLURM test (log: .venv/apt-slurm.log)"
        export DEBIAN_FRONTEND=noninteractive
        pkgs=(slurm-wlm munge)
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" >.venv/apt-slurm.log 2>&1 ||
            { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } \
                >>.venv/apt-slurm.log 2>&1 ||
            echo "warning: could not install ${pkgs[*]} (see .venv/apt-slurm.log); the SLURM test will say so" >&2
    else
        echo "note: SLURM is not installed and apt-get as root is not at hand: tests/test_slurm_e2e.py skips"
    fi
fi

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
