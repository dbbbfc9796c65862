// XLA FFI handlers of the attention custom calls (CUDA). The Python module registers them under
// the targets "flash_jax_attention_fwd_cuda" and "flash_jax_attention_bwd_cuda".
//
// Forward: q, k, v -> out, lse, out_accum, lse_accum
//   attrs softmax_scale (f32), causal, causal_top_left (bool), window_left, window_right (i64),
//   softcap (f32), num_splits (i64)
// Backward: q, k, v, out, lse, dout, dlse -> dq, dk, dv, dq_accum, softmax_d
//   attrs as the forward without num_splits, plus deterministic (bool)
//
// q/k/v/out/dout/dq/dk/dv are dense row-major [batch, seq, heads, head_dim]; dk/dv carry the
// query-head count (GQA groups are reduced by the caller). The *_accum and softmax_d outputs are
// workspace that the caller sizes as documented in flash_jax/params.h and then drops.
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashJaxAttentionFwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashJaxAttentionBwdCuda);
