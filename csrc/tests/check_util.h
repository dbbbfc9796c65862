// Host helpers shared by the standalone kernel checks (fwd_check.cu, bwd_check.cu). These are
// test programs: a failed CUDA call ends the program with a message, unlike library code.
#pragma once

#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

#include <cstdio>
#include <cstdlib>

#include "flash_jax/params.h"

#define CHECK_CUDA(call)                                                                  \
  do {                                                                                    \
    cudaError_t status_ = (call);                                                         \
    if (status_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,                   \
                   cudaGetErrorString(status_));                                          \
      std::exit(2);                                                                       \
    }                                                                                     \
  } while (0)

namespace flash_jax_check {

// The smallest instantiated head-dim bucket holding head_dim, or -1.
inline int bucket_for(int head_dim) {
  for (int bucket : flash_jax::kHeadDimBuckets) {
    if (head_dim <= bucket) return bucket;
  }
  return -1;
}

// Rounds through the element type, as the kernels' inputs and P are rounded.
inline float round_to(float x, bool fp16) {
  return fp16 ? static_cast<float>(cutlass::half_t(x)) : static_cast<float>(cutlass::bfloat16_t(x));
}

}  // namespace flash_jax_check
