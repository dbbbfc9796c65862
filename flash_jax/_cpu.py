"""Blockwise attention in JAX: the lowering of the primitives on CPU and on platforms without
kernels of their own.

The forward scans over key blocks with an online softmax (running max and sum in float32); the
backward scans over the same blocks recomputing probabilities from the forward's lse. Only one
[batch, heads, seq_q, block] tile of scores exists at a time, so memory is linear in sequence
length. Arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flash_jax import _dropout
from flash_jax._config import AttentionConfig

# Elements of one score tile [batch, heads, seq_q, block]: 4M float32 values (16 MiB) keeps the
# blocks large for small problems (few scan steps) while bounding memory for long sequences.
_TILE_BUDGET = 1 << 22
_MIN_BLOCK = 64
_MAX_BLOCK = 1024
_HIGHEST = jax.lax.Precision.HIGHEST


def _block_size(batch: int, heads: int, seq_q: int, seq_k: int) -> int:
  block = _MAX_BLOCK
  while block > _MIN_BLOCK and batch * heads * seq_q * block > _TILE_BUDGET:
    block //= 2
  return min(block, seq_k)


class _Problem:
  """Shapes and block decomposition shared by the forward and backward scans."""

  def __init__(self, query, key, config: AttentionConfig, optional):
    self.batch, self.seq_q, self.heads, self.head_dim = query.shape
    self.seq_k, self.kv_heads = key.shape[1], key.shape[2]
    self.group = self.heads // self.kv_heads
    self.config = config
    self.optional = dict(zip(config.operands, optional))
    self.block = _block_size(self.batch, self.heads, self.seq_q, self.seq_k)
    self.num_blocks = -(-self.seq_k // self.block)
    self.padded_k = self.num_blocks * self.block
    self.offset = config.diagonal_offset(self.seq_q, self.seq_k)

  def heads_first(self, x):
    """[b, sq, h, d] -> [b, kv_h, group, sq, d], float32."""
    x = x.astype(jnp.float32).reshape(self.batch, self.seq_q, self.kv_heads, self.group, -1)
    return x.transpose(0, 2, 3, 1, 4)

  def heads_last(self, x, dtype):
    """[b, kv_h, group, sq, d] -> [b, sq, h, d]."""
    return x.transpose(0, 3, 1, 2, 4).reshape(self.batch, self.seq_q, self.heads, -1).astype(dtype)

  def key_blocks(self, x):
    """[b, sk, kv_h, d] -> [num_blocks, b, kv_h, block, d], float32, zero padded."""
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, self.padded_k - self.seq_k), (0, 0), (0, 0)))
    x = x.reshape(self.batch, self.num_blocks, self.block, self.kv_heads, -1)
    return x.transpose(1, 0, 3, 2, 4)

  def dense_blocks(self, x):
    """A [b|1, h|1, sq|1, sk|1] operand -> [num_blocks, b|1, kv_h|1, group|1, sq|1, block|1]."""
    b, h, sq, sk = x.shape
    if h == self.heads:
      x = x.reshape(b, self.kv_heads, self.group, sq, sk)
    else:
      x = x.reshape(b, 1, 1, sq, sk)
    if sk == 1:
      return jnp.broadcast_to(x[None], (self.num_blocks,) + x.shape)
    x = jnp.pad(x, ((0, 0),) * 4 + ((0, self.padded_k - self.seq_k),))
    x = x.reshape(x.shape[:4] + (self.num_blocks, self.block))
    return jnp.moveaxis(x, 4, 0)

  def scan_inputs(self, key, value):
    xs = {
        "key": self.key_blocks(key),
        "value": self.key_blocks(value),
        "start": jnp.arange(self.num_blocks, dtype=jnp.int32) * self.block,
    }
    for name in ("kv_segment_ids", "kv_positions"):
      if name in self.optional:
        ids = jnp.pad(self.optional[name], ((0, 0), (0, self.padded_k - self.seq_k)))
        xs[name] = ids.reshape(self.batch, self.num_blocks, self.block).transpose(1, 0, 2)
    for name in ("mask", "bias"):
      if name in self.optional:
        xs[name] = self.dense_blocks(self.optional[name])
    return xs

  def dropout_scale(self, block):
    """Kept entries' factor 1/(1-rate), dropped 0: [b, kv_h, group, sq, block], or None."""
    if not self.config.dropout_rate:
      return None
    seeds = self.optional["dropout_seed"][:, None, None, None, None, :]
    heads = (jnp.arange(self.kv_heads)[:, None] * self.group + jnp.arange(self.group)[None, :])
    keep = _dropout.keep(seeds, heads[None, :, :, None, None],
                         jnp.arange(self.seq_q)[:, None], block["start"] + jnp.arange(self.block),
                         self.config.dropout_rate)
    return jnp.where(keep, 1.0 / (1.0 - self.config.dropout_rate), 0.0)

  def scores(self, q, block):
    """Scores of one key block, [b, kv_h, group, sq, block], and the mask of visible entries.

    Returns (scores, visible, softcap_tanh); softcap_tanh is tanh(s / softcap) for the backward,
    or None without softcap. Masked entries of `scores` are -inf.
    """
    config = self.config
    s = jnp.einsum("bkgqd,bkcd->bkgqc", q, block["key"], precision=_HIGHEST)
    s = s * config.softmax_scale
    softcap_tanh = None
    if config.softcap:
      softcap_tanh = jnp.tanh(s / config.softcap)
      s = config.softcap * softcap_tanh
    if "bias" in block:
      s = s + block["bias"].astype(jnp.float32)
    q_pos = jnp.arange(self.seq_q, dtype=jnp.int32)[:, None]
    k_pos = block["start"] + jnp.arange(self.block, dtype=jnp.int32)[None, :]
    if "kv_positions" in block:  # [b, 1, 1, sq, block]
      distance = (block["kv_positions"][:, None, None, None, :] -
                  self.optional["q_positions"][:, None, None, :, None])
    else:
      distance = k_pos - (q_pos + self.offset)  # > 0: key after the aligned diagonal
    if "alibi_slopes" in self.optional:
      slopes = self.optional["alibi_slopes"].astype(jnp.float32)
      slopes = slopes.reshape(slopes.shape[0], self.kv_heads, self.group, 1, 1)
      s = s - slopes * jnp.abs(distance).astype(jnp.float32)
    visible = k_pos < self.seq_k
    if config.causal:
      visible = visible & (distance <= 0)
    if config.window_left >= 0:
      visible = visible & (distance >= -config.window_left)
    if config.window_right >= 0:
      visible = visible & (distance <= config.window_right)
    # [sq, block] from the aligned diagonal, [b, 1, 1, sq, block] from positions: to rank 5.
    visible = visible.reshape((1,) * (5 - visible.ndim) + visible.shape)
    if "kv_lengths" in self.optional:
      lengths = self.optional["kv_lengths"][:, None, None, None, None]
      visible = visible & (k_pos < lengths)
    if "q_lengths" in self.optional:
      lengths = self.optional["q_lengths"][:, None, None, None, None]
      visible = visible & (q_pos < lengths)
    if "kv_segment_ids" in block:
      q_ids = self.optional["q_segment_ids"][:, None, None, :, None]
      visible = visible & (q_ids == block["kv_segment_ids"][:, None, None, None, :])
    if "mask" in block:
      visible = visible & block["mask"]
    return jnp.where(visible, s, -jnp.inf), visible, softcap_tanh


