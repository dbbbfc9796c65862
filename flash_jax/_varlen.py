"""flash_jax.attention_varlen: attention over sequences of different lengths packed end to end.

The packed tokens form one batch row; a segment id per token (its sequence index) keeps the
sequences apart, and positions counted from each sequence's end align causal masks, windows and
ALiBi to each sequence's own bottom-right corner, so one call equals one attention call per
sequence.
"""

from __future__ import annotations

import jax.numpy as jnp

from flash_jax import _validate
from flash_jax._api import call_core

# Segment ids of tokens past cu_seqlens[-1]: different for queries and keys, and never a
# sequence index, so those queries see no key (0 output, lse -inf) and those keys no query.
_QUERY_PADDING_ID = -1
_KEY_PADDING_ID = -2


def _layout(cu_seqlens, total, padding_id):
  """Segment id and position of each of `total` packed tokens: the index s of the sequence
  holding it and its offset from that sequence's end (token - cu_seqlens[s + 1], negative)."""
  tokens = jnp.arange(total, dtype=jnp.int32)
  num_seqs = cu_seqlens.shape[0] - 1
  # The number of sequence ends at or before a token is the index of its sequence (empty
  # sequences included); num_seqs for tokens past the last end.
  sequence = jnp.searchsorted(cu_seqlens[1:], tokens, side="right").astype(jnp.int32)
  inside = sequence < num_seqs
  ends = cu_seqlens[jnp.minimum(sequence + 1, num_seqs)]
  ids = jnp.where(inside, sequence, padding_id)
  positions = jnp.where(inside, tokens - ends, 0)
  return ids[None], positions[None]


def attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q,
                     max_seqlen_k, causal=False, softmax_scale=None, window=None, softcap=None,
                     alibi_slopes=None, dropout_rate=0.0, dropout_rng=None, return_lse=False):
  """Attention over packed variable-length sequences (FlashAttention's varlen interface).

  Sequence s holds query tokens cu_seqlens_q[s] : cu_seqlens_q[s + 1] and key/value tokens
  cu_seqlens_k[s] : cu_seqlens_k[s + 1]; it attends only to itself, exactly as
  `flash_jax.attention` on that sequence alone.

  Args:
    query: [total_q, heads, head_dim]; key, value: [total_k, kv_heads, head_dim] (GQA/MQA as in
      `attention`).
    cu_seqlens_q, cu_seqlens_k: int [n_seqs + 1] cumulative lengths, starting at 0,
      non-decreasing. Tokens past the last entry belong to no sequence: their queries return 0
      (lse -inf) and their keys are never seen. Concrete values are checked; traced values
      (under jit, as arguments) cannot be and are trusted.
    max_seqlen_q, max_seqlen_k: static positive ints bounding every sequence's length (checked
      against concrete cu_seqlens).
    causal: per sequence, aligned to its bottom-right corner (query i of a sequence with lq
      queries and lk keys sees keys j <= i + lk - lq).
    softmax_scale, window, softcap: as in `attention`, windows per sequence around the same
      diagonal.
    alibi_slopes: float [heads]; distances are measured within each sequence.
    dropout_rate, dropout_rng: as in `attention`; the mask is that of one batch row over the
      packed tokens, i.e. `dropout_mask(dropout_rng, 1, heads, total_q, total_k, rate)[0]`
      indexed by packed (global) query and key indices.
    return_lse: also return the lse, float32 [heads, total_q].

  Returns:
    out [total_q, heads, head_dim] in the dtype of query, or (out, lse).
  """
  query, key, value = _validate.varlen_inputs(query, key, value)
  total_q, total_k = query.shape[1], key.shape[1]
  heads = query.shape[2]
  max_seqlen_q = _validate.positive_static_int("max_seqlen_q", max_seqlen_q)
  max_seqlen_k = _validate.positive_static_int("max_seqlen_k", max_seqlen_k)
  cu_q = _validate.cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q,
                              "max_seqlen_q")
  cu_k = _validate.cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k,
                              "max_seqlen_k")
  if cu_q.shape != cu_k.shape:
    raise ValueError(f"`cu_seqlens_q` and `cu_seqlens_k` must describe the same number of "
                     f"sequences, got shapes {list(cu_q.shape)} and {list(cu_k.shape)}")
  if alibi_slopes is not None and jnp.shape(alibi_slopes) != (heads,):
    # Slopes per sequence would need a slope per packed token; the operand has one per batch row.
    error = (NotImplementedError if jnp.shape(alibi_slopes) == (cu_q.shape[0] - 1, heads)
             else ValueError)
    raise error(f"`alibi_slopes` must be a float array of shape [{heads}] for attention_varlen "
                f"(one slope per head, shared by the sequences), got shape "
                f"{list(jnp.shape(alibi_slopes))}")
  left, right = _validate.window(window)
  q_ids, q_positions = _layout(cu_q, total_q, _QUERY_PADDING_ID)
  kv_ids, kv_positions = _layout(cu_k, total_k, _KEY_PADDING_ID)
  operands, dropout_rate = _validate.optional_operands(
      query, key, q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_lengths=None, kv_lengths=None,
      mask=None, bias=None, alibi_slopes=alibi_slopes, dropout_rate=dropout_rate,
      dropout_rng=dropout_rng)
  operands["q_positions"] = q_positions
  operands["kv_positions"] = kv_positions
  return_lse = _validate.static_bool("return_lse", return_lse)
  out, lse = call_core(
      query, key, value, operands,
      softmax_scale=_validate.softmax_scale(softmax_scale, query.shape[-1]),
      causal=_validate.static_bool("causal", causal),
      window_left=left,
      window_right=right,
      softcap=_validate.softcap(softcap),
      dropout_rate=dropout_rate)
  return (out[0], lse[0]) if return_lse else out[0]
