"""Counter-based dropout: Philox-4x32-7 keyed per batch row, counted by (head, row, column).

Each batch row gets its own 64-bit Philox key derived from the user's PRNG key and the row's index
in the whole batch, so a mask depends neither on tiling nor on how the batch is sharded.

One Philox call yields 4 x 32 bits, cut into eight 16-bit values for the eight (row, column)
entries one thread holds in an mma.sync m16n8k16 accumulator: rows {R, R + 8} (R % 16 < 8) times
columns {2t, 2t + 1, 2t + 8, 2t + 9} of a 16-column span. The CUDA kernels thus draw the dropout of
a whole fragment with one call; the kernels and this module evaluate the same function:

  counter = ((col >> 4) * 4 + ((col >> 1) & 3), (row >> 4) * 8 + (row & 7), head, 0)
  value   = (word[((col >> 3) & 1) * 2 + (col & 1)] >> (16 * ((row >> 3) & 1))) & 0xFFFF
  kept    = value >= min(int(rate * 2**16), 2**16 - 1)

so the probability of dropping is the rate rounded down to a multiple of 2**-16 (kept weights are
still scaled by 1 / (1 - rate), the rate as given).

Seven Philox rounds, not Random123's default ten: 4x32-7 already passes TestU01's BigCrush
(Salmon et al., SC'11, table 2) and the generator is what bounds the kernels' dropout cost
(benchmarks/NOTES.md, session 3). `dropout_mask` materialises the mask for tests
and debugging.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_PHILOX_M0 = np.uint32(0xD2511F53)
_PHILOX_M1 = np.uint32(0xCD9E8D57)
_PHILOX_W0 = np.uint32(0x9E3779B9)
_PHILOX_W1 = np.uint32(0xBB67AE85)
PHILOX_ROUNDS = 7


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


def philox4x32(counter, key, rounds: int = PHILOX_ROUNDS):
  """Philox-4x32-`rounds`. counter: 4 uint32 arrays; key: 2 uint32 arrays (all broadcastable)."""
  c0, c1, c2, c3 = counter
  k0, k1 = key
  for _ in range(rounds):
    hi0, lo0 = _mulhilo(c0, _PHILOX_M0)
    hi1, lo1 = _mulhilo(c2, _PHILOX_M1)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    k0 = k0 + _PHILOX_W0
    k1 = k1 + _PHILOX_W1
  return c0, c1, c2, c3


def keep_threshold16(rate: float) -> np.uint32:
  """The least 16-bit random value of a kept entry: rate * 2**16 rounded down."""
  return np.uint32(min(int(rate * 2.0**16), 2**16 - 1))


def row_seeds(dropout_rng, batch: int):
  """uint32 [batch, 2]: the Philox key of each batch row."""
  if isinstance(dropout_rng, jax.Array) and jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key):
    key = dropout_rng
  else:
    key = jax.random.wrap_key_data(jnp.asarray(dropout_rng, jnp.uint32))
  rows = jnp.arange(batch, dtype=jnp.uint32)
  return jax.vmap(lambda row: jax.random.bits(jax.random.fold_in(key, row), (2,), jnp.uint32))(rows)


def _counter(heads, rows, cols):
  """The Philox counter of each entry: shared by the 8 entries of one accumulator fragment."""
  c0 = (cols >> np.uint32(4)) * np.uint32(4) + ((cols >> np.uint32(1)) & np.uint32(3))
  c1 = (rows >> np.uint32(4)) * np.uint32(8) + (rows & np.uint32(7))
  return c0, c1, heads, jnp.zeros_like(heads)


def _select_value(words, rows, cols):
  """Each entry's 16-bit slice of its fragment's 4 Philox words."""
  word_index = ((cols >> np.uint32(3)) & np.uint32(1)) * np.uint32(2) + (cols & np.uint32(1))
  word = jnp.select([word_index == i for i in range(3)], list(words[:3]), words[3])
  return (word >> (np.uint32(16) * ((rows >> np.uint32(3)) & np.uint32(1)))) & np.uint32(0xFFFF)


def keep(seeds, heads, rows, cols, rate: float):
  """Whether each entry is kept. seeds: uint32 [..., 2] broadcast against heads/rows/cols, which
  are integer arrays of global head, query and key indices (broadcastable to each other)."""
  shape = jnp.broadcast_shapes(seeds.shape[:-1], jnp.shape(heads), jnp.shape(rows),
                               jnp.shape(cols))
  heads, rows, cols = (jnp.broadcast_to(jnp.asarray(x).astype(jnp.uint32), shape)
                       for x in (heads, rows, cols))
  key = (jnp.broadcast_to(seeds[..., 0], shape), jnp.broadcast_to(seeds[..., 1], shape))
  words = philox4x32(_counter(heads, rows, cols), key)
  return _select_value(words, rows, cols) >= keep_threshold16(rate)


def dropout_mask(dropout_rng, batch: int, heads: int, seq_q: int, seq_k: int, rate: float):
  """The dropout mask flash_jax applies for this key: bool [batch, heads, seq_q, seq_k], True =
  kept (kept weights are scaled by 1 / (1 - rate)).

  An entry is dropped with probability rate rounded down to a multiple of 2**-16 (its 16-bit
  Philox value is below `keep_threshold16(rate)`; see the module docstring).

  It is the mask of `attention(..., dropout_rate=rate, dropout_rng=dropout_rng)` on inputs of
  that batch size, heads and sequence lengths, on CPU and GPU alike.
  """
  seeds = row_seeds(dropout_rng, batch)[:, None, None, None, :]
  return keep(seeds, jnp.arange(heads)[None, :, None, None], jnp.arange(seq_q)[None, None, :, None],
              jnp.arange(seq_k)[None, None, None, :], rate)
