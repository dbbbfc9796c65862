"""Naive attention in float32: the test oracle. It materialises the [b, h, sq, sk] scores and
shares no code with the blockwise implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def masked_scores(query, key, *, causal=False, softmax_scale=None, window=None,
                  q_segment_ids=None, kv_segment_ids=None, q_lengths=None, kv_lengths=None,
                  mask=None, bias=None, softcap=None, alibi_slopes=None,
                  compute_dtype=jnp.float32, causal_top_left=False):
  """The scores [b, h, sq, sk] after softcap, bias and ALiBi, with -inf where masked, and the
  boolean mask of visible entries. Arguments as `reference_attention`."""
  batch, seq_q, heads, head_dim = query.shape
  seq_k, kv_heads = key.shape[1], key.shape[2]
  scale = 1.0 / np.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
  q = query.astype(compute_dtype)
  k = jnp.repeat(key.astype(compute_dtype), heads // kv_heads, axis=2)

  # Scores and softmax in float32, or float64 when asked for (the tests' high-precision oracle).
  score_dtype = jnp.promote_types(compute_dtype, jnp.float32)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      precision=jax.lax.Precision.HIGHEST).astype(score_dtype) * scale
  if softcap:
    scores = softcap * jnp.tanh(scores / softcap)
  if bias is not None:
    scores = scores + jnp.broadcast_to(bias, (batch, heads, seq_q, seq_k)).astype(score_dtype)
  offset = 0 if causal_top_left else seq_k - seq_q
  rows = np.arange(seq_q)[:, None] + offset
  cols = np.arange(seq_k)[None, :]
  if alibi_slopes is not None:
    slopes = jnp.broadcast_to(jnp.asarray(alibi_slopes, score_dtype).reshape(-1, heads),
                              (batch, heads))
    scores = scores - slopes[:, :, None, None] * jnp.asarray(np.abs(cols - rows), score_dtype)
  keep = np.ones((seq_q, seq_k), bool)
  if causal:
    keep &= cols <= rows
  if window is not None:
    left, right = window
    if left >= 0:
      keep &= cols >= rows - left
    if right >= 0:
      keep &= cols <= rows + right
  keep = jnp.broadcast_to(jnp.asarray(keep), (batch, heads, seq_q, seq_k))
  if q_segment_ids is not None:
    keep = keep & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
  if kv_lengths is not None:
    keep = keep & (jnp.arange(seq_k)[None, None, None, :] < kv_lengths[:, None, None, None])
  if q_lengths is not None:
    keep = keep & (jnp.arange(seq_q)[None, None, :, None] < q_lengths[:, None, None, None])
  if mask is not None:
    keep = keep & jnp.broadcast_to(mask, (batch, heads, seq_q, seq_k))

  return jnp.where(keep, scores, -jnp.inf), keep


def reference_attention(query, key, value, *, causal=False, softmax_scale=None, window=None,
                        q_segment_ids=None, kv_segment_ids=None, q_lengths=None,
                        kv_lengths=None, mask=None, bias=None, softcap=None, alibi_slopes=None,
                        dropout_rate=0.0, dropout_rng=None, deterministic=False,
                        return_lse=False, compute_dtype=jnp.float32, causal_top_left=False):
  """Same arguments and results as `flash_jax.attention`, computed naively.

  compute_dtype: dtype of the matrix products and of the probabilities (float32 by default;
    the tests also run it in the input dtype to measure that precision's own error).
  causal_top_left: align causal masks and windows to the top-left corner (jax.nn convention).
  deterministic is accepted for signature parity and has no effect.
  """
  del deterministic
  out_dtype = query.dtype
  batch, seq_q, heads, _ = query.shape
  seq_k, kv_heads = key.shape[1], key.shape[2]
  v = jnp.repeat(value.astype(compute_dtype), heads // kv_heads, axis=2)
  scores, keep = masked_scores(
      query, key, causal=causal, softmax_scale=softmax_scale, window=window,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_lengths=q_lengths,
      kv_lengths=kv_lengths, mask=mask, bias=bias, softcap=softcap, alibi_slopes=alibi_slopes,
      compute_dtype=compute_dtype, causal_top_left=causal_top_left)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(keep, jnp.exp(scores - row_max), 0.0)
  row_sum = weights.sum(axis=-1, keepdims=True)
  probs = jnp.where(row_sum > 0, weights / jnp.where(row_sum > 0, row_sum, 1.0), 0.0)
  lse = jnp.where(row_sum[..., 0] > 0, jnp.log(jnp.where(row_sum[..., 0] > 0, row_sum[..., 0],
                                                         1.0)) + row_max[..., 0], -jnp.inf)
  if dropout_rate:
    from flash_jax import dropout_mask  # the kernels' own mask, so results compare exactly
    kept = dropout_mask(dropout_rng, batch, heads, seq_q, seq_k, dropout_rate)
    probs = jnp.where(kept, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(compute_dtype), v,
                   precision=jax.lax.Precision.HIGHEST)
  out = out.astype(out_dtype)
  return (out, lse) if return_lse else out
