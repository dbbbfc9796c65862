// One tile shape of the forward kernel for `fwd_check --sweep`; build_fwd_check.sh compiles this
// file once per FLASH_JAX_FWD_VARIANTS entry with VARIANT_D/M/N/W defined.
#include "flash_jax/sm80/fwd_launch.cuh"
#include "fwd_variants.h"

namespace {
// A distinct type, so that a shape equal to launch_fwd's own choice is still a separate kernel
// (two modules registering one kernel symbol confuse the per-kernel shared-memory attribute).
struct SweepTraits
    : flash_jax::sm80::FwdTraits<cutlass::bfloat16_t, VARIANT_D, VARIANT_M, VARIANT_N, VARIANT_W> {};
}  // namespace

std::string FLASH_JAX_FWD_VARIANT_NAME(VARIANT_D, VARIANT_M, VARIANT_N, VARIANT_W)(
    const flash_jax::FwdParams& params, cudaStream_t stream) {
  return flash_jax::sm80::launch_fwd_kernel<SweepTraits, false>(params, stream);
}
