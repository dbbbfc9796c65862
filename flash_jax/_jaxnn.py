"""flash_jax.dot_product_attention: jax.nn.dot_product_attention's signature and semantics,
computed by flash_jax's primitives."""

from __future__ import annotations

from flash_jax import _validate
from flash_jax._api import call_core


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None):
  """Drop-in for `jax.nn.dot_product_attention` (without `implementation` and
  `return_residual`), computed blockwise by flash_jax.

  Args:
    query: [batch, seq_q, heads, head_dim] (BTNH) or [seq_q, heads, head_dim] (TNH).
    key, value: [batch, seq_k, kv_heads, head_dim] or [seq_k, kv_heads, head_dim], same dtype
      as query; heads % kv_heads == 0 (GQA/MQA).
    bias: float, rank <= 4, broadcastable to [batch, heads, seq_q, seq_k] after leading axes of
      size 1 are added (as jax.nn); added to the scaled scores; differentiable.
    mask: bool with the same broadcasting, True = take part in attention.
    scale: static Python float, default 1/sqrt(head_dim).
    is_causal: query i sees keys j <= i, aligned to the top-left corner as in jax.nn (unlike
      `flash_jax.attention(causal=True)`, which aligns to the bottom-right when seq_q != seq_k).
    query_seq_lengths, key_value_seq_lengths: int [batch]: query rows >= the length return 0,
      keys >= the length are masked.
    local_window_size: int w (= (w, w)) or (left, right) >= 0: query i sees keys in
      [i - left, i + right].

  Returns:
    [batch, seq_q, heads, head_dim] (or [seq_q, heads, head_dim]) in the dtype of query.

  Differences from jax.nn (implementation="xla"): a query row that sees no key at all (every
  key masked by `mask`, causality, the window or key_value_seq_lengths) returns 0 here, where
  jax.nn fills masked scores with a large finite negative number and so returns the mean of
  `value` over all keys for that row. Rows masked by query_seq_lengths are 0 in both. A bias
  entry of -inf on a row's every visible key also gives 0 here instead of NaN.
  """
  output_shape = query.shape
  query, key, value = _validate.jax_nn_inputs(query, key, value)
  batch, _, _, head_dim = query.shape
  q_lengths = _validate.optional_lengths("query_seq_lengths", query_seq_lengths, batch)
  kv_lengths = _validate.optional_lengths("key_value_seq_lengths", key_value_seq_lengths, batch)
  left, right = _validate.local_window_size(local_window_size)
  operands, _ = _validate.optional_operands(
      query, key, q_segment_ids=None, kv_segment_ids=None, q_lengths=q_lengths,
      kv_lengths=kv_lengths, mask=mask, bias=bias, alibi_slopes=None, dropout_rate=0.0,
      dropout_rng=None)
  out, _ = call_core(
      query, key, value, operands,
      softmax_scale=_validate.softmax_scale(scale, head_dim, name="scale"),
      causal=_validate.static_bool("is_causal", is_causal),
      # jax.nn aligns the causal diagonal and the window to the top-left corner.
      causal_top_left=True,
      window_left=left,
      window_right=right)
  return out.reshape(output_shape)
