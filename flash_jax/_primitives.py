"""The forward and backward attention primitives: abstract evaluation, batching, lowering registry.

Operands (all in the [batch, seq, heads, head_dim] layout; see _config.OPTIONAL_OPERANDS for the
optional ones named by `config.operands`):
  forward:  query, key, value, *optional                         -> out, lse [b, h, sq] float32
  backward: query, key, value, out, lse, dout, dlse, *optional   -> dq, dk, dv (, dbias)

Each platform registers an implementation (a JAX-traceable function of the operands and the
config); the lowering of the primitive is that function lowered with `mlir.lower_fun`, wrapped
by the sharding rules of `_sharding`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching
from jax.interpreters import mlir

from flash_jax import _dropout
from flash_jax import _validate
from flash_jax._config import AttentionConfig

attention_fwd_p = Primitive("flash_jax_attention_fwd")
attention_fwd_p.multiple_results = True
attention_bwd_p = Primitive("flash_jax_attention_bwd")
attention_bwd_p.multiple_results = True

# Optional operands whose batch axis may stay 1 (broadcast) when another operand is vmapped.
_BROADCASTABLE = ("mask", "bias", "alibi_slopes")


def attention_fwd(query, key, value, *optional, config: AttentionConfig):
  return attention_fwd_p.bind(query, key, value, *optional, config=config)


def attention_bwd(query, key, value, out, lse, dout, dlse, *optional, config: AttentionConfig):
  return attention_bwd_p.bind(query, key, value, out, lse, dout, dlse, *optional, config=config)


# --- abstract evaluation -------------------------------------------------------------------------


def _fwd_abstract_eval(query, key, value, *optional, config):
  _validate.check_operands(query, key, value, optional, config)
  batch, seq_q, heads, _ = query.shape
  # Derived from query's abstract value (not a fresh ShapedArray) so that per-device typing
  # inside shard_map carries over to the outputs.
  return (query.update(weak_type=False),
          query.update(shape=(batch, heads, seq_q), dtype=jnp.float32, weak_type=False))


def _bwd_abstract_eval(query, key, value, out, lse, dout, dlse, *optional, config):
  _validate.check_operands(query, key, value, optional, config)
  batch, seq_q, heads, _ = query.shape
  for name, aval, shape, dtype in (("out", out, query.shape, query.dtype),
                                   ("dout", dout, query.shape, query.dtype),
                                   ("lse", lse, (batch, heads, seq_q), jnp.float32),
                                   ("dlse", dlse, (batch, heads, seq_q), jnp.float32)):
    if tuple(aval.shape) != tuple(shape) or aval.dtype != dtype:
      raise ValueError(f"attention backward: `{name}` must be {jnp.dtype(dtype).name}{list(shape)}, "
                       f"got {aval.dtype}{list(aval.shape)}")
  grads = [x.update(weak_type=False) for x in (query, key, value)]
  if "bias" in config.operands:
    grads.append(optional[config.operands.index("bias")].update(weak_type=False))
  return tuple(grads)


attention_fwd_p.def_abstract_eval(_fwd_abstract_eval)
attention_bwd_p.def_abstract_eval(_bwd_abstract_eval)


# --- eager execution: run the jitted primitive ---------------------------------------------------


@functools.lru_cache(maxsize=None)
def _jitted_bind(primitive, config):
  return jax.jit(lambda *args: primitive.bind(*args, config=config))


attention_fwd_p.def_impl(lambda *args, config: _jitted_bind(attention_fwd_p, config)(*args))
attention_bwd_p.def_impl(lambda *args, config: _jitted_bind(attention_bwd_p, config)(*args))


# --- batching: fold the vmapped axis into the batch axis -----------------------------------------
# Batching rules receive None as the dimension of an unmapped operand.


def _batch_size(x, mapped_dim):
  """Size of the batch axis of `x`, which is axis 0 once the mapped axis (if any) is removed."""
  return x.shape[1] if mapped_dim == 0 else x.shape[0]


def _fold(args, dims, names, axis_size, broadcastable=_BROADCASTABLE):
  """Moves each mapped axis to the front and merges it with the batch axis (axis 0).

  `names[i]` is the optional-operand name of args[i] or None for the dense operands. Unmapped
  operands are tiled over the mapped axis, except those named in `broadcastable` whose batch
  axis is 1.
  """
  batch = next((_batch_size(x, d) for x, d in zip(args[:3], dims[:3]) if d is not None),
               args[0].shape[0])
  folded = []
  for x, d, name in zip(args, dims, names):
    if d is None:
      if name in broadcastable and x.shape[0] == 1:
        folded.append(x)
        continue
      x = jnp.broadcast_to(x[None], (axis_size,) + x.shape)
    else:
      x = jnp.moveaxis(x, d, 0)
    if x.shape[1] != batch:
      x = jnp.broadcast_to(x, (axis_size, batch) + x.shape[2:])
    folded.append(x.reshape((axis_size * batch,) + x.shape[2:]))
  return folded


def _distinct_dropout_per_example(folded, names, axis_size):
  """Under vmap each mapped example draws its own dropout masks: the seeds of example e (rows
  e * batch ... e * batch + batch - 1 after folding) are hashed with e. The forward and backward
  rules both apply it, so the backward still sees the forward's masks."""
  if "dropout_seed" not in names:
    return folded
  index = names.index("dropout_seed")
  seeds = folded[index]
  example = jnp.repeat(jnp.arange(axis_size, dtype=jnp.uint32), seeds.shape[0] // axis_size)
  zero = jnp.zeros_like(example)
  words = _dropout.philox4x32((example, zero, zero, zero), (seeds[:, 0], seeds[:, 1]))
  return folded[:index] + [jnp.stack(words[:2], axis=-1)] + folded[index + 1:]


def _unfold(x, axis_size):
  return x.reshape((axis_size, x.shape[0] // axis_size) + x.shape[1:])


def _fwd_batch(args, dims, *, config):
  axis_size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  names = (None,) * 3 + config.operands
  folded = _distinct_dropout_per_example(_fold(args, dims, names, axis_size), names, axis_size)
  outs = attention_fwd_p.bind(*folded, config=config)
  return [_unfold(x, axis_size) for x in outs], [0] * len(outs)


def _bwd_batch(args, dims, *, config):
  axis_size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  names = (None,) * 7 + config.operands
  bias_index = 7 + config.operands.index("bias") if "bias" in config.operands else None
  # The bias gradient is per example, so even an unmapped broadcast bias is expanded here and
  # its gradient summed back over the broadcast axis below.
  folded = _fold(args, dims, names, axis_size,
                 broadcastable=tuple(name for name in _BROADCASTABLE if name != "bias"))
  folded = _distinct_dropout_per_example(folded, names, axis_size)
  grads = attention_bwd_p.bind(*folded, config=config)
  grads = [_unfold(g, axis_size) for g in grads]
  if (bias_index is not None and _batch_size(args[bias_index], dims[bias_index]) == 1 and
      grads[3].shape[1] != 1):
    grads[3] = grads[3].sum(axis=1, keepdims=True)
  return grads, [0] * len(grads)


batching.primitive_batchers[attention_fwd_p] = _fwd_batch
batching.primitive_batchers[attention_bwd_p] = _bwd_batch


# --- lowering -------------------------------------------------------------------------------------


def _lowering_rule(primitive, implementation):
  # Imported here: _sharding (through the ring) builds on this module's primitives.
  from flash_jax import _sharding
  return _sharding.lowering_rule(primitive, implementation)


def register_implementation(fwd_impl, bwd_impl, platform=None):
  """Lowers both primitives on `platform` (None: every platform without its own rule).

  fwd_impl(query, key, value, *optional, config) -> (out, lse)
  bwd_impl(query, key, value, out, lse, dout, dlse, *optional, config) -> (dq, dk, dv[, dbias])
  """
  mlir.register_lowering(attention_fwd_p, _lowering_rule(attention_fwd_p, fwd_impl),
                         platform=platform)
  mlir.register_lowering(attention_bwd_p, _lowering_rule(attention_bwd_p, bwd_impl),
                         platform=platform)
