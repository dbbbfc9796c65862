// The one place that maps run-time dtype and head-dim bucket to an instantiated launcher.
#include <cstdlib>
#include <cstring>

#include <cutlass/numeric_types.h>

#include "flash_jax/api.h"
#include "flash_jax/common/mask_cells.cuh"
#include "flash_jax/device_limits.h"
#include "flash_jax/launch.h"

namespace flash_jax {
namespace {

template <typename Params, typename Launch>
std::string dispatch(const Params& params, cudaStream_t stream, const char* direction) {
  auto by_head_dim = [&](auto element) -> std::string {
    using Element = decltype(element);
    switch (params.head_dim_padded) {
      case 32: return Launch::template run<Element, 32>(params, stream);
      case 64: return Launch::template run<Element, 64>(params, stream);
      case 96: return Launch::template run<Element, 96>(params, stream);
      case 128: return Launch::template run<Element, 128>(params, stream);
      case 192: return Launch::template run<Element, 192>(params, stream);
      case 256: return Launch::template run<Element, 256>(params, stream);
      default:
        return std::string("flash_jax ") + direction + ": no kernel for head_dim_padded=" +
               std::to_string(params.head_dim_padded) + " (buckets 32, 64, 96, 128, 192, 256)";
    }
  };
  switch (params.dtype) {
    case DType::kFloat16: return by_head_dim(cutlass::half_t{});
    case DType::kBFloat16: return by_head_dim(cutlass::bfloat16_t{});
    default:
      return std::string("flash_jax ") + direction + ": unsupported dtype code " +
             std::to_string(static_cast<int>(params.dtype));
  }
}

// FLASH_JAX_DISABLE_SM90 (any value but "0"), read on every call, runs the sm80 kernels on a
// Hopper GPU too: benchmarks and tests compare the two.
bool sm90_disabled() {
  const char* disabled = std::getenv("FLASH_JAX_DISABLE_SM90");
  return disabled != nullptr && *disabled != '\0' && std::strcmp(disabled, "0") != 0;
}

// What the Hopper kernels cover: plain attention (the mask band and lengths included) and the
// visibility extras (segment ids, positions, dense mask), without softcap, bias, ALiBi or
// dropout, on a compute capability 9.0 device.
bool sm90_covers(const AttentionParams& params) {
  const ExtrasLevel level = extras_level(params);
  return (level == ExtrasLevel::kNone || level == ExtrasLevel::kVisibility) &&
         !(params.softcap > 0.f) && !sm90_disabled() && device_is_sm90();
}

// The forward without split-KV; the backward not deterministic (its dQ is accumulated
// atomically).
bool sm90_forward_applies(const FwdParams& params) {
  return params.num_splits == 1 && sm90_covers(params);
}

bool sm90_backward_applies(const BwdParams& params) {
  return !params.deterministic && sm90_covers(params);
}

struct LaunchFwd {
  template <typename Element, int kHeadDim>
  static std::string run(const FwdParams& params, cudaStream_t stream) {
#if defined(FLASH_JAX_SM90_KERNELS)
    if constexpr (kHeadDim == 64 || kHeadDim == 128) {
      if (sm90_forward_applies(params)) return launch_fwd_sm90<Element, kHeadDim>(params, stream);
    }
#endif
    return launch_fwd<Element, kHeadDim>(params, stream);
  }
};

struct LaunchBwd {
  template <typename Element, int kHeadDim>
  static std::string run(const BwdParams& params, cudaStream_t stream) {
#if defined(FLASH_JAX_SM90_KERNELS)
    if constexpr (kHeadDim == 64 || kHeadDim == 128) {
      if (sm90_backward_applies(params)) return launch_bwd_sm90<Element, kHeadDim>(params, stream);
    }
#endif
    return launch_bwd<Element, kHeadDim>(params, stream);
  }
};

// A dense mask is summarised per 16 x 16 cell before the kernels that read it (params.h).
std::string summarise_mask(const AttentionParams& params, cudaStream_t stream) {
  if (params.mask == nullptr) return "";
  if (params.mask_tiles == nullptr) return "flash_jax: a mask needs its mask_tiles workspace";
  return launch_mask_cells(params, stream);
}

}  // namespace

std::string run_fwd(const FwdParams& params, cudaStream_t stream) {
  std::string error = summarise_mask(params, stream);
  if (!error.empty()) return error;
  return dispatch<FwdParams, LaunchFwd>(params, stream, "forward");
}

std::string run_bwd(const BwdParams& params, cudaStream_t stream) {
  std::string error = summarise_mask(params, stream);
  if (!error.empty()) return error;
  return dispatch<BwdParams, LaunchBwd>(params, stream, "backward");
}

}  // namespace flash_jax
