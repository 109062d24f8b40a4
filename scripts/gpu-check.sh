#!/usr/bin/env bash
# GPU check of onepool's CUDA paths, on a GPU host whose system Python already has a CUDA build of torch.
#
#   scripts/gpu-check.sh [OUT.json]          default OUT: ./gpu-check.json; exit 0 only if everything passed
#
# Never installs or upgrades torch. Steps, each bounded by `timeout`, all within ONEPOOL_GPU_CHECK_BUDGET_S:
#   probe            torch/CUDA versions and devices with the system Python; stops here without a CUDA device
#   venv             a venv with --system-site-packages (it sees the system torch)
#   install          the other dependencies + the tests' extras from local wheels (pip --no-index --find-links)
#   install-project  the project itself, editable, --no-deps
#   probe-venv       the same probe inside the venv (the venv must use the system torch)
#   pytest           pytest -m cuda: every test marked cuda must pass; a skipped one fails the check
#   cuda-paths       pool arena on the device, pinned host table, H2D timed with CUDA events, prefetch stream
#   bench-cli        onepool bench worker --quick on the CPU (the emulated link: a baseline on this host)
#   bench-cuda       onepool bench worker --quick --device $ONEPOOL_GPU_DEVICE, recording where engines ran
# Then scripts/gpu_check.py report writes ONE JSON file (docs/gpu-check.md lists its keys).
#
# Environment: PYTHON (the system Python with torch, default python3; must be CPython 3.11),
# ONEPOOL_WHEELS (wheel folder, default scripts/gpu-wheels/, made by scripts/gpu-wheels.sh),
# ONEPOOL_GPU_DEVICE (default cuda:0), ONEPOOL_GPU_VENV (default scripts/gpu-venv/),
# ONEPOOL_GPU_WORK (logs of each run go to a timestamped folder under it, default scripts/gpu-check-out/),
# ONEPOOL_GPU_CHECK_BUDGET_S (default 570), ONEPOOL_GPU_CHECK_DRY_RUN=1 (go on without CUDA to exercise the
# plumbing on a machine without a GPU; the result is still a failure).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_JSON=$(realpath -m -- "${1:-gpu-check.json}")
WHEELS=$(realpath -m -- "${ONEPOOL_WHEELS:-$REPO/scripts/gpu-wheels}")
VENV=$(realpath -m -- "${ONEPOOL_GPU_VENV:-$REPO/scripts/gpu-venv}")
WORK_BASE=$(realpath -m -- "${ONEPOOL_GPU_WORK:-$REPO/scripts/gpu-check-out}")
PY=${PYTHON:-python3}
DEVICE=${ONEPOOL_GPU_DEVICE:-cuda:0}
BUDGET_S=${ONEPOOL_GPU_CHECK_BUDGET_S:-570}
DRY_RUN=${ONEPOOL_GPU_CHECK_DRY_RUN:-0}
HELPER=$REPO/scripts/gpu_check.py
VPY=$VENV/bin/python
DEADLINE=$((SECONDS + BUDGET_S))

mkdir -p "$WORK_BASE"
WORK=$(mktemp -d "$WORK_BASE/$(date +%Y%m%d-%H%M%S)-XXXX")
STEPS=$WORK/steps.tsv
: >"$STEPS"
cd "$REPO"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1

fail() {  # a failure found by this script itself; the report lists it first
    echo "FAIL: $*" >&2
    echo "$*" >>"$WORK/shell-failures.txt"
}

finish() {  # on every exit: assemble the JSON from what the steps left; its verdict is the exit code
    local rc=$?
    trap - EXIT
    local report_args=(report --work "$WORK" --out "$OUT_JSON" --tests "$REPO/tests")
    [[ $DRY_RUN == 1 ]] && report_args+=(--dry-run)
    echo "== report"
    if ! command -v "$PY" >/dev/null || ! timeout 60 "$PY" "$HELPER" "${report_args[@]}"; then
        rc=1
    fi
    echo "logs: $WORK"
    exit "$rc"
}
trap finish EXIT

