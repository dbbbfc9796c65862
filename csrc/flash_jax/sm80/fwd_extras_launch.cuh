// Host launcher of the sm80 forward extras variants (segment ids, positions, dense mask, bias,
// ALiBi, dropout; the levels of params.h); see launch.h. Included only by the extras instantiation files.
#pragma once

#include <string>

#include "flash_jax/sm80/fwd_launch.cuh"

namespace flash_jax {

template <typename Element, int kHeadDim>
std::string launch_fwd_extras(const FwdParams& params, cudaStream_t stream) {
  using Traits = typename sm80::FwdConfig<Element, kHeadDim>::Main;
  if (params.num_splits != 1) {
    return "flash_jax forward: segment ids, positions, mask, bias, ALiBi and dropout run without "
           "split-KV "
           "(num_splits must be 1), got num_splits=" + std::to_string(params.num_splits);
  }
  switch (extras_level(params)) {
    case ExtrasLevel::kVisibility:
      return sm80::launch_fwd_kernel_variant<Traits, false, false, ExtrasLevel::kVisibility>(
          params, stream);
    case ExtrasLevel::kAll:
      return sm80::launch_fwd_kernel_variant<Traits, false, false, ExtrasLevel::kAll>(params,
                                                                                      stream);
    case ExtrasLevel::kDropout:
      return sm80::launch_fwd_kernel_variant<Traits, false, false, ExtrasLevel::kDropout>(params,
                                                                                          stream);
    default:
      return "flash_jax forward: the extras launcher was called without extras";
  }
}

}  // namespace flash_jax
