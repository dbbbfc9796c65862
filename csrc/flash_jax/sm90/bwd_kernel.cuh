// Backward dK/dV kernel for Hopper (sm_90a) with the atomic dQ accumulation: the sm80 backward's
// work split (bwd_kernel.cuh: one CTA per key block looping over query blocks, dQ added into the
// fp32 dq_accum) with warpgroup MMAs. Each of the two warpgroups owns 64 of the CTA's 128 keys,
// so the scores come out transposed, keys by queries, and stay in registers as the A operand of
// dV += P^T dO and dK += dS^T Q; only dS goes through shared memory, for dQ = dS K, where the
// warpgroups split the head dimension. Per query block of 64 rows:
//   wait Q, dO, lse, D | barrier | issue the loads of the next query block
//   issue S^T = K Q^T and dP^T = V dO^T | wait S^T: mask, P^T | wait dP^T: dS^T = P^T (dP^T - D)
//   issue dV += P^T dO and dK += dS^T Q (P, dS from registers) | dS^T to shared memory
//   barrier | dQ = dS K | reductions into dq_accum
// Band masks and lengths, and (kExtras = kVisibility) segment ids, positions and a dense mask,
// whose query blocks are classified first (common/extras.cuh) so that only visible ones are
// visited; no softcap, bias, ALiBi or dropout, not deterministic: those run on the sm80 kernels
// (dispatch.cu). Preprocess and dQ conversion are the sm80 ones.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "flash_jax/common/extras.cuh"
#include "flash_jax/common/fragment.cuh"
#include "flash_jax/common/mask.cuh"
#include "flash_jax/common/softmax.cuh"
#include "flash_jax/params.h"
#include "flash_jax/sm80/bwd_helpers.cuh"
#include "flash_jax/sm80/bwd_kernel.cuh"
#include "flash_jax/sm80/fwd_kernel.cuh"
#include "flash_jax/sm90/wgmma.cuh"

namespace flash_jax {
namespace sm90 {

template <typename Element_, int kHeadDim_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;   // query rows per step: one warpgroup tile of dQ
  static constexpr int kBlockN = 128;  // keys per CTA: 64 per warpgroup
  static constexpr int kWarpGroups = kBlockN / 64;
  static constexpr int kNThreads = kWarpGroups * 128;
  static constexpr int kStages = 2;
  static_assert(kHeadDim % 64 == 0 && kHeadDim / kWarpGroups % 8 == 0, "head-dim bucket");

  using M = cute::Int<kBlockM>;
  using N = cute::Int<kBlockN>;
  using D = cute::Int<kHeadDim>;
  using AlongM = cute::Layout<cute::Shape<cute::Int<kWarpGroups>, cute::_1, cute::_1>>;
  // S^T = K Q^T and dP^T = V dO^T: (keys, queries), all operands K-major in shared memory.
  using TiledMmaSdP = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, cute::Shape<N, M, D>>(), AlongM{}));
  // dV += P^T dO, dK += dS^T Q: (keys, head_dim), A from registers, B = dO / Q read transposed.
  using TiledMmaDkDv = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<N, D, M>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      AlongM{}));
  // dQ = dS K: (queries, head_dim), the warpgroups side by side along head_dim.
  using TiledMmaDq = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<M, cute::Int<kHeadDim / kWarpGroups>, N>,
                                 cute::GMMA::Major::MN, cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::_1, cute::Int<kWarpGroups>, cute::_1>>{}));

  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<M, D, cute::Int<kStages>>{}));  // also dO
  using SmemLayoutQt = decltype(cute::composition(
      SmemLayoutQ{}, cute::make_ordered_layout(cute::Shape<D, M, cute::Int<kStages>>{},
                                               cute::Step<cute::_2, cute::_1, cute::_3>{})));
  using SmemLayoutKV = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<N, D>{}));
  using SmemLayoutKt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_ordered_layout(cute::Shape<D, N>{}, cute::Step<cute::_2, cute::_1>{})));
  // dS as the (queries, keys) A operand of dQ, queries contiguous; written as dS^T (keys,
  // queries) from the accumulators.
  using SmemLayoutdS = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<Element>{},
                                                    cute::Shape<M, N>{}));
  using SmemLayoutdSt = decltype(cute::composition(
      SmemLayoutdS{},
      cute::make_ordered_layout(cute::Shape<N, M>{}, cute::Step<cute::_2, cute::_1>{})));

  using GmemTiledCopy = typename CpAsyncRowsCopy<Element, kNThreads>::TiledCopy;
  static constexpr int kElemsPerVector = CpAsyncRowsCopy<Element, kNThreads>::kElemsPerVector;

  static constexpr int kElemBytes = static_cast<int>(sizeof(Element));
  static constexpr int kSmemQBytes = kStages * kBlockM * kHeadDim * kElemBytes;  // Q, and dO
  static constexpr int kSmemKVBytes = kBlockN * kHeadDim * kElemBytes;           // K, and V
  static constexpr int kSmemdSBytes = kBlockM * kBlockN * kElemBytes;
  static constexpr int kSmemStatsBytes = 2 * kStages * kBlockM * 4;  // lse, D
  static constexpr int kSmemBytes = 2 * kSmemQBytes + 2 * kSmemKVBytes + kSmemdSBytes + kSmemStatsBytes;
  // dK and dV leave through shared memory one after the other, as padded rows (see the forward).
  static constexpr int kOutRowElems = kHeadDim + 8;
  static_assert(kBlockN * kOutRowElems * kElemBytes <= 2 * kSmemQBytes + kSmemKVBytes,
                "output staging fits below V");
};

