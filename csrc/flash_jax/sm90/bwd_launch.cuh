// Host launcher of the Hopper backward (sm90/bwd_kernel.cuh): the sm80 sequence (preprocess,
// main kernels, dQ conversion) with the Hopper dK/dV kernel as its main kernel, plain or with
// visibility (segment ids, positions, dense mask). Compiled
// for sm_90a only; dispatch.cu calls it where sm90_backward_applies.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "flash_jax/launch.h"
#include "flash_jax/sm80/bwd_launch.cuh"
#include "flash_jax/sm90/bwd_kernel.cuh"

namespace flash_jax {

template <typename Element, int kHeadDim>
std::string launch_bwd_sm90(const BwdParams& params, cudaStream_t stream) {
  using Traits = sm90::BwdTraits<Element, kHeadDim>;
  static_assert(Traits::kNThreads == 256, "bwd::launch starts 256 threads");
  auto dkdv = [](auto level, const BwdParams& p, int smem_limit, cudaStream_t s) {
    constexpr ExtrasLevel kExtras = decltype(level)::value;
    const int query_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
    const dim3 grid((p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, p.heads, p.batch);
    return bwd::launch(sm90::dkdv_kernel<Traits, kExtras>, "backward dK/dV/dQ (sm90)", grid,
                       Traits::kSmemBytes + tile_state_smem_bytes<kExtras>(query_blocks),
                       smem_limit, s, p);
  };
  return bwd::run_sequence<Element, kHeadDim>(
      params, stream,
      [&](const BwdParams& p, int smem_limit, cudaStream_t s) {
        return dkdv(std::integral_constant<ExtrasLevel, ExtrasLevel::kNone>{}, p, smem_limit, s);
      },
      [&](const BwdParams& p, int smem_limit, cudaStream_t s) -> std::string {
        if (extras_level(p) != ExtrasLevel::kVisibility) {
          return "backward: the sm90 kernels take no bias, ALiBi, dropout or softcap";
        }
        return dkdv(std::integral_constant<ExtrasLevel, ExtrasLevel::kVisibility>{}, p,
                    smem_limit, s);
      });
}

}  // namespace flash_jax
