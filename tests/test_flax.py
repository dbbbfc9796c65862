"""The Flax drop-in: flash_jax.flax.attention_fn inside Flax's own modules, flash_jax's linen and
nnx modules, the jax.export round trip, and the main example's train step.

Flax's default attention is the oracle: float32 on CPU, where both compute in full precision, so
results agree to float32 rounding. Rows whose keys are all masked are compared separately: Flax
returns the mean of the values there, flash_jax returns zeros (documented in README.md, "Flax").
"""

import functools
import importlib.util
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flash_jax
import flash_jax.flax as ff
from oracle import gpu_param

TOL = dict(rtol=2e-5, atol=2e-5)
B, S, F, H = 2, 24, 32, 4  # batch, sequence, features, heads: head_dim 8


def _inputs(seed=0, shape=(B, S, F)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _linen_pair(**kwargs):
  """(Flax's module, the same module with flash_jax.flax.attention_fn, params)."""
  flax_module = nn.MultiHeadDotProductAttention(num_heads=H, **kwargs)
  flash_module = nn.MultiHeadDotProductAttention(num_heads=H, attention_fn=ff.attention_fn,
                                                 **kwargs)
  return flax_module, flash_module


def _padding_mask(lengths, seq):
  return jnp.arange(seq)[None, :] < jnp.asarray(lengths)[:, None]


# --- attention_fn in flax.linen.MultiHeadDotProductAttention --------------------------------------


def test_linen_no_mask():
  x = _inputs()
  flax_module, flash_module = _linen_pair()
  params = flax_module.init(jax.random.key(1), x)
  np.testing.assert_allclose(flash_module.apply(params, x), flax_module.apply(params, x), **TOL)


def test_linen_causal_mask():
  x = _inputs()
  mask = nn.make_causal_mask(x[..., 0])
  flax_module, flash_module = _linen_pair()
  params = flax_module.init(jax.random.key(1), x)
  np.testing.assert_allclose(flash_module.apply(params, x, mask=mask),
                             flax_module.apply(params, x, mask=mask), **TOL)


def test_linen_padding_mask_cross_attention():
  xq, xkv = _inputs(0, (B, 20, F)), _inputs(1, (B, 29, F))
  q_valid, kv_valid = _padding_mask([20, 13], 20), _padding_mask([29, 7], 29)
  mask = nn.make_attention_mask(q_valid, kv_valid)  # float32 0/1, as Flax makes it
  flax_module, flash_module = _linen_pair()
  params = flax_module.init(jax.random.key(2), xq, xkv)
  ref = flax_module.apply(params, xq, xkv, mask=mask)
  out = flash_module.apply(params, xq, xkv, mask=mask)
  valid = np.asarray(q_valid)
  np.testing.assert_allclose(out[valid], ref[valid], **TOL)
  # Padded queries see no key: zero attention output, so the module returns the output bias.
  padded = np.broadcast_to(params["params"]["out"]["bias"], out[~valid].shape)
  np.testing.assert_allclose(out[~valid], padded, **TOL)


def test_linen_combined_masks():
  x = _inputs()
  mask = nn.combine_masks(nn.make_causal_mask(x[..., 0]),
                          nn.make_attention_mask(jnp.ones((B, S)), _padding_mask([S, 17], S)))
  flax_module, flash_module = _linen_pair()
  params = flax_module.init(jax.random.key(1), x)
  np.testing.assert_allclose(flash_module.apply(params, x, mask=mask),
                             flax_module.apply(params, x, mask=mask), **TOL)


def test_bias_and_mask():
  # Flax's modules pass no bias; attention_fn takes one as Flax's function does.
  q, k, v = (_inputs(i, (B, S, H, 8)) for i in range(3))
  bias = 0.5 * jax.random.normal(jax.random.key(3), (1, H, S, S))
  mask = nn.make_causal_mask(jnp.ones((B, S)), dtype=jnp.bool_)
  np.testing.assert_allclose(ff.attention_fn(q, k, v, bias=bias, mask=mask),
                             nn.dot_product_attention(q, k, v, bias=bias, mask=mask), **TOL)


def test_many_batch_dims_and_broadcast_mask():
  q, k, v = (_inputs(i, (3, 2, 11, H, 8)) for i in range(3))
  mask = jax.random.bernoulli(jax.random.key(7), 0.7, (3, 1, 1, 11, 11)) | jnp.eye(11, dtype=bool)
  ref = nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(ff.attention_fn(q, k, v, mask=mask), ref, **TOL)
  unbatched = [x[0, 0] for x in (q, k, v)]
  np.testing.assert_allclose(ff.attention_fn(*unbatched),
                             nn.dot_product_attention(*unbatched), **TOL)


def test_params_load_unchanged_linen():
  x = _inputs()
  flax_module = nn.MultiHeadDotProductAttention(num_heads=H, normalize_qk=True)
  params = flax_module.init(jax.random.key(1), x)
  ours = ff.MultiHeadDotProductAttention(num_heads=H, normalize_qk=True)
  assert (jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params))
  mask = nn.make_causal_mask(x[..., 0])
  np.testing.assert_allclose(ours.apply(params, x, mask=mask),
                             flax_module.apply(params, x, mask=mask), **TOL)


