"""Fused dropout: values and gradients against the reference with the same key, the mask's
statistics and reproducibility, no cost at rate 0, masks under vmap, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax import _dropout
from oracle import assert_matches, gpu_param, random_inputs, reference_outputs

RATE = 0.3


def _check_against_reference(device, inputs, kwargs):
  """attention(..., dropout_rate=RATE, **kwargs) on `device`, jitted with its vjp, against the
  reference with the same key (the oracle of DESIGN.md); returns the outputs."""
  q, k, v, dout, dlse = inputs
  kwargs = dict(kwargs, dropout_rate=RATE)

  @jax.jit
  def run(q, k, v, dout, dlse):
    f = lambda q, k, v: flash_jax.attention(q, k, v, return_lse=True, **kwargs)
    (out, lse), vjp = jax.vjp(f, q, k, v)
    return (out, lse) + vjp((dout, dlse))

  outputs = run(*jax.device_put(inputs, device))
  ref = reference_outputs(q, k, v, dout, dlse, precision="float64", **kwargs)
  base = reference_outputs(q, k, v, dout, dlse, precision="input", **kwargs)
  assert_matches(outputs, ref, base)
  return outputs


@pytest.mark.parametrize("device_kind,dtype,causal", [
    ("cpu", "float32", False), ("cpu", "bfloat16", True), gpu_param("gpu", "bfloat16", True)])
def test_matches_reference_with_the_same_key(device_kind, dtype, causal):
  q, k, v, dout, dlse = random_inputs(1, 2, 37, 45, 4, 2, 16, jnp.dtype(dtype))
  outputs = _check_against_reference(jax.devices(device_kind)[0], (q, k, v, dout, dlse),
                                     dict(causal=causal, dropout_rng=jax.random.key(7)))
  # The test sees dropout: without it the output is different.
  assert not np.allclose(np.asarray(outputs[0], np.float32),
                         np.asarray(flash_jax.attention(q, k, v, causal=causal), np.float32),
                         atol=1e-2)


# The CUDA kernels draw dropout in two variants (csrc/flash_jax/params.h): kDropout when only
# the index band comes with it (causal, window, lengths, GQA), kAll beside segment ids, masks,
# bias, ALiBi or softcap; each with the atomic and the deterministic backward. Sequences of
# several key and query blocks, so that blocks and their Philox counters are stitched together.
_LENGTHS = dict(q_lengths=np.array([150, 200], np.int32), kv_lengths=np.array([333, 97], np.int32))
_IDS = dict(q_segment_ids=np.repeat(np.array([[0, 1], [0, 0]], np.int32), [80, 120], axis=1),
            kv_segment_ids=np.repeat(np.array([[0, 1], [0, 0]], np.int32), [150, 183], axis=1))
_KERNEL_VARIANT_CASES = {
    "alone_fp16_d64": ("float16", 64, 4, {}),
    "lengths_window_gqa_d128": ("bfloat16", 128, 1, dict(window=(70, 5), **_LENGTHS)),
    "causal_deterministic": ("bfloat16", 64, 2, dict(causal=True, deterministic=True)),
    "segment_ids": ("bfloat16", 64, 2, _IDS),
    "softcap_deterministic": ("float16", 96, 2, dict(softcap=5.0, deterministic=True)),
}


@pytest.mark.parametrize("case", [gpu_param(name) for name in _KERNEL_VARIANT_CASES])
def test_kernel_variants_match_the_reference(case):
  dtype, head_dim, kv_heads, options = _KERNEL_VARIANT_CASES[case]
  inputs = random_inputs(8, 2, 200, 333, 4, kv_heads, head_dim, jnp.dtype(dtype))
  options = {name: jnp.asarray(value) if isinstance(value, np.ndarray) else value
             for name, value in options.items()}
  _check_against_reference(jax.devices("gpu")[0], inputs,
                           dict(options, dropout_rng=jax.random.key(11)))


def test_kept_fraction():
  for rate in (0.1, 0.5):
    kept = flash_jax.dropout_mask(jax.random.key(0), 2, 4, 256, 256, rate)
    assert kept.shape == (2, 4, 256, 256) and kept.dtype == jnp.bool_
    assert abs(float(kept.mean()) - (1 - rate)) < 0.01


def test_same_key_same_output_different_key_different_output():
  q, k, v, _, _ = random_inputs(2, 2, 33, 33, 2, 2, 16, jnp.float32)
  run = lambda rng: flash_jax.attention(q, k, v, dropout_rate=RATE, dropout_rng=rng)
  np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  assert not np.allclose(run(jax.random.key(1)), run(jax.random.key(2)), atol=1e-3)
  # Raw uint32 key data is accepted as well as typed keys, with the same mask.
  np.testing.assert_array_equal(run(jax.random.key_data(jax.random.key(1))),
                                run(jax.random.key(1)))


# --- the mask's specification, against an independent scalar Philox -------------------------

_M32 = 0xFFFFFFFF


def _scalar_philox(counter, key, rounds=7):
  """Philox-4x32-`rounds` on Python ints, written from the Random123 definition."""
  c0, c1, c2, c3 = counter
  k0, k1 = key
  for round_index in range(rounds):
    if round_index:
      k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
    c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _M32, (p0 >> 32) ^ c3 ^ k1, p0 & _M32
  return c0, c1, c2, c3


def _scalar_value(seed, head, row, col):
  """The spec's 16-bit random value of entry (head, row, col) under a batch row's seed."""
  counter = ((col >> 4) * 4 + ((col >> 1) & 3), (row >> 4) * 8 + (row & 7), head, 0)
  word = _scalar_philox(counter, seed)[((col >> 3) & 1) * 2 + (col & 1)]
  return (word >> (16 * ((row >> 3) & 1))) & 0xFFFF


# Random123's known-answer vectors (kat_vectors: philox4x32 7 and 10); the spec uses 7 rounds.
_PI_COUNTER, _PI_KEY = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)
_PHILOX_KAT = [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (_M32,) * 4, (_M32,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, _PI_COUNTER, _PI_KEY, (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (_M32,) * 4, (_M32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, _PI_COUNTER, _PI_KEY, (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("rounds,counter,key,expected", _PHILOX_KAT)
def test_philox_known_answers(rounds, counter, key, expected):
  assert _scalar_philox(counter, key, rounds) == expected
  words = _dropout.philox4x32([jnp.uint32(c) for c in counter], [jnp.uint32(k) for k in key],
                              rounds)
  assert tuple(int(w) for w in words) == expected


def test_mask_matches_the_scalar_spec():
  # 2 row and 3 column fragments (one partial), odd sizes: every lane and half of the spec.
  batch, heads, seq_q, seq_k, rate = 2, 3, 35, 41, 0.3
  rng = jax.random.key(11)
  seeds = [tuple(int(s) for s in row) for row in np.asarray(_dropout.row_seeds(rng, batch))]
  threshold = int(rate * 65536)
  expected = np.array([[[[_scalar_value(seeds[b], h, i, j) >= threshold for j in range(seq_k)]
                         for i in range(seq_q)] for h in range(heads)] for b in range(batch)])
  np.testing.assert_array_equal(flash_jax.dropout_mask(rng, batch, heads, seq_q, seq_k, rate),
                                expected)


@pytest.mark.parametrize("b,h,row,col", [(0, 0, 0, 0), (1, 2, 9, 17), (0, 1, 24, 33),
                                         (1, 0, 31, 46)])
def test_rate_is_quantised_to_16_bits(b, h, row, col):
  """An entry whose value is v is kept at any rate in [0, (v + 1) / 2**16) and dropped above."""
  rng = jax.random.key(3)
  seed = tuple(int(s) for s in np.asarray(_dropout.row_seeds(rng, b + 1))[b])
  value = _scalar_value(seed, h, row, col)
  kept = lambda rate: bool(flash_jax.dropout_mask(rng, b + 1, h + 1, row + 1, col + 1,
                                                  rate)[b, h, row, col])
  assert kept(value / 65536) and kept((value + 0.999) / 65536)
  assert not kept((value + 1) / 65536)


def _attention_configs(fn, *args):
  """The AttentionConfig of every flash_jax primitive in fn's jaxpr, nested jaxprs included."""
  configs = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name.startswith("flash_jax_attention"):
        configs.append(eqn.params["config"])
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            visit(inner)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return configs


