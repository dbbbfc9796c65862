#!/usr/bin/env bash
# Builds flash_jax's Bazel targets offline: the check that WORKSPACE, the BUILD files and
# bazel/*.bzl work with the Bazel Debian packages (bazel-bootstrap, Bazel 4.2.3).
#
#   tools/bazel_check.sh          FFI handlers, bindings and one kernel (fwd bf16 hdim64), sm_80
#   tools/bazel_check.sh --all    the extension //flash_jax:_flash_jax_cuda.so (every kernel file)
#   ARCH=90 JOBS=4 tools/bazel_check.sh
#
# Needs bazel (BAZEL), nvcc (CUDA_HOME or PATH) and a Python (PYTHON, default python3) with jax,
# pybind11 and nvidia-cutlass installed; bazel/local_deps.bzl takes every input from them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BAZEL="${BAZEL:-bazel}"
JOBS="${JOBS:-2}"
export FLASH_JAX_CUDA_ARCHS="${ARCH:-80}"
PYTHON_BIN_PATH="$(command -v "${PYTHON:-python3}")"
export PYTHON_BIN_PATH

case "${1:-}" in
  "") TARGETS=(//:attention_ffi //:bindings //:kernels_fwd_bf16_hdim64) ;;
  --all) TARGETS=(//flash_jax:_flash_jax_cuda.so //flash_jax:flash_jax) ;;
  *) echo "usage: $0 [--all]" >&2; exit 2 ;;
esac

FLAGS=(--jobs="$JOBS")
version="$("$BAZEL" --version)"
case "$version" in
  # Bazel 4 (Debian's build prints "bazel no_version") loads its own C++ and Java toolchains
  # through rules_cc and rules_java, which it would download; bazel/offline/ has local copies.
  # Debian's linux-sandbox also writes a debug log into every action's output, hence the
  # process-wrapper sandbox.
  "bazel no_version" | "bazel 4."*)
    FLAGS+=(--override_repository=rules_cc="$ROOT/bazel/offline/rules_cc"
            --override_repository=rules_java="$ROOT/bazel/offline/rules_java"
            --spawn_strategy=processwrapper-sandbox) ;;
esac

echo "bazel_check: ${TARGETS[*]} for sm_${FLASH_JAX_CUDA_ARCHS} with ${JOBS} jobs ($version)"
start=$SECONDS
cd "$ROOT"
"$BAZEL" build "${FLAGS[@]}" "${TARGETS[@]}"
echo "bazel_check: built in $((SECONDS - start)) s"
