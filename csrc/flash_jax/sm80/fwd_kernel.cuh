// Forward attention kernels for sm80-class GPUs (mma.sync m16n8k16, ldmatrix, cp.async); the
// same code runs on sm90 through mma.sync. One CTA per (query block, head, batch[, key split]):
// the query tile stays in shared memory, key/value tiles stream through it from the last key
// block to the first (the partially masked blocks at the causal diagonal and the sequence tail
// come first), scores and probabilities never leave registers.
//
// Pipeline per key block n (one K buffer, one V buffer, each loaded while the other is consumed):
//   wait K(n) | issue V(n) | S = Q K^T (ldmatrix pipelined one k-slice ahead) | softcap | mask
//   wait V(n) | issue K(n-1) | online softmax | O += P V
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "flash_jax/common/extras.cuh"
#include "flash_jax/common/fragment.cuh"
#include "flash_jax/common/mask.cuh"
#include "flash_jax/common/score_mod.cuh"
#include "flash_jax/common/softmax.cuh"
#include "flash_jax/params.h"

namespace flash_jax {
namespace sm80 {

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head-dim bucket");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row MMA tiles");
  static_assert(kBlockN % 16 == 0, "key tile in 16-column MMA steps");

  // Warps split the query rows; each warp computes all key columns of its rows, so a score row
  // lives in one warp (softmax reductions are 4-lane shuffles, no shared memory).
  using MmaAtom = cute::MMA_Atom<std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                                    cute::SM80_16x8x16_F32F16F16F32_TN,
                                                    cute::SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = cute::TiledMMA<MmaAtom, cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;

  // Shared-memory rows of 64 (or 32) elements with a 16-byte-chunk XOR swizzle, so that both the
  // 16-byte cp.async writes and the 8x8 ldmatrix reads (normal and transposed) are conflict free.
  static constexpr int kSmemRowElems = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kSmemRowElems == 64 ? 3 : 2;
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<kSwizzleBits, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kSmemRowElems>>,
                   cute::Stride<cute::Int<kSmemRowElems>, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V read as the (head_dim, key) B operand of O += P V, through transposing ldmatrix.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = cute::Copy_Atom<cute::AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  // Global <-> shared: 16-byte vectors, a row of kSmemRowElems covered by consecutive threads
  // (coalesced 128-byte segments).
  static constexpr int kElemsPerVector = 16 / sizeof(Element);
  static constexpr int kThreadsPerRow = kSmemRowElems / kElemsPerVector;
  using GmemThreadLayout =
      cute::Layout<cute::Shape<cute::Int<kNThreads / kThreadsPerRow>, cute::Int<kThreadsPerRow>>,
                   cute::Stride<cute::Int<kThreadsPerRow>, cute::_1>>;
  using GmemValLayout = cute::Layout<cute::Shape<cute::_1, cute::Int<kElemsPerVector>>>;
  using GmemTiledCopyQKV = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, Element>{},
      GmemThreadLayout{}, GmemValLayout{}));
  using GmemTiledCopyO = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::AutoVectorizingCopyWithAssumedAlignment<128>, Element>{},
      GmemThreadLayout{}, GmemValLayout{}));

  static constexpr int kSmemBytes =
      (kBlockM + 2 * kBlockN) * kHeadDim * static_cast<int>(sizeof(Element));
};

// 16-byte loads of one (rows, head_dim) tile from global into shared memory. Columns at or past
// head_dim and (when kCheckRows) rows at or past valid_rows are zero-filled without reading global
// memory, so padded head dims and sequence tails never touch out-of-bounds addresses and never
// leave stale shared memory (stale V rows could hold NaN, and 0 * NaN is NaN).
template <bool kCheckRows, typename TiledCopy, typename SrcTensor, typename DstTensor,
          typename CoordTensor, typename ColPredTensor>
__device__ __forceinline__ void load_tile(const TiledCopy& tiled_copy, const SrcTensor& src,
                                          DstTensor& dst, const CoordTensor& coords,
                                          const ColPredTensor& col_ok, int valid_rows) {
#pragma unroll
  for (int m = 0; m < cute::size<1>(dst); ++m) {
    bool row_ok = !kCheckRows || cute::get<0>(coords(0, m, 0)) < valid_rows;
#pragma unroll
    for (int k = 0; k < cute::size<2>(dst); ++k) {
      cute::copy(tiled_copy.with(row_ok && col_ok(k)), src(cute::_, m, k), dst(cute::_, m, k));
    }
  }
}

