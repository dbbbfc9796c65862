// Masks and score modifiers of the "extras" kernel variants, shared by the forward and backward
// kernels of every architecture: positions (varlen), segment ids, a dense mask (read through its
// 16 x 16 cell summary to skip tiles), additive bias, ALiBi and dropout.
//
// Order per score tile, as in flash_jax.reference_attention: raw q.k (softcap applied) ->
// visibility (-inf) -> + offsets (bias, -ALiBi) -> softmax -> dropout. Offsets are in logit
// units; the kernels keep raw scores (logit = score * logit_scale), so they enter as
// offset / logit_scale.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>

#include "flash_jax/common/mask.cuh"
#include "flash_jax/params.h"

namespace flash_jax {

// Philox-4x32-7 (Salmon et al., SC'11), as flash_jax/_dropout.py evaluates it: seven rounds
// pass BigCrush, and the generator's integer multiplies are what the dropout variants spend
// their time on (benchmarks/NOTES.md).
constexpr int kPhiloxRounds = 7;
__device__ __forceinline__ uint4 philox4x32(uint4 counter, uint2 key) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi0 = __umulhi(kM0, counter.x), lo0 = kM0 * counter.x;
    const uint32_t hi1 = __umulhi(kM1, counter.z), lo1 = kM1 * counter.z;
    counter = make_uint4(hi1 ^ counter.y ^ key.x, lo1, hi0 ^ counter.w ^ key.y, lo0);
    key.x += kW0;
    key.y += kW1;
  }
  return counter;
}

// Dropout draws of one (batch, head): the Philox key of the batch row and the threshold below
// which a 16-bit draw drops its entry.
struct DropoutDraws {
  uint2 seed;
  uint32_t threshold;
  uint32_t head;

  __device__ static DropoutDraws make(const AttentionParams& p, int batch, int head) {
    DropoutDraws d;
    d.seed = p.dropout_seeds != nullptr
                 ? make_uint2(p.dropout_seeds[2 * batch], p.dropout_seeds[2 * batch + 1])
                 : make_uint2(0, 0);
    d.threshold = p.dropout_threshold;
    d.head = static_cast<uint32_t>(head);
    return d;
  }

  // Calls visit(r, c, kept) for every entry (r, c) of a tile's accumulator in the (rows, cols)
  // view of m16n8 atoms ((row half, MMA_M), (column pair element, MMA_N)). One Philox call yields
  // the draws of rows {R, R + 8} (R % 16 < 8) x columns {2t, 2t + 1, 2t + 8, 2t + 9} of a
  // 16-column span, which is what a thread holds of two successive MMA_N atoms when, as the
  // callers' layouts guarantee, they lie 8 columns apart in one span (the forward's single warp
  // along N, the backward's TiledMmaSdPPairedKeys): word j of the draw then belongs to the pair's
  // entry j, the low half to row R and the high half to row R + 8, all known at compile time.
  // Each draw is compared in place (the high half against threshold << 16) and consumed at once:
  // no mask is built and read back.
  template <typename CoordsRowCol, typename Visit>
  __device__ __forceinline__ void for_each_draw(const CoordsRowCol& coords, int row_offset,
                                                int col_offset, Visit&& visit) const {
    constexpr int kRows = decltype(cute::size<0>(coords))::value;
    constexpr int kCols = decltype(cute::size<1>(coords))::value;
    static_assert(kRows % 2 == 0 && kCols % 4 == 0, "m16n8 accumulator view, atoms in pairs");
    const uint32_t threshold_high = threshold << 16;
#pragma unroll
    for (int m = 0; m < kRows / 2; ++m) {
      const int row = row_offset + static_cast<int>(cute::get<0>(coords(2 * m, 0)));
      const uint32_t row_counter = uint32_t(row >> 4) * 8 + uint32_t(row & 7);
#pragma unroll
      for (int n = 0; n < kCols / 4; ++n) {
        const int first_col = col_offset + static_cast<int>(cute::get<1>(coords(0, 4 * n)));
        const uint32_t col_counter = uint32_t(first_col >> 4) * 4 + uint32_t((first_col >> 1) & 3);
        const uint4 draw = philox4x32(make_uint4(col_counter, row_counter, head, 0), seed);
        const uint32_t words[4] = {draw.x, draw.y, draw.z, draw.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          visit(2 * m, 4 * n + j, (words[j] & 0xFFFFu) >= threshold);
          visit(2 * m + 1, 4 * n + j, words[j] >= threshold_high);
        }
      }
    }
  }

