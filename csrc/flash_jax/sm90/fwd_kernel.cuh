// Forward attention kernel for Hopper (sm_90a): warpgroup MMAs (wgmma) with both operands of
// S = Q K^T in shared memory and P in registers for O += P V, so the tensor cores run the
// 64 x N x 16 products that mma.sync cannot issue at their rate. One CTA per (query block,
// head, batch); each warpgroup owns 64 query rows; key/value tiles stream through two
// shared-memory stages with cp.async, from the last key block to the first as in the sm80
// kernel (the partially masked blocks come first).
//
// Per key block n, with P(n) already in registers:
//   wait V(n), K(n-1) | barrier | issue loads of V(n-1), K(n-2)
//   issue S = Q K(n-1)^T and O += P(n) V(n) (both asynchronous)
//   wait S | mask | max, exp, row sums of S (the output product is still running)
//   wait O | rescale O | P(n-1) = S
// so each warpgroup's softmax overlaps its own P V product, and the two warpgroups' products
// interleave on the tensor cores.
//
// Causal (both alignments), windows, q/kv lengths, GQA, fp16/bf16, and (kExtras = kVisibility)
// segment ids, varlen positions and a dense mask: those classify the CTA's key blocks first
// (common/extras.cuh, as the sm80 extras kernels) and visit only the visible ones. Softcap, bias,
// ALiBi, dropout and split-KV run on the sm80 kernels (dispatch.cu decides).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "flash_jax/common/extras.cuh"
#include "flash_jax/common/fragment.cuh"
#include "flash_jax/common/mask.cuh"
#include "flash_jax/common/softmax.cuh"
#include "flash_jax/common/score_mod.cuh"
#include "flash_jax/params.h"
#include "flash_jax/sm80/fwd_kernel.cuh"
#include "flash_jax/sm90/wgmma.cuh"

namespace flash_jax {
namespace sm90 {

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarpGroups = kBlockM / 64;
  static constexpr int kNThreads = kWarpGroups * 128;
  static constexpr int kStages = 2;
  static_assert(kBlockM % 64 == 0 && kBlockN % 16 == 0 && kHeadDim % 64 == 0,
                "64-row warpgroup tiles, 16-key k-slices, 128-byte swizzled head-dim rows");

  using WarpGroups = cute::Layout<cute::Shape<cute::Int<kWarpGroups>, cute::_1, cute::_1>>;
  // S = Q K^T: both K-major (head_dim contiguous) in shared memory.
  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>, cute::Int<kHeadDim>>>(),
      WarpGroups{}));
  // O += P V: P from registers, V read as the (head_dim, key) B operand, head_dim contiguous.
  using TiledMmaO = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      WarpGroups{}));

  // Rows of 64 elements (128 bytes) with the 128-byte swizzle wgmma descriptors expect.
  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  // The same bytes as (head_dim, key, stage): V transposed, an MN-major operand.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_ordered_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{},
                                cute::Step<cute::_2, cute::_1, cute::_3>{})));

  using GmemTiledCopy = typename CpAsyncRowsCopy<Element, kNThreads>::TiledCopy;
  static constexpr int kElemsPerVector = CpAsyncRowsCopy<Element, kNThreads>::kElemsPerVector;

  static constexpr int kTileBytes = static_cast<int>(sizeof(Element));
  static constexpr int kSmemQBytes = kBlockM * kHeadDim * kTileBytes;
  static constexpr int kSmemKVBytes = kStages * kBlockN * kHeadDim * kTileBytes;
  // The output is staged through shared memory as padded rows (8 elements: the 4-byte stores of
  // a fragment's 8 rows then fall in distinct banks) once every tile is consumed.
  static constexpr int kOutRowElems = kHeadDim + 8;
  static constexpr int kSmemBytes = kSmemQBytes + 2 * kSmemKVBytes;
  static_assert(kBlockM * kOutRowElems * kTileBytes <= kSmemBytes, "output staging fits");
};

