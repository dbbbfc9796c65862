#!/usr/bin/env bash
# One GPU-machine session in one call: build the CUDA extension in place for the device, then the
# named steps. Logs and results go to $OUT (the device tool's folder) or ./gpu_out.
#
#   tools/gpu_session.sh test sanitize bench example
#
# Expects wheels the device lacks (nvidia-cutlass) under .whl/ (carried), and python3 with
# jax[cuda], pybind11 and flax. BENCH_ARGS passes flags to benchmarks/bench_attention.py.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

start=$(date +%s)
FLASH_JAX_BUILD_CUDA=1 FLASH_JAX_CUDA_ARCHS="${ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}" \
  python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1
build_status=$?
echo "build: status $build_status, $(( $(date +%s) - start )) s"
grep -iE "error|spill stores|warning" "$OUT/build.log" | grep -v " 0 bytes spill" | sort | uniq -c | head -30
[[ $build_status -eq 0 ]] || { tail -40 "$OUT/build.log"; exit 1; }

status=0
for step in "$@"; do
  case "$step" in
    test)
      timeout 420 python3 -m pytest tests -m gpu -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
      [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1 ;;
    sanitize)
      compute-sanitizer --tool memcheck --error-exitcode 3 python3 tools/sanitize_shapes.py \
        >"$OUT/sanitize.log" 2>&1 || status=1
      tail -8 "$OUT/sanitize.log" ;;
    bench|seed)
      [[ $step == seed ]] && BENCH_ARGS="--suites seed ${SEED_ARGS:-}"
      python3 benchmarks/bench_attention.py ${BENCH_ARGS:-} --output "$OUT/$step.json" --no-progress 2>&1 |
        tee "$OUT/$step.log" | tail -60 ;;
    example)
      for attention in flash xla; do
        python3 examples/train_gpt.py --attention "$attention" ${EXAMPLE_ARGS:-} 2>&1 |
          tee "$OUT/example_$attention.log" | tail -5
      done ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