  // The same draws as bits: bit r * cols + c of `bits` says whether entry (r, c) is kept.
  template <int kWords, typename CoordsRowCol>
  __device__ __forceinline__ void keep_bits(const CoordsRowCol& coords, int row_offset,
                                            int col_offset, uint32_t (&bits)[kWords]) const {
    constexpr int kCols = decltype(cute::size<1>(coords))::value;
    static_assert(kWords * 32 >= decltype(cute::size(coords))::value, "bit words");
#pragma unroll
    for (int w = 0; w < kWords; ++w) bits[w] = 0;
    for_each_draw(coords, row_offset, col_offset, [&](int r, int c, bool kept) {
      const int index = r * kCols + c;
      if (kept) bits[index / 32] |= 1u << (index % 32);
    });
  }
};

enum TileState : uint8_t { kTileSkip = 0, kTilePartial = 1, kTileFull = 2 };

struct Extras {
  int seqlen_q, seqlen_k;  // full extents: entries outside are never read
  const int* q_pos;        // this batch row, or nullptr
  const int* kv_pos;
  int pos_left, pos_right;  // band on kv_pos - q_pos (KeyRangeMask::kUnbounded when open)
  const int* q_ids;         // segment ids of this batch row, or nullptr
  const int* kv_ids;
  const uint8_t* mask;      // this (batch, head), or nullptr
  int64_t mask_row_stride;  // 0 when broadcast along rows
  int mask_col_stride;      // 0 when broadcast along columns
  const uint8_t* tiles;     // cell summary of this (batch, head)
  int tiles_row_stride;     // 0 when broadcast along rows
  int tiles_col_stride;     // 0 when broadcast along columns
  const float* bias;        // this (batch, head), or nullptr
  int64_t bias_row_stride;
  int bias_col_stride;
  float alibi_slope;        // 0 without ALiBi
  int diagonal_offset;      // ALiBi's diagonal without positions
  float inv_logit_scale;
  DropoutDraws draws;
  bool dropout;

  __device__ static Extras make(const AttentionParams& p, int batch, int head,
                                float logit_scale) {
    Extras x;
    x.seqlen_q = p.seqlen_q;
    x.seqlen_k = p.seqlen_k;
    const bool positions = p.q_positions != nullptr;
    x.q_pos = positions ? p.q_positions + int64_t(batch) * p.seqlen_q : nullptr;
    x.kv_pos = positions ? p.kv_positions + int64_t(batch) * p.seqlen_k : nullptr;
    x.pos_left = KeyRangeMask::band_left(p);
    x.pos_right = KeyRangeMask::band_right(p);
    const bool ids = p.q_segment_ids != nullptr;
    x.q_ids = ids ? p.q_segment_ids + batch * p.q_segment_ids_batch_stride : nullptr;
    x.kv_ids = ids ? p.kv_segment_ids + batch * p.kv_segment_ids_batch_stride : nullptr;
    x.mask = nullptr;
    x.tiles = nullptr;
    if (p.mask != nullptr) {
      const int64_t mb = p.mask_batch == 1 ? 0 : batch, mh = p.mask_heads == 1 ? 0 : head;
      const int64_t plane = (mb * p.mask_heads + mh);
      x.mask = p.mask + plane * p.mask_rows * p.mask_cols;
      x.mask_row_stride = p.mask_rows == 1 ? 0 : p.mask_cols;
      x.mask_col_stride = p.mask_cols == 1 ? 0 : 1;
      const int cell_rows = (p.mask_rows + kMaskCell - 1) / kMaskCell;
      const int cell_cols = (p.mask_cols + kMaskCell - 1) / kMaskCell;
      x.tiles = p.mask_tiles + plane * cell_rows * cell_cols;
      x.tiles_row_stride = p.mask_rows == 1 ? 0 : cell_cols;
      x.tiles_col_stride = p.mask_cols == 1 ? 0 : 1;
    }
    x.bias = nullptr;
    if (p.bias != nullptr) {
      const int64_t bb = p.bias_batch == 1 ? 0 : batch, bh = p.bias_heads == 1 ? 0 : head;
      x.bias = p.bias + (bb * p.bias_heads + bh) * p.bias_rows * p.bias_cols;
      x.bias_row_stride = p.bias_rows == 1 ? 0 : p.bias_cols;
      x.bias_col_stride = p.bias_cols == 1 ? 0 : 1;
    }
    x.alibi_slope = p.alibi_slopes == nullptr
                        ? 0.f
                        : p.alibi_slopes[(p.alibi_batch == 1 ? 0 : batch) * p.heads + head];
    x.diagonal_offset = p.causal_top_left ? 0 : p.seqlen_k - p.seqlen_q;
    x.inv_logit_scale = 1.f / logit_scale;
    x.dropout = p.dropout_seeds != nullptr;
    x.draws = DropoutDraws::make(p, batch, head);
    return x;
  }

