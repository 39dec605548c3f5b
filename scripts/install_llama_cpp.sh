#!/usr/bin/env bash
# Builds llama.cpp's Python binding (llama-cpp-python) from its source package with this machine's compiler,
# CPU only, so the slow test tier can run exported GGUF packs in the real runtime
# (tests/integration/test_export_smollm2.py; that test is skipped when the binding is not installed). Prints how long it took.
# The build targets AVX2 rather than this CPU's every feature (GGML_NATIVE=OFF): on a machine that reports AMX,
# llama.cpp's AMX matmul kernels crashed (SIGSEGV in ggml_backend_amx_mul_mat) on the first decode, and a
# portable build runs on the machines CI uses too.
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
start=$(date +%s)
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" \
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  "$PY" -m pip install -q --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python \
      "llama-cpp-python==${VERSION}"
"$PY" -m pip install -q "llama-cpp-python==${VERSION}"  # its small pure-Python dependencies
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'built')"
echo "built in $(( $(date +%s) - start )) s"
