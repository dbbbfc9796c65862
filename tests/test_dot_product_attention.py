"""flash_jax.dot_product_attention against jax.nn.dot_product_attention(implementation="xla"):
values and gradients for each option and combinations, 3-D and 4-D, and its argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from oracle import gpu_devices, gpu_param

B, SQ, SK, H, KVH, D = 2, 29, 41, 4, 2, 16


def _inputs(seed, three_d=False, dtype=jnp.float32, seqs=(SQ, SK)):
  keys = jax.random.split(jax.random.key(seed), 4)
  batch = () if three_d else (B,)
  q = jax.random.normal(keys[0], batch + (seqs[0], H, D), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], batch + (seqs[1], KVH, D), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], batch + (seqs[1], KVH, D), jnp.float32).astype(dtype)
  dout = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)
  return q, k, v, dout


def _mask(seed, shape):
  """Random keep mask that always keeps the top-left diagonal, so no row is fully masked
  (fully masked rows are where the two functions differ on purpose, see below)."""
  keep = np.array(jax.random.bernoulli(jax.random.key(seed), 0.6, shape))
  if shape[-2] > 1:
    keep |= np.arange(shape[-2])[:, None] == np.arange(shape[-1])[None, :]
  else:
    keep[..., 0] = True
  return jnp.asarray(keep)


def _results(fn, q, k, v, dout, bias, mask, kwargs):
  """out and the gradients of q, k, v (and bias) of fn(q, k, v, bias, mask, **kwargs)."""
  primals = (q, k, v) if bias is None else (q, k, v, bias)

  def f(*p):
    return fn(*p[:3], p[3] if bias is not None else None, mask, **kwargs)

  out, vjp = jax.vjp(f, *primals)
  return (out,) + vjp(dout)


def _compare(q, k, v, dout, bias=None, mask=None, device=None, atol=2e-5, **kwargs):
  device = device or jax.devices("cpu")[0]
  args = jax.device_put((q, k, v, dout, bias, mask), device)
  ours = jax.jit(lambda *a: _results(flash_jax.dot_product_attention, *a, kwargs))(*args)
  xla = lambda *a, **kw: jax.nn.dot_product_attention(*a, implementation="xla", **kw)
  theirs = jax.jit(lambda *a: _results(xla, *a, kwargs))(*args)
  names = ["out", "dq", "dk", "dv", "dbias"]
  for name, a, b in zip(names, ours, theirs):
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol,
                               rtol=atol * 10, err_msg=name)


LENGTHS = dict(query_seq_lengths=jnp.array([SQ - 7, SQ], jnp.int32),
               key_value_seq_lengths=jnp.array([SK, 25], jnp.int32))
OPTIONS = {
    "plain": lambda: {},
    "scale": lambda: dict(scale=0.37),
    "is_causal": lambda: dict(is_causal=True),
    "window_int": lambda: dict(local_window_size=3),
    "window_pair": lambda: dict(local_window_size=(5, 2)),
    "window_diagonal": lambda: dict(local_window_size=(0, 0)),
    "window_causal": lambda: dict(local_window_size=(4, 4), is_causal=True),
    "query_lengths": lambda: dict(query_seq_lengths=LENGTHS["query_seq_lengths"]),
    "kv_lengths": lambda: dict(key_value_seq_lengths=LENGTHS["key_value_seq_lengths"]),
    "both_lengths_causal": lambda: dict(LENGTHS, is_causal=True),
    "mask_bhqk": lambda: dict(mask=_mask(1, (B, H, SQ, SK))),
    "mask_1hqk": lambda: dict(mask=_mask(2, (1, H, SQ, SK))),
    "mask_b1qk": lambda: dict(mask=_mask(3, (B, 1, SQ, SK))),
    "mask_qk": lambda: dict(mask=_mask(4, (SQ, SK))),
    "mask_b11k": lambda: dict(mask=_mask(5, (B, 1, 1, SK))),
    "bias_bhqk": lambda: dict(bias=jax.random.normal(jax.random.key(6), (B, H, SQ, SK))),
    "bias_1h1k": lambda: dict(bias=jax.random.normal(jax.random.key(7), (1, H, 1, SK))),
    "bias_qk": lambda: dict(bias=jax.random.normal(jax.random.key(8), (SQ, SK))),
    "bias_b1q1": lambda: dict(bias=jax.random.normal(jax.random.key(9), (B, 1, SQ, 1))),
    "bias_mask_causal_window_lengths": lambda: dict(
        LENGTHS, bias=jax.random.normal(jax.random.key(10), (1, H, SQ, SK)),
        mask=_mask(11, (B, 1, SQ, SK)), is_causal=True, local_window_size=(6, 1), scale=0.3),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_4d_matches_jax_nn(option):
  q, k, v, dout = _inputs(len(option))
  _compare(q, k, v, dout, **OPTIONS[option]())


@pytest.mark.parametrize("option", [
    dict(),
    dict(is_causal=True),
    dict(local_window_size=(3, 1), is_causal=True),
    dict(mask_shape=(H, SQ, SK)),
    dict(mask_shape=(SQ, SK), bias_shape=(1, SQ, SK)),
    dict(bias_shape=(H, 1, SK), query_seq_lengths=jnp.array([20], jnp.int32),
         key_value_seq_lengths=jnp.array([30], jnp.int32)),
], ids=["plain", "causal", "window_causal", "mask_hqk", "mask_qk_bias_1qk", "bias_lengths"])
def test_3d_matches_jax_nn(option):
  option = dict(option)
  q, k, v, dout = _inputs(20, three_d=True)
  if "mask_shape" in option:
    option["mask"] = _mask(21, option.pop("mask_shape"))
  if "bias_shape" in option:
    option["bias"] = jax.random.normal(jax.random.key(22), option.pop("bias_shape"))
  _compare(q, k, v, dout, **option)


@pytest.mark.parametrize("seqs", [(SK, SQ), (1, SK)], ids=["sq>sk", "sq=1"])
def test_causal_other_shapes_match_jax_nn(seqs):
  q, k, v, dout = _inputs(23, seqs=seqs)
  _compare(q, k, v, dout, is_causal=True)


@pytest.mark.parametrize("device_kind", ["cpu", gpu_param("gpu")])
def test_bfloat16_matches_jax_nn(device_kind):
  device = jax.devices(device_kind)[0]
  q, k, v, dout = _inputs(24, dtype=jnp.bfloat16)
  # jax.nn rounds the probabilities to bfloat16 before the second product; flash_jax does not.
  _compare(q, k, v, dout, device=device, atol=3e-2, is_causal=True,
           mask=_mask(25, (B, 1, SQ, SK)))


def test_fully_masked_rows_differ_from_jax_nn():
  """The documented difference: a row that sees no key is 0 here and the mean of value over
  all keys in jax.nn (it fills masked scores with a large finite negative number)."""
  q, k, v, _ = _inputs(26)
  lengths = jnp.array([SK, 0], jnp.int32)
  ours = flash_jax.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
  theirs = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                        implementation="xla")
  np.testing.assert_allclose(ours[0], theirs[0], atol=2e-5)
  assert bool(jnp.all(ours[1] == 0))
  mean = jnp.repeat(v[1].mean(axis=0), H // KVH, axis=0)
  np.testing.assert_allclose(theirs[1], jnp.broadcast_to(mean, theirs[1].shape), atol=1e-5)


def test_gpu_lowering_is_flash_jax():
  """On GPU the call runs flash_jax's kernels: the compiled module holds its custom call."""
  if not gpu_devices():
    pytest.skip("no GPU visible to JAX")
  q, k, v, _ = _inputs(27, dtype=jnp.bfloat16)
  text = jax.jit(flash_jax.dot_product_attention).lower(q, k, v).as_text()
  assert "flash_jax" in text


