// Host launcher of the sm80 forward kernels: tile choice per head-dim bucket, argument checks,
// split-KV and its combine.
//
// Split-KV heuristic (flash_jax/_cuda.py picks num_splits with this formula and sizes out_accum /
// lse_accum for it; the kernels accept any num_splits >= 1):
//   block_m      = 64                                    (query tile of the split kernels)
//   block_n      = 128 if d_pad <= 128, else 64
//   work         = batch * heads * ceil(seqlen_q / block_m)        CTAs without splitting
//   n_key_blocks = ceil(seqlen_k / block_n)
//   num_sms      = multiprocessor count (132 on H100 SXM)
//   if work >= 0.8 * num_sms or n_key_blocks < 2:  num_splits = 1
//   else, over s = 1 .. min(128, num_sms, n_key_blocks), skipping s > 1 with
//         ceil(n_key_blocks / s) == ceil(n_key_blocks / (s - 1))  (same split length, more combine):
//         waves(s) = work * s / num_sms,  efficiency(s) = waves(s) / ceil(waves(s))
//         num_splits = the smallest s with efficiency(s) >= 0.85 * max_s efficiency(s)
// i.e. enough CTAs to fill about one wave of the GPU, without splits that leave a wave mostly
// empty. Splitting pays only where work < num_sms: decoding (seqlen_q 1..64) at small
// batch * heads with long keys.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "flash_jax/device_limits.h"
#include "flash_jax/launch.h"
#include "flash_jax/sm80/fwd_kernel.cuh"

