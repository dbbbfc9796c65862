"""Public entry points: normalise and validate the arguments once, then call the core."""

from __future__ import annotations

from flash_jax import _validate
from flash_jax._config import OPTIONAL_OPERANDS, AttentionConfig
from flash_jax._vjp import flash_attention


def call_core(query, key, value, operands, **config_fields):
  """Runs the custom_vjp core on validated inputs: `operands` maps names of
  _config.OPTIONAL_OPERANDS to arrays, `config_fields` are the other AttentionConfig fields.
  Returns (out, lse)."""
  names = tuple(name for name in OPTIONAL_OPERANDS if name in operands)
  config = AttentionConfig(operands=names, **config_fields)
  return flash_attention(config, query, key, value, *(operands[name] for name in names))


def attention(query, key, value, *, causal=False, softmax_scale=None, window=None,
              q_segment_ids=None, kv_segment_ids=None, q_lengths=None, kv_lengths=None,
              mask=None, bias=None, softcap=None, alibi_slopes=None, dropout_rate=0.0,
              dropout_rng=None, deterministic=False, return_lse=False):
  """Exact attention computed blockwise (FlashAttention), memory linear in sequence length.

  Args:
    query: [batch, seq_q, heads, head_dim], float16/bfloat16 (float32 on CPU).
    key, value: [batch, seq_k, kv_heads, head_dim], same dtype; heads % kv_heads == 0 and query
      head h reads kv head h // (heads // kv_heads) (GQA/MQA).
    causal: mask keys after the diagonal, aligned to the bottom-right corner when
      seq_q != seq_k (query i sees keys j <= i + seq_k - seq_q).
    softmax_scale: static Python float, default 1/sqrt(head_dim).
    window: (left, right): query i sees keys in [i + off - left, i + off + right], off the
      causal offset seq_k - seq_q; -1 leaves a side unbounded.
    q_segment_ids, kv_segment_ids: int [batch, seq_q] / [batch, seq_k], given together: a query
      sees a key only when their ids are equal (packed documents).
    q_lengths, kv_lengths: int [batch]: keys at positions >= kv_lengths[b] are masked; query
      rows >= q_lengths[b] return 0 (lse -inf, zero gradients).
    mask: bool broadcastable to [batch, heads, seq_q, seq_k], True = keep.
    bias: float broadcastable to [batch, heads, seq_q, seq_k], added to the scaled scores;
      differentiable (its gradient has the bias's own shape).
    softcap: positive float c: scores s -> c * tanh(s / c), applied to the scaled scores before
      bias, ALiBi and masking.
    alibi_slopes: float [heads] or [batch, heads]: adds -slope * |i + off - j|.
    dropout_rate, dropout_rng: dropout on the attention weights with a JAX PRNG key (required
      when the rate is > 0); `flash_jax.dropout_mask` gives the mask a key produces.
    deterministic: bitwise reproducible backward.
    return_lse: also return the log-sum-exp of the (modified, masked) scores, float32
      [batch, heads, seq_q].

  A query row that sees no key returns 0 with lse -inf and zero gradients; nothing is NaN.

  Returns:
    out [batch, seq_q, heads, head_dim] in the dtype of query, or (out, lse) with return_lse.
  """
  _validate.check_dense(query, key, value)
  left, right = _validate.window(window)
  operands, dropout_rate = _validate.optional_operands(
      query, key, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      q_lengths=q_lengths, kv_lengths=kv_lengths, mask=mask, bias=bias,
      alibi_slopes=alibi_slopes, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  return_lse = _validate.static_bool("return_lse", return_lse)
  out, lse = call_core(
      query, key, value, operands,
      softmax_scale=_validate.softmax_scale(softmax_scale, query.shape[-1]),
      causal=_validate.static_bool("causal", causal),
      window_left=left,
      window_right=right,
      softcap=_validate.softcap(softcap),
      dropout_rate=dropout_rate,
      deterministic=_validate.static_bool("deterministic", deterministic))
  return (out, lse) if return_lse else out
