// Device properties the launchers need, queried once per device instead of per call.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <string>

namespace flash_jax {

// Largest dynamic shared memory a block may opt into on the current device.
inline int max_dynamic_smem_per_block(std::string* error) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) {
    *error = std::string("cudaGetDevice: ") + cudaGetErrorString(status);
    return 0;
  }
  if (device < kMaxDevices) {
    int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int value = 0;
  status = cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) {
    *error = std::string("cudaDeviceGetAttribute: ") + cudaGetErrorString(status);
    return 0;
  }
  if (device < kMaxDevices) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

}  // namespace flash_jax