namespace flash_jax {
namespace sm80 {

// Tiles per head-dim bucket for the main kernel (query block x key block, warps). Each warp owns
// kBlockM / kNWarps query rows; 32 rows per warp halves the shared-memory bytes read per MMA FLOP
// against 16, and kBlockN is then bounded by registers (fp32 scores 32 x kBlockN plus fp32 output
// 32 x d per warp, plus double-buffered operand fragments, within 255 registers per thread).
// Split kernels use 64-row query tiles (decoding has few rows) and longer key tiles: 128 up to
// d128 (256 spills ~360 bytes at d64: 128 registers of scores plus 128 of K fragments).
// Measurements: benchmarks/NOTES.md, "Forward kernel" (H100 SXM, bf16, b * s = 16384), run 1,
// taken before the masked/unmasked loop split; `fwd_check --sweep` re-measures them.
template <typename Element, int kHeadDim>
struct FwdConfig;

// d32: 128x128 needs 64 registers of double-buffered K fragments beside 128 of scores and spilled
// ~200 bytes (ptxas, sm_80); 128x64 fits.
template <typename Element>
struct FwdConfig<Element, 32> {
  using Main = FwdTraits<Element, 32, 128, 64, 4>;
  using Split = FwdTraits<Element, 32, 64, 128, 4>;
};
// d64: 128x64 measured 251 TFLOP/s at s 16384 against 206 for 128x128 (which spills ~160 bytes,
// inside its main loop too) and 199 for 256x128 with 8 warps.
template <typename Element>
struct FwdConfig<Element, 64> {
  using Main = FwdTraits<Element, 64, 128, 64, 4>;
  using Split = FwdTraits<Element, 64, 64, 128, 4>;
};
// d96: as d128 (not measured separately); 128x64 keeps the row sums spilled in the main loop.
template <typename Element>
struct FwdConfig<Element, 96> {
  using Main = FwdTraits<Element, 96, 128, 32, 4>;
  using Split = FwdTraits<Element, 96, 64, 128, 4>;
};
// d128: 128x32 measured 297 TFLOP/s at s 16384 against 279 for 128x64 (255 registers, the row
// sums and operand addresses spilled), 276 for 64x64 and 272 for 256x64 with 8 warps.
template <typename Element>
struct FwdConfig<Element, 128> {
  using Main = FwdTraits<Element, 128, 128, 32, 4>;
  using Split = FwdTraits<Element, 128, 64, 128, 4>;
};
// d >= 192: 32 rows x d of fp32 output per warp would not fit in registers; 8 warps of 16 rows.
template <typename Element>
struct FwdConfig<Element, 192> {
  using Main = FwdTraits<Element, 192, 128, 64, 8>;
  using Split = FwdTraits<Element, 192, 64, 64, 4>;
};
template <typename Element>
struct FwdConfig<Element, 256> {
  using Main = FwdTraits<Element, 256, 128, 64, 8>;
  using Split = FwdTraits<Element, 256, 64, 64, 4>;
};

inline std::string cuda_error_message(const char* what, cudaError_t error) {
  return std::string("flash_jax forward: ") + what + ": " + cudaGetErrorString(error);
}

// Devices with per-device launcher state (flags of raised shared-memory limits).
constexpr int kMaxDevices = 64;

// Raises the kernel's dynamic shared-memory limit once per device (the attribute is per device
// context; doing it on every call would cost a driver round trip per launch).
template <typename Kernel>
cudaError_t raise_smem_limit(Kernel kernel, int bytes, std::atomic<bool>* done_per_device,
                             int max_devices) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  if (device < max_devices && done_per_device[device].load(std::memory_order_acquire)) {
    return cudaSuccess;
  }
  error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (error == cudaSuccess && device < max_devices) {
    done_per_device[device].store(true, std::memory_order_release);
  }
  return error;
}

// Launches a forward kernel with smem_bytes of dynamic shared memory after raising its limit
// (once per device; to the device maximum when tile_states: the tile states' size varies with
// seqlen_k, and a smaller value set by one call must not fail a concurrent larger one).
// smem_limit_raised: the kernel's own flags, one per device.
template <typename Kernel>
std::string launch_fwd_grid(Kernel kernel, std::atomic<bool>* smem_limit_raised, dim3 grid,
                            int threads, int smem_bytes, bool tile_states, int key_blocks,
                            const FwdParams& params, cudaStream_t stream) {
  int smem_attribute = smem_bytes;
  if (tile_states) {
    std::string message;
    smem_attribute = max_dynamic_smem_per_block(&message);
    if (!message.empty()) return "flash_jax forward: " + message;
    if (smem_bytes > smem_attribute) {
      return "flash_jax forward: " + std::to_string(key_blocks) +
             " key blocks need more shared memory for their tile states than the device has";
    }
  }
  cudaError_t error = raise_smem_limit(kernel, smem_attribute, smem_limit_raised, kMaxDevices);
  if (error != cudaSuccess) return cuda_error_message("raising the shared-memory limit", error);
  kernel<<<grid, threads, smem_bytes, stream>>>(params);
  error = cudaGetLastError();
  if (error != cudaSuccess) return cuda_error_message("kernel launch", error);
  return "";
}

template <typename Traits, bool kSplit, bool kSoftcap, ExtrasLevel kExtras = ExtrasLevel::kNone>
std::string launch_fwd_kernel_variant(const FwdParams& params, cudaStream_t stream) {
  static std::atomic<bool> smem_limit_raised[kMaxDevices] = {};
  const int key_blocks = (params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  const int smem_bytes = Traits::kSmemBytes + tile_state_smem_bytes<kExtras>(key_blocks) +
                         (kExtras == ExtrasLevel::kDropout ? kDropoutDrawsSmemBytes : 0);
  const int num_splits = kSplit ? params.num_splits : 1;
  const dim3 grid((params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, params.heads,
                  params.batch * num_splits);
  return launch_fwd_grid(fwd_kernel<Traits, kSplit, kSoftcap, kExtras>, smem_limit_raised, grid,
                         Traits::kNThreads, smem_bytes, classifies_tiles(kExtras), key_blocks,
                         params, stream);
}

template <typename Traits, bool kSplit>
std::string launch_fwd_kernel(const FwdParams& params, cudaStream_t stream) {
  return params.softcap > 0.f ? launch_fwd_kernel_variant<Traits, kSplit, true>(params, stream)
                              : launch_fwd_kernel_variant<Traits, kSplit, false>(params, stream);
}

template <typename Element, int kHeadDim>
std::string launch_fwd_combine(const FwdParams& params, cudaStream_t stream) {
  constexpr int kWarps = 4;
  const int64_t rows = static_cast<int64_t>(params.batch) * params.heads * params.seqlen_q;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffff) return "flash_jax forward: too many rows for the split-KV combine";
  fwd_combine_kernel<Element, kHeadDim, kWarps>
      <<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(params);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return cuda_error_message("combine kernel launch", error);
  return "";
}

inline bool aligned_16(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

constexpr int64_t kMaxRowStride = (int64_t{1} << 31) / 256 - 256;

// Requirements of 16-byte vector loads and stores, of 32-bit in-tile offsets and of the grid.
inline std::string check_fwd_params(const FwdParams& p, int head_dim_bucket) {
  auto fail = [](const std::string& what) { return "flash_jax forward: " + what; };
  if (p.head_dim <= 0 || p.head_dim > head_dim_bucket) {
    return fail("head_dim " + std::to_string(p.head_dim) + " not in (0, " +
                std::to_string(head_dim_bucket) + "]");
  }
  if (p.head_dim % 8 != 0) {
    return fail("head_dim must be a multiple of 8 (16-byte vector loads), got " +
                std::to_string(p.head_dim) + "; pad it with zeros");
  }
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0) {
    return fail("heads " + std::to_string(p.heads) + " not divisible by kv_heads " +
                std::to_string(p.kv_heads));
  }
  const int64_t strides[] = {p.q_batch_stride, p.q_row_stride, p.q_head_stride,
                             p.k_batch_stride, p.k_row_stride, p.k_head_stride,
                             p.v_batch_stride, p.v_row_stride, p.v_head_stride,
                             p.o_batch_stride, p.o_row_stride, p.o_head_stride};
  for (int64_t stride : strides) {
    if (stride % 8 != 0) return fail("strides must be multiples of 8 elements (16 bytes)");
  }
  // Offsets inside one tile (at most 256 rows) are 32-bit.
  for (int64_t row_stride : {p.q_row_stride, p.k_row_stride, p.v_row_stride, p.o_row_stride}) {
    if (row_stride < 0 || row_stride > kMaxRowStride) {
      return fail("row strides must lie in [0, " + std::to_string(kMaxRowStride) + "] elements");
    }
  }
  if (!aligned_16(p.q) || !aligned_16(p.k) || !aligned_16(p.v) || !aligned_16(p.out)) {
    return fail("q, k, v and out must be 16-byte aligned");
  }
  if (p.num_splits < 1) return fail("num_splits must be >= 1, got " + std::to_string(p.num_splits));
  if (p.num_splits > 1 && (p.out_accum == nullptr || p.lse_accum == nullptr)) {
    return fail("num_splits > 1 needs out_accum and lse_accum");
  }
  if ((p.q_segment_ids == nullptr) != (p.kv_segment_ids == nullptr)) {
    return fail("q_segment_ids and kv_segment_ids must be given together");
  }
  if ((p.q_positions == nullptr) != (p.kv_positions == nullptr)) {
    return fail("q_positions and kv_positions must be given together");
  }
  if (p.heads > 65535 || static_cast<int64_t>(p.batch) * p.num_splits > 65535) {
    return fail("grid too large: heads <= 65535 and batch * num_splits <= 65535 required");
  }
  return "";
}

}  // namespace sm80

template <typename Element, int kHeadDim>
std::string launch_fwd(const FwdParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0 || params.seqlen_q == 0) return "";
  std::string error = sm80::check_fwd_params(params, kHeadDim);
  if (!error.empty()) return error;
  using Config = sm80::FwdConfig<Element, kHeadDim>;
  if (extras_level(params) != ExtrasLevel::kNone) return launch_fwd_extras<Element, kHeadDim>(params, stream);
  if (params.num_splits == 1) return sm80::launch_fwd_kernel<typename Config::Main, false>(params, stream);
  error = sm80::launch_fwd_kernel<typename Config::Split, true>(params, stream);
  if (!error.empty()) return error;
  return sm80::launch_fwd_combine<Element, kHeadDim>(params, stream);
}

}  // namespace flash_jax