def test_params_load_unchanged_inside_a_parent_module():
  # Auto-named submodules get the same names, so a whole model's params carry over.
  class Parent(nn.Module):
    attention: type

    @nn.compact
    def __call__(self, x):
      return self.attention(num_heads=H)(x, mask=nn.make_causal_mask(x[..., 0]))

  x = _inputs()
  params = Parent(nn.MultiHeadDotProductAttention).init(jax.random.key(1), x)
  np.testing.assert_allclose(Parent(ff.MultiHeadDotProductAttention).apply(params, x),
                             Parent(nn.MultiHeadDotProductAttention).apply(params, x), **TOL)


# --- flax.nnx.MultiHeadAttention ------------------------------------------------------------------


def _nnx_pair(causal=False, **kwargs):
  """(Flax's module, the same weights with flash_jax.flax.attention_fn, flash_jax's module with
  `causal`); all three hold the same parameters."""
  args = dict(num_heads=H, in_features=F, decode=False, rngs=nnx.Rngs(0))
  args.update(kwargs)
  flax_module = nnx.MultiHeadAttention(**args)
  with_fn = nnx.MultiHeadAttention(**{**args, "attention_fn": ff.attention_fn,
                                      "rngs": nnx.Rngs(0)})
  ours = ff.MultiHeadAttention(**{**args, "rngs": nnx.Rngs(1)}, causal=causal)
  nnx.update(ours, nnx.state(flax_module, nnx.Param))
  return flax_module, with_fn, ours


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
def test_nnx_is_causal_and_gqa(num_kv_heads):
  x = _inputs()
  flax_module, with_fn, ours = _nnx_pair(num_kv_heads=num_kv_heads)
  ref = flax_module(x, is_causal=True)
  np.testing.assert_allclose(with_fn(x, is_causal=True), ref, **TOL)
  np.testing.assert_allclose(ours(x, is_causal=True), ref, **TOL)
  np.testing.assert_allclose(ours(x), flax_module(x), **TOL)


def test_nnx_gqa_per_head_mask():
  x = _inputs()
  mask = jax.random.bernoulli(jax.random.key(9), 0.6, (B, H, S, S)) | jnp.eye(S, dtype=bool)
  flax_module, with_fn, _ = _nnx_pair(num_kv_heads=2)
  np.testing.assert_allclose(with_fn(x, mask=mask), flax_module(x, mask=mask), **TOL)


def test_nnx_is_causal_is_top_left_across_lengths():
  xq, xkv = _inputs(0, (B, 9, F)), _inputs(1, (B, 21, F))
  flax_module, with_fn, _ = _nnx_pair()
  np.testing.assert_allclose(with_fn(xq, xkv, is_causal=True),
                             flax_module(xq, xkv, is_causal=True), **TOL)