// Grid: (key blocks, heads, batch), 256 threads. kExtras: kNone or kVisibility; the latter's
// Extras and tile states follow the tiles in shared memory.
template <typename Traits, ExtrasLevel kExtras>
__global__ void __launch_bounds__(Traits::kNThreads, 1) dkdv_kernel(const __grid_constant__ BwdParams params) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;

  extern __shared__ __align__(1024) char smem[];

  const int n_block = blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int thread = threadIdx.x;
  const int kv_head = head / (params.heads / params.kv_heads);

  const KeyRangeMask mask = KeyRangeMask::make(params, batch);
  const int key_begin = n_block * kBlockN;
  int first_row, end_row;
  mask.query_row_range(key_begin, min(key_begin + kBlockN, mask.seqlen_k), &first_row, &end_row);
  int m_block_begin = first_row / kBlockM;
  int m_block_end = end_row > first_row ? (end_row + kBlockM - 1) / kBlockM : m_block_begin;
  const float scale_log2 = params.softmax_scale * bwd::kLog2e;
  static_assert(kExtras == ExtrasLevel::kNone || kExtras == ExtrasLevel::kVisibility,
                "the Hopper backward takes no score extras");
  constexpr bool kTileStates = classifies_tiles(kExtras);
  Extras* extras = reinterpret_cast<Extras*>(smem + Traits::kSmemBytes);
  uint8_t* tile_states = reinterpret_cast<uint8_t*>(smem) + Traits::kSmemBytes + kExtrasSmemBytes;
  const int states_begin = m_block_begin;
  Extras unused_registers{};
  prepare_extras<kExtras, Traits::kNThreads, kBlockM, false>(
      extras, unused_registers, params, batch, head, params.softmax_scale, mask, key_begin,
      min(key_begin + kBlockN, mask.seqlen_k), kBlockN, m_block_begin, m_block_end, tile_states);

  const int64_t bh = int64_t(batch) * params.heads + head;
  const int seqlen_q_padded = bwd::padded_seqlen_q(params.seqlen_q);
  const float* lse = params.lse + bh * params.seqlen_q;
  const float* softmax_d = params.softmax_d + bh * seqlen_q_padded;
  float* dq_accum = params.dq_accum + bh * seqlen_q_padded * kHeadDim;

  Element* smem_q = reinterpret_cast<Element*>(smem);
  Element* smem_do = smem_q + Traits::kSmemQBytes / Traits::kElemBytes;
  Element* smem_k = smem_do + Traits::kSmemQBytes / Traits::kElemBytes;
  Element* smem_v = smem_k + Traits::kSmemKVBytes / Traits::kElemBytes;
  Element* smem_ds = smem_v + Traits::kSmemKVBytes / Traits::kElemBytes;
  float* smem_lse = reinterpret_cast<float*>(smem_ds + Traits::kSmemdSBytes / Traits::kElemBytes);
  float* smem_d = smem_lse + kStages * kBlockM;

  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQt{});
  Tensor sdO = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutQ{});
  Tensor sdOt = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutQt{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{});
  Tensor sKt = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKt{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutKV{});
  Tensor sdS = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutdS{});
  Tensor sdSt = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutdSt{});

  typename Traits::TiledMmaSdP tiled_mma_sdp;
  typename Traits::TiledMmaDkDv tiled_mma_dkdv;
  typename Traits::TiledMmaDq tiled_mma_dq;
  auto thr_mma_sdp = tiled_mma_sdp.get_thread_slice(thread);
  auto thr_mma_dkdv = tiled_mma_dkdv.get_thread_slice(thread);
  auto thr_mma_dq = tiled_mma_dq.get_thread_slice(thread);

  Tensor acc_dk = partition_fragment_C(tiled_mma_dkdv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(tiled_mma_dkdv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  if (m_block_begin < m_block_end) {
    const Element* q_base = static_cast<const Element*>(params.q) + batch * params.q_batch_stride +
                            head * params.q_head_stride;
    const Element* do_base = static_cast<const Element*>(params.dout) +
                             batch * params.do_batch_stride + head * params.do_head_stride;
    const Element* k_base = static_cast<const Element*>(params.k) + batch * params.k_batch_stride +
                            kv_head * params.k_head_stride + key_begin * params.k_row_stride;
    const Element* v_base = static_cast<const Element*>(params.v) + batch * params.v_batch_stride +
                            kv_head * params.v_head_stride + key_begin * params.v_row_stride;
    auto rows_tile = [](const Element* base, int64_t row_stride, auto rows) {
      return make_tensor(make_gmem_ptr(base), Shape<decltype(rows), Int<kHeadDim>>{},
                         make_stride(static_cast<int>(row_stride), _1{}));
    };
    typename Traits::GmemTiledCopy gmem_tiled_copy;
    auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(thread);
    Tensor tQcQ = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor tKcK = gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    Tensor col_ok = make_tensor<bool>(Shape<Int<decltype(size<2>(tQcQ))::value>>{});
#pragma unroll
    for (int k = 0; k < size(col_ok); ++k) col_ok(k) = get<1>(tQcQ(0, 0, k)) < params.head_dim;
    Tensor tQsQ = gmem_thr_copy.partition_D(sQ);  // (CPY, CPY_M, CPY_K, stage)
    Tensor tdOsdO = gmem_thr_copy.partition_D(sdO);
    Tensor tKsK = gmem_thr_copy.partition_D(sK);
    Tensor tVsV = gmem_thr_copy.partition_D(sV);

    // Q, dO of query block m and its lse (-inf past the valid rows) and D (padded: in bounds).
    auto load_q_do = [&](int m, int stage) {
      const int row_begin = m * kBlockM;
      const int rows = mask.seqlen_q - row_begin;
      Tensor q_dst = tQsQ(_, _, _, stage);
      Tensor do_dst = tdOsdO(_, _, _, stage);
      sm80::load_tile<true>(gmem_tiled_copy,
                            gmem_thr_copy.partition_S(rows_tile(q_base + row_begin * params.q_row_stride, params.q_row_stride, Int<kBlockM>{})),
                            q_dst, tQcQ, col_ok, rows);
      sm80::load_tile<true>(gmem_tiled_copy,
                            gmem_thr_copy.partition_S(rows_tile(do_base + row_begin * params.do_row_stride, params.do_row_stride, Int<kBlockM>{})),
                            do_dst, tQcQ, col_ok, rows);
      if (thread < kBlockM) {
        const int row = row_begin + thread;
        bwd::cp_async_f32(smem_d + stage * kBlockM + thread, softmax_d + row);
        if (row < mask.seqlen_q) {
          bwd::cp_async_f32(smem_lse + stage * kBlockM + thread, lse + row);
        } else {
          smem_lse[stage * kBlockM + thread] = -INFINITY;
        }
      }
    };

    Tensor tSrK = thr_mma_sdp.partition_fragment_A(sK);
    Tensor tSrQ = thr_mma_sdp.partition_fragment_B(sQ);    // (MMA, MMA_N, MMA_K, stage)
    Tensor tdPrV = thr_mma_sdp.partition_fragment_A(sV);
    Tensor tdPrdO = thr_mma_sdp.partition_fragment_B(sdO);
    Tensor tdVrdOt = thr_mma_dkdv.partition_fragment_B(sdOt);
    Tensor tdKrQt = thr_mma_dkdv.partition_fragment_B(sQt);
    Tensor tdQrdS = thr_mma_dq.partition_fragment_A(sdS);
    Tensor tdQrKt = thr_mma_dq.partition_fragment_B(sKt);
    Tensor tdSsdS = thr_mma_sdp.partition_C(sdSt);  // where this thread's dS^T entries go

    Tensor acc_s = partition_fragment_C(tiled_mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor acc_dp = partition_fragment_C(tiled_mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor scores = make_tensor(acc_s.data(), accum_rowcol_layout(acc_s.layout()));
    Tensor dscores = make_tensor(acc_dp.data(), accum_rowcol_layout(acc_dp.layout()));
    // (key, query) inside the tile of every score this thread owns.
    Tensor coords_s = thr_mma_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
    Tensor coords_rowcol = make_tensor(coords_s.data(), accum_rowcol_layout(coords_s.layout()));
    constexpr int kCols = decltype(size<1>(coords_rowcol))::value;
    Tensor p = make_tensor<Element>(accum_as_operand_a_layout(acc_s.layout()));
    Tensor ds = make_tensor<Element>(accum_as_operand_a_layout(acc_dp.layout()));
    Tensor ds_c = make_tensor(ds.data(), acc_dp.layout());
    Tensor coords_dq = thr_mma_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

    const int kv_rows = mask.seqlen_k - key_begin;
    sm80::load_tile<true>(gmem_tiled_copy, gmem_thr_copy.partition_S(rows_tile(k_base, params.k_row_stride, Int<kBlockN>{})),
                          tKsK, tKcK, col_ok, kv_rows);
    sm80::load_tile<true>(gmem_tiled_copy, gmem_thr_copy.partition_S(rows_tile(v_base, params.v_row_stride, Int<kBlockN>{})),
                          tVsV, tKcK, col_ok, kv_rows);
    load_q_do(m_block_begin, 0);
    cp_async_fence();

    // The i-th visited query block goes to stage i % 2.
    for (int m = m_block_begin, next = 0, stage = 0; m < m_block_end; m = next, stage ^= 1) {
      const int row_begin = m * kBlockM;
      if constexpr (kTileStates) {
        next = visible_block_at_or_above(tile_states, states_begin, m_block_end, m + 1);
      } else {
        next = m + 1;
      }
      cp_async_wait<0>();
      fence_async_shared();
      __syncthreads();
      if (next < m_block_end) load_q_do(next, stage ^ 1);
      cp_async_fence();

      warpgroup_gemm<true, -1>(tiled_mma_sdp, tSrK, tSrQ(_, _, _, stage), acc_s);
      warpgroup_gemm<true, -1>(tiled_mma_sdp, tdPrV, tdPrdO(_, _, _, stage), acc_dp);
      // Per column (query) statistics, read while the products run; lse and D are not live
      // together (with both, the d128 kernel spilled 96 bytes).
      float column_stat[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        column_stat[c] = bwd::lse_to_exp2_offset(smem_lse[stage * kBlockM + get<1>(coords_rowcol(0, c))]);
      }
      warpgroup_wait<1>();
      fence_fragment(acc_s);
      if (!mask.tile_fully_allowed(row_begin, min(row_begin + kBlockM, params.seqlen_q), key_begin,
                                   key_begin + kBlockN)) {
#pragma unroll
        for (int i = 0; i < size(acc_s); ++i) {
          if (!mask.allowed(row_begin + get<1>(coords_s(i)), key_begin + get<0>(coords_s(i)))) {
            acc_s(i) = -INFINITY;
          }
        }
      }
      if constexpr (kTileStates) {
        if (tile_states[m - states_begin] == kTilePartial) {
#pragma unroll
          for (int i = 0; i < size(acc_s); ++i) {
            const int row = row_begin + get<1>(coords_s(i));
            const int col = key_begin + get<0>(coords_s(i));
            if (row < extras->seqlen_q && col < extras->seqlen_k && !extras->visible(row, col)) {
              acc_s(i) = -INFINITY;
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < size<0>(scores); ++r) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) scores(r, c) = fast_exp2(scores(r, c) * scale_log2 - column_stat[c]);
      }
#pragma unroll
      for (int c = 0; c < kCols; ++c) column_stat[c] = smem_d[stage * kBlockM + get<1>(coords_rowcol(0, c))];
      warpgroup_wait<0>();
      fence_fragment(acc_dp);
#pragma unroll
      for (int r = 0; r < size<0>(scores); ++r) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) dscores(r, c) = scores(r, c) * (dscores(r, c) - column_stat[c]);
      }
      convert_fragment(acc_s, p);
      convert_fragment(acc_dp, ds);
      warpgroup_gemm<false, -1>(tiled_mma_dkdv, p, tdVrdOt(_, _, _, stage), acc_dv);
      warpgroup_gemm<false, -1>(tiled_mma_dkdv, ds, tdKrQt(_, _, _, stage), acc_dk);
      copy(ds_c, tdSsdS);
      fence_async_shared();
      __syncthreads();
      Tensor acc_dq = partition_fragment_C(tiled_mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
      warpgroup_gemm<true, 0>(tiled_mma_dq, tdQrdS, tdQrKt, acc_dq);
      fence_fragment(acc_dv);
      fence_fragment(acc_dk);
      fence_fragment(p);
      fence_fragment(ds);
      float* dq_block = dq_accum + int64_t(row_begin) * kHeadDim;
      // Flat accumulator indices 2i and 2i + 1 are adjacent columns of one row.
#pragma unroll
      for (int i = 0; i < size(acc_dq); i += 2) {
        bwd::reduce_add_pair(dq_block + get<0>(coords_dq(i)) * kHeadDim + get<1>(coords_dq(i)),
                             acc_dq(i), acc_dq(i + 1));
      }
    }
  }

  // dK (times softmax_scale, the factor of d logit / d(q.k)) and dV through shared memory (the Q,
  // dO and K space, free once every warpgroup passed the barrier below) to 16-byte stores.
#pragma unroll
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= params.softmax_scale;
  Tensor coords_kv = thr_mma_dkdv.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  Element* staging = reinterpret_cast<Element*>(smem);
  constexpr int kOutRow = Traits::kOutRowElems;
  constexpr int kVectors = kHeadDim / Traits::kElemsPerVector;
  auto store = [&](auto& acc, void* out, int64_t batch_stride, int64_t row_stride,
                   int64_t head_stride) {
    Tensor converted = make_tensor<Element>(acc.layout());
    convert_fragment(acc, converted);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < size(converted); i += 2) {
      Element pair[2] = {converted(i), converted(i + 1)};
      *reinterpret_cast<uint32_t*>(staging + get<0>(coords_kv(i)) * kOutRow + get<1>(coords_kv(i))) =
          *reinterpret_cast<uint32_t*>(pair);
    }
    __syncthreads();
    Element* base = static_cast<Element*>(out) + batch * batch_stride + head * head_stride;
#pragma unroll
    for (int i = thread; i < kBlockN * kVectors; i += Traits::kNThreads) {
      const int row = i / kVectors;
      const int col = (i % kVectors) * Traits::kElemsPerVector;
      if (key_begin + row < params.seqlen_k && col < params.head_dim) {
        *reinterpret_cast<uint4*>(base + (key_begin + row) * row_stride + col) =
            *reinterpret_cast<const uint4*>(staging + row * kOutRow + col);
      }
    }
  };
  store(acc_dk, params.dk, params.dk_batch_stride, params.dk_row_stride, params.dk_head_stride);
  store(acc_dv, params.dv, params.dv_batch_stride, params.dv_row_stride, params.dv_head_stride);
}

}  // namespace sm90
}  // namespace flash_jax