def test_rate_zero_has_no_dropout_operand():
  q, k, v, _, _ = random_inputs(3, 1, 16, 16, 2, 2, 16, jnp.float32)
  grad = jax.grad(lambda q, rate: flash_jax.attention(
      q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(0)).sum())
  without = _attention_configs(lambda q: grad(q, 0.0), q)
  with_dropout = _attention_configs(lambda q: grad(q, RATE), q)
  assert len(without) == 2 and len(with_dropout) == 2  # forward and backward
  assert all("dropout_seed" not in c.operands and c.dropout_rate == 0 for c in without)
  assert all("dropout_seed" in c.operands for c in with_dropout)


def _explicit_dropout_attention(q, k, v, keep, rate):
  """Naive attention with a given keep mask [b, h, sq, sk]."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1])
  probs = jnp.where(keep, jax.nn.softmax(scores, axis=-1) / (1 - rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision="highest")


def test_vmap_draws_a_mask_per_example_and_the_backward_uses_it():
  examples, batch, heads, seq_q, seq_k = 3, 2, 4, 21, 27
  q, k, v, _, _ = random_inputs(4, examples * batch, seq_q, seq_k, heads, 2, 16, jnp.float32)
  q = q.reshape(examples, batch, seq_q, heads, 16)
  k, v = k[:batch], v[:batch]
  rng = jax.random.key(5)
  f = lambda q: flash_jax.attention(q, k, v, dropout_rate=RATE, dropout_rng=rng)
  weights = jax.random.normal(jax.random.key(6), q.shape)
  loss = lambda out: (out * weights).sum()

  # The documented per-example seeds: example e hashes each batch row's seed with e.
  seeds = _dropout.row_seeds(rng, batch)
  keeps = []
  for e in range(examples):
    zero = jnp.zeros((batch,), jnp.uint32)
    words = _dropout.philox4x32((zero + e, zero, zero, zero), (seeds[:, 0], seeds[:, 1]))
    example_seeds = jnp.stack(words[:2], axis=-1)[:, None, None, None, :]
    keeps.append(_dropout.keep(example_seeds, jnp.arange(heads)[None, :, None, None],
                               jnp.arange(seq_q)[None, None, :, None],
                               jnp.arange(seq_k)[None, None, None, :], RATE))
  assert not bool(jnp.all(keeps[0] == keeps[1]))  # each example its own mask

  expected = jnp.stack([_explicit_dropout_attention(q[e], k, v, keeps[e], RATE)
                        for e in range(examples)])
  expected_grad = jnp.stack([
      jax.grad(lambda x, e=e: (_explicit_dropout_attention(x, k, v, keeps[e], RATE)
                               * weights[e]).sum())(q[e]) for e in range(examples)])
  np.testing.assert_allclose(jax.vmap(f)(q), expected, atol=2e-5)
  grad_of_vmap = jax.grad(lambda q: loss(jax.vmap(f)(q)))(q)
  vmap_of_grad = jax.vmap(lambda q, w: jax.grad(lambda x: (f(x) * w).sum())(q))(q, weights)
  np.testing.assert_allclose(grad_of_vmap, expected_grad, atol=2e-5)
  np.testing.assert_allclose(vmap_of_grad, expected_grad, atol=2e-5)


# --- argument errors -------------------------------------------------------------------------


@pytest.mark.parametrize("rate,match", [
    (-0.1, r"`dropout_rate` must be in \[0, 1\), got -0.1"),
    (1.0, r"`dropout_rate` must be in \[0, 1\), got 1.0"),
    (True, r"`dropout_rate` must be a Python float in \[0, 1\), got bool"),
    (jnp.float32(0.1), r"`dropout_rate` must be a Python float in \[0, 1\), got ArrayImpl"),
])
def test_bad_dropout_rate(rate, match):
  q, k, v, _, _ = random_inputs(0, 1, 8, 8, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match=match):
    flash_jax.attention(q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(0))


def test_rate_without_key():
  q, k, v, _, _ = random_inputs(0, 1, 8, 8, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match=r"`dropout_rng` \(a JAX PRNG key\) is required when "
                                       r"dropout_rate > 0, got dropout_rate=0.2 and no key"):
    flash_jax.attention(q, k, v, dropout_rate=0.2)