def test_params_load_unchanged_nnx():
  flax_module, _, ours = _nnx_pair(num_kv_heads=2, normalize_qk=True)
  flax_state, our_state = nnx.state(flax_module, nnx.Param), nnx.state(ours, nnx.Param)
  assert jax.tree.structure(flax_state) == jax.tree.structure(our_state)
  for a, b in zip(jax.tree.leaves(flax_state), jax.tree.leaves(our_state)):
    np.testing.assert_array_equal(a, b)


# --- flash_jax's modules: causal and segment ids on the kernel path ------------------------------


def _dense_shapes(fn, *args):
  """The shapes of every intermediate of `fn` that ends in [..., S, S]: a dense mask or bias."""
  shapes = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        shape = getattr(var.aval, "shape", ())
        if len(shape) >= 2 and shape[-2:] == (S, S):
          shapes.add(shape)
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (tuple, list)) else (param,)):
          inner = getattr(sub, "jaxpr", None)
          if inner is not None:
            visit(getattr(inner, "jaxpr", inner))
  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def test_linen_module_causal_and_segment_ids_without_dense_mask():
  x = _inputs()
  segment_ids = jnp.array([[0] * 10 + [1] * 14, [0] * 5 + [1] * 5 + [2] * 14], jnp.int32)
  flax_module = nn.MultiHeadDotProductAttention(num_heads=H)
  params = flax_module.init(jax.random.key(1), x)
  ours = ff.MultiHeadDotProductAttention(num_heads=H, causal=True)
  mask = nn.combine_masks(nn.make_causal_mask(x[..., 0]),
                          nn.make_attention_mask(segment_ids, segment_ids, jnp.equal))
  np.testing.assert_allclose(ours.apply(params, x, segment_ids=segment_ids),
                             flax_module.apply(params, x, mask=mask), **TOL)
  assert not _dense_shapes(lambda x, ids: ours.apply(params, x, segment_ids=ids), x, segment_ids)
  # The check can fail: Flax's path builds [B, 1, S, S] masks.
  assert _dense_shapes(lambda x: flax_module.apply(params, x, mask=mask), x)


def test_nnx_module_causal_and_segment_ids():
  x = _inputs()
  segment_ids = jnp.array([[0] * 12 + [1] * 12, [3] * 24], jnp.int32)
  flax_module, _, ours = _nnx_pair(num_kv_heads=2, causal=True)
  mask = nn.combine_masks(nn.make_causal_mask(x[..., 0]),
                          nn.make_attention_mask(segment_ids, segment_ids, jnp.equal))
  np.testing.assert_allclose(ours(x, segment_ids=segment_ids), flax_module(x, mask=mask), **TOL)
  assert not _dense_shapes(lambda x, ids: ours(x, segment_ids=ids), x, segment_ids)


def test_module_segment_ids_need_kv_ids_in_cross_attention():
  x = _inputs()
  ours = ff.MultiHeadDotProductAttention(num_heads=H)
  params = ours.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="kv_segment_ids"):
    ours.apply(params, x, x, segment_ids=jnp.zeros((B, S), jnp.int32))


# --- dropout --------------------------------------------------------------------------------------


