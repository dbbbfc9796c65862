// Host launcher of the sm80 backward extras variants' main kernels (segment ids, positions, dense
// mask, bias, ALiBi, dropout); see launch.h. Included only by the extras instantiation files.
#pragma once

#include <string>

#include "flash_jax/sm80/bwd_launch.cuh"

namespace flash_jax {

template <typename Element, int kHeadDim>
std::string launch_bwd_extras_main(const BwdParams& params, int smem_limit, cudaStream_t stream) {
  using Traits = typename bwd::BwdConfig<Element, kHeadDim>::Traits;
  return params.softcap > 0.f
             ? bwd::launch_main<Traits, true, true>(params, smem_limit, stream)
             : bwd::launch_main<Traits, false, true>(params, smem_limit, stream);
}

}  // namespace flash_jax
