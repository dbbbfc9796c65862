#!/usr/bin/env bash
# One GPU-machine session in one call: build the CUDA extension in place for the device, then the
# named steps. Logs and results go to $OUT (the device tool's folder) or ./gpu_out.
#
#   tools/gpu_session.sh test sanitize bench example
#   tools/gpu_session.sh wheel          (alone: skips the in-place build, which it does not need)
#   FLASH_JAX_PREBUILT=1 tools/gpu_session.sh test profile
#                                       (the extension was built elsewhere for this machine's
#                                       Python and carried as flash_jax/_flash_jax_cuda*.so)
#
# Expects wheels the device lacks (nvidia-cutlass) under .whl/ (carried), and python3 with
# jax[cuda], pybind11 and flax. BENCH_ARGS passes flags to benchmarks/bench_attention.py; TESTS
# names the test files of the test step (default tests), TEST_TIMEOUT its limit in seconds.
# wheel: `pip wheel` from a fresh copy of the sources (FLASH_JAX_BUILD_CUDA=1, the default
# FLASH_JAX_CUDA_ARCHS unless WHEEL_ARCHS is set, no ccache), timed; its size, the extension's
# NEEDED/RUNPATH, and a jitted forward+backward against reference_attention from the installed
# wheel in a fresh process. Needs setuptools>=70.1 or the `wheel` package (its wheel in .whl/).
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

# The steps that import flash_jax from this checkout need the extension built in place.
inplace=$(( $# == 0 ))
for step in "$@"; do [[ $step == wheel ]] || inplace=1; done
if [[ ${FLASH_JAX_PREBUILT:-0} == 1 ]]; then
  ls flash_jax/_flash_jax_cuda*.so || { echo "FLASH_JAX_PREBUILT=1 but no extension in flash_jax/"; exit 1; }
  inplace=0
fi
if (( inplace )); then
start=$(date +%s)
FLASH_JAX_BUILD_CUDA=1 FLASH_JAX_CUDA_ARCHS="${ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}" \
  python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1
build_status=$?
echo "build: status $build_status, $(( $(date +%s) - start )) s"
grep -iE "error|spill stores|warning" "$OUT/build.log" | grep -v " 0 bytes spill" | sort | uniq -c | head -30
[[ $build_status -eq 0 ]] || { tail -40 "$OUT/build.log"; exit 1; }
fi

# Builds the wheel as a user would (pip wheel of a clean tree: no build/ objects, no ccache),
# then installs it outside this checkout and runs one attention through it on the GPU.
wheel_step() {
  local src target site whl so t0 ms py_path out excludes=()
  out=$(cd "$OUT" && pwd)
  [[ $out == "$PWD"/* ]] && excludes=(--exclude="./${out#"$PWD"/}")
  src=$(mktemp -d /tmp/flash_jax_src.XXXXXX)
  target=$(mktemp -d /tmp/flash_jax_wheel.XXXXXX)
  # The build imports pybind11, jax and cutlass_library, never this checkout's flash_jax.
  py_path=$(tr ':' '\n' <<<"$PYTHONPATH" | grep -vxF "$PWD" | paste -sd: -)
  tar --exclude=./build --exclude=./.git --exclude=./.whl --exclude='./bazel-*' \
    --exclude=./gpu_out ${excludes[@]+"${excludes[@]}"} --exclude='*.so' --exclude='*.egg-info' \
    --exclude=__pycache__ -cf - . |
    tar -xf - -C "$src"
  echo "== machine: $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), $(nvcc --version | tail -1)"
  echo "== python $(python3 -V 2>&1), pip $(python3 -m pip -V | cut -d' ' -f2), setuptools" \
    "$(python3 -c 'import setuptools; print(setuptools.__version__)')"
  if ! PYTHONPATH=$py_path python3 -c 'import setuptools.command.bdist_wheel' 2>/dev/null &&
     ! PYTHONPATH=$py_path python3 -c 'import wheel' 2>/dev/null; then
    echo "wheel: FAILED: no bdist_wheel (needs setuptools>=70.1 or the wheel package in .whl/)"
    return 1
  fi
  echo "== pip wheel (FLASH_JAX_BUILD_CUDA=1, FLASH_JAX_CUDA_ARCHS=${WHEEL_ARCHS:-<default>}," \
    "MAX_JOBS=${MAX_JOBS:-<cores>}, FLASH_JAX_CCACHE=0), log lines stamped with seconds since start"
  rm -rf "$out/wheelhouse"
  t0=$(date +%s%N)
  (cd "$src" && env -u FLASH_JAX_CUDA_ARCHS FLASH_JAX_BUILD_CUDA=1 FLASH_JAX_CCACHE=0 \
    ${WHEEL_ARCHS:+FLASH_JAX_CUDA_ARCHS=$WHEEL_ARCHS} PYTHONPATH="$py_path" \
    python3 -m pip wheel -v --no-deps --no-build-isolation -w "$out/wheelhouse" . 2>&1) |
    while IFS= read -r line; do
      printf '[%5d s] %s\n' $(( ($(date +%s%N) - t0) / 1000000000 )) "$line"
    done | grep -vE '^\[ *[0-9]+ s\]   (copying|adding|creating) '
  local build_status=${PIPESTATUS[0]}
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  whl=$(ls "$out"/wheelhouse/flash_jax-*.whl 2>/dev/null | head -1)
  if [[ $build_status -ne 0 || -z $whl ]]; then
    echo "wheel: FAILED: pip wheel status $build_status after $(( ms / 1000 )) s"
    return 1
  fi
  echo "== wheelhouse"
  ls -l "$out/wheelhouse"
  echo "wheel: built in $(( ms / 1000 )).$(( ms % 1000 / 100 )) s on $(nproc) cores: $(basename "$whl")," \
    "$(stat -c %s "$whl") bytes ($(( $(stat -c %s "$whl") / 1048576 )) MiB)"

  python3 -m pip install -q --no-deps --no-index --no-compile --target "$target" "$whl" || return 1
  so=$(ls "$target"/flash_jax/_flash_jax_cuda*.so)
  echo "== $(basename "$so") inside the wheel: $(stat -c %s "$so") bytes; sections:"
  size -A "$so" | sort -k2 -n | tail -3
  echo "== readelf -d (NEEDED, RUNPATH)"
  readelf -d "$so" | grep -E 'NEEDED|RPATH|RUNPATH'
  echo "== ldd, installed alone under $target"
  ldd "$so"
  # Where JAX's CUDA plugin took its runtime from (nvidia-cuda-runtime: site-packages/nvidia/cu13).
  site=$(cd / && env -u PYTHONPATH python3 -c '
import importlib, pathlib
try:
  m = importlib.import_module("nvidia.cu13")
  print(next(p for p in m.__path__ if (pathlib.Path(p) / "lib" / "libcudart.so.13").exists()))
except (ImportError, StopIteration):
  pass')
  if [[ -n $site ]]; then
    # pip install of the wheel into the site-packages of jax[cuda13] puts nvidia/ beside
    # flash_jax/; the same layout here without writing into the system's site-packages.
    mkdir -p "$target/nvidia" && ln -s "$site" "$target/nvidia/cu13"
    echo "== ldd with $target/nvidia/cu13 -> $site (the layout of one site-packages)"
    ldd "$so" | grep -E 'cudart|not found'
  else
    echo "== no nvidia.cu13 (nvidia-cuda-runtime) importable: the runtime comes from the system dirs"
  fi

  echo "== check: fresh process, cwd $(dirname "$target"), PYTHONPATH=$target only"
  (cd "$(dirname "$target")" && env -u PYTHONHOME PYTHONPATH="$target" FLASH_JAX_WHEEL_TARGET="$target" \
    python3 - <<'PY'
import os, pathlib
import jax, jax.numpy as jnp, numpy as np
import flash_jax
from flash_jax import _cuda

target = pathlib.Path(os.environ["FLASH_JAX_WHEEL_TARGET"]).resolve()
where = pathlib.Path(flash_jax.__file__).resolve().parent
assert where.is_relative_to(target), f"flash_jax imported from {where}, not from the wheel"
assert _cuda.kernels_available(), _cuda._EXTENSION_ERROR
print("wheel: flash_jax imported from", where)
print("wheel: libcudart loaded:", sorted({l.split()[-1] for l in open("/proc/self/maps")
                                            if "libcudart" in l}))
print("wheel: device", jax.devices()[0].device_kind, jax.devices()[0].platform)
assert jax.devices()[0].platform == "gpu", "no GPU in this process"

kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
shape = (2, 512, 8, 64)  # batch, seq, heads, head_dim
q, k, v, g = (jax.random.normal(key, shape, jnp.bfloat16) for key in (kq, kk, kv, kg))

def fwd_bwd(attention, **kwargs):
  def run(q, k, v, g):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, causal=True, **kwargs), q, k, v)
    return (out, *vjp(g))
  return jax.jit(run)

hlo = fwd_bwd(flash_jax.attention).lower(q, k, v, g).as_text()
assert "flash_jax_attention_fwd_cuda" in hlo and "flash_jax_attention_bwd_cuda" in hlo, \
    "the jitted function does not call the CUDA kernels"
got = fwd_bwd(flash_jax.attention)(q, k, v, g)
want = fwd_bwd(flash_jax.reference_attention)(q, k, v, g)
low = fwd_bwd(flash_jax.reference_attention, compute_dtype=jnp.bfloat16)(q, k, v, g)
ok = True
for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, low):
  a, b, c = (np.asarray(x, np.float32) for x in (a, b, c))
  err, own = float(np.max(np.abs(a - b))), float(np.max(np.abs(c - b)))
  # Within twice the error of the reference itself run in bfloat16 (its own precision error).
  ok = ok and bool(np.isfinite(a).all()) and err <= 2 * own + 1e-3
  print(f"wheel: {name} max|flash - reference| {err:.2e} (bf16 reference {own:.2e})")
print("wheel: check", "PASSED" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
PY
  )
}

status=0
for step in "$@"; do
  case "$step" in
    test)
      timeout "${TEST_TIMEOUT:-420}" python3 -m pytest ${TESTS:-tests} -m gpu -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
      [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1 ;;
    profile)
      # Nsight Compute: stall reasons, pipe use and scheduler statistics of one launch of each
      # main-loop kernel (tools/profile_kernels.py says which); the report comes back too.
      XLA_PYTHON_CLIENT_PREALLOCATE=false \
      ncu --kernel-name regex:'fwd_kernel|dkdv_kernel' --launch-count 6 \
        --section LaunchStats --section Occupancy --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section SchedulerStats --section WarpStateStats --section InstructionStats \
        -o "$OUT/profile" -f python3 tools/profile_kernels.py >"$OUT/profile_run.log" 2>&1 || status=1
      ncu -i "$OUT/profile.ncu-rep" --print-details all >"$OUT/profile.txt" 2>&1 || status=1
      grep -E "^  [^ ].*\(|Stall|Warp Cycles Per Issued|Issued Ipc|Pipe|Bank" "$OUT/profile.txt" | head -60 ;;
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
    wheel)
      wheel_step >"$OUT/wheel.log" 2>&1 || status=1
      grep -E '^wheel: ' "$OUT/wheel.log" ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