  __device__ bool has_visibility() const {
    return q_pos != nullptr || q_ids != nullptr || mask != nullptr;
  }
  __device__ bool has_offsets() const { return bias != nullptr || alibi_slope != 0.f; }

  // Positions, segment ids and the dense mask of one entry inside the sequences (the index band
  // and the lengths are KeyRangeMask's).
  __device__ bool visible(int row, int col) const {
    if (q_pos != nullptr) {
      const int distance = __ldg(kv_pos + col) - __ldg(q_pos + row);
      if (distance < -pos_left || distance > pos_right) return false;
    }
    if (q_ids != nullptr && __ldg(q_ids + row) != __ldg(kv_ids + col)) return false;
    if (mask != nullptr && __ldg(mask + row * mask_row_stride + col * mask_col_stride) == 0) {
      return false;
    }
    return true;
  }

  // bias - slope * distance, in raw-score units.
  __device__ float offset(int row, int col) const {
    float value = 0.f;
    if (bias != nullptr) value = __ldg(bias + row * bias_row_stride + col * bias_col_stride);
    if (alibi_slope != 0.f) {
      const int distance = q_pos != nullptr ? __ldg(kv_pos + col) - __ldg(q_pos + row)
                                            : col - row - diagonal_offset;
      value -= alibi_slope * fabsf(static_cast<float>(distance));
    }
    return value * inv_logit_scale;
  }

  // Per-element visibility on a partially visible tile; same conventions as
  // KeyRangeMask::apply. Entries outside the sequences are left to the index band.
  template <typename ScoreTensor, typename CoordTensor>
  __device__ void apply_visibility(ScoreTensor& scores, const CoordTensor& coords, int row_offset,
                                   int col_offset) const {
#pragma unroll
    for (int i = 0; i < cute::size(scores); ++i) {
      const int row = row_offset + static_cast<int>(cute::get<0>(coords(i)));
      const int col = col_offset + static_cast<int>(cute::get<1>(coords(i)));
      if (row < seqlen_q && col < seqlen_k && !visible(row, col)) scores(i) = -INFINITY;
    }
  }

  template <typename ScoreTensor, typename CoordTensor>
  __device__ void add_offsets(ScoreTensor& scores, const CoordTensor& coords, int row_offset,
                              int col_offset) const {
#pragma unroll
    for (int i = 0; i < cute::size(scores); ++i) {
      const int row = row_offset + static_cast<int>(cute::get<0>(coords(i)));
      const int col = col_offset + static_cast<int>(cute::get<1>(coords(i)));
      if (row < seqlen_q && col < seqlen_k) scores(i) += offset(row, col);
    }
  }
};

// The variants that classify tiles build their CTA's Extras once in shared memory, after the
// tiles and before the tile states. kAll then reads it from there in the main loop (its ~25 words
// of pointers, strides and seed otherwise stay live in registers: the kAll dK/dV kernel spilled 384-396
// bytes at d128 on sm_90, 152 with this, and the d128 forward with dropout went from +50% to
// +36% over none); kVisibility copies its few fields to registers, which measured 3-7% faster
// for one-document segment ids than reading them from shared memory (benchmarks/NOTES.md,
// session 3).
constexpr int kExtrasSmemBytes = (sizeof(Extras) + 15) / 16 * 16;

// Thread 0 writes this CTA's Extras to `slot`; returns it once every thread can read it.
__device__ __forceinline__ const Extras& share_extras(Extras* slot, const AttentionParams& p,
                                                      int batch, int head, float logit_scale) {
  if (threadIdx.x == 0) *slot = Extras::make(p, batch, head, logit_scale);
  __syncthreads();
  return *slot;
}

