// XLA FFI handlers: decode the buffers and attributes XLA hands over, fill the kernel parameters
// (flash_jax/params.h) and call the kernels library. Every problem is returned as an ffi::Error:
// a handler never aborts, synchronises the stream or allocates device memory (workspace arrives
// as extra outputs), which is also what makes it safe to capture in CUDA graphs.
#include "ffi/attention_ffi.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "flash_jax/api.h"
#include "flash_jax/params.h"
#include "xla/ffi/api/ffi.h"

namespace flash_jax {
namespace {

namespace ffi = ::xla::ffi;

using Dims = std::vector<int64_t>;

constexpr float kLog2e = 1.4426950408889634f;

std::string format_dims(ffi::AnyBuffer::Dimensions dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(dims[i]);
  }
  return text + "]";
}

std::string format_dims(const Dims& dims) {
  return format_dims(ffi::AnyBuffer::Dimensions(dims.data(), dims.size()));
}

const char* dtype_name(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::U32: return "uint32";
    case ffi::DataType::U8: return "uint8";
    default: return "an unsupported dtype";
  }
}

// The custom call is only emitted by flash_jax/_cuda.py, which sizes every buffer; a mismatch
// means a caller bypassed it, and must be reported rather than read out of bounds.
ffi::Error check_buffer(const char* name, const ffi::AnyBuffer& buffer, ffi::DataType dtype,
                        const Dims& dims) {
  if (buffer.element_type() != dtype) {
    return ffi::Error::InvalidArgument(std::string("flash_jax: `") + name + "` must be " +
                                       dtype_name(dtype) + ", got " +
                                       dtype_name(buffer.element_type()));
  }
  auto actual = buffer.dimensions();
  if (actual.size() != dims.size() || !std::equal(dims.begin(), dims.end(), actual.begin())) {
    return ffi::Error::InvalidArgument(std::string("flash_jax: `") + name + "` must have shape " +
                                       format_dims(dims) + ", got " + format_dims(actual));
  }
  return ffi::Error::Success();
}

int64_t head_dim_bucket(int64_t head_dim) {
  for (int bucket : kHeadDimBuckets) {
    if (head_dim <= bucket) return bucket;
  }
  return -1;
}

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Sets the fields shared by the forward and the backward from q, k, v and the attributes.
ffi::Error fill_common(AttentionParams& params, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                       const ffi::AnyBuffer& v, float softmax_scale, bool causal,
                       bool causal_top_left, int64_t window_left, int64_t window_right,
                       float softcap) {
  if (q.element_type() != ffi::DataType::F16 && q.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument(std::string("flash_jax: `q` must be float16 or bfloat16, got ") +
                                       dtype_name(q.element_type()));
  }
  auto q_dims = q.dimensions();
  auto k_dims = k.dimensions();
  if (q_dims.size() != 4 || k_dims.size() != 4) {
    return ffi::Error::InvalidArgument(
        "flash_jax: `q` and `k` must have rank 4 [batch, seq, heads, head_dim], got " +
        format_dims(q_dims) + " and " + format_dims(k_dims));
  }
  const int64_t batch = q_dims[0], seqlen_q = q_dims[1], heads = q_dims[2], head_dim = q_dims[3];
  const int64_t seqlen_k = k_dims[1], kv_heads = k_dims[2];
  const Dims kv_shape = {batch, seqlen_k, kv_heads, head_dim};
  if (auto error = check_buffer("k", k, q.element_type(), kv_shape); error.failure()) return error;
  if (auto error = check_buffer("v", v, q.element_type(), kv_shape); error.failure()) return error;

  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  for (int64_t size : {batch, seqlen_q, seqlen_k, heads, kv_heads}) {
    if (size < 1 || size > kIntMax) {
      return ffi::Error::InvalidArgument(
          "flash_jax: every size of q " + format_dims(q_dims) + " and k " + format_dims(k_dims) +
          " must be in [1, 2^31 - 1]");
    }
  }
  if (heads % kv_heads != 0) {
    return ffi::Error::InvalidArgument("flash_jax: query heads (" + std::to_string(heads) +
                                       ") must be a multiple of kv heads (" +
                                       std::to_string(kv_heads) + ")");
  }
  // Rows are loaded in 16-byte vectors, so head_dim comes padded to a multiple of 8 from Python.
  const int64_t bucket = head_dim_bucket(head_dim);
  if (head_dim < 8 || head_dim % 8 != 0 || bucket < 0) {
    return ffi::Error::InvalidArgument("flash_jax: head_dim must be a multiple of 8 in [8, 256], got " +
                                       std::to_string(head_dim));
  }
  if (window_left < -1 || window_right < -1 || window_left > kIntMax || window_right > kIntMax) {
    return ffi::Error::InvalidArgument(
        "flash_jax: window sizes must be -1 (unbounded) or in [0, 2^31 - 1], got (" +
        std::to_string(window_left) + ", " + std::to_string(window_right) + ")");
  }
  if (!(softcap >= 0.0f)) {
    return ffi::Error::InvalidArgument("flash_jax: softcap must be >= 0, got " +
                                       std::to_string(softcap));
  }

  params.q = q.untyped_data();
  params.k = k.untyped_data();
  params.v = v.untyped_data();
  params.q_row_stride = heads * head_dim;
  params.q_head_stride = head_dim;
  params.q_batch_stride = seqlen_q * params.q_row_stride;
  params.k_row_stride = kv_heads * head_dim;
  params.k_head_stride = head_dim;
  params.k_batch_stride = seqlen_k * params.k_row_stride;
  params.v_row_stride = params.k_row_stride;
  params.v_head_stride = params.k_head_stride;
  params.v_batch_stride = params.k_batch_stride;

  params.batch = static_cast<int>(batch);
  params.seqlen_q = static_cast<int>(seqlen_q);
  params.seqlen_k = static_cast<int>(seqlen_k);
  params.heads = static_cast<int>(heads);
  params.kv_heads = static_cast<int>(kv_heads);
  params.head_dim = static_cast<int>(head_dim);
  params.head_dim_padded = static_cast<int>(bucket);
  params.dtype = q.element_type() == ffi::DataType::F16 ? DType::kFloat16 : DType::kBFloat16;

  params.softmax_scale = softmax_scale;
  params.softmax_scale_log2 = softmax_scale * kLog2e;
  params.causal = causal;
  params.causal_top_left = causal_top_left;
  params.window_left = static_cast<int>(window_left);
  params.window_right = static_cast<int>(window_right);
  params.softcap = softcap;
  return ffi::Error::Success();
}

// The optional masks, always passed as operands so that the handler signature is fixed: an absent
// one is an empty int32 [0] array, and the has_* attributes say which are present (a present one
// is never empty: batch and sequence lengths are >= 1).
ffi::Error fill_masks(AttentionParams& params, const ffi::AnyBuffer& q_lengths,
                      const ffi::AnyBuffer& kv_lengths, const ffi::AnyBuffer& q_segment_ids,
                      const ffi::AnyBuffer& kv_segment_ids, bool has_q_lengths,
                      bool has_kv_lengths, bool has_segment_ids) {
  const int64_t b = params.batch;
  const Dims absent = {0};
  struct Operand {
    const char* name;
    const ffi::AnyBuffer& buffer;
    bool present;
    Dims dims;
    const int** field;
  };
  for (const Operand& operand : {
           Operand{"q_lengths", q_lengths, has_q_lengths, {b}, &params.q_lengths},
           Operand{"kv_lengths", kv_lengths, has_kv_lengths, {b}, &params.kv_lengths},
           Operand{"q_segment_ids", q_segment_ids, has_segment_ids, {b, params.seqlen_q},
                   &params.q_segment_ids},
           Operand{"kv_segment_ids", kv_segment_ids, has_segment_ids, {b, params.seqlen_k},
                   &params.kv_segment_ids},
       }) {
    if (auto error = check_buffer(operand.name, operand.buffer, ffi::DataType::S32,
                                  operand.present ? operand.dims : absent);
        error.failure()) {
      return error;
    }
    *operand.field =
        operand.present ? static_cast<const int*>(operand.buffer.untyped_data()) : nullptr;
  }
  params.q_segment_ids_batch_stride = params.seqlen_q;
  params.kv_segment_ids_batch_stride = params.seqlen_k;
  return ffi::Error::Success();
}

// Operands of the extras variants (params.h), always passed so that the handler signature is
// fixed: an absent one is an empty rank-1 array [0], a present one has its own rank (2 or 4).
struct ExtraOperands {
  const ffi::AnyBuffer& q_positions;
  const ffi::AnyBuffer& kv_positions;
  const ffi::AnyBuffer& mask;
  const ffi::AnyBuffer& bias;
  const ffi::AnyBuffer& alibi_slopes;
  const ffi::AnyBuffer& dropout_seeds;
};

