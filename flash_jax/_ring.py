"""Ring attention: exact attention over a sequence sharded across devices.

Each device holds one chunk of the queries and one chunk of the keys/values. The K/V chunks
travel around the ring (`ppermute`); at every step a device attends its queries to the chunk it
holds with the attention primitives and merges the partial result into its running (out, lse) by
the log-sum-exp. The backward pass runs the ring again: the K/V chunks travel with their dK/dV
accumulators, which arrive back at their owner after a last step.

The chunk-pair backward gets the chunk's own (out, lse), recomputed by the forward primitive,
with cotangents rescaled to that chunk: dout_c = w * dout and dlse_c = w * (rowsum(dout * out_c)
- D), where w = exp(lse_c - lse) and D = rowsum(dout * out) - dlse are global. The backward
primitive's contract only holds for its own forward's (out, lse) (the CPU implementation derives
D from the keys it sees), so one chunk forward is recomputed per chunk pair in the backward.

The same ring runs in two places: `ring_attention` below (inside `shard_map`/`pmap`, with its
own custom_vjp) and the partitioning of the primitives under `jit` with a sequence-sharded
NamedSharding (`_sharding`), where the ring axis is the mesh axis of the sequence.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flash_jax import _primitives
from flash_jax import _validate
from flash_jax._config import OPTIONAL_OPERANDS
from flash_jax._config import AttentionConfig

LAYOUTS = ("contiguous", "zigzag")

# Optional operands the ring can carry: per-token ids and positions travel with their chunk,
# lengths are shifted by the chunk's first position, ALiBi slopes are per head. A mask, a bias
# and dropout are indexed by (row, column) of the whole score matrix, which the chunk calls do
# not see.
RING_OPERANDS = ("q_segment_ids", "kv_segment_ids", "q_positions", "kv_positions", "q_lengths",
                 "kv_lengths", "alibi_slopes")
# Per-token operands of the keys: they travel around the ring with their K/V chunk.
_KV_TOKEN_OPERANDS = ("kv_segment_ids", "kv_positions")


@dataclasses.dataclass(frozen=True)
class Ring:
  """The ring: the mesh axis (or axes, flattened row-major) of the sequence, its size and the
  token layout of the chunks (see `ring_attention`)."""
  axis: str | tuple[str, ...]
  size: int
  layout: str = "contiguous"


def needs_global_positions(config: AttentionConfig, seq_q: int, seq_k: int) -> bool:
  """Whether the chunk calls need the global positions of their tokens: windows and ALiBi
  measure distances from the global diagonal, and so does causal masking when the query and key
  lengths differ (the chunk pairs then do not split along the diagonal). Positions given by the
  caller (attention_varlen) already are global."""
  return "q_positions" not in config.operands and (
      config.has_window or "alibi_slopes" in config.operands or
      (config.causal and seq_q != seq_k))


def unsupported_reason(config: AttentionConfig, layout: str):
  """Why the ring cannot compute `config` in `layout` (None when it can)."""
  extra = [name for name in config.operands if name not in RING_OPERANDS]
  if extra:
    return f"optional operands {extra} (the ring supports {list(RING_OPERANDS)})"
  if layout == "zigzag" and any(name.endswith("lengths") for name in config.operands):
    return "q_lengths/kv_lengths with the zigzag layout"
  if config.dropout_rate:
    return "dropout"
  return None


# --- zigzag token order --------------------------------------------------------------------------


def zigzag_permutation(seq_len: int, num_devices: int) -> np.ndarray:
  """Token order that balances causal ring attention over `num_devices` devices.

  The sequence is cut into 2 * num_devices chunks; device i holds chunks i and
  2 * num_devices - 1 - i, so every device has the same amount of causal work at every ring step.
  Returns `perm` (int32 [seq_len]) such that `x[:, perm]` is the zigzag order: sharding that
  array contiguously over the devices gives each device its two chunks.
  """
  for name, value in (("seq_len", seq_len), ("num_devices", num_devices)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"zigzag_permutation: `{name}` must be a positive int, got {value!r}")
  if seq_len % (2 * num_devices):
    raise ValueError(f"zigzag_permutation: `seq_len` ({seq_len}) must be a multiple of "
                     f"2 * num_devices ({2 * num_devices})")
  chunks = np.arange(seq_len, dtype=np.int32).reshape(2 * num_devices, -1)
  order = [c for i in range(num_devices) for c in (i, 2 * num_devices - 1 - i)]
  return chunks[order].reshape(-1)


def inverse_zigzag_permutation(seq_len: int, num_devices: int) -> np.ndarray:
  """`inv` such that `y[:, inv]` undoes `y = x[:, zigzag_permutation(...)]`."""
  return np.argsort(zigzag_permutation(seq_len, num_devices)).astype(np.int32)


def zigzag_shard(x, num_devices: int, axis: int = 1):
  """Reorders the sequence axis `axis` of the global array `x` into the zigzag order."""
  return jnp.take(x, zigzag_permutation(x.shape[axis], num_devices), axis=axis)


def zigzag_unshard(x, num_devices: int, axis: int = 1):
  """Inverse of `zigzag_shard`: from the zigzag order back to the natural token order."""
  return jnp.take(x, inverse_zigzag_permutation(x.shape[axis], num_devices), axis=axis)


# --- the ring ------------------------------------------------------------------------------------


def _rotate(tree, ring: Ring):
  """Sends every device's chunk to the next device of the ring."""
  perm = [(j, (j + 1) % ring.size) for j in range(ring.size)]
  return jax.tree.map(lambda x: lax.ppermute(x, ring.axis, perm), tree)