def attention_fwd(query, key, value, *optional, config: AttentionConfig):
  problem = _Problem(query, key, config, optional)
  q = problem.heads_first(query)
  stats_shape = q.shape[:-1]

  def step(carry, block):
    row_max, row_sum, acc = carry
    s, visible, _ = problem.scores(q, block)
    new_max = jnp.maximum(row_max, s.max(axis=-1))
    # A row that has seen no visible key keeps max -inf; shift by 0 there so exp gives 0, not NaN.
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    p = jnp.exp(s - shift[..., None])
    rescale = jnp.exp(row_max - shift)
    row_sum = row_sum * rescale + p.sum(axis=-1)
    dropout = problem.dropout_scale(block)
    if dropout is not None:
      p = p * dropout
    acc = acc * rescale[..., None] + jnp.einsum("bkgqc,bkcd->bkgqd", p, block["value"],
                                                precision=_HIGHEST)
    return (new_max, row_sum, acc), None

  init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
          jnp.zeros(stats_shape + (value.shape[-1],), jnp.float32))
  (row_max, row_sum, acc), _ = jax.lax.scan(step, init, problem.scan_inputs(key, value))
  seen = row_sum > 0
  out = jnp.where(seen[..., None], acc / jnp.where(seen, row_sum, 1.0)[..., None], 0.0)
  lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)
  lse = lse.reshape(problem.batch, problem.heads, problem.seq_q)
  return problem.heads_last(out, query.dtype), lse