// acc += A B with both operands in shared memory; the ldmatrix loads of k-slice i + 1 are issued
// before the MMAs of slice i so that shared-memory latency overlaps tensor-core work.
template <typename Acc, typename FragA, typename FragB, typename SmemA, typename SmemB,
          typename TiledMma, typename CopyA, typename CopyB>
__device__ __forceinline__ void gemm_smem_smem(Acc& acc, FragA& frag_a, FragB& frag_b,
                                               const SmemA& smem_a, const SmemB& smem_b,
                                               const TiledMma& tiled_mma, const CopyA& copy_a,
                                               const CopyB& copy_b, int thread) {
  auto thr_copy_a = copy_a.get_thread_slice(thread);
  auto thr_copy_b = copy_b.get_thread_slice(thread);
  auto frag_a_view = thr_copy_a.retile_D(frag_a);
  auto frag_b_view = thr_copy_b.retile_D(frag_b);
  cute::copy(copy_a, smem_a(cute::_, cute::_, 0), frag_a_view(cute::_, cute::_, 0));
  cute::copy(copy_b, smem_b(cute::_, cute::_, 0), frag_b_view(cute::_, cute::_, 0));
#pragma unroll
  for (int k = 0; k < cute::size<2>(frag_a); ++k) {
    if (k + 1 < cute::size<2>(frag_a)) {
      cute::copy(copy_a, smem_a(cute::_, cute::_, k + 1), frag_a_view(cute::_, cute::_, k + 1));
      cute::copy(copy_b, smem_b(cute::_, cute::_, k + 1), frag_b_view(cute::_, cute::_, k + 1));
    }
    cute::gemm(tiled_mma, frag_a(cute::_, cute::_, k), frag_b(cute::_, cute::_, k), acc);
  }
}

// acc += A B with A already in registers (the probabilities P) and B in shared memory.
template <typename Acc, typename FragA, typename FragB, typename SmemB, typename TiledMma,
          typename CopyB>
