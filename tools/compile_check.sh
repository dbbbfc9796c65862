#!/usr/bin/env bash
# Compiles every CUDA and C++ source of flash_jax for one architecture, without setup.py and
# without linking: the CI check that kernels, FFI handlers and bindings build, warnings shown.
#
#   tools/compile_check.sh            sm_80, 2 parallel jobs
#   ARCH=90 JOBS=4 tools/compile_check.sh
#   tools/compile_check.sh csrc/instantiations/fwd_bf16_hdim64.cu   (only the files named)
#
# Needs nvcc (CUDA_HOME or PATH), a C++17 compiler, and a Python (PYTHON, default python3) with
# jax, pybind11 and nvidia-cutlass installed. Flags follow setup.py's NVCC_FLAGS / CXX_FLAGS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCH="${ARCH:-80}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
CXX="${CXX:-c++}"
if [[ -n "${CUDA_HOME:-}" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; else NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"; fi
[[ -x "$NVCC" ]] || { echo "compile_check: nvcc not found (set CUDA_HOME)" >&2; exit 1; }
# nvcc may be a wrapper script outside the toolkit; its dry run names the toolkit's root.
CUDA_TOP="$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
CUDA_INCLUDE="$(cd "$CUDA_TOP" && pwd)/include"

read -r JAX_INCLUDE PYBIND11_INCLUDE PYTHON_INCLUDE CUTLASS_INCLUDE < <("$PYTHON" - <<'PY'
import importlib.util, pathlib, sysconfig
import jax.ffi, pybind11
spec = importlib.util.find_spec("cutlass_library")
if spec is None:
  raise SystemExit("compile_check: pip install nvidia-cutlass==4.2.0.0")
cutlass = pathlib.Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
print(jax.ffi.include_dir(), pybind11.get_include(), sysconfig.get_paths()["include"], cutlass)
PY
)

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
export ROOT OUT NVCC CXX ARCH JAX_INCLUDE PYBIND11_INCLUDE PYTHON_INCLUDE CUTLASS_INCLUDE CUDA_INCLUDE

compile_one() {
  set -euo pipefail
  local source="$1" object
  object="$OUT/$(echo "${source#"$ROOT"/}" | tr / _).o"
  # As setup.py: the Hopper sources (wgmma) build for sm_90a whatever ARCH is, and dispatch.cu
  # is checked with its call into them.
  local arch_flags=("-gencode=arch=compute_${ARCH},code=sm_${ARCH}")
  case "$source" in
    *_sm90_*.cu) arch_flags=("-gencode=arch=compute_90a,code=sm_90a") ;;
    */dispatch.cu) arch_flags+=("-DFLASH_JAX_SM90_KERNELS") ;;
  esac
  case "$source" in
    *.cu)
      "$NVCC" -std=c++17 -O3 -DNDEBUG --use_fast_math --expt-relaxed-constexpr -lineinfo \
        -Xptxas=--warn-on-spills -Xcompiler -fPIC -Xcompiler -fvisibility=hidden \
        "${arch_flags[@]}" -I"$ROOT/csrc" -isystem="$CUTLASS_INCLUDE" \
        -c "$source" -o "$object" ;;
    *.cc)
      "$CXX" -std=c++17 -O2 -fPIC -fvisibility=hidden -Wall -Wextra -I"$ROOT/csrc" \
        -isystem "$JAX_INCLUDE" -isystem "$PYBIND11_INCLUDE" -isystem "$PYTHON_INCLUDE" \
        -isystem "$CUDA_INCLUDE" -c "$source" -o "$object" ;;
  esac
  echo "ok  ${source#"$ROOT"/}"
}
export -f compile_one

if [[ $# -gt 0 ]]; then
  SOURCES=()
  for source in "$@"; do SOURCES+=("$(cd "$(dirname "$source")" && pwd)/$(basename "$source")"); done
else
  SOURCES=("$ROOT"/csrc/bindings.cc "$ROOT"/csrc/ffi/*.cc "$ROOT"/csrc/flash_jax/dispatch.cu
           "$ROOT"/csrc/instantiations/*.cu)
fi
echo "compile_check: ${#SOURCES[@]} sources for sm_${ARCH} with ${JOBS} jobs ($("$NVCC" --version | tail -1))"
start=$SECONDS
if printf '%s\0' "${SOURCES[@]}" | xargs -0 -n 1 -P "$JOBS" bash -c 'compile_one "$1"' _; then
  echo "compile_check: all ${#SOURCES[@]} sources compiled in $((SECONDS - start)) s"
else
  echo "compile_check: FAILED (see the errors above)" >&2
  exit 1
fi
