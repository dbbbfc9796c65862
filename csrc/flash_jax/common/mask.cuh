// Which keys a query row may see: causal limit (either alignment), sliding window and the sequence
// ends (per batch row with q_lengths / kv_lengths); segment ids, positions and dense masks are in
// extras.cuh. Shared by the forward and backward kernels of every architecture.
//
// Every combination of these masks leaves each query row a contiguous interval of keys, so the
// mask is kept as the band  diagonal_offset - left <= key - query <= diagonal_offset + right
// intersected with [0, seqlen_k). That gives O(1) block-range arithmetic for skipping key (or
// query) blocks and a two-comparison per-element test.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include <cute/tensor.hpp>

#include "flash_jax/params.h"

namespace flash_jax {

struct KeyRangeMask {
  // Stands in for an unbounded window side. i + offset +/- kUnbounded stays far inside int32
  // for any sequence length below 2^29.
  static constexpr int kUnbounded = 1 << 30;

  // Valid extents of this batch row: the sequence lengths capped by q_lengths[b] / kv_lengths[b].
  // Keys past seqlen_k are masked like the padding of a tile; query rows past seqlen_q see no key
  // (the kernels write them as fully masked rows). The diagonal stays aligned to the full lengths.
  int seqlen_q;
  int seqlen_k;
  int diagonal_offset;  // query i is aligned with key i + diagonal_offset
  int left;             // keys >= i + diagonal_offset - left
  int right;            // keys <= i + diagonal_offset + right

  // Causal is the window's right side clamped to 0; window sides of -1 are unbounded. The diagonal
  // is bottom-right aligned (offset seqlen_k - seqlen_q) unless causal_top_left, for the window
  // too, whether or not causal is set.
  // Lengths are read once per CTA here, outside every loop: without them the fields are the
  // parameters themselves.
  __host__ __device__ static KeyRangeMask make(const AttentionParams& p, int batch) {
    KeyRangeMask m;
    m.seqlen_q = valid_length(p.seqlen_q, p.q_lengths, batch);
    m.seqlen_k = valid_length(p.seqlen_k, p.kv_lengths, batch);
    m.diagonal_offset = p.causal_top_left ? 0 : p.seqlen_k - p.seqlen_q;
    // With positions the band is on kv_pos - q_pos (ExtrasMask); the index band keeps only the
    // sequence extents.
    const bool by_index = p.q_positions == nullptr;
    m.left = by_index ? band_left(p) : kUnbounded;
    m.right = by_index ? band_right(p) : kUnbounded;
    return m;
  }

  __host__ __device__ static int band_left(const AttentionParams& p) {
    return p.window_left < 0 ? kUnbounded : p.window_left;
  }
  __host__ __device__ static int band_right(const AttentionParams& p) {
    return p.causal ? 0 : (p.window_right < 0 ? kUnbounded : p.window_right);
  }

  // min(seqlen, lengths[batch]) clamped at 0, or seqlen without lengths.
  __host__ __device__ static int valid_length(int seqlen, const int* lengths, int batch) {
    if (lengths == nullptr) return seqlen;
    const int length = lengths[batch];
    return length < 0 ? 0 : (length < seqlen ? length : seqlen);
  }

  // First and last key (inclusive) that query `row` sees; empty when last < first.
  __host__ __device__ int key_first(int row) const {
    int first = row + diagonal_offset - left;
    return first < 0 ? 0 : first;
  }
  __host__ __device__ int key_last(int row) const {
    int last = row + diagonal_offset + right;
    return last > seqlen_k - 1 ? seqlen_k - 1 : last;
  }

  __host__ __device__ bool allowed(int row, int col) const {
    int distance = col - row;
    return col < seqlen_k && col >= 0 && distance >= diagonal_offset - left &&
           distance <= diagonal_offset + right;
  }

  // Key blocks [*block_begin, *block_end) of size block_n that hold at least one key seen by a
  // query in rows [row_begin, row_end) (row_end already clipped to seqlen_q). Empty (end <= begin)
  // when every such row is fully masked.
  __host__ __device__ void key_block_range(int row_begin, int row_end, int block_n,
                                           int* block_begin, int* block_end) const {
    // No rows (a query block entirely past q_lengths[b]): the band alone would not empty it.
    if (row_end <= row_begin) {
      *block_begin = *block_end = 0;
      return;
    }
    int first = key_first(row_begin);
    int last = key_last(row_end - 1);
    *block_begin = first / block_n;
    *block_end = last < first ? *block_begin : (last + block_n) / block_n;
  }

  // Query rows [*first_row, *end_row) that see at least one key in [col_begin, col_end) (col_end
  // clipped to seqlen_k): the backward's loop range for one key block. Empty when end <= first.
  __host__ __device__ void query_row_range(int col_begin, int col_end, int* first_row,
                                           int* end_row) const {
    // No keys (a key block entirely past kv_lengths[b]).
    if (col_end <= col_begin) {
      *first_row = *end_row = 0;
      return;
    }
    long long first = (long long)col_begin - diagonal_offset - right;
    long long end = (long long)col_end - 1 - diagonal_offset + left + 1;
    *first_row = (int)(first < 0 ? 0 : first);
    *end_row = (int)(end > seqlen_q ? seqlen_q : end);
  }

  // True when every query in [row_begin, row_end) sees every key in [col_begin, col_end): such a
  // tile needs no per-element mask. The binding rows are the last one for the left edge and the
  // first one for the right edge, since both edges move right with the row.
  __host__ __device__ bool tile_fully_allowed(int row_begin, int row_end, int col_begin,
                                              int col_end) const {
    return col_end <= seqlen_k && col_begin >= key_first(row_end - 1) &&
           col_end - 1 <= key_last(row_begin);
  }

  // Key blocks [*block_begin, *block_end) that every query in [row_begin, row_end) sees entirely
  // (the blocks for which tile_fully_allowed holds: one interval, since both band edges are
  // monotonic). A loop over blocks compares its index against two integers instead of
  // re-evaluating the band per block. Possibly empty (end <= begin).
  __host__ __device__ void unmasked_key_block_range(int row_begin, int row_end, int block_n,
                                                    int* block_begin, int* block_end) const {
    int first = key_first(row_end - 1);
    int end = key_last(row_begin) + 1;
    if (end > seqlen_k) end = seqlen_k;
    *block_begin = (first + block_n - 1) / block_n;
    *block_end = end < 0 ? 0 : end / block_n;
  }

  // Sets masked scores to -inf. `scores` and `coords` are fragments of one tile partitioned the
  // same way (coords from an identity tensor of the tile's shape, so coords(i) = (row, col)
  // inside the tile); row_offset/col_offset place the tile in the sequence. Works for any
  // accumulator layout.
  template <typename ScoreTensor, typename CoordTensor>
  __device__ void apply(ScoreTensor& scores, const CoordTensor& coords, int row_offset,
                        int col_offset) const {
#pragma unroll
    for (int i = 0; i < cute::size(scores); ++i) {
      int row = row_offset + static_cast<int>(cute::get<0>(coords(i)));
      int col = col_offset + static_cast<int>(cute::get<1>(coords(i)));
      if (!allowed(row, col)) scores(i) = -INFINITY;
    }
  }
};

}  // namespace flash_jax