__device__ __forceinline__ void gemm_regs_smem(Acc& acc, const FragA& frag_a, FragB& frag_b,
                                               const SmemB& smem_b, const TiledMma& tiled_mma,
                                               const CopyB& copy_b, int thread) {
  auto thr_copy_b = copy_b.get_thread_slice(thread);
  auto frag_b_view = thr_copy_b.retile_D(frag_b);
  cute::copy(copy_b, smem_b(cute::_, cute::_, 0), frag_b_view(cute::_, cute::_, 0));
#pragma unroll
  for (int k = 0; k < cute::size<2>(frag_a); ++k) {
    if (k + 1 < cute::size<2>(frag_a)) {
      cute::copy(copy_b, smem_b(cute::_, cute::_, k + 1), frag_b_view(cute::_, cute::_, k + 1));
    }
    cute::gemm(tiled_mma, frag_a(cute::_, cute::_, k), frag_b(cute::_, cute::_, k), acc);
  }
}

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Grid: (query blocks, heads, batch * num_splits). kSplit: the key blocks are divided into
// params.num_splits contiguous ranges, one per blockIdx.z % num_splits, and each CTA writes its
// normalised partial output and lse to out_accum / lse_accum for fwd_combine_kernel.
// kSoftcap: params.softcap > 0 (a template flag for the same reason as kMasked below: the tanh
// doubles the MUFU work per score and must not be issued predicated-off).
// q_lengths / kv_lengths need no flag: they only narrow the mask's extents, read once per CTA.
// kExtras (params.h): kVisibility for segment ids, positions and a dense mask; kAll adds bias,
// ALiBi and dropout, each a uniform run-time branch, and takes softcap at run time (kSoftcap is
// then false). These two first classify the CTA's key blocks into shared memory (after the tiles,
// ceil(key blocks / 16) * 16 bytes), then walk only the visible ones: no dependent global load
// per block. kDropout keeps the plain loops and only adds the draws. Not combined with kSplit.
template <typename Traits, bool kSplit, bool kSoftcap, ExtrasLevel kExtras>
__global__ void __launch_bounds__(Traits::kNThreads, 1) fwd_kernel(const __grid_constant__ FwdParams params) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(128) char smem[];

  // Reversed so that under a causal mask the query blocks with the most key blocks start first
  // and the short ones fill the last wave.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int batch = kSplit ? blockIdx.z / params.num_splits : blockIdx.z;
  const int split = kSplit ? blockIdx.z % params.num_splits : 0;
  const int kv_head = head / (params.heads / params.kv_heads);
  const int thread = threadIdx.x;

  const KeyRangeMask mask = KeyRangeMask::make(params, batch);
  const int row_begin = m_block * kBlockM;
  const int row_end = min(row_begin + kBlockM, mask.seqlen_q);
  int n_block_begin, n_block_end;
  mask.key_block_range(row_begin, row_end, kBlockN, &n_block_begin, &n_block_end);
  if (kSplit) {
    const int blocks_per_split = ceil_div(ceil_div(params.seqlen_k, kBlockN), params.num_splits);
    n_block_begin = max(n_block_begin, split * blocks_per_split);
    n_block_end = min(n_block_end, (split + 1) * blocks_per_split);
  }
  constexpr bool kTileStates = classifies_tiles(kExtras);
  constexpr bool kScoreExtras = kExtras == ExtrasLevel::kAll;
  static_assert(!(kExtras != ExtrasLevel::kNone && kSplit), "extras variants run without split-KV");
  static_assert(!(kExtras != ExtrasLevel::kNone && kSoftcap),
                "extras variants take softcap at run time (kAll) or not at all");
  const bool softcap_on = kSoftcap || (kScoreExtras && params.softcap > 0.f);
  const SoftmaxScales scales = SoftmaxScales::make(params.softmax_scale, params.softcap);
  Extras* extras_slot = reinterpret_cast<Extras*>(smem + Traits::kSmemBytes);
  uint8_t* tile_states = reinterpret_cast<uint8_t*>(smem) + Traits::kSmemBytes + kExtrasSmemBytes;
  const int states_begin = n_block_begin;
  Extras visibility_extras{};
  prepare_extras<kExtras, Traits::kNThreads, kBlockN, true>(
      extras_slot, visibility_extras, params, batch, head, scales.scale, mask, row_begin, row_end,
      kBlockM, n_block_begin, n_block_end, tile_states);
  // Read only by the extras variants; see cta_extras and shared_draws.
  const Extras& extras = cta_extras<kExtras>(extras_slot, visibility_extras);
  const DropoutDraws& draws = shared_draws<kExtras>(
      extras, reinterpret_cast<DropoutDraws*>(extras_slot), params, batch, head);

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(thread);
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor acc_o_rowcol = make_tensor(acc_o.data(), accum_rowcol_layout(acc_o.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(acc_o_rowcol))::value;
  // (row, col) inside the query tile of every accumulator element this thread owns.
  Tensor o_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor o_coords_rowcol = make_tensor(o_coords.data(), accum_rowcol_layout(o_coords.layout()));

  OnlineSoftmax<kRowsPerThread> softmax;
  float lse[kRowsPerThread];

  const int64_t bh_row = (static_cast<int64_t>(batch) * params.heads + head) * params.seqlen_q;
  const int64_t split_rows = static_cast<int64_t>(params.batch) * params.heads * params.seqlen_q;

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});

  if (n_block_end > n_block_begin) {
    const Element* q_ptr = static_cast<const Element*>(params.q) + batch * params.q_batch_stride +
                           head * params.q_head_stride + row_begin * params.q_row_stride;
    const Element* k_ptr = static_cast<const Element*>(params.k) + batch * params.k_batch_stride +
                           kv_head * params.k_head_stride;
    const Element* v_ptr = static_cast<const Element*>(params.v) + batch * params.v_batch_stride +
                           kv_head * params.v_head_stride;
    // Tiles address their rows with 32-bit offsets (row_stride * kBlockN < 2^31, checked at
    // launch); only the tile base pointer uses 64-bit arithmetic. 64-bit per-row addresses
    // would hold two registers each, and the d=128 loop has none to spare.
    const int q_row_stride = static_cast<int>(params.q_row_stride);
    const int k_row_stride = static_cast<int>(params.k_row_stride);
    const int v_row_stride = static_cast<int>(params.v_row_stride);
    Tensor gQ = make_tensor(make_gmem_ptr(q_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                            make_stride(q_row_stride, _1{}));
    auto kv_tile = [](const Element* base, int64_t row_stride64, int row_stride, int n) {
      return make_tensor(make_gmem_ptr(base + n * kBlockN * row_stride64),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(row_stride, _1{}));
    };
    Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
    Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
    Tensor sVtNoSwizzle = make_tensor(sV.data().get(), typename Traits::SmemLayoutVtNoSwizzle{});

    typename Traits::GmemTiledCopyQKV gmem_tiled_copy;
    auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(thread);
    Tensor tQgQ = gmem_thr_copy.partition_S(gQ);
    Tensor tQsQ = gmem_thr_copy.partition_D(sQ);
    Tensor tKsK = gmem_thr_copy.partition_D(sK);
    Tensor tVsV = gmem_thr_copy.partition_D(sV);
    auto tKgK = [&](int n) { return gmem_thr_copy.partition_S(kv_tile(k_ptr, params.k_row_stride, k_row_stride, n)); };
    auto tVgV = [&](int n) { return gmem_thr_copy.partition_S(kv_tile(v_ptr, params.v_row_stride, v_row_stride, n)); };
    Tensor tQcQ = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor tKVcKV = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    // The column predicate is the same for every row and every block: computed once.
    Tensor col_ok = make_tensor<bool>(Shape<Int<decltype(size<2>(tQsQ))::value>>{});
#pragma unroll
    for (int k = 0; k < size(col_ok); ++k) col_ok(k) = get<1>(tQcQ(0, 0, k)) < params.head_dim;

    auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
    auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
    auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
    Tensor tSsQ = smem_copy_q.get_thread_slice(thread).partition_S(sQ);
    Tensor tSsK = smem_copy_k.get_thread_slice(thread).partition_S(sK);
    Tensor tOsVt = smem_copy_v.get_thread_slice(thread).partition_S(sVt);
    Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
    Tensor tSrK = thr_mma.partition_fragment_B(sK);
    Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);

    Tensor s_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor s_coords_rowcol = make_tensor(s_coords.data(), accum_rowcol_layout(s_coords.layout()));
    const Softcap softcap = Softcap::make(params.softmax_scale, softcap_on ? params.softcap : 1.f);
    const int seqlen_k = mask.seqlen_k;
    int n_unmasked_begin, n_unmasked_end;
    mask.unmasked_key_block_range(row_begin, row_end, kBlockN, &n_unmasked_begin, &n_unmasked_end);

    load_tile<true>(gmem_tiled_copy, tQgQ, tQsQ, tQcQ, col_ok, mask.seqlen_q - row_begin);
    // The last key block is the only one that can extend past seqlen_k.
    {
      const int n = n_block_end - 1;
      load_tile<true>(gmem_tiled_copy, tKgK(n), tKsK, tKVcKV, col_ok, seqlen_k - n * kBlockN);
    }
    cp_async_fence();
    clear(acc_o);

    // One key block n; `next` is the block processed after it (its K is loaded here), below
    // n_block_begin for none. kMasked: per-element mask and row-checked V load. A compile-time flag and
    // separate loops (not a uniform run-time branch): the compiler if-converts such a branch and
    // then issues the mask's ~250 compares/selects predicated-off in every iteration, with the
    // registers they need (measured: d64 at 250 instead of >300 TFLOP/s, spills at d128).
    auto key_block = [&](int n, int next, auto masked) __attribute__((always_inline)) {
      constexpr bool kMasked = decltype(masked)::value;
      Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
      clear(acc_s);
      cp_async_wait<0>();
      __syncthreads();
      load_tile<kMasked>(gmem_tiled_copy, tVgV(n), tVsV, tKVcKV, col_ok, seqlen_k - n * kBlockN);
      cp_async_fence();

      gemm_smem_smem(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_copy_q, smem_copy_k, thread);
      if (softcap_on) softcap.apply(acc_s);
      if constexpr (kMasked) {
        mask.apply(acc_s, s_coords, row_begin, n * kBlockN);
        if constexpr (kTileStates) {
          if (tile_states[n - states_begin] == kTilePartial) {
            extras.apply_visibility(acc_s, s_coords, row_begin, n * kBlockN);
          }
        }
      }
      if constexpr (kScoreExtras) {
        if (extras.has_offsets()) extras.add_offsets(acc_s, s_coords, row_begin, n * kBlockN);
      }

      cp_async_wait<0>();
      __syncthreads();
      if (next >= n_block_begin) {
        load_tile<false>(gmem_tiled_copy, tKgK(next), tKsK, tKVcKV, col_ok, kBlockN);
        cp_async_fence();
      }

      Tensor acc_s_rowcol = make_tensor(acc_s.data(), accum_rowcol_layout(acc_s.layout()));
      softmax.update(acc_s_rowcol, acc_o_rowcol, scales.scale_log2);
      if constexpr (draws_dropout(kExtras)) {
        // After the row sums: dropout removes weights from the output, not from the softmax.
        // Each thread's two successive n8 atoms lie 8 columns apart in one 16-column span (one
        // warp along N), so one Philox call serves both (DropoutDraws::for_each_draw).
        if (dropout_active<kExtras>(extras)) {
          draws.for_each_draw(s_coords_rowcol, row_begin, n * kBlockN, [&](int r, int c, bool kept) {
            if (!kept) acc_s_rowcol(r, c) = 0.f;
          });
        }
      }
      Tensor p = make_tensor<Element>(accum_as_operand_a_layout(acc_s.layout()));
      convert_fragment(acc_s, p);
      gemm_regs_smem(acc_o, p, tOrVt, tOsVt, tiled_mma, smem_copy_v, thread);
    };

    // Blocks from n_block_end - 1 down: first the partially masked ones (sequence tail, causal
    // diagonal, window right edge), then the unmasked interval, then those at the window's left
    // edge. Only unmasked blocks lie inside seqlen_k entirely, so only masked ones check rows.
    softmax.init();
    if constexpr (kTileStates) {
      for (int n = n_block_end - 1; n >= n_block_begin;) {
        const int next = visible_block_at_or_below(tile_states, states_begin, n_block_begin, n - 1);
        if (tile_states[n - states_begin] == kTileFull) {
          key_block(n, next, cute::false_type{});
        } else {
          key_block(n, next, cute::true_type{});
        }
        n = next;
      }
    } else {
      int n = n_block_end - 1;
      for (; n >= n_block_begin && n >= n_unmasked_end; --n) key_block(n, n - 1, cute::true_type{});
      for (; n >= n_block_begin && n >= n_unmasked_begin; --n) key_block(n, n - 1, cute::false_type{});
      for (; n >= n_block_begin; --n) key_block(n, n - 1, cute::true_type{});
    }
    softmax.finalize(acc_o_rowcol, scales.scale, lse);
    if constexpr (draws_dropout(kExtras)) {
      if (dropout_active<kExtras>(extras)) {
#pragma unroll
        for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= params.dropout_scale;
      }
    }
  } else {
    // No key visible to any row of this block (or of this split): output 0, lse -inf.
    clear(acc_o);
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) lse[r] = -INFINITY;
  }

  // Rows past q_lengths[b] see no key: written as fully masked rows (their zero-filled queries
  // took part in the loop above only to keep it free of row checks).
  // The limit is re-read rather than kept live in a register through the main loop.
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

  // lse: the lane holding column 0 of a row writes it.
  if (get<1>(o_coords_rowcol(0, 0)) == 0) {
    float* lse_out = kSplit ? params.lse_accum + split * split_rows + bh_row : params.lse + bh_row;
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = row_begin + get<0>(o_coords_rowcol(r, 0));
      if (row < params.seqlen_q) lse_out[row] = lse[r];
    }
  }

  if (kSplit) {
    // Partial outputs in fp32 straight from registers: two adjacent columns per store.
    float* out_accum = params.out_accum + (split * split_rows + bh_row + row_begin) * kHeadDim;
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = get<0>(o_coords_rowcol(r, 0));
      if (row_begin + row < params.seqlen_q) {
#pragma unroll
        for (int c = 0; c < size<1>(acc_o_rowcol); c += 2) {
          const int col = get<1>(o_coords_rowcol(r, c));
          *reinterpret_cast<float2*>(out_accum + static_cast<int64_t>(row) * kHeadDim + col) =
              make_float2(acc_o_rowcol(r, c), acc_o_rowcol(r, c + 1));
        }
      }
    }
    return;
  }

  // Output through shared memory (the Q tile's space, which no warp reads any more: every warp
  // passed the barrier after its last Q K^T) so that global stores are 16-byte and coalesced.
  Tensor acc_o_converted = make_tensor<Element>(acc_o.layout());
  convert_fragment(acc_o, acc_o_converted);
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});
  auto smem_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto smem_thr_copy_o = smem_copy_o.get_thread_slice(thread);
  copy(smem_copy_o, smem_thr_copy_o.retile_S(acc_o_converted), smem_thr_copy_o.partition_D(sO));
  __syncthreads();

  Element* o_ptr = static_cast<Element*>(params.out) + batch * params.o_batch_stride +
                   head * params.o_head_stride + row_begin * params.o_row_stride;
  Tensor gO = make_tensor(make_gmem_ptr(o_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                          make_stride(params.o_row_stride, _1{}));
  typename Traits::GmemTiledCopyO gmem_copy_o;
  auto gmem_thr_copy_o = gmem_copy_o.get_thread_slice(thread);
  Tensor tOsO = gmem_thr_copy_o.partition_S(sO);
  Tensor tOgO = gmem_thr_copy_o.partition_D(gO);
  Tensor tOcO = gmem_thr_copy_o.partition_D(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tOrO = make_tensor<Element>(shape(tOgO));
  copy(gmem_copy_o, tOsO, tOrO);
#pragma unroll
  for (int m = 0; m < size<1>(tOrO); ++m) {
    if (row_begin + get<0>(tOcO(0, m, 0)) < params.seqlen_q) {
#pragma unroll
      for (int k = 0; k < size<2>(tOrO); ++k) {
        if (get<1>(tOcO(0, m, k)) < params.head_dim) copy(gmem_copy_o, tOrO(_, m, k), tOgO(_, m, k));
      }
    }
  }
}

// Merges the num_splits partial results of each query row by their lse:
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) * out_s.
// One warp per (batch, head, row); lane j handles columns j, j + 32, ... (coalesced reads).
template <typename Element, int kHeadDim, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) fwd_combine_kernel(const __grid_constant__ FwdParams params) {
  constexpr int kColsPerLane = kHeadDim / 32;
  const int lane = threadIdx.x % 32;
  const int64_t total_rows = static_cast<int64_t>(params.batch) * params.heads * params.seqlen_q;
  const int64_t row_id = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row_id >= total_rows) return;
  const int num_splits = params.num_splits;

  float lse_max = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) lse_max = fmaxf(lse_max, params.lse_accum[s * total_rows + row_id]);
  lse_max = lanes_max<32>(lse_max);
  float sum = 0.f;
  if (lse_max != -INFINITY) {
    for (int s = lane; s < num_splits; s += 32) sum += __expf(params.lse_accum[s * total_rows + row_id] - lse_max);
  }
  sum = lanes_sum<32>(sum);
  const float lse = sum > 0.f ? lse_max + __logf(sum) : -INFINITY;
  if (lane == 0) params.lse[row_id] = lse;

  float acc[kColsPerLane];
#pragma unroll
  for (int j = 0; j < kColsPerLane; ++j) acc[j] = 0.f;
  if (lse != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      const float weight = __expf(params.lse_accum[s * total_rows + row_id] - lse);
      const float* partial = params.out_accum + (s * total_rows + row_id) * kHeadDim;
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) acc[j] += weight * partial[j * 32 + lane];
    }
  }

  const int64_t bh = row_id / params.seqlen_q;
  const int row = static_cast<int>(row_id - bh * params.seqlen_q);
  const int batch = static_cast<int>(bh / params.heads);
  const int head = static_cast<int>(bh - static_cast<int64_t>(batch) * params.heads);
  Element* out = static_cast<Element*>(params.out) + batch * params.o_batch_stride +
                 head * params.o_head_stride + row * params.o_row_stride;
#pragma unroll
  for (int j = 0; j < kColsPerLane; ++j) {
    const int col = j * 32 + lane;
    if (col < params.head_dim) out[col] = static_cast<Element>(acc[j]);
  }
}

}  // namespace sm80
}  // namespace flash_jax
