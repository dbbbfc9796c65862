// The only contract between host code (FFI handlers) and the kernels: plain pointers, element
// strides (int64), sizes, flags and scales. No JAX, XLA or pybind types may appear here.
//
// Layout of q/k/v/out/dout/dq/dk/dv: [batch, seq, heads, head_dim] with arbitrary batch/row/head
// strides (in elements) and a unit stride along head_dim. lse and dlse: float32 [batch, heads,
// seqlen_q], contiguous.
#pragma once

#include <cstdint>

namespace flash_jax {

enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1 };

// Head-dim buckets with instantiated kernels; head_dim is padded up to the next bucket.
constexpr int kHeadDimBuckets[] = {32, 64, 96, 128, 192, 256};

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;

  int batch;
  int seqlen_q;
  int seqlen_k;
  int heads;           // query heads
  int kv_heads;        // heads % kv_heads == 0; query head h reads kv head h / (heads / kv_heads)
  int head_dim;        // actual head dim, <= 256
  int head_dim_padded; // the bucket from kHeadDimBuckets the kernel is instantiated for
  DType dtype;

  float softmax_scale;       // applied to q.k
  float softmax_scale_log2;  // softmax_scale * log2(e), for exp2-based softmax

  // Causal masking. causal_top_left == false: bottom-right alignment, query i sees keys
  // j <= i + seqlen_k - seqlen_q (FlashAttention-2 convention). true: j <= i (jax.nn).
  bool causal;
  bool causal_top_left;
  // Sliding window around the (causally aligned) diagonal; -1 = unbounded on that side.
  int window_left;
  int window_right;
  // 0 disables; else scores s -> softcap * tanh(s / softcap) before masking.
  float softcap;

  // Optional per-batch-row masks, nullptr when absent (device pointers, int32).
  //   q_lengths [batch], kv_lengths [batch]: keys >= kv_lengths[b] are masked and query rows
  //   >= q_lengths[b] see no key (output 0, lse -inf, zero gradients); values above seqlen are
  //   capped, negative ones count as 0. The causal diagonal stays aligned to seqlen_q/seqlen_k.
  const int* q_lengths;
  const int* kv_lengths;
  //   q_segment_ids [batch, seqlen_q], kv_segment_ids [batch, seqlen_k] (unit stride along the
  //   sequence; both present or both absent): query i sees key j only when their ids are equal.
  const int* q_segment_ids;
  const int* kv_segment_ids;
  int64_t q_segment_ids_batch_stride;
  int64_t kv_segment_ids_batch_stride;

  // Segment ids and the operands below run in the "extras" kernel variants (launchers pick them
  // when any is present; none of them is read by the plain kernels). nullptr / 0 when absent.
  //   q_positions [batch, seqlen_q], kv_positions [batch, seqlen_k] (int32, given together):
  //   replace the index diagonal. Query i sees key j when -window_left <= kv_pos[j] - q_pos[i]
  //   <= window_right (0 when causal; -1 sides unbounded), and ALiBi measures |kv_pos - q_pos|.
  const int* q_positions;
  const int* kv_positions;
  //   mask: uint8 [mask_batch, mask_heads, mask_rows, mask_cols], contiguous, non-zero keeps;
  //   mask_batch in {1, batch}, mask_heads in {1, heads}, mask_rows in {1, seqlen_q},
  //   mask_cols in {1, seqlen_k} (1 = broadcast).
  const uint8_t* mask;
  int mask_batch, mask_heads, mask_rows, mask_cols;
  //   mask_tiles: uint8 [mask_batch, mask_heads, ceil(mask_rows / 16), ceil(mask_cols / 16)]
  //   summary of 16 x 16 cells (kMaskCellAny | kMaskCellAll), written by the launchers before
  //   the attention kernels so that those skip empty tiles and test no element of full ones.
  uint8_t* mask_tiles;
  //   bias: float32 [bias_batch, bias_heads, bias_rows, bias_cols], contiguous, broadcast as mask.
  const float* bias;
  int bias_batch, bias_heads, bias_rows, bias_cols;
  //   alibi_slopes: float32 [alibi_batch, heads], alibi_batch in {1, batch}: the logit of (i, j)
  //   gets -slope * |j - i - diagonal offset| (or |kv_pos - q_pos|).
  const float* alibi_slopes;
  int alibi_batch;
  //   dropout_seeds: uint32 [batch, 2], the Philox key of each batch row (flash_jax/_dropout.py
  //   has the counter layout); entries whose 16-bit draw is below dropout_threshold are dropped
  //   and the kept ones scaled by dropout_scale = 1 / (1 - rate).
  const uint32_t* dropout_seeds;
  uint32_t dropout_threshold;
  float dropout_scale;
};

