// Backward kernels for sm80-class GPUs (mma.sync m16n8k16, ldmatrix, cp.async), run in order on
// one stream by launch_bwd (bwd_launch.cuh):
//
//   1. preprocess_kernel   D = rowsum(dO * O) - dlse per query row into softmax_d; zeroes
//                          dq_accum (atomic variant only).
//   2. dkdv_kernel         one CTA per (key block, head, batch); loops over the query blocks that
//                          see the key block, recomputes P = exp2(S * scale_log2 - lse * log2e)
//                          and accumulates dV += P^T dO and dK += dS^T Q in registers, with
//                          dS = P * (dP - D), dP = dO V^T. The atomic variant also adds dQ = dS K
//                          into the fp32 dq_accum with reductions.
//   3a. convert_dq_kernel  dq = dq_accum * softmax_scale in the input dtype (atomic variant), or
//   3b. dq_kernel          deterministic variant: one CTA per (query block, head, batch) loops over
//                          key blocks recomputing S, P, dP, dS and accumulates dQ in registers in a
//                          fixed order. Costs two recomputed products (S and dP) per tile: 7 block
//                          products per tile instead of 5; measured 1.2-1.35x the time of the
//                          atomic variant on H100 (benchmarks/NOTES.md).
//
// The gradient of the lse output enters only through D (softmax_d = rowsum(dO * O) - dlse), so
// dS = P * (dP - rowsum(dO * O) + dlse). Rows with lse = -inf (no visible key) and rows past
// seqlen_q use lse = +inf, making P and dS exactly zero there. Rows past q_lengths[b] and keys
// past kv_lengths[b] are treated like rows and keys past the sequence ends: zero-filled loads
// (never reading what the caller left there, which may be NaN), lse = -inf and D = 0, so they
// contribute nothing and their gradients are zero.
//
// kExtras (params.h): kVisibility for segment ids, positions and a dense mask; kAll adds bias,
// ALiBi, dropout and a run-time softcap. With these two each CTA classifies the tiles it walks
// into shared memory first (classify_tiles) and visits only visible ones. kDropout: the plain
// loops plus dropout. Dropout: dS = P * (dP * keep / (1 - rate) - D) and dV accumulates the kept
// P (scaled by 1 / (1 - rate) at the end). At kAll the dK/dV kernel also writes dbias =
// dL/dlogit, the dS before the softcap factor.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "flash_jax/common/extras.cuh"
#include "flash_jax/common/fragment.cuh"
#include "flash_jax/common/mask.cuh"
#include "flash_jax/common/score_mod.cuh"
#include "flash_jax/common/softmax.cuh"
#include "flash_jax/params.h"
#include "flash_jax/sm80/bwd_helpers.cuh"
#include "flash_jax/sm80/bwd_traits.cuh"

