#!/usr/bin/env bash
# Download the wheels that scripts/gpu-check.sh installs on a GPU host, on any machine with PyPI access (no
# GPU needed): every dependency of the project and of the extras the tests need EXCEPT torch (the GPU host
# brings its own CUDA build), plus the build backend, for Linux x86_64 / CPython 3.11, binary wheels only.
#
#   scripts/gpu-wheels.sh [DIR]      DIR: $ONEPOOL_WHEELS, else scripts/gpu-wheels/
#
# PYTHON: a Python >= 3.11 with pip (default python3; it only reads pyproject.toml and downloads).
# ONEPOOL_WHEEL_PLATFORMS: the wheel platform tags accepted, space-separated (default: manylinux2014 and
# manylinux_2_28 x86_64, i.e. a host with glibc >= 2.28). pip does not expand manylinux_2_X tags downwards, so
# every tag a wanted wheel may carry is named.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-${ONEPOOL_WHEELS:-$REPO/scripts/gpu-wheels}}
PY=${PYTHON:-python3}
read -r -a PLATFORMS <<<"${ONEPOOL_WHEEL_PLATFORMS:-manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64}"

mkdir -p "$DEST"
REQS="$DEST/requirements.txt"
"$PY" "$REPO/scripts/gpu_check.py" requirements --pyproject "$REPO/pyproject.toml" --build-system >"$REQS"
{
    echo "# onepool $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# platforms: ${PLATFORMS[*]}; CPython 3.11; torch left out"
} >>"$REQS"

platform_args=()
for p in "${PLATFORMS[@]}"; do
    platform_args+=(--platform "$p")
done

start=$SECONDS
# Pure-Python dependencies that PyPI has as source only (nkeys, of nats-py[nkeys]): built here into
# py3-none-any wheels, which fit any host, and found by the download below through --find-links.
SDIST_ONLY=(nkeys)
echo "building wheels of ${SDIST_ONLY[*]} (source only on PyPI) into $DEST"
"$PY" -m pip wheel --disable-pip-version-check --no-input --no-deps --wheel-dir "$DEST" "${SDIST_ONLY[@]}"
for name in "${SDIST_ONLY[@]}"; do
    if ! compgen -G "$DEST/${name}-*-py3-none-any.whl" >/dev/null; then
        echo "FAIL: no py3-none-any wheel of $name in $DEST (is it still pure Python?)" >&2
        exit 1
    fi
done

echo "downloading into $DEST:"
grep -v '^#' "$REQS" | sed 's/^/  /'
"$PY" -m pip download --disable-pip-version-check --no-input \
    --only-binary=:all: "${platform_args[@]}" --python-version 3.11 --implementation cp \
    --find-links "$DEST" --dest "$DEST" -r "$REQS"

if compgen -G "$DEST/torch-*.whl" >/dev/null; then
    echo "FAIL: a torch wheel landed in $DEST (a dependency asked for it); remove it and find out why" >&2
    exit 1
fi
count=$(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l)
echo "done in $((SECONDS - start)) s: $count wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
