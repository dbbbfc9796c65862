"""Memory stays linear in sequence length: compiled temporaries of forward+backward."""

import jax
import jax.numpy as jnp

import flash_jax


def _temp_bytes(attention, batch, seq, heads, head_dim):
  shape = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.float32)

  def loss(q, k, v):
    return attention(q, k, v, causal=True).sum()

  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(shape, shape, shape).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_forward_backward_temp_memory_is_a_fraction_of_naive():
  flash = _temp_bytes(flash_jax.attention, 1, 8192, 4, 64)
  naive = _temp_bytes(flash_jax.reference_attention, 1, 8192, 4, 64)
  assert flash < 0.10 * naive, f"flash_jax {flash / 2**20:.0f} MiB, naive {naive / 2**20:.0f} MiB"


def test_temp_memory_grows_linearly():
  small = _temp_bytes(flash_jax.attention, 1, 4096, 4, 64)
  large = _temp_bytes(flash_jax.attention, 1, 16384, 4, 64)
  assert large < 5 * small, f"4x the sequence took {large / small:.1f}x the memory"