def _flax_with_kernel_mask(q, k, v, rng, rate, **kwargs):
  """Flax's attention with flash_jax's dropout mask applied to Flax's own weights."""
  weights = nn.dot_product_attention_weights(q, k, **kwargs)
  kept = flash_jax.dropout_mask(rng, q.shape[0], q.shape[2], q.shape[1], k.shape[1], rate)
  weights = jnp.where(kept, weights / (1.0 - rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def test_dropout_exact_through_dropout_mask():
  q, k, v = (_inputs(i, (B, S, H, 8)) for i in range(3))
  rng, rate = jax.random.key(11), 0.3
  mask = nn.make_causal_mask(jnp.ones((B, S)))
  out = ff.attention_fn(q, k, v, mask=mask, dropout_rng=rng, dropout_rate=rate,
                        broadcast_dropout=False, deterministic=False)
  np.testing.assert_allclose(out, _flax_with_kernel_mask(q, k, v, rng, rate, mask=mask), **TOL)
  # deterministic=True switches dropout off, as in Flax.
  np.testing.assert_allclose(
      ff.attention_fn(q, k, v, mask=mask, dropout_rng=rng, dropout_rate=rate,
                      deterministic=True),
      nn.dot_product_attention(q, k, v, mask=mask), **TOL)


def test_dropout_statistics():
  q, k, v = (_inputs(i, (1, 16, 2, 8)) for i in range(3))
  rate, draws = 0.25, 128
  keys = jax.random.split(jax.random.key(5), draws)
  kept = jax.jit(jax.vmap(lambda r: flash_jax.dropout_mask(r, 1, 2, 16, 16, rate)))(keys)
  # Kept fraction: binomial over draws * 512 entries, standard deviation ~0.0017.
  assert abs(float(kept.mean()) - (1 - rate)) < 0.009
  outs = jax.jit(jax.vmap(lambda r: ff.attention_fn(q, k, v, dropout_rng=r, dropout_rate=rate,
                                                    broadcast_dropout=False)))(keys)
  # Inverted dropout is unbiased: the mean over draws approaches the output without dropout.
  expected = nn.dot_product_attention(q, k, v)
  stderr = outs.std(axis=0) / np.sqrt(draws)
  assert float(jnp.max(jnp.abs(outs.mean(axis=0) - expected) / (stderr + 1e-6))) < 5.0
  assert float(stderr.min()) > 0  # draws do differ


def test_dropout_in_modules():
  x = _inputs()
  rate = 0.2
  linen_ours = ff.MultiHeadDotProductAttention(num_heads=H, dropout_rate=rate)
  params = linen_ours.init(jax.random.key(0), x, deterministic=True)
  a = linen_ours.apply(params, x, deterministic=False, dropout_rng=jax.random.key(1))
  b = linen_ours.apply(params, x, deterministic=False, dropout_rng=jax.random.key(1))
  c = linen_ours.apply(params, x, deterministic=False, dropout_rng=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-3
  np.testing.assert_allclose(linen_ours.apply(params, x, deterministic=True),
                             nn.MultiHeadDotProductAttention(num_heads=H).apply(params, x), **TOL)
  # Flax's modules default to broadcast_dropout=True, which the kernel cannot do.
  flax_default = nn.MultiHeadDotProductAttention(num_heads=H, dropout_rate=rate,
                                                 attention_fn=ff.attention_fn)
  with pytest.raises(NotImplementedError, match="broadcast_dropout"):
    flax_default.apply(params, x, deterministic=False, dropout_rng=jax.random.key(1))
  _, _, nnx_ours = _nnx_pair(dropout_rate=rate)
  np.testing.assert_array_equal(nnx_ours(x, deterministic=True), nnx_ours(x, deterministic=True))
  assert float(jnp.abs(nnx_ours(x, deterministic=False) -
                       nnx_ours(x, deterministic=False)).max()) > 1e-3


# --- decode mode ----------------------------------------------------------------------------------


def test_linen_decode_equals_one_causal_pass():
  x = _inputs()
  # causal=True (bottom-right) leaves the single query free; the cache's mask does the rest.
  ours = ff.MultiHeadDotProductAttention(num_heads=H, decode=True, causal=True)
  flax_fn = nn.MultiHeadDotProductAttention(num_heads=H, decode=True,
                                            attention_fn=ff.attention_fn)
  full = nn.MultiHeadDotProductAttention(num_heads=H)
  variables = ours.init(jax.random.key(0), x)  # sets the cache to length S
  expected = full.apply({"params": variables["params"]}, x,
                        mask=nn.make_causal_mask(x[..., 0]))
  for module in (ours, flax_fn):
    cache = variables["cache"]
    step = jax.jit(lambda cache, token: module.apply(
        {"params": variables["params"], "cache": cache}, token, mutable=["cache"]))
    outs = []
    for t in range(S):
      out, updated = step(cache, x[:, t:t + 1])
      cache = updated["cache"]
      outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), expected, **TOL)


def test_nnx_decode_equals_one_causal_pass():
  x = _inputs()
  flax_module, with_fn, ours = _nnx_pair(num_kv_heads=2)
  expected = flax_module(x, is_causal=True)
  # Flax's module with attention_fn (is_causal off: the cache's mask is the causal one) and
  # ours (which ignores is_causal while decoding).
  for module, is_causal in ((with_fn, False), (ours, True)):
    module.init_cache(x.shape)
    outs = [module(x[:, t:t + 1], decode=True, is_causal=is_causal) for t in range(S)]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), expected, **TOL)