// Grid: (query blocks, heads, batch), query blocks in reverse as in the sm80 kernel. kExtras:
// kNone or kVisibility; the latter's Extras and tile states follow the tiles in shared memory.
template <typename Traits, ExtrasLevel kExtras>
__global__ void __launch_bounds__(Traits::kNThreads, 1) fwd_kernel(const __grid_constant__ FwdParams params) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(1024) char smem[];

  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / (params.heads / params.kv_heads);
  const int thread = threadIdx.x;

  const KeyRangeMask mask = KeyRangeMask::make(params, batch);
  const int row_begin = m_block * kBlockM;
  const int row_end = min(row_begin + kBlockM, mask.seqlen_q);
  int n_block_begin, n_block_end;
  mask.key_block_range(row_begin, row_end, kBlockN, &n_block_begin, &n_block_end);
  int n_unmasked_begin, n_unmasked_end;
  mask.unmasked_key_block_range(row_begin, row_end, kBlockN, &n_unmasked_begin, &n_unmasked_end);
  const SoftmaxScales scales = SoftmaxScales::make(params.softmax_scale, 0.f);
  static_assert(kExtras == ExtrasLevel::kNone || kExtras == ExtrasLevel::kVisibility,
                "the Hopper forward takes no score extras");
  constexpr bool kTileStates = classifies_tiles(kExtras);
  // The Extras stay in shared memory (no registers to spare at 253): read only on partial tiles.
  Extras* extras = reinterpret_cast<Extras*>(smem + Traits::kSmemBytes);
  uint8_t* tile_states = reinterpret_cast<uint8_t*>(smem) + Traits::kSmemBytes + kExtrasSmemBytes;
  const int states_begin = n_block_begin;
  Extras unused_registers{};
  prepare_extras<kExtras, Traits::kNThreads, kBlockN, true>(
      extras, unused_registers, params, batch, head, scales.scale, mask, row_begin, row_end,
      kBlockM, n_block_begin, n_block_end, tile_states);

  typename Traits::TiledMmaS tiled_mma_s;
  typename Traits::TiledMmaO tiled_mma_o;
  auto thr_mma_s = tiled_mma_s.get_thread_slice(thread);
  auto thr_mma_o = tiled_mma_o.get_thread_slice(thread);
  Tensor acc_o = partition_fragment_C(tiled_mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor acc_o_rowcol = make_tensor(acc_o.data(), accum_rowcol_layout(acc_o.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(acc_o_rowcol))::value;
  Tensor o_coords = thr_mma_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor o_coords_rowcol = make_tensor(o_coords.data(), accum_rowcol_layout(o_coords.layout()));

  OnlineSoftmax<kRowsPerThread> softmax;
  float lse[kRowsPerThread];

  if (n_block_end > n_block_begin) {
    Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
    Element* kv_smem = reinterpret_cast<Element*>(smem + Traits::kSmemQBytes);
    Tensor sK = make_tensor(make_smem_ptr(kv_smem), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(make_smem_ptr(kv_smem + size(sK)), typename Traits::SmemLayoutKV{});
    Tensor sVt = make_tensor(make_smem_ptr(kv_smem + size(sK)), typename Traits::SmemLayoutVt{});

    const Element* q_ptr = static_cast<const Element*>(params.q) + batch * params.q_batch_stride +
                           head * params.q_head_stride + row_begin * params.q_row_stride;
    const Element* k_ptr = static_cast<const Element*>(params.k) + batch * params.k_batch_stride +
                           kv_head * params.k_head_stride;
    const Element* v_ptr = static_cast<const Element*>(params.v) + batch * params.v_batch_stride +
                           kv_head * params.v_head_stride;
    // 32-bit offsets inside a tile (checked at launch), as in the sm80 kernel.
    const int q_row_stride = static_cast<int>(params.q_row_stride);
    const int k_row_stride = static_cast<int>(params.k_row_stride);
    const int v_row_stride = static_cast<int>(params.v_row_stride);
    Tensor gQ = make_tensor(make_gmem_ptr(q_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                            make_stride(q_row_stride, _1{}));
    auto kv_tile = [](const Element* base, int64_t row_stride64, int row_stride, int n) {
      return make_tensor(make_gmem_ptr(base + n * kBlockN * row_stride64),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(row_stride, _1{}));
    };

    typename Traits::GmemTiledCopy gmem_tiled_copy;
    auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(thread);
    Tensor tQgQ = gmem_thr_copy.partition_S(gQ);
    Tensor tQsQ = gmem_thr_copy.partition_D(sQ);
    Tensor tKsK = gmem_thr_copy.partition_D(sK);  // (CPY, CPY_N, CPY_K, stage)
    Tensor tVsV = gmem_thr_copy.partition_D(sV);
    Tensor tQcQ = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor tKVcKV = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    Tensor col_ok = make_tensor<bool>(Shape<Int<decltype(size<2>(tQsQ))::value>>{});
#pragma unroll
    for (int k = 0; k < size(col_ok); ++k) col_ok(k) = get<1>(tQcQ(0, 0, k)) < params.head_dim;
    const int seqlen_k = mask.seqlen_k;
    // Rows past seqlen_k (the sequence tail) are zero-filled: every K/V load checks rows, which
    // costs a compare per 16-byte copy and keeps one loop for all blocks.
    auto load_k = [&](int n, int stage) {
      Tensor dst = tKsK(_, _, _, stage);
      sm80::load_tile<true>(gmem_tiled_copy, gmem_thr_copy.partition_S(kv_tile(k_ptr, params.k_row_stride, k_row_stride, n)),
                            dst, tKVcKV, col_ok, seqlen_k - n * kBlockN);
    };
    auto load_v = [&](int n, int stage) {
      Tensor dst = tVsV(_, _, _, stage);
      sm80::load_tile<true>(gmem_tiled_copy, gmem_thr_copy.partition_S(kv_tile(v_ptr, params.v_row_stride, v_row_stride, n)),
                            dst, tKVcKV, col_ok, seqlen_k - n * kBlockN);
    };

    Tensor tSrQ = thr_mma_s.partition_fragment_A(sQ);
    Tensor tSrK = thr_mma_s.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
    Tensor tOrVt = thr_mma_o.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
    Tensor acc_s = partition_fragment_C(tiled_mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_s_rowcol = make_tensor(acc_s.data(), accum_rowcol_layout(acc_s.layout()));
    Tensor s_coords = thr_mma_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor p = make_tensor<Element>(accum_as_operand_a_layout(acc_s.layout()));
    float correction[kRowsPerThread];

    // The next block to visit below n (below n_block_begin: none), and whether block n needs
    // the per-element mask.
    auto visit_after = [&](int n) {
      if constexpr (kTileStates) {
        return visible_block_at_or_below(tile_states, states_begin, n_block_begin, n - 1);
      } else {
        return n - 1;
      }
    };
    auto masked = [&](int n) {
      if constexpr (kTileStates) {
        return tile_states[n - states_begin] != kTileFull;
      } else {
        return n >= n_unmasked_end || n < n_unmasked_begin;
      }
    };
    // S of block n, masked or not, turned into probabilities; acc_o must then be rescaled.
    auto scores_to_probabilities = [&](int n, auto apply_mask) __attribute__((always_inline)) {
      if constexpr (decltype(apply_mask)::value) {
        mask.apply(acc_s, s_coords, row_begin, n * kBlockN);
        if constexpr (kTileStates) {
          if (tile_states[n - states_begin] == kTilePartial) {
            extras->apply_visibility(acc_s, s_coords, row_begin, n * kBlockN);
          }
        }
      }
      softmax.update_scores(acc_s_rowcol, scales.scale_log2, correction);
    };

    // The i-th visited block's K and V go to stage i % 2.
    const int n = n_block_end - 1;
    int next = visit_after(n);
    int stage = 0;
    sm80::load_tile<true>(gmem_tiled_copy, tQgQ, tQsQ, tQcQ, col_ok, mask.seqlen_q - row_begin);
    load_k(n, stage);
    cp_async_fence();
    load_v(n, stage);
    cp_async_fence();
    if (next >= n_block_begin) load_k(next, stage ^ 1);
    cp_async_fence();
    softmax.init();
    clear(acc_o);

    cp_async_wait<2>();
    fence_async_shared();
    __syncthreads();
    warpgroup_gemm<true, 0>(tiled_mma_s, tSrQ, tSrK(_, _, _, stage), acc_s);
    if (masked(n)) {
      scores_to_probabilities(n, cute::true_type{});
    } else {
      scores_to_probabilities(n, cute::false_type{});
    }
    convert_fragment(acc_s, p);

    // The P V product of the block whose P is in registers and the scores of `next`, the block
    // visited after it; kMaskNext: `next` is
    // partially masked. A compile-time flag, as in the sm80 kernel (a run-time branch gets
    // if-converted).
    auto key_block = [&](int after, auto mask_next) __attribute__((always_inline)) {
      cp_async_wait<0>();
      fence_async_shared();
      __syncthreads();
      // Into the stages of the blocks before `next` and n, whose products every warpgroup has
      // waited for.
      load_v(next, stage ^ 1);
      if (after >= n_block_begin) load_k(after, stage);
      cp_async_fence();
      warpgroup_gemm<true, -1>(tiled_mma_s, tSrQ, tSrK(_, _, _, stage ^ 1), acc_s);
      warpgroup_gemm<false, -1>(tiled_mma_o, p, tOrVt(_, _, _, stage), acc_o);
      warpgroup_wait<1>();
      fence_fragment(acc_s);
      scores_to_probabilities(next, mask_next);
      warpgroup_wait<0>();
      fence_fragment(acc_o);
      fence_fragment(p);
      softmax.rescale(acc_o_rowcol, correction);
      convert_fragment(acc_s, p);
    };
    while (next >= n_block_begin) {
      const int after = visit_after(next);
      if (masked(next)) {
        key_block(after, cute::true_type{});
      } else {
        key_block(after, cute::false_type{});
      }
      next = after;
      stage ^= 1;
    }
    cp_async_wait<0>();
    fence_async_shared();
    __syncthreads();
    warpgroup_gemm<false, 0>(tiled_mma_o, p, tOrVt(_, _, _, stage), acc_o);
    softmax.finalize(acc_o_rowcol, scales.scale, lse);
  } else {
    clear(acc_o);
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) lse[r] = -INFINITY;
  }

  if (params.q_lengths != nullptr) {
    const int q_limit = KeyRangeMask::valid_length(params.seqlen_q, params.q_lengths, batch);
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      if (row_begin + get<0>(o_coords_rowcol(r, 0)) >= q_limit) {
        lse[r] = -INFINITY;
#pragma unroll
        for (int c = 0; c < size<1>(acc_o_rowcol); ++c) acc_o_rowcol(r, c) = 0.f;
      }
    }
  }

  const int64_t bh_row = (static_cast<int64_t>(batch) * params.heads + head) * params.seqlen_q;
  if (get<1>(o_coords_rowcol(0, 0)) == 0) {
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = row_begin + get<0>(o_coords_rowcol(r, 0));
      if (row < params.seqlen_q) params.lse[bh_row + row] = lse[r];
    }
  }

  // Output through shared memory (every tile consumed: the barrier below follows each
  // warpgroup's last wait) so that global stores are 16-byte and coalesced.
  __syncthreads();
  Element* s_out = reinterpret_cast<Element*>(smem);
  constexpr int kOutRow = Traits::kOutRowElems;
  Tensor acc_o_converted = make_tensor<Element>(acc_o.layout());
  convert_fragment(acc_o, acc_o_converted);
  Tensor converted_rowcol = make_tensor(acc_o_converted.data(), accum_rowcol_layout(acc_o.layout()));
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
#pragma unroll
    for (int c = 0; c < size<1>(converted_rowcol); c += 2) {
      const int row = get<0>(o_coords_rowcol(r, c));
      const int col = get<1>(o_coords_rowcol(r, c));
      Element pair[2] = {converted_rowcol(r, c), converted_rowcol(r, c + 1)};
      *reinterpret_cast<uint32_t*>(s_out + row * kOutRow + col) = *reinterpret_cast<uint32_t*>(pair);
    }
  }
  __syncthreads();
  constexpr int kVectors = kHeadDim / Traits::kElemsPerVector;
  Element* o_ptr = static_cast<Element*>(params.out) + batch * params.o_batch_stride +
                   head * params.o_head_stride;
#pragma unroll
  for (int i = thread; i < kBlockM * kVectors; i += Traits::kNThreads) {
    const int row = i / kVectors;
    const int col = (i % kVectors) * Traits::kElemsPerVector;
    if (row_begin + row < params.seqlen_q && col < params.head_dim) {
      *reinterpret_cast<uint4*>(o_ptr + (row_begin + row) * params.o_row_stride + col) =
          *reinterpret_cast<const uint4*>(s_out + row * kOutRow + col);
    }
  }
}

}  // namespace sm90
}  // namespace flash_jax