template <ExtrasLevel kLevel>
__device__ __forceinline__ const Extras& cta_extras(const Extras* shared,
                                                    const Extras& in_registers) {
  if constexpr (kLevel == ExtrasLevel::kAll) {
    return *shared;
  } else {
    return in_registers;
  }
}

// Where the dropout variants' kernels read their draws. kAll: inside its shared Extras. kDropout:
// the forward has thread 0 write them to `slot` (kDropoutDrawsSmemBytes after the tiles), the
// backward builds them in registers. Measured (ptxas, sm_90, d128 bf16, spill stores/loads): the
// forward 140/196 bytes with them in registers, 0 in shared memory (plain: 72/124); the atomic
// dK/dV kernel 88/88 in registers, 128/128 in shared memory (plain: 44/44).
constexpr int kDropoutDrawsSmemBytes = (sizeof(DropoutDraws) + 15) / 16 * 16;

template <ExtrasLevel kLevel>
__device__ __forceinline__ const DropoutDraws& shared_draws(const Extras& extras,
                                                            DropoutDraws* slot,
                                                            const AttentionParams& p, int batch,
                                                            int head) {
  if constexpr (kLevel == ExtrasLevel::kDropout) {
    if (threadIdx.x == 0) *slot = DropoutDraws::make(p, batch, head);
    __syncthreads();
    return *slot;
  } else {
    return extras.draws;
  }
}

template <ExtrasLevel kLevel>
__device__ __forceinline__ const DropoutDraws& register_draws(const Extras& extras,
                                                              const DropoutDraws& in_registers) {
  if constexpr (kLevel == ExtrasLevel::kDropout) {
    return in_registers;
  } else {
    return extras.draws;
  }
}

// Dynamic shared memory the variants that classify tiles need after their tiles: the Extras and
// one state per walked block.
template <ExtrasLevel kLevel>
inline int tile_state_smem_bytes(int walked_blocks) {
  return classifies_tiles(kLevel) ? kExtrasSmemBytes + (walked_blocks + 15) / 16 * 16 : 0;
}

template <ExtrasLevel kLevel>
__device__ __forceinline__ bool dropout_active(const Extras& extras) {
  if constexpr (kLevel == ExtrasLevel::kDropout) {
    return true;
  } else if constexpr (kLevel == ExtrasLevel::kAll) {
    return extras.dropout;
  } else {
    return false;
  }
}

template <int kWords>
__device__ __forceinline__ bool bit_set(const uint32_t (&bits)[kWords], int index) {
  return (bits[index / 32] >> (index % 32)) & 1u;
}

// (min, max) of values[begin, end) computed by every warp on its own (uniform across the CTA);
// (INT_MAX, INT_MIN) when empty.
__device__ __forceinline__ int2 warp_min_max(const int* values, int begin, int end) {
  int lo = INT_MAX, hi = INT_MIN;
  for (int i = begin + static_cast<int>(threadIdx.x % 32); i < end; i += 32) {
    const int value = __ldg(values + i);
    lo = min(lo, value);
    hi = max(hi, value);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
  }
  return make_int2(lo, hi);
}

// Summary of one 16-element chunk (or a whole tile, after reduction) of the walked side.
struct ChunkSummary {
  int2 ids;      // segment ids (min, max)
  int2 pos;      // positions (min, max)
  int valid;     // entries inside the valid extent
  bool mask_any;
  bool mask_all;

  __device__ void reduce_with_lane(int offset) {
    ids.x = min(ids.x, __shfl_xor_sync(0xffffffffu, ids.x, offset));
    ids.y = max(ids.y, __shfl_xor_sync(0xffffffffu, ids.y, offset));
    pos.x = min(pos.x, __shfl_xor_sync(0xffffffffu, pos.x, offset));
    pos.y = max(pos.y, __shfl_xor_sync(0xffffffffu, pos.y, offset));
    valid += __shfl_xor_sync(0xffffffffu, valid, offset);
    mask_any = __shfl_xor_sync(0xffffffffu, int(mask_any), offset) || mask_any;
    mask_all = __shfl_xor_sync(0xffffffffu, int(mask_all), offset) && mask_all;
  }
};

// Nearest block at or below / at or above `block` whose state is not kTileSkip; returns
// `limit - 1` / `limit` when none.
__device__ __forceinline__ int visible_block_at_or_below(const uint8_t* states, int block_begin,
                                                         int block) {
  while (block >= block_begin && states[block - block_begin] == kTileSkip) --block;
  return block;
}
__device__ __forceinline__ int visible_block_at_or_above(const uint8_t* states, int block_begin,
                                                         int block_end, int block) {
  while (block < block_end && states[block - block_begin] == kTileSkip) ++block;
  return block;
}

