"""Counter-based dropout: Philox-4x32-10 keyed per batch row, counted by (head, row, column).

Each batch row gets its own 64-bit Philox key derived from the user's PRNG key and the row's index
in the whole batch, so a mask depends neither on tiling nor on how the batch is sharded; the
counter (column // 4, row, head, 0) selects one of four 32-bit outputs per column. An entry is
kept when its 32-bit value is >= rate * 2**32. The CUDA kernels evaluate the same function, and
`dropout_mask` materialises it for tests and debugging.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_PHILOX_M0 = np.uint32(0xD2511F53)
_PHILOX_M1 = np.uint32(0xCD9E8D57)
_PHILOX_W0 = np.uint32(0x9E3779B9)
_PHILOX_W1 = np.uint32(0xBB67AE85)
_ROUNDS = 10


def _mulhilo(a, b: np.uint32):
  """(high, low) 32-bit halves of the 64-bit product a * b, in uint32 arithmetic only (JAX may
  run without 64-bit types)."""
  b_lo, b_hi = np.uint32(int(b) & 0xFFFF), np.uint32(int(b) >> 16)
  a_lo, a_hi = a & np.uint32(0xFFFF), a >> np.uint32(16)
  lo_lo = a_lo * b_lo
  lo_hi = a_lo * b_hi
  hi_lo = a_hi * b_lo
  middle = (lo_lo >> np.uint32(16)) + (lo_hi & np.uint32(0xFFFF)) + (hi_lo & np.uint32(0xFFFF))
  high = a_hi * b_hi + (lo_hi >> np.uint32(16)) + (hi_lo >> np.uint32(16)) + (middle >>
                                                                              np.uint32(16))
  return high, a * b


def philox4x32(counter, key):
  """Philox-4x32-10. counter: 4 uint32 arrays; key: 2 uint32 arrays (all broadcastable)."""
  c0, c1, c2, c3 = counter
  k0, k1 = key
  for _ in range(_ROUNDS):
    hi0, lo0 = _mulhilo(c0, _PHILOX_M0)
    hi1, lo1 = _mulhilo(c2, _PHILOX_M1)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    k0 = k0 + _PHILOX_W0
    k1 = k1 + _PHILOX_W1
  return c0, c1, c2, c3


def keep_threshold(rate: float) -> np.uint32:
  return np.uint32(min(int(rate * 2.0**32), 2**32 - 1))


def row_seeds(dropout_rng, batch: int):
  """uint32 [batch, 2]: the Philox key of each batch row."""
  if isinstance(dropout_rng, jax.Array) and jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key):
    key = dropout_rng
  else:
    key = jax.random.wrap_key_data(jnp.asarray(dropout_rng, jnp.uint32))
  rows = jnp.arange(batch, dtype=jnp.uint32)
  return jax.vmap(lambda row: jax.random.bits(jax.random.fold_in(key, row), (2,), jnp.uint32))(rows)


def keep(seeds, heads, rows, cols, rate: float):
  """Whether each entry is kept. seeds: uint32 [..., 2] broadcast against heads/rows/cols, which
  are integer arrays of head, query and key indices (broadcastable to each other)."""
  heads, rows, cols = (jnp.asarray(x).astype(jnp.uint32) for x in (heads, rows, cols))
  shape = jnp.broadcast_shapes(seeds.shape[:-1], heads.shape, rows.shape, cols.shape)
  zero = jnp.zeros(shape, jnp.uint32)
  counter = (zero + cols // np.uint32(4), zero + rows, zero + heads, zero)
  words = philox4x32(counter, (zero + seeds[..., 0], zero + seeds[..., 1]))
  lane = cols % np.uint32(4)
  bits = jnp.select([lane == 0, lane == 1, lane == 2], list(words[:3]), words[3])
  return bits >= keep_threshold(rate)


def dropout_mask(dropout_rng, batch: int, heads: int, seq_q: int, seq_k: int, rate: float):
  """The dropout mask flash_jax applies for this key: bool [batch, heads, seq_q, seq_k], True =
  kept (kept weights are scaled by 1 / (1 - rate)).

  It is the mask of `attention(..., dropout_rate=rate, dropout_rng=dropout_rng)` on inputs of
  that batch size, heads and sequence lengths, on CPU and GPU alike.
  """
  seeds = row_seeds(dropout_rng, batch)[:, None, None, None, :]
  return keep(seeds, jnp.arange(heads)[None, :, None, None], jnp.arange(seq_q)[None, None, :, None],
              jnp.arange(seq_k)[None, None, None, :], rate)
