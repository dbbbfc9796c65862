// Host launcher of the sm80 backward: checks what the kernels assume, then enqueues preprocess,
// dK/dV (+ atomic dQ) and the dQ conversion (or the deterministic dQ kernel) on `stream`. Never
// synchronises or allocates; workspace (dq_accum, softmax_d) comes in through BwdParams.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "flash_jax/device_limits.h"
#include "flash_jax/launch.h"
#include "flash_jax/params.h"
#include "flash_jax/sm80/bwd_kernel.cuh"

namespace flash_jax {
namespace bwd {

inline bool aligned16(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

// The kernels move 16-byte vectors of 8 elements: each tensor's base must be 16-byte aligned and
// every stride that is actually stepped must be a multiple of 8 elements. An empty tensor (XLA may
// pass a null buffer for it) is never touched.
inline std::string check_layout(const char* name, const void* pointer, int64_t batch_stride,
                                int64_t row_stride, int64_t head_stride, int batch, int seqlen,
                                int heads) {
  if (batch == 0 || seqlen == 0 || heads == 0) return "";
  if (pointer == nullptr) return std::string(name) + " is null";
  if (!aligned16(pointer)) return std::string(name) + " is not 16-byte aligned";
  if ((batch > 1 && batch_stride % 8 != 0) || (seqlen > 1 && row_stride % 8 != 0) ||
      (heads > 1 && head_stride % 8 != 0)) {
    return std::string(name) + " strides (batch " + std::to_string(batch_stride) + ", row " +
           std::to_string(row_stride) + ", head " + std::to_string(head_stride) +
           ") must be multiples of 8 elements";
  }
  return "";
}

inline std::string check_params(const BwdParams& p, int bucket) {
  if (p.head_dim <= 0 || p.head_dim > bucket || p.head_dim % 8 != 0) {
    return "head_dim must be a positive multiple of 8 no larger than the bucket " +
           std::to_string(bucket) + " (pad it before the call), got " +
           std::to_string(p.head_dim);
  }
  if (p.head_dim_padded != bucket) {
    return "head_dim_padded " + std::to_string(p.head_dim_padded) + " does not match bucket " +
           std::to_string(bucket);
  }
  if ((p.q_segment_ids == nullptr) != (p.kv_segment_ids == nullptr)) {
    return "q_segment_ids and kv_segment_ids must be given together";
  }
  if ((p.q_positions == nullptr) != (p.kv_positions == nullptr)) {
    return "q_positions and kv_positions must be given together";
  }
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0) {
    return "heads (" + std::to_string(p.heads) + ") must be a multiple of kv_heads (" +
           std::to_string(p.kv_heads) + ")";
  }
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0) return "negative size";
  if (p.heads > 65535 || p.batch > 65535) {
    return "heads and batch must each be at most 65535 (grid limits)";
  }
  if (p.seqlen_q >= (1 << 29) || p.seqlen_k >= (1 << 29)) return "sequence longer than 2^29";
  if (p.seqlen_q > 0 && (p.lse == nullptr || p.softmax_d == nullptr)) {
    return "lse and softmax_d must be given";
  }
  if (p.seqlen_q > 0 && !p.deterministic && (p.dq_accum == nullptr || !aligned16(p.dq_accum))) {
    return "dq_accum must be a 16-byte aligned buffer";
  }
  const std::string layout_checks[] = {
      check_layout("q", p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, p.batch,
                   p.seqlen_q, p.heads),
      check_layout("k", p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, p.batch,
                   p.seqlen_k, p.kv_heads),
      check_layout("v", p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, p.batch,
                   p.seqlen_k, p.kv_heads),
      check_layout("out", p.out, p.o_batch_stride, p.o_row_stride, p.o_head_stride, p.batch,
                   p.seqlen_q, p.heads),
      check_layout("dout", p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride, p.batch,
                   p.seqlen_q, p.heads),
      check_layout("dq", p.dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, p.batch,
                   p.seqlen_q, p.heads),
      check_layout("dk", p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, p.batch,
                   p.seqlen_k, p.heads),
      check_layout("dv", p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, p.batch,
                   p.seqlen_k, p.heads),
  };
  for (const std::string& check : layout_checks) {
    if (!check.empty()) return check;
  }
  return "";
}

template <typename Kernel>
std::string launch(Kernel kernel, const char* name, dim3 grid, int smem_bytes, int smem_limit,
                   cudaStream_t stream, const BwdParams& params) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "";
  if (smem_bytes > smem_limit) {
    return std::string(name) + " needs " + std::to_string(smem_bytes) +
           " bytes of shared memory, the device allows " + std::to_string(smem_limit);
  }
  if (smem_bytes > 48 * 1024) {
    // The device maximum rather than this call's size: the extras variants' size varies with the
    // sequence length, and a smaller value set by one call must not fail a concurrent larger one.
    cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit);
    if (status != cudaSuccess) {
      return std::string(name) + ": cudaFuncSetAttribute: " + cudaGetErrorString(status);
    }
  }
  kernel<<<grid, 256, smem_bytes, stream>>>(params);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return std::string(name) + ": " + cudaGetErrorString(status);
  return "";
}

