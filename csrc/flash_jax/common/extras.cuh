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

// kTileBand: segment ids, positions and the mask keep every entry of the tile and only the index
// band (causal diagonal, window edge, lengths) cuts it, so KeyRangeMask alone masks it. Without
// this state the diagonal tile of every CTA of one causal document tested each entry's ids, one
// dependent pair of global loads after another (benchmarks/NOTES.md, session 8).
enum TileState : uint8_t { kTileSkip = 0, kTilePartial = 1, kTileFull = 2, kTileBand = 3 };

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
//
// After the Extras come the first and last visible walked block, which the classification finds
// with shared-memory atomics as it writes the states (each thread scanning the states for them
// instead read up to ~450 states one dependent load after another in a CTA of a packed row).
struct ExtrasSlot {
  Extras extras;
  int first_visible;
  int last_visible;
};
constexpr int kExtrasSmemBytes = (sizeof(ExtrasSlot) + 15) / 16 * 16;

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

// (min, max) over the kLanes aligned lanes of a group (a power of two dividing 32).
template <int kLanes>
__device__ __forceinline__ int2 group_min_max(int2 range) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    range.x = min(range.x, __shfl_xor_sync(0xffffffffu, range.x, offset));
    range.y = max(range.y, __shfl_xor_sync(0xffffffffu, range.y, offset));
  }
  return range;
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
  return group_min_max<32>(make_int2(lo, hi));
}

// What one lane reads of the walked side before the lanes of a walked block combine it: four
// consecutive entries' segment ids and positions (min, max) and, of the mask cells of its 16-entry
// column (or row) of cells, whether any keeps an entry and whether all keep every entry.
struct QuadSummary {
  int2 ids;
  int2 pos;
  bool mask_any;
  bool mask_all;
};

// The four int32 entries [start, start + 4) of `values` (one 16-byte load when kVector: the row
// is 16-byte aligned, as start is a multiple of 4; entries at or past `extent` are never read).
template <bool kVector>
__device__ __forceinline__ int4 load_quad(const int* values, int start, int extent) {
  if (kVector && start + 4 <= extent) return __ldg(reinterpret_cast<const int4*>(values + start));
  int4 quad = make_int4(0, 0, 0, 0);
  if (start < extent) quad.x = __ldg(values + start);
  if (start + 1 < extent) quad.y = __ldg(values + start + 1);
  if (start + 2 < extent) quad.z = __ldg(values + start + 2);
  if (start + 3 < extent) quad.w = __ldg(values + start + 3);
  return quad;
}

// (min, max) of the entries of `quad` (indices start .. start + 3) below `valid`.
__device__ __forceinline__ int2 quad_min_max(int4 quad, int start, int valid) {
  const int values[4] = {quad.x, quad.y, quad.z, quad.w};
  int2 range = make_int2(INT_MAX, INT_MIN);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (start + j < valid) range = make_int2(min(range.x, values[j]), max(range.y, values[j]));
  }
  return range;
}

// Whether `flag` holds for any / for all of the kLanes aligned lanes of this lane's group.
template <int kLanes>
__device__ __forceinline__ bool group_any(bool flag) {
  const uint32_t bits = __ballot_sync(0xffffffffu, flag);
  const uint32_t group = kLanes == 32 ? 0xffffffffu : (1u << kLanes) - 1u;
  return (bits >> (threadIdx.x % 32 / kLanes * kLanes)) & group;
}
template <int kLanes>
__device__ __forceinline__ bool group_all(bool flag) {
  return !group_any<kLanes>(!flag);
}

// Nearest block at or below / at or above `block` whose state is not kTileSkip, searching no
// lower than `lowest` / no higher than `block_end - 1` (the narrowed range: every state outside
// it is kTileSkip, and scanning those one dependent shared load at a time cost a CTA of a packed
// row ~450 loads); states are indexed from `states_begin`. Returns a block below `lowest` /
// `block_end` when none.
__device__ __forceinline__ int visible_block_at_or_below(const uint8_t* states, int states_begin,
                                                         int lowest, int block) {
  while (block >= lowest && states[block - states_begin] == kTileSkip) --block;
  return block;
}
__device__ __forceinline__ int visible_block_at_or_above(const uint8_t* states, int states_begin,
                                                         int block_end, int block) {
  while (block < block_end && states[block - states_begin] == kTileSkip) ++block;
  return block;
}