# --- sow_weights ----------------------------------------------------------------------------------


def test_linen_sow_weights():
  x = _inputs()
  mask = nn.make_causal_mask(x[..., 0])
  flax_module, flash_module = _linen_pair()
  params = flax_module.init(jax.random.key(1), x)
  outputs = [module.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
             for module in (flax_module, flash_module)]
  (ref, ref_vars), (out, out_vars) = outputs
  np.testing.assert_allclose(out, ref, **TOL)
  ref_w, = ref_vars["intermediates"]["attention_weights"]
  out_w, = out_vars["intermediates"]["attention_weights"]
  assert out_w.shape == ref_w.shape == (B, H, S, S)
  np.testing.assert_allclose(out_w, ref_w, **TOL)


def test_nnx_sow_weights_gqa():
  x = _inputs()
  flax_module, with_fn, ours = _nnx_pair(num_kv_heads=2)
  ref = flax_module(x, is_causal=True, sow_weights=True)
  for module in (with_fn, ours):
    np.testing.assert_allclose(module(x, is_causal=True, sow_weights=True), ref, **TOL)
    weights, = nnx.pop(module, nnx.Intermediate)["attention_weights"].get_value()
    ref_weights, = nnx.state(flax_module, nnx.Intermediate)["attention_weights"].get_value()
    np.testing.assert_allclose(weights, ref_weights, **TOL)


# --- errors ---------------------------------------------------------------------------------------


def test_errors():
  q = _inputs(0, (B, S, H, 8))
  with pytest.raises(NotImplementedError, match="broadcast_dropout"):
    ff.attention_fn(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.key(0))
  with pytest.raises(ValueError, match="dropout_rng"):
    ff.attention_fn(q, q, q, dropout_rate=0.1, broadcast_dropout=False)
  with pytest.raises(NotImplementedError, match="qk_attn_weights_einsum"):
    ff.attention_fn(q, q, q, qk_attn_weights_einsum=jnp.einsum)
  with pytest.raises(ValueError, match="mask.*broadcastable"):
    ff.attention_fn(q, q, q, mask=jnp.ones((B, H, S, S + 1), bool))
  with pytest.raises(ValueError, match="batch dimensions"):
    ff.attention_fn(q, q[:1], q[:1])
  with pytest.raises(ValueError, match="kv_segment_ids"):
    ff.attention_fn(q, q, q, q_segment_ids=jnp.zeros((B, S), jnp.int32))


# --- jax.export -----------------------------------------------------------------------------------


def _gpt_forward():
  """A jitted causal attention block (linen, flash_jax inside) and its inputs."""
  module = ff.MultiHeadDotProductAttention(num_heads=H, causal=True)
  x = _inputs()
  params = module.init(jax.random.key(0), x)
  return jax.jit(lambda params, x: module.apply(params, x)), params, x


def test_export_round_trip():
  fn, params, x = _gpt_forward()
  grad_fn = jax.jit(jax.grad(lambda params, x: (fn(params, x) ** 2).sum()))
  for f in (fn, grad_fn):  # the forward, and the backward primitive through grad
    exported = jax.export.export(f, platforms=["cpu"])(params, x)
    restored = jax.export.deserialize(exported.serialize())
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
                 restored.call(params, x), f(params, x))


def test_export_for_cuda_needs_the_custom_call_opt_in():
  # Lowering for CUDA needs no GPU: the module text must hold flash_jax's custom calls.
  module = ff.MultiHeadDotProductAttention(num_heads=H, causal=True, dtype=jnp.bfloat16)
  x = _inputs()
  params = module.init(jax.random.key(0), x)
  spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x))
  fn = jax.jit(lambda params, x: module.apply(params, x))
  with pytest.raises(ValueError, match="flash_jax_attention_fwd_cuda"):
    jax.export.export(fn, platforms=["cuda"])(*spec)
  checks = [jax.export.DisabledSafetyCheck.custom_call(name)
            for name in ("flash_jax_attention_fwd_cuda", "flash_jax_attention_bwd_cuda")]
  exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(*spec)
  restored = jax.export.deserialize(exported.serialize())
  assert "flash_jax_attention_fwd_cuda" in restored.mlir_module()


