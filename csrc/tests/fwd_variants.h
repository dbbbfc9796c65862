// Alternative tile shapes of the forward kernel, timed by `fwd_check --sweep` to choose the
// per-head-dim tiles of flash_jax/sm80/fwd_launch.cuh. Each X(head_dim, block_m, block_n, warps)
// is compiled by build_fwd_check.sh from fwd_variants.cu in its own translation unit (bf16).
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "flash_jax/params.h"

#define FLASH_JAX_FWD_VARIANTS(X) \
  X(128, 128, 64, 4)              \
  X(128, 128, 32, 4)              \
  X(128, 64, 64, 4)               \
  X(128, 256, 64, 8)              \
  X(64, 128, 128, 4)              \
  X(64, 128, 64, 4)               \
  X(64, 64, 128, 4)               \
  X(64, 64, 64, 4)

#define FLASH_JAX_FWD_VARIANT_NAME_PASTE(d, m, n, w) fwd_variant_d##d##_##m##x##n##_##w
#define FLASH_JAX_FWD_VARIANT_NAME(d, m, n, w) FLASH_JAX_FWD_VARIANT_NAME_PASTE(d, m, n, w)
#define FLASH_JAX_DECLARE_FWD_VARIANT(d, m, n, w) \
  std::string FLASH_JAX_FWD_VARIANT_NAME(d, m, n, w)(const flash_jax::FwdParams&, cudaStream_t);
FLASH_JAX_FWD_VARIANTS(FLASH_JAX_DECLARE_FWD_VARIANT)

struct FwdVariant {
  int head_dim, block_m, block_n, warps;
  std::string (*launch)(const flash_jax::FwdParams&, cudaStream_t);
};

inline std::vector<FwdVariant> fwd_variants() {
#define FLASH_JAX_LIST_FWD_VARIANT(d, m, n, w) {d, m, n, w, FLASH_JAX_FWD_VARIANT_NAME(d, m, n, w)},
  return {FLASH_JAX_FWD_VARIANTS(FLASH_JAX_LIST_FWD_VARIANT)};
#undef FLASH_JAX_LIST_FWD_VARIANT
}
