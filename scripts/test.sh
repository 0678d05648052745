#!/usr/bin/env bash
# Set everything up from nothing (idempotent) and run the whole test suite,
# the end-to-end tests against the real vLLM CPU server included.
#   bash scripts/test.sh                 # everything (the smoke marker only under CI=true)
#   bash scripts/test.sh -m unit         # one group: unit | integration | e2e | smoke
# Without arguments: the end-to-end group in the background as two pytest processes (one
# runs the tests of the shared demo service, the other those that start their own:
# tests/conftest.py), and beside it the lint, then the unit and integration tests on the cores
# those two leave. Each pytest prints its 25 slowest steps (--durations=25).
set -euo pipefail
cd "$(dirname "$0")/.."

# Caches kept between runs and between clones, outside the checkout: mypy's
# (under a second instead of 25 s on two cores) and the installer's (uv's ~/.cache/uv,
# or pip's ~/.cache/pip: the wheels scripts/setup_env.sh installs). A clean clone still builds its own .venv
# from the lock: a missing install step fails there as it would on a new
# machine; only downloads and analyses are reused.
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/qwen3-vl-service"
export MYPY_CACHE_DIR="${MYPY_CACHE_DIR:-$CACHE/mypy}"

bash scripts/setup_env.sh
echo "== set up in ${SECONDS} s"
PY=.venv/bin/python

# tests/test_slurm_e2e.py runs slurm/serve.sbatch on a private one-node cluster
# of Debian's slurm-wlm and munge, with its own config, key and daemons. As root
# with apt-get, this installs the packages if missing, with policy-rc.d telling
# the packages' scripts not to start or restart their system services.
if ! command -v sbatch >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        mkdir -p logs
        log=logs/apt-slurm.log
        echo "== installing slurm-wlm and munge (Debian) for the SLURM test (log: $log)"
        policy=/usr/sbin/policy-rc.d
        made_policy=0
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
        fi
        pkgs=(slurm-wlm munge)
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$log" 2>&1; then
            { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >>"$log" 2>&1 ||
                echo "warning: could not install ${pkgs[*]} (see $log); the SLURM test will say so" >&2
        fi
        if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi
    else
        echo "note: SLURM is not installed and apt-get as root is not at hand: tests/test_slurm_e2e.py skips"
    fi
fi

failed=0
lint() {
    echo "== lint"
    "$PY" -m ruff check --force-exclude qwen3_vl_service devtools tests bench scripts *.py &&
        "$PY" -m ruff format --check --force-exclude qwen3_vl_service devtools tests bench scripts *.py &&
        "$PY" -m mypy # files and settings: [tool.mypy] in pyproject.toml
}
run_pytest() {
    local rc=0
    "$PY" -m pytest --durations=25 "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        # pytest's 5 means "no tests collected": a suite that tested nothing has not passed.
        echo "error: pytest collected no tests; check the -m/-k selection or the tests/ folder" >&2
        rc=1
    fi
    [ "$rc" -eq 0 ] || failed=1
}
if [ "$#" -gt 0 ]; then
    lint
    echo "== tests"
    run_pytest "$@"
else
    # The CPU run of devtools/gpu_smoke repeats what the e2e tests prove, through the
    # script itself: CI runs it once; a contributor asks for it (-m smoke).
    if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then e2e="e2e"; else e2e="e2e and not smoke"; fi
    # The end-to-end group waits on vLLM about half of its time (starts, restarts, a hang's
    # STALL_AFTER, a job's time limit): it starts first, in the background, as two pytest
    # processes (the shared demo's tests, marked demo_side, and those that start services of their
    # own: tests/conftest.py), beside the lint and the unit and integration tests, which fill
    # those waits (measured in issue 25's note). Each pytest has its own share of ports
    # (tests/lifecycle_helpers.free_port); the e2e outputs are printed once all are done.
    e2e_dir="$(mktemp -d)"
    e2e_pids=()
    # Job control on for these two: without it bash starts background commands with SIGINT ignored,
    # and the trap below could not interrupt them.
    set -m
    TEST_PORT_SHARD=1/3 "$PY" -m pytest --durations=25 -m "$e2e and demo_side" >"$e2e_dir/demo" 2>&1 &
    e2e_pids+=($!)
    TEST_PORT_SHARD=2/3 "$PY" -m pytest --durations=25 -m "$e2e and not demo_side" >"$e2e_dir/own" 2>&1 &
    e2e_pids+=($!)
    set +m
    # Whatever ends this script first ends those: SIGINT, as Ctrl+C would (their tests'
    # finalizers stop what the tests started).
    trap 'for p in "${e2e_pids[@]}"; do kill -INT "$p" 2>/dev/null; done; wait; rm -rf "$e2e_dir"' EXIT
    lint || failed=1
    echo "== unit and integration tests"
    # On the cores the two e2e processes leave (one each; one worker on two cores): the e2e group is
    # the longer path, and a third busy process beside its vLLM starts slowed it more than the unit
    # tests gained (issue 25's note).
    workers=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
    TEST_PORT_SHARD=0/3 run_pytest -m "not e2e" -n "$workers"
    for side in demo own; do
        rc=0
        wait "${e2e_pids[0]}" || rc=$?
        e2e_pids=("${e2e_pids[@]:1}")
        echo "== end-to-end tests, $side side (ran beside the others)"
        cat "$e2e_dir/$side"
        [ "$rc" -ne 5 ] || echo "error: pytest collected no end-to-end tests ($side side)" >&2
        [ "$rc" -eq 0 ] || failed=1
    done
    echo "== the whole suite, set-up included: ${SECONDS} s"
fi
exit "$failed"
