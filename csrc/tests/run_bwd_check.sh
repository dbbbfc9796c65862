#!/usr/bin/env bash
# Builds csrc/tests/bwd_check from the backward instantiations and runs it. On a GPU machine:
#   csrc/tests/run_bwd_check.sh            build, correctness cases, timing grid
# Environment: ARCH (default 90), JOBS (default 16), CUTLASS_INCLUDE (default: from the
# installed nvidia-cutlass wheel), BUILD (default build/bwd_check), STEPS (default "check time";
# also time64, time128, memcheck), SOURCES (the .cu files to compile; objects of the others
# already in BUILD are reused, e.g. to rebuild one bucket of a tile variant).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ARCH="${ARCH:-90}"
JOBS="${JOBS:-16}"
BUILD="${BUILD:-build/bwd_check}"
STEPS="${STEPS:-check time}"
if [[ -z "${CUTLASS_INCLUDE:-}" ]]; then
  CUTLASS_INCLUDE="$(python3 -c 'import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))')/source/include"
fi
export FLAGS="-std=c++17 -O3 --expt-relaxed-constexpr --use_fast_math -lineinfo -Xptxas=--warn-on-spills -gencode arch=compute_${ARCH},code=sm_${ARCH} -I csrc -I ${CUTLASS_INCLUDE}"
export BUILD
mkdir -p "$BUILD"
start=$(date +%s)
SOURCES="${SOURCES:-csrc/instantiations/bwd_*.cu csrc/tests/bwd_check.cu}"
ls $SOURCES | xargs -P "$JOBS" -I{} sh -c \
  'nvcc $FLAGS -Xptxas=-v -c {} -o "$BUILD/$(basename {} .cu).o" > "$BUILD/$(basename {} .cu).log" 2>&1 || { echo "BUILD FAILED: {}"; tail -20 "$BUILD/$(basename {} .cu).log"; }'
nvcc -gencode "arch=compute_${ARCH},code=sm_${ARCH}" "$BUILD"/*.o -o "$BUILD/bwd_check" || exit 1
echo "build: $(( $(date +%s) - start )) s"
echo "kernels with spills: $(grep -h "spill" "$BUILD"/*.log | grep -vc " 0 bytes spill stores")"
status=0
for step in $STEPS; do
  case "$step" in
    check) "$BUILD/bwd_check" || status=1 ;;
    time) "$BUILD/bwd_check" --time || status=1 ;;
    time64) "$BUILD/bwd_check" --time 64 || status=1 ;;
    time128) "$BUILD/bwd_check" --time 128 || status=1 ;;
    memcheck) compute-sanitizer --tool memcheck --error-exitcode 3 "$BUILD/bwd_check" --small || status=1 ;;
  esac
done
exit $status
