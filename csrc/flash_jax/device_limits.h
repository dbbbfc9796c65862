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

// Whether the current device has compute capability 9.0 (H100, H200), the one the sm_90a kernels
// run on; false when the query fails (the sm80 kernels then run).
inline bool device_is_sm90() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached != 0) return cached == 2;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  const bool sm90 = major == 9 && minor == 0;
  if (device < kMaxDevices) cache[device].store(sm90 ? 2 : 1, std::memory_order_relaxed);
  return sm90;
}

}  // namespace flash_jax