template <typename Kernel>
std::string launch_row_kernel(Kernel kernel, const char* name, dim3 grid, cudaStream_t stream,
                              const BwdParams& params, bool zero_dq_accum) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "";
  kernel<<<grid, 256, 0, stream>>>(params, zero_dq_accum);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return std::string(name) + ": " + cudaGetErrorString(status);
  return "";
}

// dK/dV (with atomic dQ) or, when deterministic, dK/dV then the dQ kernel, for one combination
// of the template flags.
template <typename Traits, bool kSoftcap, ExtrasLevel kExtras = ExtrasLevel::kNone>
std::string launch_main(const BwdParams& params, int smem_limit, cudaStream_t stream) {
  const unsigned heads = params.heads;
  const unsigned batch = params.batch;
  const int key_blocks = (params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  const int query_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int dkdv_smem = Traits::kSmemBytesDkDv + tile_state_smem_bytes<kExtras>(query_blocks);
  const int dq_smem = Traits::kSmemBytesDq + tile_state_smem_bytes<kExtras>(key_blocks);
  const dim3 key_grid(key_blocks, heads, batch);
  if (!params.deterministic) {
    return launch(dkdv_kernel<Traits, kSoftcap, true, kExtras>, "backward dK/dV/dQ",
                  key_grid, dkdv_smem, smem_limit, stream, params);
  }
  std::string error =
      launch(dkdv_kernel<Traits, kSoftcap, false, kExtras>, "backward dK/dV",
             key_grid, dkdv_smem, smem_limit, stream, params);
  if (!error.empty()) return error;
  const dim3 query_grid(query_blocks, heads, batch);
  return launch(dq_kernel<Traits, kSoftcap, kExtras>, "backward deterministic dQ",
                query_grid, dq_smem, smem_limit, stream, params);
}

// The backward's sequence on `stream`: preprocess, the main kernels, the dQ conversion.
// plain_main / extras_main(params, smem_limit, stream) run the main kernels without / with
// extras (params.h): the sm80 ones here, the Hopper dK/dV kernels from sm90/bwd_launch.cuh.
template <typename Element, int kHeadDim, typename PlainMain, typename ExtrasMain>
std::string run_sequence(const BwdParams& params, cudaStream_t stream, PlainMain&& plain_main,
                         ExtrasMain&& extras_main) {
  using RowShape = RowVectorShape<kHeadDim>;
  std::string error = check_params(params, kHeadDim);
  if (!error.empty()) return "flash_jax backward: " + error;
  if (params.batch == 0 || params.heads == 0) return "";
  const int smem_limit = max_dynamic_smem_per_block(&error);
  if (!error.empty()) return "flash_jax backward: " + error;

  const unsigned heads = params.heads;
  const unsigned batch = params.batch;
  const int seqlen_q_padded = padded_seqlen_q(params.seqlen_q);

  // The deterministic dQ kernel writes dq itself; dq_accum is then unused and not zeroed.
  error = launch_row_kernel(
      preprocess_kernel<Element, kHeadDim>, "backward preprocess",
      dim3(seqlen_q_padded / RowShape::kRowsPerBlock, heads, batch), stream, params,
      /*zero_dq_accum=*/!params.deterministic);
  if (!error.empty()) return "flash_jax " + error;

  if (extras_level(params) != ExtrasLevel::kNone) {
    if (params.dbias != nullptr) {
      const size_t bytes = sizeof(float) * size_t(params.bias_batch) * params.bias_heads *
                           params.bias_rows * params.bias_cols;
      cudaError_t status = cudaMemsetAsync(params.dbias, 0, bytes, stream);
      if (status != cudaSuccess) {
        return std::string("flash_jax backward: zeroing dbias: ") + cudaGetErrorString(status);
      }
    }
    error = extras_main(params, smem_limit, stream);
  } else {
    error = plain_main(params, smem_limit, stream);
  }
  if (!error.empty()) return "flash_jax " + error;
  if (params.deterministic) return "";
  const dim3 row_grid((params.seqlen_q + RowShape::kRowsPerBlock - 1) / RowShape::kRowsPerBlock,
                      heads, batch);
  if (row_grid.x == 0) return "";
  convert_dq_kernel<Element, kHeadDim><<<row_grid, 256, 0, stream>>>(params);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    return std::string("flash_jax backward dQ conversion: ") + cudaGetErrorString(status);
  }
  return "";
}

}  // namespace bwd

template <typename Element, int kHeadDim>
std::string launch_bwd(const BwdParams& params, cudaStream_t stream) {
  using Traits = typename bwd::BwdConfig<Element, kHeadDim>::Traits;
  return bwd::run_sequence<Element, kHeadDim>(
      params, stream,
      [](const BwdParams& p, int smem_limit, cudaStream_t s) {
        return p.softcap > 0.f ? bwd::launch_main<Traits, true>(p, smem_limit, s)
                               : bwd::launch_main<Traits, false>(p, smem_limit, s);
      },
      launch_bwd_extras_main<Element, kHeadDim>);
}

}  // namespace flash_jax