@pytest.mark.parametrize("device", [gpu_param("gpu")])
def test_export_round_trip_gpu(device):
  module = ff.MultiHeadDotProductAttention(num_heads=H, causal=True, dtype=jnp.bfloat16)
  x = _inputs()
  params = module.init(jax.random.key(0), x)
  fn = jax.jit(lambda params, x: module.apply(params, x))
  checks = [jax.export.DisabledSafetyCheck.custom_call(name)
            for name in ("flash_jax_attention_fwd_cuda", "flash_jax_attention_bwd_cuda")]
  exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(params, x)
  restored = jax.export.deserialize(exported.serialize())
  np.testing.assert_array_equal(restored.call(params, x), fn(params, x))


# --- GPU: bfloat16 against Flax's attention ------------------------------------------------------


def _bf16_oracle(params, x):
  """(ref, base): Flax's causal attention block in float32 at full matmul precision, and in
  bfloat16, whose distance from ref is the error bfloat16 itself brings."""
  mask = nn.make_causal_mask(x[..., 0])
  with jax.default_matmul_precision("highest"):
    ref = nn.MultiHeadDotProductAttention(num_heads=2).apply(params, x, mask=mask)
  base = nn.MultiHeadDotProductAttention(num_heads=2, dtype=jnp.bfloat16).apply(params, x,
                                                                                 mask=mask)
  return ref, base


def _assert_bf16_close(out, ref, base):
  base_error = float(jnp.abs(base.astype(jnp.float32) - ref).max())
  error = float(jnp.abs(out.astype(jnp.float32) - ref).max())
  assert error <= 2 * base_error + 1e-3, (error, base_error)


@pytest.mark.parametrize("device", [gpu_param("gpu")])
def test_modules_bf16_gpu(device):
  x = _inputs(0, (2, 256, 128))
  ours = ff.MultiHeadDotProductAttention(num_heads=2, dtype=jnp.bfloat16, causal=True)
  params = ours.init(jax.random.key(0), x)
  out = ours.apply(params, x)
  assert out.dtype == jnp.bfloat16
  _assert_bf16_close(out, *_bf16_oracle(params, x))


@pytest.mark.parametrize("device", [gpu_param("gpu")])
def test_decode_bf16_gpu(device):
  # One query against a long, partly written cache: the kernel's split-KV path with a mask.
  x = _inputs(0, (2, 300, 128))
  ours = ff.MultiHeadDotProductAttention(num_heads=2, dtype=jnp.bfloat16, decode=True)
  variables = ours.init(jax.random.key(0), x)
  params = {"params": variables["params"]}
  step = jax.jit(lambda cache, token: ours.apply({**params, "cache": cache}, token,
                                                 mutable=["cache"]))
  cache, outs = variables["cache"], []
  for t in range(x.shape[1]):
    out, updated = step(cache, x[:, t:t + 1])
    cache = updated["cache"]
    outs.append(out)
  _assert_bf16_close(jnp.concatenate(outs, axis=1), *_bf16_oracle(params, x))


# --- the main example -----------------------------------------------------------------------------


def _load_example():
  path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_gpt.py"
  spec = importlib.util.spec_from_file_location("train_gpt", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses (linen modules) look their module up there
  spec.loader.exec_module(module)
  return module


def test_example_train_step_lowers_loss():
  example = _load_example()
  result = example.main(["--steps", "120", "--layers", "1", "--d-model", "32", "--heads", "2",
                         "--seq-len", "32", "--period", "8", "--vocab", "16",
                         "--batch-size", "8", "--lr", "1e-2"])
  # From ln(16) = 2.77 towards the task's floor of 0.61; steps are fast, compiling dominates.
  assert result["losses"][-1] < 0.8 * result["losses"][0], result["losses"]