namespace flash_jax {
namespace bwd {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ inline int padded_seqlen_q(int seqlen_q) {
  return (seqlen_q + kBwdSeqlenQPadMultiple - 1) / kBwdSeqlenQPadMultiple * kBwdSeqlenQPadMultiple;
}

// ---------------------------------------------------------------------------------------------
// Row-vector kernels (preprocess, dq conversion): one 16-byte vector of 8 head-dim elements per
// thread, the threads of a row a power of two so that a shuffle reduction closes the row.
template <int kHeadDim>
struct RowVectorShape {
  static constexpr int kVectors = kHeadDim / 8;
  static constexpr int kThreadsPerRow =
      kVectors <= 4 ? 4 : (kVectors <= 8 ? 8 : (kVectors <= 16 ? 16 : 32));
  static constexpr int kThreads = 256;
  static constexpr int kRowsPerBlock = kThreads / kThreadsPerRow;
  static_assert(kBwdSeqlenQPadMultiple % kRowsPerBlock == 0, "blocks must tile the padded rows");
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(256)
    preprocess_kernel(const __grid_constant__ BwdParams params, bool zero_dq_accum) {
  using Shape = RowVectorShape<kHeadDim>;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int row = blockIdx.x * Shape::kRowsPerBlock + threadIdx.x / Shape::kThreadsPerRow;
  const int col = (threadIdx.x % Shape::kThreadsPerRow) * 8;
  const int64_t bh = int64_t(batch) * params.heads + head;
  const int64_t padded_row = bh * padded_seqlen_q(params.seqlen_q) + row;
  // Rows past q_lengths[b] get D = 0 like the padding: their out/dout are never read.
  const int q_limit = KeyRangeMask::valid_length(params.seqlen_q, params.q_lengths, batch);

  float dot = 0.f;
  if (row < q_limit && col < params.head_dim) {
    const Element* out = static_cast<const Element*>(params.out) + batch * params.o_batch_stride +
                         row * params.o_row_stride + head * params.o_head_stride + col;
    const Element* dout = static_cast<const Element*>(params.dout) +
                          batch * params.do_batch_stride + row * params.do_row_stride +
                          head * params.do_head_stride + col;
    cutlass::NumericArrayConverter<float, Element, 8> to_float;
    const auto out_f = to_float(*reinterpret_cast<const cutlass::Array<Element, 8>*>(out));
    const auto dout_f = to_float(*reinterpret_cast<const cutlass::Array<Element, 8>*>(dout));
#pragma unroll
    for (int i = 0; i < 8; ++i) dot += out_f[i] * dout_f[i];
  }
  dot = lanes_sum<Shape::kThreadsPerRow>(dot);
  if (threadIdx.x % Shape::kThreadsPerRow == 0) {
    float d = 0.f;
    if (row < q_limit) {
      d = dot - (params.dlse != nullptr ? params.dlse[bh * params.seqlen_q + row] : 0.f);
    }
    params.softmax_d[padded_row] = d;
  }
  if (zero_dq_accum && col < kHeadDim) {
    float4* accum = reinterpret_cast<float4*>(params.dq_accum + padded_row * kHeadDim + col);
    accum[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    accum[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(256) convert_dq_kernel(const __grid_constant__ BwdParams params) {
  using Shape = RowVectorShape<kHeadDim>;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int row = blockIdx.x * Shape::kRowsPerBlock + threadIdx.x / Shape::kThreadsPerRow;
  const int col = (threadIdx.x % Shape::kThreadsPerRow) * 8;
  if (row >= params.seqlen_q || col >= params.head_dim) return;
  const int64_t bh = int64_t(batch) * params.heads + head;
  const float* accum =
      params.dq_accum + (bh * padded_seqlen_q(params.seqlen_q) + row) * kHeadDim + col;
  cutlass::Array<float, 8> values;
  *reinterpret_cast<float4*>(&values[0]) = reinterpret_cast<const float4*>(accum)[0];
  *reinterpret_cast<float4*>(&values[4]) = reinterpret_cast<const float4*>(accum)[1];
#pragma unroll
  for (int i = 0; i < 8; ++i) values[i] *= params.softmax_scale;
  cutlass::NumericArrayConverter<Element, float, 8> to_element;
  Element* dq = static_cast<Element*>(params.dq) + batch * params.dq_batch_stride +
                row * params.dq_row_stride + head * params.dq_head_stride + col;
  *reinterpret_cast<cutlass::Array<Element, 8>*>(dq) = to_element(values);
}

// ---------------------------------------------------------------------------------------------
// Per-tile pieces shared by dkdv_kernel and dq_kernel.

// lse of one row as the offset of its exp2: rows past seqlen_q and fully masked rows (lse =
// -inf) get +inf so that their probabilities are exactly 0.
__device__ __forceinline__ float lse_to_exp2_offset(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// lse (as an exp2 offset) and D for the kRows accumulator rows this thread owns in a query block
// starting at row_begin, read from global memory.
template <int kRows, typename RowColCoords>
__device__ __forceinline__ void load_row_stats(const float* lse, const float* softmax_d,
                                               int seqlen_q, int row_begin,
                                               const RowColCoords& coords,
                                               float (&lse_log2)[kRows], float (&row_d)[kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = row_begin + static_cast<int>(get<0>(coords(r, 0)));
    lse_log2[r] = lse_to_exp2_offset(row < seqlen_q ? lse[row] : -INFINITY);
    row_d[r] = softmax_d[row];  // softmax_d has padded rows (zeros) past seqlen_q
  }
}

// The same from a block's lse and D staged in shared memory (rows past seqlen_q hold -inf).
template <int kRows, typename RowColCoords>
__device__ __forceinline__ void row_stats_from_smem(const float* smem_lse, const float* smem_d,
                                                    const RowColCoords& coords,
                                                    float (&lse_log2)[kRows],
                                                    float (&row_d)[kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = static_cast<int>(get<0>(coords(r, 0)));
    lse_log2[r] = lse_to_exp2_offset(smem_lse[row]);
    row_d[r] = smem_d[row];
  }
}

// From the raw scores S = q.k (acc_s) and dP = dO V^T (acc_dp) of one tile, in place:
// acc_s <- P = exp2(logit * log2e - lse * log2e) and acc_dp <- dS = P * (dP - D), the gradient
// w.r.t. the logit times d logit / d(q.k) / softmax_scale (the softmax_scale factor is applied
// once to dK and dQ at the end). With softcap the logit is softcap * t, t = tanh(q.k * scale /
// softcap), and the extra factor is 1 - t^2; masked entries (t = -inf, P = 0) clamp it to 0 so
// that 0 * inf never appears.
// With tile states, tile_partial says that the tile needs the per-element visibility test; at
// kAll dbias(row, col, dL/dlogit) receives every in-sequence entry's logit gradient. softcap_on is
// kSoftcap, or the run-time flag of the kAll variant.
template <ExtrasLevel kExtras, int kRows, typename AccS, typename AccDp, typename Coords,
          typename DbiasSink>
__device__ __forceinline__ void probs_and_dscores(
    AccS& acc_s, AccDp& acc_dp, const Coords& coords, const KeyRangeMask& mask,
    const Extras& extras, const DropoutDraws& draws, bool tile_partial, bool softcap_on,
    const Softcap& softcap, float scale_log2, const float (&lse_log2)[kRows],
    const float (&row_d)[kRows], int row_begin, int row_end, int col_begin, int col_block,
    float dropout_scale, const DbiasSink& dbias) {
  constexpr bool kScoreExtras = kExtras == ExtrasLevel::kAll;
  if (softcap_on) softcap.apply(acc_s);
  if (!mask.tile_fully_allowed(row_begin, row_end, col_begin, col_begin + col_block)) {
    mask.apply(acc_s, coords, row_begin, col_begin);
  }
  Tensor scores = accum_rowcol(acc_s);
  Tensor dscores = accum_rowcol(acc_dp);
  Tensor coords_rowcol = make_tensor(coords.data(), accum_rowcol_layout(coords.layout()));
  bool offsets = false;
  if constexpr (classifies_tiles(kExtras)) {
    if (tile_partial && extras.has_visibility()) {
      extras.apply_visibility(acc_s, coords, row_begin, col_begin);
    }
  }
  if constexpr (kScoreExtras) offsets = extras.has_offsets();
  const bool dropout = dropout_active<kExtras>(extras);
  auto entry = [&](int r, int c, bool kept) __attribute__((always_inline)) {
    const float score = scores(r, c);
    const int row = row_begin + static_cast<int>(get<0>(coords_rowcol(r, c)));
    const int col = col_begin + static_cast<int>(get<1>(coords_rowcol(r, c)));
    const bool inside = row < extras.seqlen_q && col < extras.seqlen_k;
    float logit_score = score;
    if (kScoreExtras && offsets && inside) logit_score += extras.offset(row, col);
    const float p = fast_exp2(logit_score * scale_log2 - lse_log2[r]);
    float dp = dscores(r, c);
    if (draws_dropout(kExtras) && dropout) {
      dp = kept ? dp * dropout_scale : 0.f;
      scores(r, c) = kept ? p : 0.f;
    } else {
      scores(r, c) = p;
    }
    float ds = p * (dp - row_d[r]);
    if constexpr (kScoreExtras) {
      if (inside) dbias(row, col, ds);
    }
    if (softcap_on) ds *= fmaxf(1.f - score * score, 0.f);
    dscores(r, c) = ds;
  };
  // Successive n8 atoms of a thread lie 8 keys apart in one 16-key span (the dropout variants'
  // TiledMmaSdPPairedKeys): one Philox call per pair. kDropout consumes each draw as it is made;
  // kAll, where dropout is a run-time branch, reads it from a bit mask so that the entry code
  // is not emitted twice.
  if constexpr (kExtras == ExtrasLevel::kDropout) {
    draws.for_each_draw(coords_rowcol, row_begin, col_begin, entry);
  } else {
    constexpr int kEntries = decltype(size(acc_s))::value;
    uint32_t keep[(kEntries + 31) / 32];
    if constexpr (kScoreExtras) {
      if (dropout) draws.keep_bits(coords_rowcol, row_begin, col_begin, keep);
    }
#pragma unroll
    for (int r = 0; r < size<0>(scores); ++r) {
#pragma unroll
      for (int c = 0; c < size<1>(scores); ++c) {
        entry(r, c, kScoreExtras && dropout && bit_set(keep, r * size<1>(scores) + c));
      }
    }
  }
}

// The S/dP product's warp layout: keys paired per warp where the variant may draw dropout.
template <typename Traits, ExtrasLevel kExtras>
using SdpMma = std::conditional_t<draws_dropout(kExtras),
                                  typename Traits::TiledMmaSdPPairedKeys,
                                  typename Traits::TiledMmaSdP>;

// dbias sinks: none (plain kernels, deterministic dQ kernel) or the dK/dV kernel's writer.
struct NoDbias {
  __device__ void operator()(int, int, float) const {}
};

struct DbiasWriter {
  float* base;  // this (batch, head) of the bias-shaped gradient, or nullptr
  int64_t row_stride;
  int col_stride;
  bool atomic;

  __device__ static DbiasWriter make(const BwdParams& p, int batch, int head) {
    DbiasWriter w{nullptr, 0, 0, p.dbias_atomic};
    if (p.dbias == nullptr) return w;
    const int64_t bb = p.bias_batch == 1 ? 0 : batch, bh = p.bias_heads == 1 ? 0 : head;
    w.base = p.dbias + (bb * p.bias_heads + bh) * p.bias_rows * p.bias_cols;
    w.row_stride = p.bias_rows == 1 ? 0 : p.bias_cols;
    w.col_stride = p.bias_cols == 1 ? 0 : 1;
    return w;
  }

  __device__ void operator()(int row, int col, float value) const {
    if (base == nullptr) return;
    float* address = base + row * row_stride + col * col_stride;
    if (atomic) {
      atomicAdd(address, value);
    } else {
      *address = value;
    }
  }
};

// Global view of one head of a [batch, seq, heads, head_dim] tensor as (seq, kHeadDim), cut into
// kBlockRows-row tiles: (kBlockRows, kHeadDim, num_blocks).
template <int kBlockRows, int kHeadDim, typename Element>
__device__ __forceinline__ auto head_tiles(Element* base, int seqlen, int64_t row_stride) {
  Tensor full = make_tensor(make_gmem_ptr(base), make_shape(seqlen, Int<kHeadDim>{}),
                            make_stride(row_stride, _1{}));
  return local_tile(full, Shape<Int<kBlockRows>, Int<kHeadDim>>{}, make_coord(_, 0));
}

// ---------------------------------------------------------------------------------------------
template <typename Traits, bool kSoftcap, bool kAccumulateDq, ExtrasLevel kExtras>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    dkdv_kernel(const __grid_constant__ BwdParams params) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kQTileElems = Traits::kQTileElems;

  const int n_block = blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int tid = threadIdx.x;
  const int kv_head = head / (params.heads / params.kv_heads);
  const int seqlen_q = params.seqlen_q;
  const int seqlen_k = params.seqlen_k;

  const KeyRangeMask mask = KeyRangeMask::make(params, batch);
  constexpr bool kTileStates = classifies_tiles(kExtras);
  static_assert(!(kExtras != ExtrasLevel::kNone && kSoftcap),
                "extras variants take softcap at run time (kAll) or not at all");
  const bool softcap_on = kSoftcap || (kExtras == ExtrasLevel::kAll && params.softcap > 0.f);
  const Softcap softcap = Softcap::make(params.softmax_scale, params.softcap);
  const float scale_log2 = SoftmaxScales::make(params.softmax_scale, params.softcap).scale_log2;

  const int key_begin = n_block * kBlockN;
  int first_row, end_row;
  mask.query_row_range(key_begin, min(key_begin + kBlockN, mask.seqlen_k), &first_row, &end_row);
  int m_block_begin = first_row / kBlockM;
  int m_block_end = end_row > first_row ? (end_row + kBlockM - 1) / kBlockM : m_block_begin;

  const int64_t bh = int64_t(batch) * params.heads + head;
  const int seqlen_q_padded = padded_seqlen_q(seqlen_q);
  const float* lse = params.lse + bh * seqlen_q;
  const float* softmax_d = params.softmax_d + bh * seqlen_q_padded;
  float* dq_accum =
      kAccumulateDq ? params.dq_accum + bh * seqlen_q_padded * kHeadDim : nullptr;  // unused else

  Tensor gQ = head_tiles<kBlockM, kHeadDim>(
      static_cast<const Element*>(params.q) + batch * params.q_batch_stride +
          head * params.q_head_stride,
      seqlen_q, params.q_row_stride);
  Tensor gdO = head_tiles<kBlockM, kHeadDim>(
      static_cast<const Element*>(params.dout) + batch * params.do_batch_stride +
          head * params.do_head_stride,
      seqlen_q, params.do_row_stride);
  Tensor gK = head_tiles<kBlockN, kHeadDim>(
      static_cast<const Element*>(params.k) + batch * params.k_batch_stride +
          kv_head * params.k_head_stride,
      seqlen_k, params.k_row_stride)(_, _, n_block);
  Tensor gV = head_tiles<kBlockN, kHeadDim>(
      static_cast<const Element*>(params.v) + batch * params.v_batch_stride +
          kv_head * params.v_head_stride,
      seqlen_k, params.v_row_stride)(_, _, n_block);
  Tensor gdK = head_tiles<kBlockN, kHeadDim>(
      static_cast<Element*>(params.dk) + batch * params.dk_batch_stride +
          head * params.dk_head_stride,
      seqlen_k, params.dk_row_stride)(_, _, n_block);
  Tensor gdV = head_tiles<kBlockN, kHeadDim>(
      static_cast<Element*>(params.dv) + batch * params.dv_batch_stride +
          head * params.dv_head_stride,
      seqlen_k, params.dv_row_stride)(_, _, n_block);

  extern __shared__ __align__(128) unsigned char smem[];
  Element* smem_q = reinterpret_cast<Element*>(smem);  // 2 stages
  Element* smem_do = smem_q + 2 * kQTileElems;         // 2 stages
  Element* smem_k = smem_do + 2 * kQTileElems;
  Element* smem_v = smem_k + Traits::kKVTileElems;
  Element* smem_p = smem_v + Traits::kKVTileElems;
  Element* smem_ds = smem_p + Traits::kPdSTileElems;
  float* smem_lse = reinterpret_cast<float*>(smem_ds + Traits::kPdSTileElems);  // 2 stages
  float* smem_d = smem_lse + 2 * kBlockM;                                         // 2 stages
  // Extras variants: the CTA's Extras, then one tile-state byte per query block.
  Extras* extras_slot = reinterpret_cast<Extras*>(smem + Traits::kSmemBytesDkDv);
  uint8_t* tile_states = smem + Traits::kSmemBytesDkDv + kExtrasSmemBytes;

  const int states_begin = m_block_begin;
  Extras visibility_extras{};
  prepare_extras<kExtras, Traits::kNThreads, kBlockM, false>(
      extras_slot, visibility_extras, params, batch, head,
      SoftmaxScales::make(params.softmax_scale, params.softcap).scale, mask, key_begin,
      min(key_begin + kBlockN, mask.seqlen_k), kBlockN, m_block_begin, m_block_end, tile_states);
  const Extras& extras = cta_extras<kExtras>(extras_slot, visibility_extras);
  const DropoutDraws own_draws = kExtras == ExtrasLevel::kDropout
                                     ? DropoutDraws::make(params, batch, head)
                                     : DropoutDraws{};
  const DropoutDraws& draws = register_draws<kExtras>(extras, own_draws);
  const DbiasWriter dbias =
      kExtras == ExtrasLevel::kAll ? DbiasWriter::make(params, batch, head) : DbiasWriter{};

  using SmemLayoutQ = typename Traits::SmemLayoutQ;
  using SmemLayoutQt = typename Traits::SmemLayoutQt;
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutKV{});
  Tensor sKt = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKVt{});
  Tensor sP = make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdS{});
  Tensor sPt = make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdSt{});
  Tensor sdS = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutPdS{});
  Tensor sdSt = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutPdSt{});
  auto sQ = [&](int stage) {
    return make_tensor(make_smem_ptr(smem_q + stage * kQTileElems), SmemLayoutQ{});
  };
  auto sQt = [&](int stage) {
    return make_tensor(make_smem_ptr(smem_q + stage * kQTileElems), SmemLayoutQt{});
  };
  auto sdO = [&](int stage) {
    return make_tensor(make_smem_ptr(smem_do + stage * kQTileElems), SmemLayoutQ{});
  };
  auto sdOt = [&](int stage) {
    return make_tensor(make_smem_ptr(smem_do + stage * kQTileElems), SmemLayoutQt{});
  };

  // Global -> shared loads.
  typename Traits::GmemTiledCopyAsync gmem_tiled_copy;
  auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr_copy.partition_S(gQ);
  Tensor tdOgdO = gmem_thr_copy.partition_S(gdO);
  Tensor tQcQ =
      gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKcK =
      gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  auto load_q_do = [&](int m_block, int stage) {
    const int rows = mask.seqlen_q - m_block * kBlockM;
    load_tile_async(gmem_tiled_copy, tQgQ(_, _, _, m_block), gmem_thr_copy.partition_D(sQ(stage)),
                    tQcQ, rows, params.head_dim);
    load_tile_async(gmem_tiled_copy, tdOgdO(_, _, _, m_block),
                    gmem_thr_copy.partition_D(sdO(stage)), tQcQ, rows, params.head_dim);
    if (tid < kBlockM) {
      const int row = m_block * kBlockM + tid;
      cp_async_f32(smem_d + stage * kBlockM + tid, softmax_d + row);  // padded: always in bounds
      if (row < mask.seqlen_q) {
        cp_async_f32(smem_lse + stage * kBlockM + tid, lse + row);
      } else {
        smem_lse[stage * kBlockM + tid] = -INFINITY;
      }
    }
  };

  // Products and their shared -> register copies.
  SdpMma<Traits, kExtras> tiled_mma_sdp;
  auto thr_mma_sdp = tiled_mma_sdp.get_thread_slice(tid);
  typename Traits::TiledMmaDkDv tiled_mma_dkdv;
  auto thr_mma_dkdv = tiled_mma_dkdv.get_thread_slice(tid);
  typename Traits::TiledMmaDq tiled_mma_dq;
  auto thr_mma_dq = tiled_mma_dq.get_thread_slice(tid);

