// Tile-level building blocks of the sm80 backward kernels: a block product with both operands in
// shared memory, predicated global <-> shared tile copies and the fp32 reduction into dq_accum.
// Nothing here is backward-specific; candidates for flash_jax/common/ once the forward settles.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cute/tensor.hpp>

namespace flash_jax {
namespace bwd {

using namespace cute;

// acc += A * B^T for one tile, A and B read from shared memory by ldmatrix one k16 slice ahead of
// the MMAs that use the previous slice (two slices of registers live instead of the whole tile).
template <typename TiledMma, typename Accum, typename FragA, typename FragB, typename SmemA,
          typename SmemB, typename TiledCopyA, typename ThrCopyA, typename TiledCopyB,
          typename ThrCopyB>
__device__ __forceinline__ void gemm_smem(const TiledMma& tiled_mma, Accum& acc, FragA& frag_a,
                                          FragB& frag_b, const SmemA& smem_a, const SmemB& smem_b,
                                          const TiledCopyA& copy_a, const ThrCopyA& thr_copy_a,
                                          const TiledCopyB& copy_b, const ThrCopyB& thr_copy_b) {
  Tensor frag_a_view = thr_copy_a.retile_D(frag_a);
  Tensor frag_b_view = thr_copy_b.retile_D(frag_b);
  static_assert(decltype(size<2>(frag_a))::value == decltype(size<2>(frag_b))::value,
                "operands disagree on k");
  copy(copy_a, smem_a(_, _, _0{}), frag_a_view(_, _, _0{}));
  copy(copy_b, smem_b(_, _, _0{}), frag_b_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(frag_a); ++k) {
    if (k + 1 < size<2>(frag_a)) {
      copy(copy_a, smem_a(_, _, k + 1), frag_a_view(_, _, k + 1));
      copy(copy_b, smem_b(_, _, k + 1), frag_b_view(_, _, k + 1));
    }
    cute::gemm(tiled_mma, frag_a(_, _, k), frag_b(_, _, k), acc);
  }
}

// Global -> shared tile load (cp.async) of a partitioned (CPY, CPY_ROWS, CPY_COLS) tile. Vectors
// whose row is >= rows_valid or whose columns are >= cols_valid are zero-filled instead: the
// products then see zeros, never stale or out-of-bounds data. cols_valid is a multiple of 8 (the
// launcher checks head_dim), so a 16-byte vector is either wholly inside or wholly outside.
template <typename TiledCopy, typename Src, typename Dst, typename Coords>
__device__ __forceinline__ void load_tile_async(const TiledCopy& tiled_copy, const Src& src,
                                                Dst&& dst, const Coords& coords, int rows_valid,
                                                int cols_valid) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(dst); ++m) {
    const bool row_ok = get<0>(coords(0, m, 0)) < rows_valid;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(dst); ++k) {
      if (row_ok && get<1>(coords(0, m, k)) < cols_valid) {
        copy(tiled_copy, src(_, m, k), dst(_, m, k));
      } else {
        clear(dst(_, m, k));
      }
    }
  }
}

// Register -> global tile store of a partitioned tile, skipping rows >= rows_valid and columns
// >= cols_valid (padded head-dim columns are never written).
template <typename TiledCopy, typename Src, typename Dst, typename Coords>
__device__ __forceinline__ void store_tile(const TiledCopy& tiled_copy, const Src& src, Dst&& dst,
                                           const Coords& coords, int rows_valid, int cols_valid) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coords(0, m, 0)) < rows_valid) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(src); ++k) {
        if (get<1>(coords(0, m, k)) < cols_valid) copy(tiled_copy, src(_, m, k), dst(_, m, k));
      }
    }
  }
}

// 4-byte asynchronous global -> shared copy (per-row statistics), completed by the same
// cp.async group as the tile it belongs to.
__device__ __forceinline__ void cp_async_f32(float* smem, const float* gmem) {
  const uint32_t smem_address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_address), "l"(gmem)
               : "memory");
}

// dq_accum[address .. address + 1] += (a, b) in fp32, without a return value. Hopper has a
// two-wide reduction that halves the L2 atomic operations of the dQ accumulation.
__device__ __forceinline__ void reduce_add_pair(float* address, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(address), "f"(a), "f"(b)
               : "memory");
#else
  atomicAdd(address, a);
  atomicAdd(address + 1, b);
#endif
}

}  // namespace bwd
}  // namespace flash_jax