class _Chunks:
  """The operands of one device and the chunk pairs it computes.

  `named` holds the device's optional operands, `kv` the travelling chunk (key, value and the
  keys' per-token operands). Two ways to mask by position:
  - without global positions, a pair is either entirely visible, entirely in the future
    (skipped) or the device's own diagonal chunk pair (causal inside), which `pairs` and
    `own_config` encode;
  - with them (`needs_global_positions`, or positions given by the caller), every pair carries
    the positions of its tokens and the kernels compare key and query positions; a pair runs only
    where the position ranges meet the band of the causal mask and window.
  """

  def __init__(self, config: AttentionConfig, ring: Ring, query, key, value, optional):
    self.config = config
    self.ring = ring
    self.named = dict(zip(config.operands, optional))
    self.index = lax.axis_index(ring.axis)
    self.batch, self.seq_q, self.seq_k = query.shape[0], query.shape[1], key.shape[1]
    self.kv = {"key": key, "value": value}
    for name in _KV_TOKEN_OPERANDS:
      if name in self.named:
        self.kv[name] = self.named[name]
    self.global_positions = needs_global_positions(config, self.seq_q, self.seq_k)
    self.positional = self.global_positions or "q_positions" in self.named
    self.pair_config = config
    if self.global_positions:
      names = set(config.operands) | {"q_positions", "kv_positions"}
      self.pair_config = dataclasses.replace(
          config, operands=tuple(n for n in OPTIONAL_OPERANDS if n in names))

  def token_positions(self, device, length):
    """Global index of each local token of `device`'s chunk, int32 [batch, length]."""
    local = jnp.arange(length, dtype=jnp.int32)
    if self.ring.layout == "contiguous":
      positions = device * length + local
    else:
      half = length // 2  # zigzag: chunks device and 2n - 1 - device of the 2n half-chunks
      chunk = jnp.where(local < half, device, 2 * self.ring.size - 1 - device)
      positions = chunk * half + local % half
    return jnp.broadcast_to(positions, (self.batch, length))

  def positions(self, kv, source):
    """(query positions, key positions) of the device's queries and of `source`'s keys, in the
    units the kernels compare (the query's include the diagonal offset)."""
    if not self.global_positions:
      return self.named["q_positions"], kv["kv_positions"]
    size = self.ring.size
    offset = self.config.diagonal_offset(size * self.seq_q, size * self.seq_k)
    return (self.token_positions(self.index, self.seq_q) + offset,
            self.token_positions(source, self.seq_k))

  def optional(self, rows, cols, kv, source):
    """The optional operands of the chunk pair (query rows `rows`, key columns `cols` of the
    chunk of device `source`), lengths shifted to the pair's first positions."""
    if self.positional:
      q_positions, kv_positions = self.positions(kv, source)
    values = []
    for name in self.pair_config.operands:
      if name == "q_segment_ids":
        values.append(self.named[name][:, rows])
      elif name in _KV_TOKEN_OPERANDS and name in kv:
        values.append(kv[name][:, cols])
      elif name == "q_positions":
        values.append(q_positions[:, rows])
      elif name == "kv_positions":
        values.append(kv_positions[:, cols])
      elif name == "q_lengths":
        start = self.index * self.seq_q + (rows.start or 0)
        values.append(jnp.clip(self.named[name] - start, 0, self.seq_q))
      elif name == "kv_lengths":
        start = source * self.seq_k + (cols.start or 0)
        values.append(jnp.clip(self.named[name] - start, 0, self.seq_k))
      else:  # alibi_slopes: per head
        values.append(self.named[name])
    return values

  def band(self):
    """(lowest, highest) key position minus query position that the causal mask and window
    allow; None for an unbounded side."""
    config = self.config
    upper = [bound for bound, on in ((0, config.causal),
                                     (config.window_right, config.window_right >= 0)) if on]
    return (-config.window_left if config.window_left >= 0 else None,
            min(upper) if upper else None)

  def band_meets(self, q_positions, kv_positions):
    """Whether some (query, key) pair of these positions lies in the band (a traced bool), or
    None when the band is unbounded."""
    lower, upper = self.band()
    if lower is None and upper is None:
      return None
    meets = jnp.bool_(True)
    if upper is not None:
      meets &= kv_positions.min() - q_positions.max() <= upper
    if lower is not None:
      meets &= kv_positions.max() - q_positions.min() >= lower
    return meets

  def pairs(self, kv, step):
    """The chunk pairs of ring step `step` (a traced int >= 1): a list of (predicate or None,
    query rows, key columns); a pair runs where its predicate holds. Step 0, the device's own
    chunks, uses `own_config`."""
    all_rows = slice(None)
    source = (self.index - step) % self.ring.size
    if self.positional:
      q_positions, kv_positions = self.positions(kv, source)
      # Zigzag chunks are two distant halves: each pair of halves is skipped on its own.
      halves = (self.global_positions and self.ring.layout == "zigzag" and
                self.band() != (None, None))
      row_parts = [slice(0, self.seq_q // 2), slice(self.seq_q // 2, None)] if halves else [
          all_rows]
      col_parts = [slice(0, self.seq_k // 2), slice(self.seq_k // 2, None)] if halves else [
          all_rows]
      return [(self.band_meets(q_positions[:, rows], kv_positions[:, cols]), rows, cols)
              for rows in row_parts for cols in col_parts]
    if not self.config.causal:
      return [(None, all_rows, all_rows)]
    earlier = source < self.index
    if self.ring.layout == "contiguous":
      # Chunks after the device's own are entirely in the future: skipped.
      return [(earlier, all_rows, all_rows)]
    # Zigzag: device i holds chunks (i, 2n-1-i). An earlier source's first chunk precedes both
    # query chunks and its second follows both; a later source's two chunks both precede the
    # second query chunk and follow the first.
    half_q, half_k = self.seq_q // 2, self.seq_k // 2
    return [(earlier, all_rows, slice(0, half_k)),
            (~earlier, slice(half_q, None), all_rows)]

  def own_config(self):
    """Step 0 pairs the device's chunks with themselves: causal inside (in both layouts the
    local tokens are in increasing global order), or masked by positions."""
    return self.pair_config

  def other_config(self):
    if self.positional:
      return self.pair_config
    return dataclasses.replace(self.config, causal=False)


def _varying_like(x, *refs):
  """`x` typed as varying over every manual axis the `refs` vary over (inside shard_map).

  The attention primitives' results are typed invariant by JAX versions whose abstract
  evaluation does not carry manual axes; adding zeros shaped from the refs (a no-op) restores
  the type that loop carries and custom_vjp cotangents must match.
  """
  for ref in refs:
    x = x + jnp.zeros_like(ref, shape=(), dtype=x.dtype)
  return x


def _update(acc, value, index, axis):
  """`acc` with `value` written at the static slice `index` of `axis`.

  A dynamic_update_slice rather than `.at[].set`, whose scatter crashes XLA's CPU compiler of
  jax 0.11 inside shard_map loops.
  """
  return lax.dynamic_update_slice_in_dim(acc, value, index.start or 0, axis)


def _merge(acc_out, acc_lse, out, lse, rows):
  """Merges a partial (out, lse) of query rows `rows` into the float32 accumulators."""
  old_out, old_lse = acc_out[:, rows], acc_lse[..., rows]
  top = jnp.maximum(old_lse, lse)
  top = jnp.where(jnp.isfinite(top), top, 0.0)  # rows with no key so far stay 0 / -inf
  old_weight, new_weight = jnp.exp(old_lse - top), jnp.exp(lse - top)
  total = old_weight + new_weight
  new_lse = jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
  scale = lambda w: (w / jnp.where(total > 0, total, 1.0)).transpose(0, 2, 1)[..., None]
  merged = old_out * scale(old_weight) + out.astype(jnp.float32) * scale(new_weight)
  return _update(acc_out, merged, rows, 1), _update(acc_lse, new_lse, rows, 2)


def ring_forward(config: AttentionConfig, ring: Ring, query, key, value, *optional):
  """(out, lse) of attention over the ring; every argument is the local chunk."""
  chunks = _Chunks(config, ring, query, key, value, optional)

  def attend(rows, cols, kv, source, pair_config):
    return _primitives.attention_fwd(query[:, rows], kv["key"][:, cols], kv["value"][:, cols],
                                     *chunks.optional(rows, cols, kv, source), config=pair_config)

  everything = slice(None)
  out, lse = attend(everything, everything, chunks.kv, chunks.index, chunks.own_config())
  acc_out, acc_lse = out.astype(jnp.float32), lse

  def step(t, carry):
    acc_out, acc_lse, kv = carry
    kv = _rotate(kv, ring)
    source = (chunks.index - t) % ring.size
    for predicate, rows, cols in chunks.pairs(kv, t):
      def compute(acc, rows=rows, cols=cols):
        out, lse = attend(rows, cols, kv, source, chunks.other_config())
        return _merge(*acc, out, lse, rows)
      acc = (acc_out, acc_lse)
      acc_out, acc_lse = compute(acc) if predicate is None else lax.cond(
          predicate, compute, lambda acc: acc, acc)
    return acc_out, acc_lse, kv

  acc_out, acc_lse, _ = lax.fori_loop(1, ring.size, step, (acc_out, acc_lse, chunks.kv))
  return (_varying_like(acc_out.astype(query.dtype), query, key, value),
          _varying_like(acc_lse, query, key, value))


def ring_backward(config: AttentionConfig, ring: Ring, query, key, value, out, lse, dout, dlse,
                  *optional):
  """(dq, dk, dv) of ring attention; every argument is the local chunk."""
  chunks = _Chunks(config, ring, query, key, value, optional)
  dout32 = dout.astype(jnp.float32)
  # D of the whole row: rowsum(dout * out) - dlse, [b, h, sq].
  delta = jnp.einsum("bqhd,bqhd->bhq", dout32, out.astype(jnp.float32)) - dlse
  finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def gradients(rows, cols, kv, source, pair_config):
    q = query[:, rows]
    k, v = kv["key"][:, cols], kv["value"][:, cols]
    pair_optional = chunks.optional(rows, cols, kv, source)
    out_c, lse_c = _primitives.attention_fwd(q, k, v, *pair_optional, config=pair_config)
    # The pair's share of each row's softmax; rows that see none of its keys get 0.
    weight = jnp.where(jnp.isfinite(lse_c), jnp.exp(lse_c - finite_lse[..., rows]), 0.0)
    dout_c = (dout32[:, rows] * weight.transpose(0, 2, 1)[..., None]).astype(dout.dtype)
    row_dot = jnp.einsum("bqhd,bqhd->bhq", dout32[:, rows], out_c.astype(jnp.float32))
    dlse_c = weight * (row_dot - delta[..., rows])
    grads = _primitives.attention_bwd(q, k, v, out_c, lse_c, dout_c, dlse_c, *pair_optional,
                                      config=pair_config)
    return [g.astype(jnp.float32) for g in grads[:3]]

  everything = slice(None)
  dq, dk, dv = gradients(everything, everything, chunks.kv, chunks.index, chunks.own_config())
  dq = _varying_like(dq, query, key, value)
  dkv = {"key": _varying_like(dk, query, key, value), "value": _varying_like(dv, query, key, value)}

  def step(t, carry):
    dq, kv, dkv = carry
    kv, dkv = _rotate((kv, dkv), ring)
    source = (chunks.index - t) % ring.size
    for predicate, rows, cols in chunks.pairs(kv, t):
      def compute(acc, rows=rows, cols=cols):
        dq, dkv = acc
        dq_c, dk_c, dv_c = gradients(rows, cols, kv, source, chunks.other_config())
        add = lambda acc, value, index: _update(acc, acc[:, index] + value, index, 1)
        return (add(dq, dq_c, rows), {"key": add(dkv["key"], dk_c, cols),
                                      "value": add(dkv["value"], dv_c, cols)})
      acc = (dq, dkv)
      dq, dkv = compute(acc) if predicate is None else lax.cond(
          predicate, compute, lambda acc: acc, acc)
    return dq, kv, dkv

  dq, _, dkv = lax.fori_loop(1, ring.size, step, (dq, chunks.kv, dkv))
  # After the last step each device holds the accumulators of the next device's chunk.
  dkv = _rotate(dkv, ring) if ring.size > 1 else dkv
  return (dq.astype(query.dtype), dkv["key"].astype(key.dtype),
          dkv["value"].astype(value.dtype))


# --- public API ----------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring_attention(config, ring, query, key, value, *optional):
  return ring_forward(config, ring, query, key, value, *optional)


def _ring_attention_fwd(config, ring, query, key, value, *optional):
  out, lse = ring_forward(config, ring, query, key, value, *optional)
  return (out, lse), (query, key, value, out, lse, optional)


def _ring_attention_bwd(config, ring, residuals, cotangents):
  query, key, value, out, lse, optional = residuals
  dout, dlse = cotangents
  grads = ring_backward(config, ring, query, key, value, out, lse, dout.astype(query.dtype), dlse,
                        *optional)
  return (*grads, *(None for _ in optional))


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def ring_attention(query, key, value, *, axis_name, causal=False, softmax_scale=None,
                   window=None, q_segment_ids=None, kv_segment_ids=None, q_lengths=None,
                   kv_lengths=None, softcap=None, alibi_slopes=None, return_lse=False,
                   layout="contiguous"):
  """Attention over a sequence sharded across the devices of `axis_name` (ring attention).

  Call it inside `shard_map` (or `pmap`) with the sequence axis of query, key and value sharded
  over `axis_name`: every argument is the local chunk, and the result is the local chunk of
  `flash_jax.attention` on the gathered sequence. K/V chunks rotate around the ring with
  `ppermute` (size - 1 steps forward; the backward rotates them again with their gradients), so
  no device ever holds more than two K/V chunks. Memory and communication are per chunk; the
  per-chunk work runs in the attention kernels.

  Args:
    query: local chunk [batch, seq_q / n, heads, head_dim].
    key, value: local chunks [batch, seq_k / n, kv_heads, head_dim] (GQA as in `attention`).
    axis_name: the mapped axis (or tuple of axes, flattened row-major) the sequence is sharded
      over; device i of that axis holds the i-th chunk (see `layout`).
    causal: causal masking over the global positions, aligned to the bottom-right corner of the
      global score matrix as in `attention`. Chunk pairs entirely in the future are skipped.
    softmax_scale: static Python float, default 1/sqrt(head_dim).
    window: (left, right) sliding window around the global diagonal, as in `attention`; chunk
      pairs outside the band are skipped.
    q_segment_ids, kv_segment_ids: local chunks int [batch, seq_q / n] / [batch, seq_k / n] of
      the global segment ids (packed documents), given together.
    q_lengths, kv_lengths: int [batch], the global lengths (the same on every device);
      contiguous layout only.
    softcap, alibi_slopes: as in `attention` (ALiBi distances are global).
    return_lse: also return the lse, float32 [batch, heads, seq_q / n].
    layout: how tokens are assigned to devices.
      "contiguous": device i holds tokens [i * c, (i + 1) * c) (c = local length). With causal
        masking device i has work at i + 1 of the n steps, so the last device sets the pace.
      "zigzag": the global sequence is cut into 2n chunks and device i holds chunks i and
        2n - 1 - i (local length even), which gives every device the same causal work at every
        step (about twice as fast as contiguous for causal attention on many devices). Arrange
        the global arrays with `zigzag_shard(x, n)` (or index with `zigzag_permutation`) before
        sharding them contiguously, and restore the output with `zigzag_unshard`; segment ids
        go through `zigzag_shard` like the tokens. Without causal masking, a window or ALiBi
        both layouts compute the same thing.

  Windows, ALiBi, and causal masking with seq_q != seq_k give every chunk pair the global
  positions of its tokens, so the pairs run the kernels' position-masked variant.
  A mask, a bias and dropout are not supported (NotImplementedError): they are indexed by the
  whole score matrix.

  Returns:
    The local output chunk [batch, seq_q / n, heads, head_dim], or (out, lse) with return_lse.
  """
  _validate.check_dense(query, key, value)
  if layout not in LAYOUTS:
    raise ValueError(f"ring_attention: `layout` must be one of {LAYOUTS}, got {layout!r}")
  if axis_name is None:
    raise ValueError("ring_attention: `axis_name` must name the mapped axis the sequence is "
                     "sharded over (inside shard_map or pmap), got None")
  left, right = _validate.window(window)
  operands, _ = _validate.optional_operands(
      query, key, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      q_lengths=q_lengths, kv_lengths=kv_lengths, mask=None, bias=None,
      alibi_slopes=alibi_slopes, dropout_rate=0.0, dropout_rng=None)
  names = tuple(name for name in OPTIONAL_OPERANDS if name in operands)
  config = AttentionConfig(
      softmax_scale=_validate.softmax_scale(softmax_scale, query.shape[-1]),
      causal=_validate.static_bool("causal", causal), window_left=left, window_right=right,
      softcap=_validate.softcap(softcap), operands=names)
  return_lse = _validate.static_bool("return_lse", return_lse)
  axis = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else axis_name
  try:
    size = lax.axis_size(axis)
  except NameError as error:
    raise ValueError(f"ring_attention: `axis_name` {axis_name!r} is not a mapped axis here; call "
                     "ring_attention inside shard_map or pmap over that axis") from error
  seq_q, seq_k = query.shape[1], key.shape[1]
  if layout == "zigzag" and (seq_q % 2 or seq_k % 2) and (
      causal or needs_global_positions(config, seq_q, seq_k)):
    raise ValueError("ring_attention: layout='zigzag' holds two chunks per device, so the local "
                     f"sequence lengths must be even, got {seq_q} and {seq_k}")
  reason = unsupported_reason(config, layout)
  if reason is not None:
    raise NotImplementedError(f"ring_attention: {reason} is not supported")
  out, lse = _ring_attention(config, Ring(axis, size, layout), query, key, value,
                             *(operands[name] for name in names))
  return (out, lse) if return_lse else out