  Tensor sQtNoSwizzle = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQtNoSwizzle{});
  Tensor sPdStNoSwizzle =
      make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdStNoSwizzle{});
  Tensor sKtNoSwizzle =
      make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKVtNoSwizzle{});
  Tensor tSrQ = thr_mma_sdp.partition_fragment_A(sQ(0));
  Tensor tSrK = thr_mma_sdp.partition_fragment_B(sK);
  Tensor tdPrdO = thr_mma_sdp.partition_fragment_A(sdO(0));
  Tensor tdPrV = thr_mma_sdp.partition_fragment_B(sV);
  Tensor tdVrPt = thr_mma_dkdv.partition_fragment_A(sPdStNoSwizzle);
  Tensor tdVrdOt = thr_mma_dkdv.partition_fragment_B(sQtNoSwizzle);
  Tensor tdKrdSt = thr_mma_dkdv.partition_fragment_A(sPdStNoSwizzle);
  Tensor tdKrQt = thr_mma_dkdv.partition_fragment_B(sQtNoSwizzle);
  Tensor tdQrdS = thr_mma_dq.partition_fragment_A(sdS);
  Tensor tdQrKt = thr_mma_dq.partition_fragment_B(sKtNoSwizzle);

  auto smem_tiled_copy_a_sdp = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma_sdp);
  auto smem_thr_copy_a_sdp = smem_tiled_copy_a_sdp.get_thread_slice(tid);
  auto smem_tiled_copy_b_sdp = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma_sdp);
  auto smem_thr_copy_b_sdp = smem_tiled_copy_b_sdp.get_thread_slice(tid);
  Tensor tSsK = smem_thr_copy_b_sdp.partition_S(sK);
  Tensor tdPsV = smem_thr_copy_b_sdp.partition_S(sV);

  auto smem_tiled_copy_a_dkdv =
      make_tiled_copy_A(typename Traits::SmemCopyAtomTransposed{}, tiled_mma_dkdv);
  auto smem_thr_copy_a_dkdv = smem_tiled_copy_a_dkdv.get_thread_slice(tid);
  auto smem_tiled_copy_b_dkdv =
      make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma_dkdv);
  auto smem_thr_copy_b_dkdv = smem_tiled_copy_b_dkdv.get_thread_slice(tid);
  Tensor tdVsPt = smem_thr_copy_a_dkdv.partition_S(sPt);
  Tensor tdKsdSt = smem_thr_copy_a_dkdv.partition_S(sdSt);

  auto smem_tiled_copy_a_dq = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma_dq);
  auto smem_thr_copy_a_dq = smem_tiled_copy_a_dq.get_thread_slice(tid);
  auto smem_tiled_copy_b_dq =
      make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma_dq);
  auto smem_thr_copy_b_dq = smem_tiled_copy_b_dq.get_thread_slice(tid);
  Tensor tdQsdS = smem_thr_copy_a_dq.partition_S(sdS);
  Tensor tdQsKt = smem_thr_copy_b_dq.partition_S(sKt);

  auto smem_tiled_copy_pds =
      make_tiled_copy_C(typename Traits::SmemCopyAtomAccum{}, tiled_mma_sdp);
  auto smem_thr_copy_pds = smem_tiled_copy_pds.get_thread_slice(tid);
  Tensor tPsP = smem_thr_copy_pds.partition_D(sP);
  Tensor tdSsdS = smem_thr_copy_pds.partition_D(sdS);

  Tensor acc_dk = partition_fragment_C(tiled_mma_dkdv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(tiled_mma_dkdv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  // Coordinates of this thread's S elements inside a tile, and of its dQ elements.
  Tensor coords_s =
      thr_mma_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor coords_s_rowcol = make_tensor(coords_s.data(), accum_rowcol_layout(coords_s.layout()));
  constexpr int kRows = decltype(size<0>(coords_s_rowcol))::value;
  Tensor coords_dq =
      thr_mma_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  if (m_block_begin < m_block_end) {
    load_tile_async(gmem_tiled_copy, gmem_thr_copy.partition_S(gK),
                    gmem_thr_copy.partition_D(sK), tKcK, mask.seqlen_k - key_begin,
                    params.head_dim);
    load_tile_async(gmem_tiled_copy, gmem_thr_copy.partition_S(gV),
                    gmem_thr_copy.partition_D(sV), tKcK, mask.seqlen_k - key_begin,
                    params.head_dim);
    load_q_do(m_block_begin, 0);
    cp_async_fence();
  }

  int iteration = 0;
  for (int m_block = m_block_begin, next = 0; m_block < m_block_end; m_block = next, ++iteration) {
    const int stage = iteration & 1;
    const int row_begin = m_block * kBlockM;
    next = kTileStates
               ? visible_block_at_or_above(tile_states, states_begin, m_block_end, m_block + 1)
               : m_block + 1;

    // The current stage has landed, and every thread is done with the previous iteration's
    // buffers (the other stage, P, dS).
    cp_async_wait<0>();
    __syncthreads();
    if (next < m_block_end) {
      load_q_do(next, stage ^ 1);
      cp_async_fence();
    }

    // dP before S: the probabilities and dS are then formed in one pass with nothing but the
    // two accumulators live (no saved softcap derivative, no lse/D registers across products).
    Tensor acc_dp = partition_fragment_C(tiled_mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_smem(tiled_mma_sdp, acc_dp, tdPrdO, tdPrV, smem_thr_copy_a_sdp.partition_S(sdO(stage)),
              tdPsV, smem_tiled_copy_a_sdp, smem_thr_copy_a_sdp, smem_tiled_copy_b_sdp,
              smem_thr_copy_b_sdp);
    Tensor acc_s = partition_fragment_C(tiled_mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_smem(tiled_mma_sdp, acc_s, tSrQ, tSrK, smem_thr_copy_a_sdp.partition_S(sQ(stage)), tSsK,
              smem_tiled_copy_a_sdp, smem_thr_copy_a_sdp, smem_tiled_copy_b_sdp,
              smem_thr_copy_b_sdp);
    float lse_log2[kRows];
    float row_d[kRows];
    row_stats_from_smem(smem_lse + stage * kBlockM, smem_d + stage * kBlockM, coords_s_rowcol,
                        lse_log2, row_d);
    probs_and_dscores<kExtras>(
        acc_s, acc_dp, coords_s, mask, extras, draws,
        kTileStates && tile_states[m_block - states_begin] == kTilePartial, softcap_on, softcap,
        scale_log2, lse_log2, row_d, row_begin, min(row_begin + kBlockM, seqlen_q), key_begin,
        kBlockN, params.dropout_scale, dbias);

    Tensor p_elem = make_tensor<Element>(acc_s.layout());
    convert_fragment(acc_s, p_elem);
    copy(smem_tiled_copy_pds, smem_thr_copy_pds.retile_S(p_elem), tPsP);
    Tensor ds_elem = make_tensor<Element>(acc_dp.layout());
    convert_fragment(acc_dp, ds_elem);
    copy(smem_tiled_copy_pds, smem_thr_copy_pds.retile_S(ds_elem), tdSsdS);
    __syncthreads();

    gemm_smem(tiled_mma_dkdv, acc_dv, tdVrPt, tdVrdOt, tdVsPt,
              smem_thr_copy_b_dkdv.partition_S(sdOt(stage)), smem_tiled_copy_a_dkdv,
              smem_thr_copy_a_dkdv, smem_tiled_copy_b_dkdv, smem_thr_copy_b_dkdv);

    if constexpr (kAccumulateDq) {
      // Issued before dK so that the reductions drain while the dK product runs.
      Tensor acc_dq = partition_fragment_C(tiled_mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
      clear(acc_dq);
      gemm_smem(tiled_mma_dq, acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, smem_tiled_copy_a_dq,
                smem_thr_copy_a_dq, smem_tiled_copy_b_dq, smem_thr_copy_b_dq);
      float* dq_accum_block = dq_accum + int64_t(row_begin) * kHeadDim;
      // Flat accumulator indices 2i and 2i + 1 are adjacent columns of one row.
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dq); i += 2) {
        const int row = get<0>(coords_dq(i));
        const int col = get<1>(coords_dq(i));
        reduce_add_pair(dq_accum_block + row * kHeadDim + col, acc_dq(i), acc_dq(i + 1));
      }
    }

    gemm_smem(tiled_mma_dkdv, acc_dk, tdKrdSt, tdKrQt, tdKsdSt,
              smem_thr_copy_b_dkdv.partition_S(sQt(stage)), smem_tiled_copy_a_dkdv,
              smem_thr_copy_a_dkdv, smem_tiled_copy_b_dkdv, smem_thr_copy_b_dkdv);
  }

  // Epilogue: dK (times softmax_scale, the factor of d logit / d(q.k)) and dV through shared
  // memory (the Q and dO stages) to coalesced 16-byte global stores.
#pragma unroll
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= params.softmax_scale;
  if constexpr (draws_dropout(kExtras)) {
    if (dropout_active<kExtras>(extras)) {
#pragma unroll
      for (int i = 0; i < size(acc_dv); ++i) acc_dv(i) *= params.dropout_scale;
    }
  }
  Tensor dk_elem = make_tensor<Element>(acc_dk.layout());
  Tensor dv_elem = make_tensor<Element>(acc_dv.layout());
  convert_fragment(acc_dk, dk_elem);
  convert_fragment(acc_dv, dv_elem);
  Tensor sdK = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutKV{});
  Tensor sdV = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutKV{});
  auto smem_tiled_copy_dkdv =
      make_tiled_copy_C(typename Traits::SmemCopyAtomAccum{}, tiled_mma_dkdv);
  auto smem_thr_copy_dkdv = smem_tiled_copy_dkdv.get_thread_slice(tid);
  __syncthreads();
  copy(smem_tiled_copy_dkdv, smem_thr_copy_dkdv.retile_S(dk_elem),
       smem_thr_copy_dkdv.partition_D(sdK));
  copy(smem_tiled_copy_dkdv, smem_thr_copy_dkdv.retile_S(dv_elem),
       smem_thr_copy_dkdv.partition_D(sdV));
  __syncthreads();

  typename Traits::GmemTiledCopyVector gmem_tiled_store;
  auto gmem_thr_store = gmem_tiled_store.get_thread_slice(tid);
  Tensor tdKgdK = gmem_thr_store.partition_D(gdK);
  Tensor tdVgdV = gmem_thr_store.partition_D(gdV);
  Tensor tdKrdK = make_tensor<Element>(shape(tdKgdK));
  Tensor tdVrdV = make_tensor<Element>(shape(tdVgdV));
  copy(gmem_tiled_store, gmem_thr_store.partition_S(sdK), tdKrdK);
  copy(gmem_tiled_store, gmem_thr_store.partition_S(sdV), tdVrdV);
  Tensor tKVcKV =
      gmem_thr_store.partition_D(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  store_tile(gmem_tiled_store, tdKrdK, tdKgdK, tKVcKV, seqlen_k - key_begin, params.head_dim);
  store_tile(gmem_tiled_store, tdVrdV, tdVgdV, tKVcKV, seqlen_k - key_begin, params.head_dim);
}

// ---------------------------------------------------------------------------------------------
// Deterministic dQ: one CTA per (query block, head, batch), key blocks visited in ascending order,
// dQ accumulated in registers: no atomics, so the result is bitwise reproducible.
template <typename Traits, bool kSoftcap, ExtrasLevel kExtras>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    dq_kernel(const __grid_constant__ BwdParams params) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kKVTileElems = Traits::kKVTileElems;

  const int m_block = blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int tid = threadIdx.x;
  const int kv_head = head / (params.heads / params.kv_heads);
  const int seqlen_q = params.seqlen_q;
  const int seqlen_k = params.seqlen_k;

  const KeyRangeMask mask = KeyRangeMask::make(params, batch);
  constexpr bool kTileStates = classifies_tiles(kExtras);
  static_assert(!(kExtras != ExtrasLevel::kNone && kSoftcap),
                "extras variants take softcap at run time (kAll) or not at all");
  const bool softcap_on = kSoftcap || (kExtras == ExtrasLevel::kAll && params.softcap > 0.f);
  const Softcap softcap = Softcap::make(params.softmax_scale, params.softcap);
  const float scale_log2 = SoftmaxScales::make(params.softmax_scale, params.softcap).scale_log2;

  const int row_begin = m_block * kBlockM;
  const int row_end = min(row_begin + kBlockM, mask.seqlen_q);
  int n_block_begin, n_block_end;
  mask.key_block_range(row_begin, row_end, kBlockN, &n_block_begin, &n_block_end);

  const int64_t bh = int64_t(batch) * params.heads + head;
  const float* lse = params.lse + bh * seqlen_q;
  const float* softmax_d = params.softmax_d + bh * padded_seqlen_q(seqlen_q);

  Tensor gQ = head_tiles<kBlockM, kHeadDim>(
      static_cast<const Element*>(params.q) + batch * params.q_batch_stride +
          head * params.q_head_stride,
      seqlen_q, params.q_row_stride)(_, _, m_block);
  Tensor gdO = head_tiles<kBlockM, kHeadDim>(
      static_cast<const Element*>(params.dout) + batch * params.do_batch_stride +
          head * params.do_head_stride,
      seqlen_q, params.do_row_stride)(_, _, m_block);
  Tensor gdQ = head_tiles<kBlockM, kHeadDim>(
      static_cast<Element*>(params.dq) + batch * params.dq_batch_stride +
          head * params.dq_head_stride,
      seqlen_q, params.dq_row_stride)(_, _, m_block);
  Tensor gK = head_tiles<kBlockN, kHeadDim>(
      static_cast<const Element*>(params.k) + batch * params.k_batch_stride +
          kv_head * params.k_head_stride,
      seqlen_k, params.k_row_stride);
  Tensor gV = head_tiles<kBlockN, kHeadDim>(
      static_cast<const Element*>(params.v) + batch * params.v_batch_stride +
          kv_head * params.v_head_stride,
      seqlen_k, params.v_row_stride);

  extern __shared__ __align__(128) unsigned char smem[];
  Element* smem_q = reinterpret_cast<Element*>(smem);
  Element* smem_do = smem_q + Traits::kQTileElems;
  Element* smem_k = smem_do + Traits::kQTileElems;  // 2 stages
  Element* smem_v = smem_k + 2 * kKVTileElems;       // 2 stages
  Element* smem_ds = smem_v + 2 * kKVTileElems;
  // Extras variants: the CTA's Extras, then one tile-state byte per key block.
  Extras* extras_slot = reinterpret_cast<Extras*>(smem + Traits::kSmemBytesDq);
  uint8_t* tile_states = smem + Traits::kSmemBytesDq + kExtrasSmemBytes;

  const int states_begin = n_block_begin;
  Extras visibility_extras{};
  prepare_extras<kExtras, Traits::kNThreads, kBlockN, true>(
      extras_slot, visibility_extras, params, batch, head,
      SoftmaxScales::make(params.softmax_scale, params.softcap).scale, mask, row_begin, row_end,
      kBlockM, n_block_begin, n_block_end, tile_states);
  const Extras& extras = cta_extras<kExtras>(extras_slot, visibility_extras);
  const DropoutDraws own_draws = kExtras == ExtrasLevel::kDropout
                                     ? DropoutDraws::make(params, batch, head)
                                     : DropoutDraws{};
  const DropoutDraws& draws = register_draws<kExtras>(extras, own_draws);

  using SmemLayoutKV = typename Traits::SmemLayoutKV;
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutQ{});
  Tensor sdS = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutPdS{});
  auto sK = [&](int stage) {
    return make_tensor(make_smem_ptr(smem_k + stage * kKVTileElems), SmemLayoutKV{});
  };
  auto sKt = [&](int stage) {
    return make_tensor(make_smem_ptr(smem_k + stage * kKVTileElems),
                       typename Traits::SmemLayoutKVt{});
  };
  auto sV = [&](int stage) {
    return make_tensor(make_smem_ptr(smem_v + stage * kKVTileElems), SmemLayoutKV{});
  };

  typename Traits::GmemTiledCopyAsync gmem_tiled_copy;
  auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(tid);
  Tensor tKgK = gmem_thr_copy.partition_S(gK);
  Tensor tVgV = gmem_thr_copy.partition_S(gV);
  Tensor tQcQ =
      gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKcK =
      gmem_thr_copy.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  auto load_k_v = [&](int n_block, int stage) {
    const int rows = mask.seqlen_k - n_block * kBlockN;
    load_tile_async(gmem_tiled_copy, tKgK(_, _, _, n_block), gmem_thr_copy.partition_D(sK(stage)),
                    tKcK, rows, params.head_dim);
    load_tile_async(gmem_tiled_copy, tVgV(_, _, _, n_block), gmem_thr_copy.partition_D(sV(stage)),
                    tKcK, rows, params.head_dim);
  };

  SdpMma<Traits, kExtras> tiled_mma_sdp;
  auto thr_mma_sdp = tiled_mma_sdp.get_thread_slice(tid);
  typename Traits::TiledMmaDq tiled_mma_dq;
  auto thr_mma_dq = tiled_mma_dq.get_thread_slice(tid);

  Tensor tSrQ = thr_mma_sdp.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma_sdp.partition_fragment_B(sK(0));
  Tensor tdPrdO = thr_mma_sdp.partition_fragment_A(sdO);
  Tensor tdPrV = thr_mma_sdp.partition_fragment_B(sV(0));
  Tensor tdQrdS = thr_mma_dq.partition_fragment_A(sdS);
  Tensor tdQrKt = thr_mma_dq.partition_fragment_B(
      make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKVtNoSwizzle{}));

  auto smem_tiled_copy_a_sdp = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma_sdp);
  auto smem_thr_copy_a_sdp = smem_tiled_copy_a_sdp.get_thread_slice(tid);
  auto smem_tiled_copy_b_sdp = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma_sdp);
  auto smem_thr_copy_b_sdp = smem_tiled_copy_b_sdp.get_thread_slice(tid);
  Tensor tSsQ = smem_thr_copy_a_sdp.partition_S(sQ);
  Tensor tdPsdO = smem_thr_copy_a_sdp.partition_S(sdO);
  auto smem_tiled_copy_a_dq = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma_dq);
  auto smem_thr_copy_a_dq = smem_tiled_copy_a_dq.get_thread_slice(tid);
  auto smem_tiled_copy_b_dq =
      make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma_dq);
  auto smem_thr_copy_b_dq = smem_tiled_copy_b_dq.get_thread_slice(tid);
  Tensor tdQsdS = smem_thr_copy_a_dq.partition_S(sdS);
  auto smem_tiled_copy_ds = make_tiled_copy_C(typename Traits::SmemCopyAtomAccum{}, tiled_mma_sdp);
  auto smem_thr_copy_ds = smem_tiled_copy_ds.get_thread_slice(tid);
  Tensor tdSsdS = smem_thr_copy_ds.partition_D(sdS);

  Tensor coords_s =
      thr_mma_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor coords_s_rowcol = make_tensor(coords_s.data(), accum_rowcol_layout(coords_s.layout()));
  constexpr int kRows = decltype(size<0>(coords_s_rowcol))::value;
  float lse_log2[kRows];
  float row_d[kRows];
  load_row_stats(lse, softmax_d, mask.seqlen_q, row_begin, coords_s_rowcol, lse_log2, row_d);

  Tensor acc_dq = partition_fragment_C(tiled_mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_dq);

  if (n_block_begin < n_block_end) {
    load_tile_async(gmem_tiled_copy, gmem_thr_copy.partition_S(gQ), gmem_thr_copy.partition_D(sQ),
                    tQcQ, mask.seqlen_q - row_begin, params.head_dim);
    load_tile_async(gmem_tiled_copy, gmem_thr_copy.partition_S(gdO),
                    gmem_thr_copy.partition_D(sdO), tQcQ, mask.seqlen_q - row_begin,
                    params.head_dim);
    load_k_v(n_block_begin, 0);
    cp_async_fence();
  }

  int iteration = 0;
  for (int n_block = n_block_begin, next = 0; n_block < n_block_end; n_block = next, ++iteration) {
    const int stage = iteration & 1;
    const int key_begin = n_block * kBlockN;
    next = kTileStates
               ? visible_block_at_or_above(tile_states, states_begin, n_block_end, n_block + 1)
               : n_block + 1;
    cp_async_wait<0>();
    __syncthreads();
    if (next < n_block_end) {
      load_k_v(next, stage ^ 1);
      cp_async_fence();
    }

    Tensor acc_dp = partition_fragment_C(tiled_mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_smem(tiled_mma_sdp, acc_dp, tdPrdO, tdPrV, tdPsdO,
              smem_thr_copy_b_sdp.partition_S(sV(stage)), smem_tiled_copy_a_sdp,
              smem_thr_copy_a_sdp, smem_tiled_copy_b_sdp, smem_thr_copy_b_sdp);
    Tensor acc_s = partition_fragment_C(tiled_mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_smem(tiled_mma_sdp, acc_s, tSrQ, tSrK, tSsQ, smem_thr_copy_b_sdp.partition_S(sK(stage)),
              smem_tiled_copy_a_sdp, smem_thr_copy_a_sdp, smem_tiled_copy_b_sdp,
              smem_thr_copy_b_sdp);
    probs_and_dscores<kExtras>(
        acc_s, acc_dp, coords_s, mask, extras, draws,
        kTileStates && tile_states[n_block - states_begin] == kTilePartial, softcap_on, softcap,
        scale_log2, lse_log2, row_d, row_begin, row_end, key_begin, kBlockN, params.dropout_scale,
        NoDbias{});
    Tensor ds_elem = make_tensor<Element>(acc_dp.layout());
    convert_fragment(acc_dp, ds_elem);
    copy(smem_tiled_copy_ds, smem_thr_copy_ds.retile_S(ds_elem), tdSsdS);
    __syncthreads();

    gemm_smem(tiled_mma_dq, acc_dq, tdQrdS, tdQrKt, tdQsdS,
              smem_thr_copy_b_dq.partition_S(sKt(stage)), smem_tiled_copy_a_dq, smem_thr_copy_a_dq,
              smem_tiled_copy_b_dq, smem_thr_copy_b_dq);
  }

  // Epilogue: dQ * softmax_scale through shared memory (the Q buffer) to 16-byte global stores.
#pragma unroll
  for (int i = 0; i < size(acc_dq); ++i) acc_dq(i) *= params.softmax_scale;
  Tensor dq_elem = make_tensor<Element>(acc_dq.layout());
  convert_fragment(acc_dq, dq_elem);
  auto smem_tiled_copy_dq = make_tiled_copy_C(typename Traits::SmemCopyAtomAccum{}, tiled_mma_dq);
  auto smem_thr_copy_dq = smem_tiled_copy_dq.get_thread_slice(tid);
  __syncthreads();
  copy(smem_tiled_copy_dq, smem_thr_copy_dq.retile_S(dq_elem), smem_thr_copy_dq.partition_D(sQ));
  __syncthreads();

  typename Traits::GmemTiledCopyVector gmem_tiled_store;
  auto gmem_thr_store = gmem_tiled_store.get_thread_slice(tid);
  Tensor tdQgdQ = gmem_thr_store.partition_D(gdQ);
  Tensor tdQrdQ = make_tensor<Element>(shape(tdQgdQ));
  copy(gmem_tiled_store, gmem_thr_store.partition_S(sQ), tdQrdQ);
  Tensor tdQcdQ =
      gmem_thr_store.partition_D(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  store_tile(gmem_tiled_store, tdQrdQ, tdQgdQ, tdQcdQ, seqlen_q - row_begin, params.head_dim);
}

}  // namespace bwd
}  // namespace flash_jax
