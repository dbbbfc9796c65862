#!/usr/bin/env bash
# Builds fwd_check (forward instantiations + sweep variants), one nvcc per translation unit in
# parallel, and prints every kernel's registers and spills from the ptxas report.
# Usage, from the repository root:
#   csrc/tests/build_fwd_check.sh CUTLASS_INCLUDE ARCH OUT_DIR      e.g. ... /path/include 90 build/fwd
set -euo pipefail
cutlass_include=$1
arch=$2
out=$3
mkdir -p "$out"
flags="-std=c++17 -O3 --expt-relaxed-constexpr --use_fast_math -lineinfo -Xptxas=--warn-on-spills"
flags+=" -Xptxas=-v -gencode arch=compute_${arch},code=sm_${arch} -I csrc -I csrc/tests -I $cutlass_include"
{
  for source in csrc/instantiations/fwd_*.cu csrc/tests/fwd_check.cu; do
    echo "$(basename "$source" .cu) $source"
  done
  grep -o 'X([0-9, ]*)' csrc/tests/fwd_variants.h | tr -d 'X() ' | while IFS=, read -r d m n w; do
    echo "variant_${d}_${m}x${n}_${w} csrc/tests/fwd_variants.cu -DVARIANT_D=$d -DVARIANT_M=$m -DVARIANT_N=$n -DVARIANT_W=$w"
  done
} | xargs -P "$(nproc)" -L 1 bash -c 'name=$0; source=$1; shift;
  nvcc '"$flags"' "$@" -c "$source" -o '"$out"'/$name.o > '"$out"'/$name.log 2>&1 ||
  { cat '"$out"'/$name.log; exit 255; }'
# Registers / stack / spills per kernel (ptxas prints the function name, then its properties).
cat "$out"/*.log | awk '/Compiling entry function/ { name = $7 }
  /bytes stack frame/ { frame = $0 } /Used [0-9]+ registers/ { print $5, "regs |", frame, "|", name }' |
  sed 's/ptxas info *: //' | sort -u
nvcc $flags -o "$out/fwd_check" "$out"/*.o