// States (kTileSkip / kTilePartial / kTileFull) of the tiles of one CTA, written to shared memory
// before its main loop so that the loop skips empty tiles without waiting on global loads and
// tests no element of full ones. The CTA's own block (rows when kWalkKeys, else keys)
// [fixed_begin, fixed_end) (clipped to the valid extent, non-empty) is crossed with the walked
// blocks [block_begin, block_end) of kWalkBlock entries. Ends with a barrier.
template <int kThreads, int kWalkBlock, bool kWalkKeys>
__device__ void fill_tile_states(const Extras& x, const KeyRangeMask& band, int fixed_begin,
                                 int fixed_end, int fixed_block, int block_begin, int block_end,
                                 uint8_t* states) {
  static_assert(kWalkBlock % kMaskCell == 0 && kWalkBlock / kMaskCell <= 32, "walk block");
  constexpr int kGroup = kWalkBlock / kMaskCell;  // threads per walked block
  static_assert(kThreads % kGroup == 0, "whole groups");
  const int* fixed_ids = kWalkKeys ? x.q_ids : x.kv_ids;
  const int* walk_ids = kWalkKeys ? x.kv_ids : x.q_ids;
  const int* fixed_pos = kWalkKeys ? x.q_pos : x.kv_pos;
  const int* walk_pos = kWalkKeys ? x.kv_pos : x.q_pos;
  const int walk_valid = kWalkKeys ? band.seqlen_k : band.seqlen_q;
  const int2 empty = make_int2(INT_MAX, INT_MIN);
  const int2 fixed_id_range = fixed_ids ? warp_min_max(fixed_ids, fixed_begin, fixed_end) : empty;
  const int2 fixed_pos_range = fixed_pos ? warp_min_max(fixed_pos, fixed_begin, fixed_end) : empty;
  // Mask cells of the fixed block along its own axis.
  const int fixed_cell_first = fixed_begin / kMaskCell, fixed_cell_last = (fixed_end - 1) / kMaskCell;

  const int chunks = (block_end - block_begin) * kGroup;
  for (int base = 0; base < chunks; base += kThreads) {
    const int chunk = base + static_cast<int>(threadIdx.x);
    const int start = block_begin * kWalkBlock + chunk * kMaskCell;
    ChunkSummary s{empty, empty, 0, false, true};
    if (chunk < chunks) {
      const int end = min(start + kMaskCell, walk_valid);
      s.valid = max(end - start, 0);
      // Unrolled and predicated so that the chunk's 16 loads are in flight together: a rolled
      // loop waited one L2 latency per element, 16 per chunk and 8 chunks per thread for the
      // 512 key blocks of a 16k packed row (packed documents 1.32x the batch in the forward).
#pragma unroll
      for (int j = 0; j < kMaskCell; ++j) {
        const int i = start + j;
        if (i < end && walk_ids) {
          const int id = __ldg(walk_ids + i);
          s.ids = make_int2(min(s.ids.x, id), max(s.ids.y, id));
        }
        if (i < end && walk_pos) {
          const int pos = __ldg(walk_pos + i);
          s.pos = make_int2(min(s.pos.x, pos), max(s.pos.y, pos));
        }
      }
      if (x.tiles != nullptr) {
        const int walk_cell = start / kMaskCell;
        // Unrolled (fixed_block is a constant once inlined) for the same reason as the ids.
#pragma unroll
        for (int c = 0; c < fixed_block / kMaskCell; ++c) {
          const int cell = fixed_cell_first + c;
          if (cell <= fixed_cell_last) {
            const int row_cell = kWalkKeys ? cell : walk_cell;
            const int col_cell = kWalkKeys ? walk_cell : cell;
            const uint8_t summary =
                __ldg(x.tiles + row_cell * x.tiles_row_stride + col_cell * x.tiles_col_stride);
            s.mask_any = s.mask_any || (summary & kMaskCellAny);
            s.mask_all = s.mask_all && (summary & kMaskCellAll);
          }
        }
      } else {
        s.mask_any = true;
      }
    }
#pragma unroll
    for (int offset = kGroup / 2; offset > 0; offset /= 2) s.reduce_with_lane(offset);
    if (chunk < chunks && chunk % kGroup == 0) {
      const int block = block_begin + chunk / kGroup;
      const int walk_begin = block * kWalkBlock;
      const int row_begin = kWalkKeys ? fixed_begin : walk_begin;
      const int row_end = kWalkKeys ? fixed_end : min(walk_begin + kWalkBlock, walk_valid);
      const int col_begin = kWalkKeys ? walk_begin : fixed_begin;
      const int col_end = kWalkKeys ? min(walk_begin + kWalkBlock, walk_valid) : fixed_end;
      const int2 q_ids = kWalkKeys ? fixed_id_range : s.ids, kv_ids = kWalkKeys ? s.ids : fixed_id_range;
      const int2 q_pos = kWalkKeys ? fixed_pos_range : s.pos, kv_pos = kWalkKeys ? s.pos : fixed_pos_range;
      bool any = s.valid > 0 && s.mask_any && col_end > col_begin && row_end > row_begin &&
                 band.key_first(row_begin) <= col_end - 1 && band.key_last(row_end - 1) >= col_begin;
      // Full: no element test and, for the walked side, no entry past the valid extent.
      bool full = s.valid == kWalkBlock && s.mask_all &&
                  band.tile_fully_allowed(row_begin, row_end, kWalkKeys ? walk_begin : fixed_begin,
                                          kWalkKeys ? walk_begin + kWalkBlock
                                                    : fixed_begin + fixed_block);
      if (x.q_ids != nullptr) {
        // Exact for sorted (packed) ids; for any other order it only skips less.
        any = any && q_ids.x <= kv_ids.y && kv_ids.x <= q_ids.y;
        full = full && q_ids.x == q_ids.y && kv_ids.x == kv_ids.y && q_ids.x == kv_ids.x;
      }
      if (x.q_pos != nullptr) {
        any = any && kv_pos.y - q_pos.x >= -x.pos_left && kv_pos.x - q_pos.y <= x.pos_right;
        full = full && kv_pos.x - q_pos.y >= -x.pos_left && kv_pos.y - q_pos.x <= x.pos_right;
      }
      states[block - block_begin] = !any ? kTileSkip : (full ? kTileFull : kTilePartial);
    }
  }
  __syncthreads();
}

