// Host entry points of the kernels library. Each dispatches once on dtype, head-dim bucket and
// feature flags, launches on `stream` without synchronising it, and returns an empty string on
// success or a message naming what failed (unsupported combination, launch error).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "flash_jax/params.h"

namespace flash_jax {

std::string run_fwd(const FwdParams& params, cudaStream_t stream);
std::string run_bwd(const BwdParams& params, cudaStream_t stream);

}  // namespace flash_jax
