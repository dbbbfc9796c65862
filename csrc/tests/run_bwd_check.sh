#!/usr/bin/env bash
# Builds csrc/tests/bwd_check from the backward instantiations and runs it. On a GPU machine:
#   csrc/tests/run_bwd_check.sh            build, correctness cases, timing grid
# Environment: ARCH (default 90), JOBS (default 16), CUTLASS_INCLUDE (default: from the
# installed nvidia-cutlass wheel), BUILD (default build/bwd_check), STEPS (default "check time").
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
ls csrc/instantiations/bwd_*.cu csrc/tests/bwd_check.cu | xargs -P "$JOBS" -I{} sh -c \
  'nvcc $FLAGS -Xptxas=-v -c {} -o "$BUILD/$(basename {} .cu).o" > "$BUILD/$(basename {} .cu).log" 2>&1 || { echo "BUILD FAILED: {}"; tail -20 "$BUILD/$(basename {} .cu).log"; }'
nvcc -gencode "arch=compute_${ARCH},code=sm_${ARCH}" "$BUILD"/*.o -o "$BUILD/bwd_check" || exit 1
echo "build: $(( $(date +%s) - start )) s"
grep -h "spill" "$BUILD"/bwd_*.log | grep -v " 0 bytes spill stores" | sort | uniq -c | head -40
status=0
for step in $STEPS; do
  case "$step" in
    check) "$BUILD/bwd_check" || status=1 ;;
    time) "$BUILD/bwd_check" --time || status=1 ;;
    memcheck) compute-sanitizer --tool memcheck --error-exitcode 3 "$BUILD/bwd_check" --small || status=1 ;;
  esac
done
exit $status
