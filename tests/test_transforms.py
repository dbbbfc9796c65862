"""JAX transformations of flash_jax.attention: jit, grad, vmap, checkpoint, export, jvp."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from oracle import random_inputs

ATOL = 2e-5


def _loss(attention, q, k, v, causal=False):
  out, lse = attention(q, k, v, causal=causal, return_lse=True)
  weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
  return (out * weights).sum() + jnp.sin(lse).sum()


def _reference(q, k, v, causal=False, return_lse=False):
  return flash_jax.reference_attention(q, k, v, causal=causal, return_lse=return_lse)


def test_lse_and_its_gradient():
  q, k, v, _, _ = random_inputs(0, 2, 37, 53, 6, 2, 48, jnp.float32)
  out, lse = flash_jax.attention(q, k, v, causal=True, return_lse=True)
  ref_out, ref_lse = _reference(q, k, v, causal=True, return_lse=True)
  np.testing.assert_allclose(out, ref_out, atol=ATOL)
  np.testing.assert_allclose(lse, ref_lse, atol=ATOL)
  assert lse.shape == (2, 6, 37) and lse.dtype == jnp.float32
  lse_only = lambda f: jax.grad(lambda q, k, v: jnp.sin(f(q, k, v, causal=True,
                                                          return_lse=True)[1]).sum(), (0, 1, 2))
  for got, want in zip(lse_only(flash_jax.attention)(q, k, v), lse_only(_reference)(q, k, v)):
    np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("causal", [False, True])
def test_jit_grad_matches_reference(causal):
  q, k, v, _, _ = random_inputs(1, 3, 29, 41, 4, 4, 32, jnp.float32)
  got = jax.jit(jax.grad(functools.partial(_loss, flash_jax.attention, causal=causal),
                         (0, 1, 2)))(q, k, v)
  want = jax.grad(functools.partial(_loss, _reference, causal=causal), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=ATOL)


# (in_axes, which of q/k/v carry the mapped axis at which position). Batch 3 and mapped size 2
# differ and both exceed 1, so a rule that confuses the two axes cannot pass.
VMAP_CASES = [((0, 0, 0), "all mapped at 0"), ((0, None, None), "only query"),
              ((None, 0, 0), "only key and value"), ((1, 1, 1), "mapped at axis 1"),
              ((2, None, 0), "mixed axes")]


@pytest.mark.parametrize("in_axes,label", VMAP_CASES, ids=[c[1] for c in VMAP_CASES])
def test_vmap(in_axes, label):
  del label
  mapped, batch = 2, 3
  keys = jax.random.split(jax.random.key(2), 3)

  def make(key, shape, axis):
    if axis is None:
      return jax.random.normal(key, shape)
    return jax.random.normal(key, shape[:axis] + (mapped,) + shape[axis:])

  q = make(keys[0], (batch, 19, 4, 16), in_axes[0])
  k = make(keys[1], (batch, 23, 2, 16), in_axes[1])
  v = make(keys[2], (batch, 23, 2, 16), in_axes[2])
  f = lambda q, k, v: flash_jax.attention(q, k, v, causal=True, return_lse=True)
  r = lambda q, k, v: _reference(q, k, v, causal=True, return_lse=True)
  got = jax.jit(jax.vmap(f, in_axes=in_axes))(q, k, v)
  want = jax.vmap(r, in_axes=in_axes)(q, k, v)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, atol=ATOL)
  # vmap of grad, also through jit.
  grad = lambda a: jax.grad(functools.partial(_loss, a, causal=True), (0, 1, 2))
  got = jax.jit(jax.vmap(grad(flash_jax.attention), in_axes=in_axes))(q, k, v)
  want = jax.vmap(grad(_reference), in_axes=in_axes)(q, k, v)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, atol=ATOL)


def test_grad_of_vmap_and_nested_vmap():
  q, k, v, _, _ = random_inputs(3, 2, 11, 13, 2, 1, 8, jnp.float32)
  stack = lambda x: jnp.stack([x, 2 * x, -x])
  f = lambda a: lambda q, k, v: jax.vmap(jax.vmap(lambda q, k, v: _loss(a, q, k, v)))(
      jnp.stack([stack(q)] * 2), jnp.stack([stack(k)] * 2), jnp.stack([stack(v)] * 2)).sum()
  got = jax.grad(f(flash_jax.attention), (0, 1, 2))(q, k, v)
  want = jax.grad(f(_reference), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4)


def test_checkpoint():
  q, k, v, _, _ = random_inputs(4, 2, 17, 17, 2, 2, 16, jnp.float32)

  def model(q, k, v):
    h = jax.checkpoint(lambda q, k, v: flash_jax.attention(q, k, v, causal=True))(q, k, v)
    return jnp.tanh(h).sum()

  got = jax.jit(jax.grad(model, (0, 1, 2)))(q, k, v)
  want = jax.grad(lambda q, k, v: jnp.tanh(_reference(q, k, v, causal=True)).sum(),
                  (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=ATOL)


def test_export_round_trip():
  q, k, v, _, _ = random_inputs(5, 2, 21, 34, 4, 2, 32, jnp.float32)
  f = jax.jit(lambda q, k, v: jax.value_and_grad(
      functools.partial(_loss, flash_jax.attention, causal=True), (0, 1, 2))(q, k, v))
  exported = jax.export.export(f)(q, k, v)
  restored = jax.export.deserialize(exported.serialize())
  for got, want in zip(jax.tree_util.tree_leaves(restored.call(q, k, v)),
                       jax.tree_util.tree_leaves(f(q, k, v))):
    np.testing.assert_array_equal(got, want)


def test_jvp_raises_a_clear_error():
  q, k, v, _, _ = random_inputs(6, 1, 8, 8, 1, 1, 8, jnp.float32)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda q: flash_jax.attention(q, k, v), (q,), (q,))