bool present(const ffi::AnyBuffer& buffer) { return buffer.dimensions().size() > 1; }

// A [batch|1, heads|1, seqlen_q|1, seqlen_k|1] operand: its four sizes, each full or 1.
ffi::Error broadcast_dims(const char* name, const ffi::AnyBuffer& buffer, ffi::DataType dtype,
                          const AttentionParams& params, int (&dims)[4]) {
  const int64_t full[4] = {params.batch, params.heads, params.seqlen_q, params.seqlen_k};
  auto actual = buffer.dimensions();
  bool ok = buffer.element_type() == dtype && actual.size() == 4;
  for (int i = 0; ok && i < 4; ++i) ok = actual[i] == full[i] || actual[i] == 1;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        std::string("flash_jax: `") + name + "` must be " + dtype_name(dtype) +
        " of a shape broadcastable to " + format_dims(Dims(full, full + 4)) +
        " with each size full or 1, got " + dtype_name(buffer.element_type()) +
        format_dims(actual));
  }
  for (int i = 0; i < 4; ++i) dims[i] = static_cast<int>(actual[i]);
  return ffi::Error::Success();
}

Dims mask_tiles_dims(const AttentionParams& params) {
  if (params.mask == nullptr) return {0};
  return {params.mask_batch, params.mask_heads, round_up(params.mask_rows, kMaskCell) / kMaskCell,
          round_up(params.mask_cols, kMaskCell) / kMaskCell};
}

ffi::Error fill_extras(AttentionParams& params, const ExtraOperands& operands,
                       ffi::AnyBuffer& mask_tiles, int64_t dropout_threshold,
                       float dropout_scale) {
  const int64_t b = params.batch, h = params.heads;
  const bool positions = present(operands.q_positions);
  for (auto [name, buffer, length, field] :
       {std::tuple{"q_positions", &operands.q_positions, int64_t(params.seqlen_q), &params.q_positions},
        std::tuple{"kv_positions", &operands.kv_positions, int64_t(params.seqlen_k), &params.kv_positions}}) {
    if (auto error = check_buffer(name, *buffer, ffi::DataType::S32,
                                  positions ? Dims{b, length} : Dims{0});
        error.failure()) {
      return error;
    }
    *field = positions ? static_cast<const int*>(buffer->untyped_data()) : nullptr;
  }
  params.mask = nullptr;
  if (present(operands.mask)) {
    int dims[4];
    if (auto error = broadcast_dims("mask", operands.mask, ffi::DataType::U8, params, dims);
        error.failure()) {
      return error;
    }
    params.mask = static_cast<const uint8_t*>(operands.mask.untyped_data());
    params.mask_batch = dims[0], params.mask_heads = dims[1];
    params.mask_rows = dims[2], params.mask_cols = dims[3];
  }
  if (auto error = check_buffer("mask_tiles", mask_tiles, ffi::DataType::U8, mask_tiles_dims(params));
      error.failure()) {
    return error;
  }
  params.mask_tiles = params.mask ? static_cast<uint8_t*>(mask_tiles.untyped_data()) : nullptr;
  params.bias = nullptr;
  if (present(operands.bias)) {
    int dims[4];
    if (auto error = broadcast_dims("bias", operands.bias, ffi::DataType::F32, params, dims);
        error.failure()) {
      return error;
    }
    params.bias = static_cast<const float*>(operands.bias.untyped_data());
    params.bias_batch = dims[0], params.bias_heads = dims[1];
    params.bias_rows = dims[2], params.bias_cols = dims[3];
  }
  params.alibi_slopes = nullptr;
  if (present(operands.alibi_slopes)) {
    auto dims = operands.alibi_slopes.dimensions();
    const int64_t rows = dims[0];
    if (auto error = check_buffer("alibi_slopes", operands.alibi_slopes, ffi::DataType::F32,
                                  {rows == 1 ? 1 : b, h});
        error.failure()) {
      return error;
    }
    params.alibi_slopes = static_cast<const float*>(operands.alibi_slopes.untyped_data());
    params.alibi_batch = static_cast<int>(rows);
  }
  params.dropout_seeds = nullptr;
  const bool dropout = present(operands.dropout_seeds);
  if (auto error = check_buffer("dropout_seeds", operands.dropout_seeds, ffi::DataType::U32,
                                dropout ? Dims{b, 2} : Dims{0});
      error.failure()) {
    return error;
  }
  // The threshold comes from Python (flash_jax/_dropout.py keep_threshold16) so that CPU and
  // GPU derive it from the same double-precision rate.
  if (dropout_threshold < 0 || dropout_threshold > 65535 || !(dropout_scale >= 1.f)) {
    return ffi::Error::InvalidArgument(
        "flash_jax: dropout_threshold must be in [0, 65535] and dropout_scale >= 1, got " +
        std::to_string(dropout_threshold) + " and " + std::to_string(dropout_scale));
  }
  if (dropout) {
    params.dropout_seeds = static_cast<const uint32_t*>(operands.dropout_seeds.untyped_data());
    params.dropout_threshold = static_cast<uint32_t>(dropout_threshold);
    params.dropout_scale = dropout_scale;
  }
  return ffi::Error::Success();
}