// fill_tile_states, then [block_begin, block_end) narrowed to the first and last visible block
// (empty when none; the states stay indexed from the original block_begin). Does nothing, and no
// barrier, for an empty range (a CTA-uniform condition).
template <int kThreads, int kWalkBlock, bool kWalkKeys>
__device__ __forceinline__ void classify_tiles(const Extras& x, const KeyRangeMask& band,
                                               int fixed_begin, int fixed_end, int fixed_block,
                                               int& block_begin, int& block_end,
                                               uint8_t* states) {
  if (block_end <= block_begin) return;
  const int states_begin = block_begin;
  fill_tile_states<kThreads, kWalkBlock, kWalkKeys>(x, band, fixed_begin, fixed_end, fixed_block,
                                                    block_begin, block_end, states);
  const int last = visible_block_at_or_below(states, states_begin, block_end - 1);
  block_begin = visible_block_at_or_above(states, states_begin, block_end, block_begin);
  block_end = last < block_begin ? block_begin : last + 1;
}

// The prologue of the variants that classify tiles (no-op for the others): the CTA's Extras in
// shared memory (`slot`; copied to `in_registers` by kVisibility, see cta_extras), then the
// states of the walked blocks (classify_tiles). Every thread calls it.
template <ExtrasLevel kLevel, int kThreads, int kWalkBlock, bool kWalkKeys>
__device__ __forceinline__ void prepare_extras(Extras* slot, Extras& in_registers,
                                               const AttentionParams& p, int batch, int head,
                                               float logit_scale, const KeyRangeMask& band,
                                               int fixed_begin, int fixed_end, int fixed_block,
                                               int& block_begin, int& block_end,
                                               uint8_t* states) {
  if constexpr (classifies_tiles(kLevel)) {
    const Extras& shared = share_extras(slot, p, batch, head, logit_scale);
    if constexpr (kLevel == ExtrasLevel::kVisibility) in_registers = shared;
    classify_tiles<kThreads, kWalkBlock, kWalkKeys>(shared, band, fixed_begin, fixed_end,
                                                    fixed_block, block_begin, block_end, states);
  }
}

}  // namespace flash_jax
