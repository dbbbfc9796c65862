"""Public entry points: normalise and validate the arguments once, then call the core."""

from __future__ import annotations

from flash_jax import _validate
from flash_jax._config import AttentionConfig
from flash_jax._vjp import flash_attention

# Keyword arguments of the contract (DESIGN.md section 1) that arrive with later work; passing a
# non-default value raises NotImplementedError naming the argument.
_NOT_YET_SUPPORTED = {
    "window": None,
    "q_segment_ids": None,
    "kv_segment_ids": None,
    "q_lengths": None,
    "kv_lengths": None,
    "mask": None,
    "bias": None,
    "softcap": None,
    "alibi_slopes": None,
    "dropout_rate": 0.0,
    "dropout_rng": None,
}


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
      seq_q != seq_k (query i sees keys j <= i + seq_k - seq_q). Rows that see no key return 0
      and lse -inf.
    softmax_scale: static Python float, default 1/sqrt(head_dim).
    deterministic: bitwise reproducible backward.
    return_lse: also return the log-sum-exp of the scaled scores, float32 [batch, heads, seq_q].

  Returns:
    out [batch, seq_q, heads, head_dim] in the dtype of query, or (out, lse) with return_lse.
  """
  given = dict(window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
               q_lengths=q_lengths, kv_lengths=kv_lengths, mask=mask, bias=bias, softcap=softcap,
               alibi_slopes=alibi_slopes, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  for name, default in _NOT_YET_SUPPORTED.items():
    value_given = given[name]
    if value_given is not default and not (default == 0.0 and value_given == 0.0):
      raise NotImplementedError(f"flash_jax.attention: `{name}` is not supported yet, got "
                                f"{type(value_given).__name__}")
  _validate.check_dense(query, key, value)
  config = AttentionConfig(
      softmax_scale=_validate.softmax_scale(softmax_scale, query.shape[-1]),
      causal=_validate.static_bool("causal", causal),
      deterministic=_validate.static_bool("deterministic", deterministic),
  )
  return_lse = _validate.static_bool("return_lse", return_lse)
  out, lse = flash_attention(config, query, key, value)
  return (out, lse) if return_lse else out
