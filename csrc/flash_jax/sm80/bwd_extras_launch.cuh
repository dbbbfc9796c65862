// Host launcher of the sm80 backward extras variants' main kernels (segment ids, positions, dense
// mask, bias, ALiBi, dropout; the levels of params.h); see launch.h. Included only by the
// extras instantiation files.
#pragma once

#include <string>

#include "flash_jax/sm80/bwd_launch.cuh"

namespace flash_jax {

template <typename Element, int kHeadDim>
std::string launch_bwd_extras_main(const BwdParams& params, int smem_limit, cudaStream_t stream) {
  using Traits = typename bwd::BwdConfig<Element, kHeadDim>::Traits;
  switch (extras_level(params)) {
    case ExtrasLevel::kVisibility:
      return bwd::launch_main<Traits, false, ExtrasLevel::kVisibility>(params, smem_limit, stream);
    case ExtrasLevel::kAll:
      return bwd::launch_main<Traits, false, ExtrasLevel::kAll>(params, smem_limit, stream);
    case ExtrasLevel::kDropout:
      return bwd::launch_main<Traits, false, ExtrasLevel::kDropout>(params, smem_limit, stream);
    default:
      return "backward: the extras launcher was called without extras";
  }
}

}  // namespace flash_jax