def attention_bwd(query, key, value, out, lse, dout, dlse, *optional, config: AttentionConfig):
  problem = _Problem(query, key, config, optional)
  q = problem.heads_first(query)
  do = problem.heads_first(dout)
  del out  # D = rowsum(dout * out) is recomputed as sum_j p_ij dp_ij, see below
  stats_shape = q.shape[:-1]
  lse = lse.reshape(stats_shape)
  finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  bias_shape = problem.optional["bias"].shape if "bias" in problem.optional else None
  xs = problem.scan_inputs(key, value)

  def probabilities(block):
    s, visible, softcap_tanh = problem.scores(q, block)
    p = jnp.where(visible, jnp.exp(s - finite_lse[..., None]), 0.0)
    dp = jnp.einsum("bkgqd,bkcd->bkgqc", do, block["value"], precision=_HIGHEST)
    dropout = problem.dropout_scale(block)
    # With dropout, out = (P * Z) V for the scaled keep mask Z: dV takes P * Z and the
    # probabilities see dP * Z.
    p_dropped = p if dropout is None else p * dropout
    dp = dp if dropout is None else dp * dropout
    return p, p_dropped, dp, softcap_tanh

  # D = sum_j p_ij dp_ij equals rowsum(dout * out) but rounds like dp itself, so dp - D cancels
  # exactly where attention is one-hot (rowsum(dout * out) left float32 errors of 1e-6 there,
  # above the naive reference's). One extra pass over the keys on CPU buys that.
  def delta_step(delta, block):
    p, _, dp, _ = probabilities(block)
    return delta + (p * dp).sum(axis=-1), None

  delta, _ = jax.lax.scan(delta_step, jnp.zeros(stats_shape, jnp.float32), xs)
  delta = delta - dlse.reshape(stats_shape)

  def step(dq, block):
    p, p_dropped, dp, softcap_tanh = probabilities(block)
    # Per query head first, then over the group: the order of the naive computation, whose
    # float32 rounding the tests hold this implementation to.
    dv = jnp.einsum("bkgqc,bkgqd->bkgcd", p_dropped, do, precision=_HIGHEST).sum(axis=2)
    ds = p * (dp - delta[..., None])
    outputs = {"key": None, "value": dv}
    if bias_shape is not None:
      outputs["bias"] = _reduce_to_bias_block(ds, bias_shape, problem)
    if softcap_tanh is not None:
      ds = ds * (1.0 - softcap_tanh * softcap_tanh)
    ds = ds * config.softmax_scale
    dq = dq + jnp.einsum("bkgqc,bkcd->bkgqd", ds, block["key"], precision=_HIGHEST)
    outputs["key"] = jnp.einsum("bkgqc,bkgqd->bkgcd", ds, q, precision=_HIGHEST).sum(axis=2)
    return dq, outputs

  dq, blocks = jax.lax.scan(step, jnp.zeros_like(q), xs)

  def unblock(x, like):
    x = x.transpose(1, 0, 3, 2, 4).reshape(problem.batch, problem.padded_k, problem.kv_heads, -1)
    return x[:, :problem.seq_k].astype(like.dtype)

  grads = [problem.heads_last(dq, query.dtype), unblock(blocks["key"], key),
           unblock(blocks["value"], value)]
  if bias_shape is not None:
    grads.append(_unblock_bias(blocks["bias"], bias_shape, problem)
                 .astype(problem.optional["bias"].dtype))
  return grads


def _reduce_to_bias_block(ds, bias_shape, problem):
  """Sums a [b, kv_h, group, sq, block] gradient over the axes the bias broadcasts along."""
  b, h, sq, sk = bias_shape
  ds = ds.reshape(problem.batch, problem.heads, problem.seq_q, problem.block)
  axes = tuple(axis for axis, size in zip(range(3), (b, h, sq)) if size == 1)
  ds = ds.sum(axis=axes, keepdims=True)
  return ds.sum(axis=-1, keepdims=True) if sk == 1 else ds


def _unblock_bias(blocks, bias_shape, problem):
  """[num_blocks, b|1, h|1, sq|1, block|1] -> the bias's own shape."""
  if bias_shape[3] == 1:
    return blocks.sum(axis=0)
  x = jnp.moveaxis(blocks, 0, 3)
  x = x.reshape(x.shape[:3] + (problem.padded_k,))
  return x[..., :problem.seq_k]
