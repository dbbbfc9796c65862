"""Flax drop-in: `attention_fn` for Flax's attention modules, and modules that use it.

`attention_fn` has the signature of `flax.linen.dot_product_attention` and
`flax.nnx.dot_product_attention` (plus flash_jax's own keyword-only extras), so it can be passed as
`attention_fn=` to `flax.linen.MultiHeadDotProductAttention` and `flax.nnx.MultiHeadAttention`.
`MultiHeadDotProductAttention` (linen) and `MultiHeadAttention` (nnx) are those modules with
flash attention inside: same constructor, call and parameter tree, plus `causal` and segment ids
that reach the kernel without a dense mask. README.md ("Flax") describes the behaviour in full.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import flash_jax
from flash_jax.reference import masked_scores


def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                 dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                 is_causal=False, force_fp32_for_softmax=False, qk_attn_weights_einsum=None,
                 attn_weights_value_einsum=None, *, causal=False, q_segment_ids=None,
                 kv_segment_ids=None):
  """`flax.linen.dot_product_attention` / `flax.nnx.dot_product_attention`, computed by flash_jax.

  Args:
    query: [batch..., q_length, heads, head_dim].
    key, value: [batch..., kv_length, kv_heads, head_dim]; heads % kv_heads == 0 (GQA, as
      `nnx.MultiHeadAttention(num_kv_heads=...)` passes them).
    bias: additive, broadcastable to [batch..., heads, q_length, kv_length], added to the scaled
      scores.
    mask: broadcastable to [batch..., heads, q_length, kv_length]; nonzero/True keeps a score
      (Flax's masks are float 0/1 or bool). A query row whose keys are all masked returns zeros
      (Flax's own attention returns the mean of the values there).
    broadcast_dropout: Flax's dropout shared across batch and heads has no kernel equivalent:
      with dropout active it must be False (flash_jax draws one mask per batch row and head).
    dropout_rng, dropout_rate, deterministic: Flax's dropout switches; dropout is active when
      `not deterministic and dropout_rate > 0`, and then uses the kernel's dropout, whose mask
      is `flash_jax.dropout_mask(dropout_rng, prod(batch...), heads, q_length, kv_length,
      dropout_rate)`. (Flax's `deterministic` is not `flash_jax.attention`'s.)
    dtype: q, k and v are cast to it (default: their promoted dtype); the output has it.
    precision, force_fp32_for_softmax: accepted for compatibility; the kernels multiply in the
      input dtype and accumulate and take the softmax in float32.
    module: when given (Flax's `sow_weights=True`), the attention weights [batch..., heads,
      q_length, kv_length] (before dropout) are computed densely from the kernel's log-sum-exp
      and sown into `module` as Flax does; the output still comes from the kernel.
    is_causal: nnx's causal flag, aligned top-left like `nnx.make_causal_mask` and
      `jax.nn.dot_product_attention` (query i sees keys j <= i). Equal lengths use the kernel's
      causal mask; different lengths add a dense top-left mask.
    qk_attn_weights_einsum, attn_weights_value_einsum: Flax's custom einsums (quantisation) have
      no kernel equivalent: must be None.
    causal: flash_jax's causal mask, aligned bottom-right when lengths differ (query i sees keys
      j <= i + kv_length - q_length), read inside the kernel.
    q_segment_ids, kv_segment_ids: int [batch..., q_length] / [batch..., kv_length]; a query sees
      a key only when their ids are equal. Given together or not at all.

  Returns:
    [batch..., q_length, heads, head_dim] in `dtype`.
  """
  del precision, force_fp32_for_softmax
  for name, einsum in (("qk_attn_weights_einsum", qk_attn_weights_einsum),
                       ("attn_weights_value_einsum", attn_weights_value_einsum)):
    if einsum is not None:
      raise NotImplementedError(f"flash_jax.flax.attention_fn: `{name}` must be None (the kernel "
                                f"computes its own products), got {einsum!r}")
  if query.ndim < 3 or not query.ndim == key.ndim == value.ndim:
    raise ValueError("flash_jax.flax.attention_fn: `query`, `key` and `value` must have one rank "
                     ">= 3 ([batch..., length, heads, head_dim]), got shapes "
                     f"{query.shape}, {key.shape}, {value.shape}")
  batch_shape = query.shape[:-3]
  if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
    raise ValueError("flash_jax.flax.attention_fn: `query`, `key` and `value` batch dimensions "
                     f"must match, got shapes {query.shape}, {key.shape}, {value.shape}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("flash_jax.flax.attention_fn: `q_segment_ids` and `kv_segment_ids` go "
                     f"together, got q_segment_ids={_shape_or_none(q_segment_ids)} and "
                     f"kv_segment_ids={_shape_or_none(kv_segment_ids)}")
  dropout = not deterministic and dropout_rate > 0.0
  if dropout and broadcast_dropout:
    raise NotImplementedError(
        "flash_jax.flax.attention_fn: `broadcast_dropout=True` (one dropout mask shared by all "
        "batch rows and heads) has no kernel equivalent; set broadcast_dropout=False on the "
        "module (flash_jax draws an independent mask per batch row and head)")
  if dropout and dropout_rng is None:
    raise ValueError("flash_jax.flax.attention_fn: dropout is active (dropout_rate="
                     f"{dropout_rate}, deterministic={deterministic}) but `dropout_rng` is None")

  dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query, key, value)
  seq_q, heads = query.shape[-3], query.shape[-2]
  seq_k = key.shape[-3]
  # The kernel takes one batch axis: Flax allows any number (including none), flattened here.
  batch = math.prod(batch_shape)
  q, k, v = (x.astype(dtype).reshape((batch,) + x.shape[-3:]) for x in (query, key, value))
  full = (heads, seq_q, seq_k)
  if mask is not None:
    mask = _flatten_scores(jnp.asarray(mask).astype(jnp.bool_), batch_shape, full, "mask")
  if bias is not None:
    bias = _flatten_scores(jnp.asarray(bias), batch_shape, full, "bias")
  if q_segment_ids is not None:
    q_segment_ids = _flatten_ids(q_segment_ids, batch_shape, seq_q, "q_segment_ids")
    kv_segment_ids = _flatten_ids(kv_segment_ids, batch_shape, seq_k, "kv_segment_ids")
  if is_causal and seq_q == seq_k:
    causal = True  # top-left and bottom-right alignments coincide
  elif is_causal:
    top_left = jnp.arange(seq_q)[:, None] >= jnp.arange(seq_k)[None, :]
    mask = top_left[None, None] if mask is None else mask & top_left

  sow = module is not None
  out = flash_jax.attention(
      q, k, v, causal=causal, mask=mask, bias=bias, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, dropout_rate=dropout_rate if dropout else 0.0,
      dropout_rng=dropout_rng if dropout else None, return_lse=sow)
  if sow:
    out, lse = out
    weights = _weights_from_lse(q, k, lse, causal=causal, mask=mask, bias=bias,
                                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    weights = weights.astype(dtype).reshape(batch_shape + full)
    if isinstance(module, nnx.Module):
      module.sow(nnx.Intermediate, "attention_weights", weights)
    else:
      module.sow("intermediates", "attention_weights", weights)
  return out.reshape(batch_shape + out.shape[1:])


def _shape_or_none(x):
  return None if x is None else f"array{list(jnp.shape(x))}"


def _flatten_scores(x, batch_shape, full, name):
  """A mask or bias broadcastable to [batch..., h, sq, sk] as [batch|1, h|1, sq|1, sk|1]."""
  target = batch_shape + full
  if x.ndim > len(target):
    raise ValueError(f"flash_jax.flax.attention_fn: `{name}` must be broadcastable to "
                     f"{list(target)} ([batch..., heads, q_length, kv_length]), got shape "
                     f"{list(x.shape)}")
  x = x.reshape((1,) * (len(target) - x.ndim) + x.shape)
  try:
    jnp.broadcast_shapes(x.shape, target)
  except ValueError:
    raise ValueError(f"flash_jax.flax.attention_fn: `{name}` must be broadcastable to "
                     f"{list(target)} ([batch..., heads, q_length, kv_length]), got shape "
                     f"{list(x.shape)}") from None
  lead = x.shape[:len(batch_shape)]
  if all(n == 1 for n in lead):
    return x.reshape((1,) + x.shape[len(batch_shape):])
  # Broadcast only over the batch axes (a batch axis of 1 beside a full one cannot stay 1 once
  # the axes are merged); head and sequence axes keep their size 1 for the kernel.
  x = jnp.broadcast_to(x, batch_shape + x.shape[len(batch_shape):])
  return x.reshape((math.prod(batch_shape),) + x.shape[len(batch_shape):])


def _flatten_ids(ids, batch_shape, length, name):
  ids = jnp.asarray(ids)
  if ids.shape != batch_shape + (length,):
    raise ValueError(f"flash_jax.flax.attention_fn: `{name}` must have shape "
                     f"{list(batch_shape + (length,))} ([batch..., length]), got "
                     f"{list(ids.shape)}")
  return ids.astype(jnp.int32).reshape((math.prod(batch_shape), length))


def _weights_from_lse(q, k, lse, *, causal, mask, bias, q_segment_ids, kv_segment_ids):
  """The attention probabilities [b, h, sq, sk] the kernel used: exp(score - lse) where kept.

  Normalising by the kernel's own log-sum-exp makes `weights @ value` equal the kernel's output
  (up to rounding); fully masked rows (lse = -inf) are zero, as the output is.
  """
  scores, keep = masked_scores(q, k, causal=causal, mask=mask, bias=bias,
                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  return jnp.where(keep, jnp.exp(scores - lse[..., None]), 0.0)


def _call_attention(fn, query, key, value, *, extras, **flax_kwargs):
  """Calls an attention_fn as Flax's modules do: Flax's keywords that `fn` does not declare are
  dropped (linen's rule); flash_jax's extras (causal, segment ids) are passed when set, and a
  function that cannot take a set one is an error rather than a silent loss of the mask."""
  params = inspect.signature(fn).parameters
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  kwargs = {k: v for k, v in flax_kwargs.items() if takes_any or k in params}
  for name, value_given in extras.items():
    if value_given is None or value_given is False:
      continue
    if not takes_any and name not in params:
      raise ValueError(f"`{name}` was given but the module's attention_fn {fn!r} does not accept "
                       f"it; use flash_jax.flax.attention_fn")
    kwargs[name] = value_given
  return fn(query, key, value, **kwargs)


def _segment_extras(segment_ids, kv_segment_ids, self_attention, decode):
  """The segment-id keywords of a module call; kv ids default to the query's in self-attention."""
  if segment_ids is None and kv_segment_ids is None:
    return {}
  if decode:
    raise NotImplementedError("segment ids are not supported in decode mode (the cache does not "
                              "store them); got `segment_ids` with decode=True")
  if kv_segment_ids is None:
    if not self_attention:
      raise ValueError("`kv_segment_ids` is required with `segment_ids` when keys come from "
                       "`inputs_k`/`inputs_v` (cross-attention), got None")
    kv_segment_ids = segment_ids
  if segment_ids is None:
    raise ValueError("`kv_segment_ids` needs `segment_ids` (the query's ids), got None")
  return dict(q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)



def _key_value_inputs(inputs_q, inputs_k, inputs_v):
  """Flax's defaulting of the key and value inputs: both fall back to the query's."""
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError("`inputs_k` cannot be None if `inputs_v` is not None")
    inputs_k = inputs_q
  if inputs_v is None:
    inputs_v = inputs_k
  return inputs_k, inputs_v

class MultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
  """`flax.linen.MultiHeadDotProductAttention` with flash attention inside.

  Same fields, call signature and parameter tree as Flax's module (its parameters load
  unchanged), with these differences:
    attention_fn: defaults to `flash_jax.flax.attention_fn`.
    broadcast_dropout: defaults to False (flash_jax's dropout is per batch row and head; True
      with dropout active raises NotImplementedError).
    causal: flash_jax's causal mask, read inside the kernel (no dense mask; bottom-right aligned
      when lengths differ).
  and `__call__` also takes `segment_ids` / `kv_segment_ids` ([batch..., length] int; a query
  sees a key only when their ids are equal; kv ids default to the query's in self-attention).
  """

  attention_fn: Callable[..., jax.Array] = attention_fn
  broadcast_dropout: bool = False
  causal: bool = False

  @nn.compact
  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, inputs_kv=None, mask=None,
               deterministic=None, dropout_rng=None, sow_weights=False, segment_ids=None,
               kv_segment_ids=None):
    if self.qk_attn_weights_einsum_cls or self.attn_weights_value_einsum_cls:
      raise NotImplementedError("flash_jax.flax.MultiHeadDotProductAttention: "
                                "`qk_attn_weights_einsum_cls`/`attn_weights_value_einsum_cls` "
                                "have no kernel equivalent; they must be None")
    if inputs_kv is not None:
      if inputs_k is not None or inputs_v is not None:
        raise ValueError("`inputs_kv` excludes `inputs_k` and `inputs_v`; pass `inputs_k` and "
                         "`inputs_v` only")
      warnings.warn("The inputs_kv arg will be deprecated soon. Use inputs_k and inputs_v "
                    "instead.", DeprecationWarning)
      inputs_k = inputs_v = inputs_kv
    self_attention = inputs_k is None
    inputs_k, inputs_v = _key_value_inputs(inputs_q, inputs_k, inputs_v)

    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(f"qkv_features ({qkv_features}) must be divisible by num_heads "
                       f"({self.num_heads})")
    dense = functools.partial(
        nn.DenseGeneral, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
        features=(self.num_heads, qkv_features // self.num_heads), kernel_init=self.kernel_init,
        bias_init=self.bias_init, use_bias=self.use_bias, precision=self.precision,
        dot_general=self.qkv_dot_general, dot_general_cls=self.qkv_dot_general_cls)
    query = dense(name="query")(inputs_q)
    key = dense(name="key")(inputs_k)
    value = dense(name="value")(inputs_v)
    if self.normalize_qk:
      query = nn.LayerNorm(name="query_ln", use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype)(query)
      key = nn.LayerNorm(name="key_ln", use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype)(key)

    # Flax's autoregressive cache, variable for variable: one query per step, keys written at
    # cache_index, and the positions not yet written masked out (a [batch..., 1, 1, max_length]
    # mask: the kernel skips its fully masked key blocks).
    decoding = False
    if self.decode:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if initialized:
        decoding = True
        *batch_dims, max_length, num_heads, head_dim = cached_key.value.shape
        expected = tuple(batch_dims) + (1, num_heads, head_dim)
        if query.shape != expected:
          raise ValueError(f"Autoregressive cache shape error, expected query shape {expected} "
                           f"instead got {query.shape}.")
        index = cache_index.value
        zero = jnp.zeros((), index.dtype)
        at = (zero,) * len(batch_dims) + (index, zero, zero)
        key = lax.dynamic_update_slice(cached_key.value, key, at)
        value = lax.dynamic_update_slice(cached_value.value, value, at)
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + 1
        mask = nn.combine_masks(mask, jnp.broadcast_to(jnp.arange(max_length) <= index,
                                                       tuple(batch_dims) + (1, 1, max_length)))

    if self.dropout_rate > 0.0:
      deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not deterministic and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    else:
      deterministic = True

    extras = dict(causal=self.causal, module=self if sow_weights else None,
                  **_segment_extras(segment_ids, kv_segment_ids, self_attention, decoding))
    x = _call_attention(
        self.attention_fn, query, key, value, extras=extras, mask=mask, dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
        deterministic=deterministic, dtype=self.dtype, precision=self.precision,
        force_fp32_for_softmax=self.force_fp32_for_softmax)
    return nn.DenseGeneral(
        features=features, axis=(-2, -1), kernel_init=self.out_kernel_init or self.kernel_init,
        bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, precision=self.precision,
        dot_general=self.out_dot_general, dot_general_cls=self.out_dot_general_cls,
        name="out")(x)


class MultiHeadAttention(nnx.MultiHeadAttention):
  """`flax.nnx.MultiHeadAttention` with flash attention inside.

  The constructor is Flax's (its state loads unchanged: `init_cache`, `set_view` and the
  submodules are inherited), with `attention_fn` defaulting to `flash_jax.flax.attention_fn`,
  `broadcast_dropout` to False (see `MultiHeadDotProductAttention`), and `causal=`: flash_jax's
  causal mask read inside the kernel. `__call__` is Flax's plus `segment_ids` / `kv_segment_ids`;
  `is_causal` (top-left) is ignored in decode mode, where the cache's mask already is causal.
  """

  def __init__(self, num_heads, in_features, *args, attention_fn=attention_fn,
               broadcast_dropout=False, causal=False, **kwargs):
    super().__init__(num_heads, in_features, *args, attention_fn=attention_fn,
                     broadcast_dropout=broadcast_dropout, **kwargs)
    self.causal = causal

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, deterministic=None,
               rngs=None, sow_weights=False, decode=None, is_causal=False, out_sharding=None,
               qkv_sharding=None, input_positions=None, segment_ids=None, kv_segment_ids=None):
    if rngs is None:
      rngs = self.rngs
    elif isinstance(rngs, nnx.Rngs):
      rngs = rngs.dropout
    self_attention = inputs_k is None
    inputs_k, inputs_v = _key_value_inputs(inputs_q, inputs_k, inputs_v)
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"Incompatible input dimension, got {inputs_q.shape[-1]} but module "
                       f"expects {self.in_features}.")

    query = self.query(inputs_q, out_sharding=qkv_sharding)
    key = self.key(inputs_k, out_sharding=qkv_sharding)
    value = self.value(inputs_v, out_sharding=qkv_sharding)
    if self.normalize_qk:
      query = self.query_ln(query)
      key = self.key_ln(key)

    decode = decode if decode is not None else self.decode
    if decode is None:
      raise ValueError("No `decode` argument was provided to MultiHeadAttention as either a "
                       "__call__ argument or a constructor argument.")
    if decode:
      if self.cached_key is None or self.cached_value is None or self.cache_index is None:
        raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
      *batch_dims, max_length, num_kv_heads, head_dim = self.cached_key.shape
      expected = tuple(batch_dims) + (1, num_kv_heads, head_dim)
      if key.shape != expected:
        raise ValueError(f"Autoregressive cache shape error, expected key shape {expected} "
                         f"instead got {key.shape}.")
      index = self.cache_index[...]
      zero = jnp.zeros((), index.dtype)
      at = (zero,) * len(batch_dims) + (index, zero, zero)
      key = lax.dynamic_update_slice(self.cached_key[...], key, at)
      value = lax.dynamic_update_slice(self.cached_value[...], value, at)
      self.cached_key[...] = key
      self.cached_value[...] = value
      self.cache_index[...] = index + 1
      mask = nnx.combine_masks(mask, jnp.broadcast_to(jnp.arange(max_length) <= index,
                                                      tuple(batch_dims) + (1, 1, max_length)))

    dropout_rng = None
    if self.dropout_rate > 0.0:
      deterministic = deterministic if deterministic is not None else self.deterministic
      if deterministic is None:
        raise ValueError("No `deterministic` argument was provided to MultiHeadAttention as "
                         "either a __call__ argument or a constructor argument.")
      if not deterministic:
        if rngs is None:
          raise ValueError("'rngs' must be provided to __call__ method if MultiHeadAttention "
                           "instance is defined with keep_rngs=False.")
        dropout_rng = rngs()
    else:
      deterministic = True

    # input_positions: what Flax (0.12.12) forwards to a RoPE attention_fn.
    extras = dict(causal=self.causal, is_causal=is_causal and not decode,
                  module=self if sow_weights else None, input_positions=input_positions,
                  **_segment_extras(segment_ids, kv_segment_ids, self_attention, decode))
    x = _call_attention(
        self.attention_fn, query, key, value, extras=extras, mask=mask, dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
        deterministic=deterministic, dtype=self.dtype, precision=self.precision)
    return self.out(x, out_sharding=out_sharding)
