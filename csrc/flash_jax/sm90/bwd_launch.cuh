// Host launcher of the Hopper backward (sm90/bwd_kernel.cuh): the sm80 sequence (preprocess,
// main kernels, dQ conversion) with the Hopper dK/dV kernel as its plain main kernel. Compiled
// for sm_90a only; dispatch.cu calls it where sm90_backward_applies.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "flash_jax/launch.h"
#include "flash_jax/sm80/bwd_launch.cuh"
#include "flash_jax/sm90/bwd_kernel.cuh"

namespace flash_jax {

template <typename Element, int kHeadDim>
std::string launch_bwd_sm90(const BwdParams& params, cudaStream_t stream) {
  using Traits = sm90::BwdTraits<Element, kHeadDim>;
  static_assert(Traits::kNThreads == 256, "bwd::launch starts 256 threads");
  return bwd::run_sequence<Element, kHeadDim>(
      params, stream, [](const BwdParams& p, int smem_limit, cudaStream_t s) {
        const dim3 grid((p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, p.heads, p.batch);
        return bwd::launch(sm90::dkdv_kernel<Traits>, "backward dK/dV/dQ (sm90)", grid,
                           Traits::kSmemBytes, smem_limit, s, p);
      });
}

}  // namespace flash_jax