constexpr int kMaskCell = 16;
constexpr uint8_t kMaskCellAny = 1;  // some entry of the cell is kept
constexpr uint8_t kMaskCellAll = 2;  // every entry of the cell (inside the sequences) is kept

// Which extras kernel variant a call needs. Several variants instead of one so that the common
// cases do not carry the registers and code of the rest: with every score modifier the backward
// dK/dV kernel spilled 330-400 bytes at head_dim 128 and one-document segment ids cost +56%
// fwd+bwd over none (benchmarks/NOTES.md, session 2); with dropout alone it ran at 2x the plain
// kernel with 1.8x its instructions and instruction-cache stalls (session 4).
//   kVisibility: segment ids, positions, dense mask (tile states, per-element visibility).
//   kAll:        also bias (+ dbias), ALiBi and dropout; softcap is a run-time branch there,
//                so that each extras translation unit instantiates three variants, not six.
//   kDropout:    dropout with neither of the above nor softcap: the plain kernels' loops (causal,
//                windows and lengths through the index band) plus the draws, kept in registers.
enum class ExtrasLevel : int { kNone = 0, kVisibility = 1, kAll = 2, kDropout = 3 };

// The variants that classify their tiles into shared memory before the main loop.
constexpr bool classifies_tiles(ExtrasLevel level) {
  return level == ExtrasLevel::kVisibility || level == ExtrasLevel::kAll;
}
constexpr bool draws_dropout(ExtrasLevel level) {
  return level == ExtrasLevel::kAll || level == ExtrasLevel::kDropout;
}

inline ExtrasLevel extras_level(const AttentionParams& p) {
  const bool visibility =
      p.q_segment_ids != nullptr || p.q_positions != nullptr || p.mask != nullptr;
  if (p.bias != nullptr || p.alibi_slopes != nullptr) return ExtrasLevel::kAll;
  if (p.dropout_seeds != nullptr) {
    return visibility || p.softcap > 0.f ? ExtrasLevel::kAll : ExtrasLevel::kDropout;
  }
  if (visibility) return p.softcap > 0.f ? ExtrasLevel::kAll : ExtrasLevel::kVisibility;
  return ExtrasLevel::kNone;
}

struct FwdParams : AttentionParams {
  void* out;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  float* lse;  // [batch, heads, seqlen_q]

  // Split-KV (decoding shapes): when num_splits > 1 each split writes partial results here and a
  // combine kernel merges them by lse into out/lse. Both buffers come from the caller (extra FFI
  // outputs), sized for num_splits:
  //   out_accum float [num_splits, batch, heads, seqlen_q, head_dim_padded]
  //   lse_accum float [num_splits, batch, heads, seqlen_q]
  int num_splits;
  float* out_accum;
  float* lse_accum;
};

struct BwdParams : AttentionParams {
  const void* out;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  const void* dout;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  const float* lse;   // [batch, heads, seqlen_q], from the forward
  const float* dlse;  // [batch, heads, seqlen_q] cotangent of lse, or nullptr when zero

  // Gradients. dk/dv always have `heads` (query) heads: for GQA/MQA the caller passes buffers of
  // shape [batch, seqlen_k, heads, head_dim] and reduces each group afterwards.
  void* dq;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  void* dk;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  void* dv;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

  // Workspace from the caller (extra FFI outputs), seqlen_q_padded = round_up(seqlen_q, 128):
  //   dq_accum  float [batch, heads, seqlen_q_padded, head_dim_padded]  (zeroed by the kernels)
  //   softmax_d float [batch, heads, seqlen_q_padded]                   (rowsum(dout * out) - dlse)
  float* dq_accum;
  float* softmax_d;

  // true: dq accumulation in a fixed order, bitwise reproducible run to run.
  bool deterministic;

  // Gradient of bias, float32 with the bias's shape (zeroed by the launcher). Each entry is the
  // sum of dL/dlogit over the entries the bias broadcasts to: dbias_atomic when the bias is
  // broadcast along some axis (several CTAs add to one entry), plain stores otherwise
  // (bitwise reproducible).
  float* dbias;
  bool dbias_atomic;
};

constexpr int kBwdSeqlenQPadMultiple = 128;

}  // namespace flash_jax