// States (kTileSkip / kTilePartial / kTileBand / kTileFull) of the tiles of one CTA, written to shared memory
// before its main loop so that the loop skips empty tiles without waiting on global loads and
// tests no element of full ones. The CTA's own block (rows when kWalkKeys, else keys)
// [fixed_begin, fixed_end) (clipped to the valid extent, non-empty) is crossed with the walked
// blocks [block_begin, block_end) of kWalkBlock entries. Ends with a barrier.
//
// Each lane reads four consecutive walked entries (a warp reads 512 contiguous bytes of ids, one
// 16-byte load per lane when the row is aligned) and kQuadsInFlight of them before reducing any,
// and the kWalkBlock / 4 lanes of a walked block combine theirs by shuffles. This pass is what a
// CTA pays for every walked block, visible or not: a packed 16k row has 512 key blocks per query
// block of which 64 are visible. One 16-entry chunk per lane with scalar loads, the previous
// form, left the packed forward at 1.40x the same documents as batch entries.
template <int kThreads, int kWalkBlock, bool kWalkKeys, bool kVectorLoads>
__device__ void fill_tile_states_with(const Extras& x, const KeyRangeMask& band, int fixed_begin,
                                      int fixed_end, int fixed_block, int block_begin,
                                      int block_end, uint8_t* states, ExtrasSlot& slot) {
  constexpr int kLanes = kWalkBlock / 4;  // lanes per walked block
  static_assert(kWalkBlock % kMaskCell == 0 && 32 % kLanes == 0, "walk block of 16 to 128");
  static_assert(kThreads % 32 == 0, "whole warps");
  constexpr int kLanesPerCell = kMaskCell / 4;
  constexpr int kQuadsInFlight = 8;
  const int* fixed_ids = kWalkKeys ? x.q_ids : x.kv_ids;
  const int* walk_ids = kWalkKeys ? x.kv_ids : x.q_ids;
  const int* fixed_pos = kWalkKeys ? x.q_pos : x.kv_pos;
  const int* walk_pos = kWalkKeys ? x.kv_pos : x.q_pos;
  const int walk_valid = kWalkKeys ? band.seqlen_k : band.seqlen_q;
  const int walk_extent = kWalkKeys ? x.seqlen_k : x.seqlen_q;  // what the id/position rows hold
  const int2 empty = make_int2(INT_MAX, INT_MIN);
  const int2 fixed_id_range = fixed_ids ? warp_min_max(fixed_ids, fixed_begin, fixed_end) : empty;
  const int2 fixed_pos_range = fixed_pos ? warp_min_max(fixed_pos, fixed_begin, fixed_end) : empty;
  // Mask cells of the fixed block along its own axis; the four lanes of a 16-entry chunk share
  // them out.
  const int fixed_cell_first = fixed_begin / kMaskCell, fixed_cell_last = (fixed_end - 1) / kMaskCell;
  const int lane_in_cell = static_cast<int>(threadIdx.x) % kLanesPerCell;

  const int quad_begin = block_begin * kLanes;
  const int quads = (block_end - block_begin) * kLanes;
  int first_visible = INT_MAX, last_visible = INT_MIN;  // of the blocks this thread classified
  for (int base = 0; base < quads; base += kThreads * kQuadsInFlight) {
    // Loads first, for every quad of this round, so that they are in flight together.
    int4 raw_ids[kQuadsInFlight], raw_pos[kQuadsInFlight];
    QuadSummary s[kQuadsInFlight];
#pragma unroll
    for (int u = 0; u < kQuadsInFlight; ++u) {
      const int quad = base + u * kThreads + static_cast<int>(threadIdx.x);
      const int start = (quad_begin + quad) * 4;
      const int extent = quad < quads ? walk_extent : 0;
      if (walk_ids) raw_ids[u] = load_quad<kVectorLoads>(walk_ids, start, extent);
      if (walk_pos) raw_pos[u] = load_quad<kVectorLoads>(walk_pos, start, extent);
      s[u] = QuadSummary{empty, empty, x.tiles == nullptr && quad < quads, true};
      // Cells past the walked extent do not exist (the summary has ceil(extent / 16) of them);
      // the test is on the cell, not on this lane's entries: the four lanes of a cell share out
      // its row (or column) of cells, and every one of them must be read.
      const int walk_cell = start / kMaskCell;
      if (x.tiles != nullptr && quad < quads && walk_cell * kMaskCell < walk_extent) {
        // Unrolled (fixed_block is a constant once inlined): the cell loads in flight together.
#pragma unroll
        for (int k = 0; k < (fixed_block / kMaskCell + kLanesPerCell - 1) / kLanesPerCell; ++k) {
          const int cell = fixed_cell_first + lane_in_cell + k * kLanesPerCell;
          if (cell <= fixed_cell_last) {
            const int row_cell = kWalkKeys ? cell : walk_cell;
            const int col_cell = kWalkKeys ? walk_cell : cell;
            const uint8_t summary =
                __ldg(x.tiles + row_cell * x.tiles_row_stride + col_cell * x.tiles_col_stride);
            s[u].mask_any = s[u].mask_any || (summary & kMaskCellAny);
            s[u].mask_all = s[u].mask_all && (summary & kMaskCellAll);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kQuadsInFlight; ++u) {
      const int quad = base + u * kThreads + static_cast<int>(threadIdx.x);
      const int start = (quad_begin + quad) * 4;
      const int valid = quad < quads ? walk_valid : 0;
      if (walk_ids) s[u].ids = group_min_max<kLanes>(quad_min_max(raw_ids[u], start, valid));
      if (walk_pos) s[u].pos = group_min_max<kLanes>(quad_min_max(raw_pos[u], start, valid));
      const bool mask_any = group_any<kLanes>(s[u].mask_any);
      const bool mask_all = group_all<kLanes>(s[u].mask_all);
      if (quad < quads && quad % kLanes == 0) {
        const int block = block_begin + quad / kLanes;
        const int walk_begin = block * kWalkBlock;
        const int walk_count = min(max(walk_valid - walk_begin, 0), kWalkBlock);
        const int row_begin = kWalkKeys ? fixed_begin : walk_begin;
        const int row_end = kWalkKeys ? fixed_end : min(walk_begin + kWalkBlock, walk_valid);
        const int col_begin = kWalkKeys ? walk_begin : fixed_begin;
        const int col_end = kWalkKeys ? min(walk_begin + kWalkBlock, walk_valid) : fixed_end;
        const int2 q_ids = kWalkKeys ? fixed_id_range : s[u].ids;
        const int2 kv_ids = kWalkKeys ? s[u].ids : fixed_id_range;
        const int2 q_pos = kWalkKeys ? fixed_pos_range : s[u].pos;
        const int2 kv_pos = kWalkKeys ? s[u].pos : fixed_pos_range;
        bool any = walk_count > 0 && mask_any && col_end > col_begin && row_end > row_begin &&
                   band.key_first(row_begin) <= col_end - 1 && band.key_last(row_end - 1) >= col_begin;
        // Band-full: the index band cuts nothing and, for the walked side, no entry lies past
        // the valid extent (full tiles are loaded and scored without any test).
        const bool band_full =
            walk_count == kWalkBlock &&
            band.tile_fully_allowed(row_begin, row_end, kWalkKeys ? walk_begin : fixed_begin,
                                    kWalkKeys ? walk_begin + kWalkBlock : fixed_begin + fixed_block);
        bool extras_keep_all = mask_all;
        if (x.q_ids != nullptr) {
          // Exact for sorted (packed) ids; for any other order it only skips less.
          any = any && q_ids.x <= kv_ids.y && kv_ids.x <= q_ids.y;
          extras_keep_all = extras_keep_all && q_ids.x == q_ids.y && kv_ids.x == kv_ids.y &&
                            q_ids.x == kv_ids.x;
        }
        if (x.q_pos != nullptr) {
          any = any && kv_pos.y - q_pos.x >= -x.pos_left && kv_pos.x - q_pos.y <= x.pos_right;
          extras_keep_all = extras_keep_all && kv_pos.x - q_pos.y >= -x.pos_left &&
                            kv_pos.y - q_pos.x <= x.pos_right;
        }
        states[block - block_begin] = !any              ? kTileSkip
                                      : !extras_keep_all ? kTilePartial
                                      : band_full        ? kTileFull
                                                         : kTileBand;
        if (any) {
          first_visible = min(first_visible, block);
          last_visible = max(last_visible, block);
        }
      }
    }
  }
  // One pair of shared atomics per warp rather than one per visible block (up to 512 per CTA,
  // all on the same two words).
  const int2 visible = group_min_max<32>(make_int2(first_visible, last_visible));
  if (threadIdx.x % 32 == 0 && visible.x <= visible.y) {
    atomicMin(&slot.first_visible, visible.x);
    atomicMax(&slot.last_visible, visible.y);
  }
  __syncthreads();
}

// fill_tile_states_with 16-byte loads when the walked id and position rows are 16-byte aligned
// (a CTA-uniform choice; rows of a batch whose length is not a multiple of 4 are not). The
// visible range in `slot` must hold (block_end, block_begin - 1) before the call.
template <int kThreads, int kWalkBlock, bool kWalkKeys>
__device__ __forceinline__ void fill_tile_states(const Extras& x, const KeyRangeMask& band,
                                                 int fixed_begin, int fixed_end, int fixed_block,
                                                 int block_begin, int block_end, uint8_t* states,
                                                 ExtrasSlot& slot) {
  const int* walk_ids = kWalkKeys ? x.kv_ids : x.q_ids;
  const int* walk_pos = kWalkKeys ? x.kv_pos : x.q_pos;
  const bool aligned = (reinterpret_cast<uintptr_t>(walk_ids) | reinterpret_cast<uintptr_t>(walk_pos)) % 16 == 0;
  if (aligned) {
    fill_tile_states_with<kThreads, kWalkBlock, kWalkKeys, true>(
        x, band, fixed_begin, fixed_end, fixed_block, block_begin, block_end, states, slot);
  } else {
    fill_tile_states_with<kThreads, kWalkBlock, kWalkKeys, false>(
        x, band, fixed_begin, fixed_end, fixed_block, block_begin, block_end, states, slot);
  }
}

// fill_tile_states, then [block_begin, block_end) narrowed to the first and last visible block
// (empty when none; the states stay indexed from the original block_begin). Does nothing, and no
// barrier, for an empty range (a CTA-uniform condition).
template <int kThreads, int kWalkBlock, bool kWalkKeys>
__device__ __forceinline__ void classify_tiles(const Extras& x, const KeyRangeMask& band,
                                               int fixed_begin, int fixed_end, int fixed_block,
                                               int& block_begin, int& block_end,
                                               uint8_t* states, ExtrasSlot& slot) {
  if (block_end <= block_begin) return;
  fill_tile_states<kThreads, kWalkBlock, kWalkKeys>(x, band, fixed_begin, fixed_end, fixed_block,
                                                    block_begin, block_end, states, slot);
  block_begin = slot.first_visible;
  block_end = slot.last_visible < block_begin ? block_begin : slot.last_visible + 1;
}

// The prologue of the variants that classify tiles (no-op for the others): the CTA's Extras in
// shared memory (`slot`, the start of an ExtrasSlot; copied to `in_registers` by kVisibility,
// see cta_extras), then the states of the walked blocks (classify_tiles). Every thread calls it.
template <ExtrasLevel kLevel, int kThreads, int kWalkBlock, bool kWalkKeys>
__device__ __forceinline__ void prepare_extras(Extras* slot, Extras& in_registers,
                                               const AttentionParams& p, int batch, int head,
                                               float logit_scale, const KeyRangeMask& band,
                                               int fixed_begin, int fixed_end, int fixed_block,
                                               int& block_begin, int& block_end,
                                               uint8_t* states) {
  if constexpr (classifies_tiles(kLevel)) {
    ExtrasSlot& area = *reinterpret_cast<ExtrasSlot*>(slot);
    // Before share_extras' barrier: the empty range that the classification's atomics widen.
    if (threadIdx.x == 0) {
      area.first_visible = block_end;
      area.last_visible = block_begin - 1;
    }
    const Extras& shared = share_extras(slot, p, batch, head, logit_scale);
    if constexpr (kLevel == ExtrasLevel::kVisibility) in_registers = shared;
    classify_tiles<kThreads, kWalkBlock, kWalkKeys>(shared, band, fixed_begin, fixed_end,
                                                    fixed_block, block_begin, block_end, states,
                                                    area);
  }
}

}  // namespace flash_jax
