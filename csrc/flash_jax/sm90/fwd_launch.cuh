// Host launcher of the Hopper forward kernel (sm90/fwd_kernel.cuh): tiles per head-dim bucket,
// the plain and the visibility (segment ids, positions, dense mask) variants.
// Compiled for sm_90a only; dispatch.cu calls it on devices of compute capability 9.0 for the
// calls the kernel covers (sm90_forward_applies), everything else runs the sm80 kernels.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "flash_jax/launch.h"
#include "flash_jax/sm80/fwd_launch.cuh"
#include "flash_jax/sm90/fwd_kernel.cuh"

namespace flash_jax {
namespace sm90 {

// 128 query rows (two warpgroups) by 128 keys: per thread 64 fp32 scores, 64 (d128) or 32 (d64)
// fp32 outputs and 32 registers of P; ptxas: 253 registers at d128, no spills.
template <typename Element, int kHeadDim>
struct FwdConfig;
template <typename Element>
struct FwdConfig<Element, 64> {
  using Main = FwdTraits<Element, 64, 128, 128>;
};
template <typename Element>
struct FwdConfig<Element, 128> {
  using Main = FwdTraits<Element, 128, 128, 128>;
};

}  // namespace sm90

namespace sm90 {

template <typename Traits, ExtrasLevel kExtras>
std::string launch_fwd_kernel(const FwdParams& params, cudaStream_t stream) {
  static std::atomic<bool> smem_limit_raised[sm80::kMaxDevices] = {};
  const int key_blocks = (params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  const dim3 grid((params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, params.heads,
                  params.batch);
  return sm80::launch_fwd_grid(fwd_kernel<Traits, kExtras>, smem_limit_raised, grid,
                               Traits::kNThreads,
                               Traits::kSmemBytes + tile_state_smem_bytes<kExtras>(key_blocks),
                               classifies_tiles(kExtras), key_blocks, params, stream);
}

}  // namespace sm90

template <typename Element, int kHeadDim>
std::string launch_fwd_sm90(const FwdParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0 || params.seqlen_q == 0) return "";
  std::string error = sm80::check_fwd_params(params, kHeadDim);
  if (!error.empty()) return error;
  using Traits = typename sm90::FwdConfig<Element, kHeadDim>::Main;
  switch (extras_level(params)) {
    case ExtrasLevel::kNone:
      return sm90::launch_fwd_kernel<Traits, ExtrasLevel::kNone>(params, stream);
    case ExtrasLevel::kVisibility:
      return sm90::launch_fwd_kernel<Traits, ExtrasLevel::kVisibility>(params, stream);
    default:
      return "flash_jax forward: the sm90 kernels take no bias, ALiBi, dropout or softcap";
  }
}

}  // namespace flash_jax