# --- argument errors -------------------------------------------------------------------------


def _small():
  q, k, v, _ = _inputs(28)
  return q, k, v


def test_rank_errors():
  q, k, v = _small()
  with pytest.raises(ValueError, match=r"`query` must have rank 4 .* or 3 .* got shape \[1, 2"):
    flash_jax.dot_product_attention(q[None], k, v)
  with pytest.raises(ValueError, match=r"`key` must have rank 4 .* got shape \[16\]"):
    flash_jax.dot_product_attention(q, k[0, 0, 0], v)


@pytest.mark.parametrize("window,match", [
    (-1, r"`local_window_size` sizes must be >= 0, got \(-1, -1\)"),
    ((2, -1), r"`local_window_size` sizes must be >= 0, got \(2, -1\)"),
    (2.5, r"`local_window_size` must be a Python int or a pair of ints .* got 2.5"),
    ((1, 2, 3), r"`local_window_size` must be a Python int or a pair .* got \(1, 2, 3\)"),
])
def test_local_window_size_errors(window, match):
  q, k, v = _small()
  with pytest.raises(ValueError, match=match):
    flash_jax.dot_product_attention(q, k, v, local_window_size=window)


def test_length_errors():
  q, k, v = _small()
  with pytest.raises(ValueError, match=r"`query_seq_lengths` must have shape \[2\], got \[3\]"):
    flash_jax.dot_product_attention(q, k, v, query_seq_lengths=jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match=r"`key_value_seq_lengths` must be an integer array"):
    flash_jax.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([1.0, 2.0]))


def test_mask_and_bias_errors():
  q, k, v = _small()
  with pytest.raises(ValueError, match="`mask` must be a boolean array"):
    flash_jax.dot_product_attention(q, k, v, mask=jnp.ones((SQ, SK), jnp.int32))
  with pytest.raises(ValueError, match=r"`mask` must be broadcastable to .* got shape \[1, 1, 3"):
    flash_jax.dot_product_attention(q, k, v, mask=jnp.ones((3, SK), bool))
  with pytest.raises(ValueError, match=r"`bias` must be broadcastable to .* got shape \[1, 2"):
    flash_jax.dot_product_attention(q, k, v, jnp.ones((1, 2, 3, SQ, SK)))
  with pytest.raises(ValueError, match="`bias` must be a floating array"):
    flash_jax.dot_product_attention(q, k, v, jnp.ones((SQ, SK), jnp.int32))


def test_scale_and_flag_errors():
  q, k, v = _small()
  with pytest.raises(ValueError, match="`scale` must be a Python float"):
    jax.jit(lambda s: flash_jax.dot_product_attention(q, k, v, scale=s))(0.5)
  with pytest.raises(ValueError, match="`is_causal` must be a Python bool, got str"):
    flash_jax.dot_product_attention(q, k, v, is_causal="yes")