// A message from the kernels library means a launch failed or a combination slipped past the
// Python checks: both are internal errors from the user's point of view.
ffi::Error from_message(const std::string& message) {
  return message.empty() ? ffi::Error::Success() : ffi::Error::Internal(message);
}

ffi::Error attention_fwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::AnyBuffer q_lengths, ffi::AnyBuffer kv_lengths,
                         ffi::AnyBuffer q_segment_ids, ffi::AnyBuffer kv_segment_ids,
                         ffi::AnyBuffer q_positions, ffi::AnyBuffer kv_positions,
                         ffi::AnyBuffer mask, ffi::AnyBuffer bias, ffi::AnyBuffer alibi_slopes,
                         ffi::AnyBuffer dropout_seeds, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> out_accum,
                         ffi::Result<ffi::AnyBuffer> lse_accum,
                         ffi::Result<ffi::AnyBuffer> mask_tiles, float softmax_scale, bool causal,
                         bool causal_top_left, int64_t window_left, int64_t window_right,
                         float softcap, int64_t num_splits, bool has_q_lengths,
                         bool has_kv_lengths, bool has_segment_ids, int64_t dropout_threshold,
                         float dropout_scale) {
  FwdParams params{};
  if (auto error = fill_common(params, q, k, v, softmax_scale, causal, causal_top_left,
                               window_left, window_right, softcap);
      error.failure()) {
    return error;
  }
  if (auto error = fill_masks(params, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                              has_q_lengths, has_kv_lengths, has_segment_ids);
      error.failure()) {
    return error;
  }
  if (auto error = fill_extras(params,
                               {q_positions, kv_positions, mask, bias, alibi_slopes, dropout_seeds},
                               *mask_tiles, dropout_threshold, dropout_scale);
      error.failure()) {
    return error;
  }
  const int64_t b = params.batch, sq = params.seqlen_q, h = params.heads;
  const Dims q_shape(q.dimensions().begin(), q.dimensions().end());
  if (auto error = check_buffer("out", *out, q.element_type(), q_shape); error.failure()) {
    return error;
  }
  if (auto error = check_buffer("lse", *lse, ffi::DataType::F32, {b, h, sq}); error.failure()) {
    return error;
  }
  if (num_splits < 1 || num_splits > std::numeric_limits<int>::max()) {
    return ffi::Error::InvalidArgument("flash_jax: num_splits must be >= 1, got " +
                                       std::to_string(num_splits));
  }
  // Without splitting the partial-result workspace is unused and comes as empty arrays.
  const bool split = num_splits > 1;
  const Dims out_accum_shape =
      split ? Dims{num_splits, b, h, sq, params.head_dim_padded} : Dims{0};
  const Dims lse_accum_shape = split ? Dims{num_splits, b, h, sq} : Dims{0};
  if (auto error = check_buffer("out_accum", *out_accum, ffi::DataType::F32, out_accum_shape);
      error.failure()) {
    return error;
  }
  if (auto error = check_buffer("lse_accum", *lse_accum, ffi::DataType::F32, lse_accum_shape);
      error.failure()) {
    return error;
  }

  params.out = out->untyped_data();
  params.o_row_stride = params.q_row_stride;
  params.o_head_stride = params.q_head_stride;
  params.o_batch_stride = params.q_batch_stride;
  params.lse = static_cast<float*>(lse->untyped_data());
  params.num_splits = static_cast<int>(num_splits);
  params.out_accum = split ? static_cast<float*>(out_accum->untyped_data()) : nullptr;
  params.lse_accum = split ? static_cast<float*>(lse_accum->untyped_data()) : nullptr;
  return from_message(run_fwd(params, stream));
}