# run_step NAME CAP_S CMD...: run CMD for at most min(CAP_S, time left), output to the terminal and
# $WORK/NAME.log; record "NAME rc seconds limit" in steps.tsv; return CMD's exit code.
run_step() {
    local name=$1 cap=$2 rc
    shift 2
    local left=$((DEADLINE - SECONDS))
    local limit=$((cap < left ? cap : left))
    echo "== $name (limit ${limit} s)"
    if ((limit < 5)); then
        fail "no time left for step $name (ONEPOOL_GPU_CHECK_BUDGET_S=${BUDGET_S})"
        return 124
    fi
    local t0=$SECONDS
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    printf '%s\t%d\t%d\t%d\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$STEPS"
    return "$rc"
}

echo "onepool GPU check: repo $REPO, wheels $WHEELS, device $DEVICE, budget ${BUDGET_S} s, report $OUT_JSON"

# --- preflight: Python, wheels -------------------------------------------------------------------------
if ! command -v "$PY" >/dev/null; then
    echo "FAIL: $PY not found (set PYTHON to the Python that has the CUDA build of torch)" >&2
    trap - EXIT
    exit 1
fi
pyver=$("$PY" -c 'import sys; print("%s-%d.%d" % (sys.implementation.name, *sys.version_info[:2]))')
if [[ $pyver != cpython-3.11 ]]; then
    fail "$PY is $pyver; the wheels and this check are for CPython 3.11 (set PYTHON)"
    exit 1
fi
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    fail "no wheels in $WHEELS: run scripts/gpu-wheels.sh on a machine with PyPI access and copy the folder here"
    exit 1
fi
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi --query-gpu=index,name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max \
        --format=csv >"$WORK/nvidia-smi.txt" 2>&1 || true
    cat "$WORK/nvidia-smi.txt"
else
    echo "nvidia-smi not found" | tee "$WORK/nvidia-smi.txt"
fi

# --- torch and the device, with the system Python ------------------------------------------------------
if ! run_step probe 90 "$PY" "$HELPER" probe --out "$WORK/probe.json"; then
    if [[ $DRY_RUN != 1 ]]; then
        exit 1  # the probe printed why (no torch, a CPU build, or no visible device)
    fi
    echo "DRY RUN: going on without CUDA; the check will fail at the end"
fi

# --- venv on top of the system torch, dependencies from the wheel folder --------------------------------
run_step venv 90 "$PY" -m venv --clear --system-site-packages "$VENV" || exit 1
"$PY" "$HELPER" requirements --pyproject "$REPO/pyproject.toml" >"$WORK/requirements.txt"
run_step install 240 "$VPY" -m pip install --no-index --find-links "$WHEELS" -r "$WORK/requirements.txt" || exit 1
run_step install-project 120 "$VPY" -m pip install --no-index --find-links "$WHEELS" --no-deps -e "$REPO" || exit 1
run_step probe-venv 60 "$VPY" "$HELPER" probe --out "$WORK/probe-venv.json" || [[ $DRY_RUN == 1 ]] || exit 1

# --- the checks: each runs even if an earlier one failed; the report decides ---------------------------
# Only the plugins the project uses: --system-site-packages would also autoload whatever pytest plugins the
# host's Python has (xdist, cov, benchmark ...).
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 run_step pytest 240 "$VPY" -m pytest -m cuda -rA -p no:cacheprovider \
    -p asyncio -p timeout -p hypothesispytest --timeout 120 --junitxml "$WORK/pytest.xml" tests || true
run_step cuda-paths 120 "$VPY" "$HELPER" cuda-paths --device "$DEVICE" --out "$WORK/cuda-paths.json" || true
run_step bench-cli 150 "$VENV/bin/onepool" bench worker --quick --json "$WORK/bench-cli.json" || true
bench_device=$DEVICE
if [[ $DRY_RUN == 1 ]] && ! "$VPY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    bench_device=cpu  # only to exercise the plumbing; the report flags the engines as off the device
fi
run_step bench-cuda 200 "$VPY" "$HELPER" bench --device "$bench_device" --json "$WORK/bench-cuda.json" || true