ffi::Error attention_bwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                         ffi::AnyBuffer dout, ffi::AnyBuffer dlse, ffi::AnyBuffer q_lengths,
                         ffi::AnyBuffer kv_lengths, ffi::AnyBuffer q_segment_ids,
                         ffi::AnyBuffer kv_segment_ids, ffi::AnyBuffer q_positions,
                         ffi::AnyBuffer kv_positions, ffi::AnyBuffer mask, ffi::AnyBuffer bias,
                         ffi::AnyBuffer alibi_slopes, ffi::AnyBuffer dropout_seeds,
                         ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                         ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dbias,
                         ffi::Result<ffi::AnyBuffer> dq_accum,
                         ffi::Result<ffi::AnyBuffer> softmax_d,
                         ffi::Result<ffi::AnyBuffer> mask_tiles, float softmax_scale, bool causal,
                         bool causal_top_left, int64_t window_left, int64_t window_right,
                         float softcap, bool deterministic, bool has_q_lengths,
                         bool has_kv_lengths, bool has_segment_ids, int64_t dropout_threshold,
                         float dropout_scale) {
  BwdParams params{};
  if (auto error = fill_common(params, q, k, v, softmax_scale, causal, causal_top_left,
                               window_left, window_right, softcap);
      error.failure()) {
    return error;
  }
  if (auto error = fill_masks(params, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                              has_q_lengths, has_kv_lengths, has_segment_ids);
      error.failure()) {
    return error;
  }
  if (auto error = fill_extras(params,
                               {q_positions, kv_positions, mask, bias, alibi_slopes, dropout_seeds},
                               *mask_tiles, dropout_threshold, dropout_scale);
      error.failure()) {
    return error;
  }
  const int64_t b = params.batch, sq = params.seqlen_q, sk = params.seqlen_k, h = params.heads;
  const int64_t d = params.head_dim;
  // dbias: the bias's own shape (broadcast entries accumulate atomically), or [0] when not
  // wanted (no bias, or a bias constant along the keys, whose gradient Python forms from dlse).
  const Dims bias_shape = {params.bias_batch, params.bias_heads, params.bias_rows,
                           params.bias_cols};
  const bool want_dbias = params.bias && dbias->dimensions().size() == 4;
  const Dims dbias_shape = want_dbias ? bias_shape : Dims{0};
  const int64_t sq_padded = round_up(sq, kBwdSeqlenQPadMultiple);
  const ffi::DataType dtype = q.element_type();
  const Dims q_shape = {b, sq, h, d};
  const Dims grad_kv_shape = {b, sk, h, d};  // query heads, see params.h
  const Dims lse_shape = {b, h, sq};
  struct Expected {
    const char* name;
    const ffi::AnyBuffer& buffer;
    ffi::DataType dtype;
    const Dims& dims;
  };
  const Dims dq_accum_shape = {b, h, sq_padded, params.head_dim_padded};
  const Dims softmax_d_shape = {b, h, sq_padded};
  for (const Expected& expected : {
           Expected{"out", out, dtype, q_shape},
           Expected{"lse", lse, ffi::DataType::F32, lse_shape},
           Expected{"dout", dout, dtype, q_shape},
           Expected{"dlse", dlse, ffi::DataType::F32, lse_shape},
           Expected{"dq", *dq, dtype, q_shape},
           Expected{"dk", *dk, dtype, grad_kv_shape},
           Expected{"dv", *dv, dtype, grad_kv_shape},
           Expected{"dq_accum", *dq_accum, ffi::DataType::F32, dq_accum_shape},
           Expected{"softmax_d", *softmax_d, ffi::DataType::F32, softmax_d_shape},
           Expected{"dbias", *dbias, ffi::DataType::F32, dbias_shape},
       }) {
    if (auto error = check_buffer(expected.name, expected.buffer, expected.dtype, expected.dims);
        error.failure()) {
      return error;
    }
  }

  // All [b, s, h, d] tensors of one call share q's (or, for dk/dv, the query-head kv) layout.
  params.out = out.untyped_data();
  params.dout = dout.untyped_data();
  params.dq = dq->untyped_data();
  params.o_row_stride = params.do_row_stride = params.dq_row_stride = params.q_row_stride;
  params.o_head_stride = params.do_head_stride = params.dq_head_stride = params.q_head_stride;
  params.o_batch_stride = params.do_batch_stride = params.dq_batch_stride = params.q_batch_stride;
  params.dk = dk->untyped_data();
  params.dv = dv->untyped_data();
  params.dk_row_stride = params.dv_row_stride = h * d;
  params.dk_head_stride = params.dv_head_stride = d;
  params.dk_batch_stride = params.dv_batch_stride = sk * h * d;
  params.lse = static_cast<const float*>(lse.untyped_data());
  params.dlse = static_cast<const float*>(dlse.untyped_data());
  params.dq_accum = static_cast<float*>(dq_accum->untyped_data());
  params.softmax_d = static_cast<float*>(softmax_d->untyped_data());
  params.deterministic = deterministic;
  params.dbias = want_dbias ? static_cast<float*>(dbias->untyped_data()) : nullptr;
  params.dbias_atomic = want_dbias && bias_shape != Dims{b, h, sq, sk};
  if (params.dbias_atomic && deterministic) {
    return ffi::Error::InvalidArgument(
        "flash_jax: a deterministic backward needs the bias in its full [batch, heads, seq_q, "
        "seq_k] shape (flash_jax/_cuda.py expands it), got " + format_dims(dbias_shape));
  }
  return from_message(run_bwd(params, stream));
}

}  // namespace
}  // namespace flash_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashJaxAttentionFwdCuda, flash_jax::attention_fwd,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()   // q
                                  .Arg<xla::ffi::AnyBuffer>()   // k
                                  .Arg<xla::ffi::AnyBuffer>()   // v
                                  .Arg<xla::ffi::AnyBuffer>()   // q_lengths (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // kv_lengths (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // q_segment_ids (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // kv_segment_ids (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // q_positions (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // kv_positions (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // mask uint8 (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // bias f32 (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // alibi_slopes (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // dropout_seeds (or [0])
                                  .Ret<xla::ffi::AnyBuffer>()   // out
                                  .Ret<xla::ffi::AnyBuffer>()   // lse
                                  .Ret<xla::ffi::AnyBuffer>()   // out_accum (workspace)
                                  .Ret<xla::ffi::AnyBuffer>()   // lse_accum (workspace)
                                  .Ret<xla::ffi::AnyBuffer>()   // mask_tiles (workspace)
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("causal_top_left")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("num_splits")
                                  .Attr<bool>("has_q_lengths")
                                  .Attr<bool>("has_kv_lengths")
                                  .Attr<bool>("has_segment_ids")
                                  .Attr<int64_t>("dropout_threshold")
                                  .Attr<float>("dropout_scale"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashJaxAttentionBwdCuda, flash_jax::attention_bwd,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()   // q
                                  .Arg<xla::ffi::AnyBuffer>()   // k
                                  .Arg<xla::ffi::AnyBuffer>()   // v
                                  .Arg<xla::ffi::AnyBuffer>()   // out
                                  .Arg<xla::ffi::AnyBuffer>()   // lse
                                  .Arg<xla::ffi::AnyBuffer>()   // dout
                                  .Arg<xla::ffi::AnyBuffer>()   // dlse
                                  .Arg<xla::ffi::AnyBuffer>()   // q_lengths (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // kv_lengths (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // q_segment_ids (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // kv_segment_ids (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // q_positions (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // kv_positions (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // mask uint8 (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // bias f32 (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // alibi_slopes (or [0])
                                  .Arg<xla::ffi::AnyBuffer>()   // dropout_seeds (or [0])
                                  .Ret<xla::ffi::AnyBuffer>()   // dq
                                  .Ret<xla::ffi::AnyBuffer>()   // dk (query heads)
                                  .Ret<xla::ffi::AnyBuffer>()   // dv (query heads)
                                  .Ret<xla::ffi::AnyBuffer>()   // dbias (or [0])
                                  .Ret<xla::ffi::AnyBuffer>()   // dq_accum (workspace)
                                  .Ret<xla::ffi::AnyBuffer>()   // softmax_d (workspace)
                                  .Ret<xla::ffi::AnyBuffer>()   // mask_tiles (workspace)
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("causal_top_left")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<float>("softcap")
                                  .Attr<bool>("deterministic")
                                  .Attr<bool>("has_q_lengths")
                                  .Attr<bool>("has_kv_lengths")
                                  .Attr<bool>("has_segment_ids")
                                  .Attr<int64_t>("dropout_threshold")
                                  .Attr<float>("dropout_scale"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
