"""Sharding rules of the attention primitives: custom_partitioning inside their lowering.

The lowering of each primitive calls the platform implementation through a
`jax.experimental.custom_partitioning` function (custom_partitioning has no vjp or vmap rules, so
it lives below the primitives, which carry those). Under `jit` with sharded inputs XLA then asks
the rules below how to split the call:

- batch: every operand with a batch axis follows the query's batch sharding; no communication.
- heads: the query's head sharding. K/V heads follow it when kv_heads divides evenly; with GQA
  and fewer kv heads than shards, K/V heads are sharded over the leading mesh axes of the query's
  head axes whose size product is kv_heads (so device groups share their kv head, exactly the
  kernel's grouping h // (heads // kv_heads)) and the backward sums dK/dV over the rest. Any other
  head sharding (uneven, or no such leading axes) is replicated: XLA gathers the heads.
- sequence: a sharded query sequence with unsharded keys runs locally when nothing depends on
  absolute query positions (no causal mask, window, alibi, q_lengths or dropout). Otherwise, and
  whenever K/V are sequence-sharded, query and K/V are sharded alike over the sequence's mesh
  axes and the call runs ring attention over them (`_ring`). What the ring cannot compute
  (a mask, a bias, dropout, lengths that do not divide) is computed on the gathered sequence
  instead.
- head_dim: refused with NotImplementedError.

Shardy (the default partitioner) propagates shardings with `sharding_rule`; GSPMD
(jax_use_shardy_partitioner=False) with `infer_sharding_from_operands` and
`propagate_user_sharding`. Both then call `partition`, which makes the decisions above. Without a
mesh, on one device and inside shard_map (all axes manual) custom_partitioning inlines the
implementation.
"""

from __future__ import annotations

import dataclasses
import math

from jax.core import ShapedArray
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flash_jax import _ring

# Dense operands of each primitive that have the query layout [b, sq, h, d] or the K/V layout.
_QUERY_LIKE = {"fwd": ((0, "query"),), "bwd": ((0, "query"), (3, "out"), (5, "dout"))}
_KV_LIKE = ((1, "key"), (2, "value"))
_DENSE = {"fwd": 3, "bwd": 7}


def lowering_rule(primitive, implementation):
  """The MLIR lowering of `primitive` on one platform: `implementation` inside custom_partitioning."""
  kind = "bwd" if primitive.name.endswith("bwd") else "fwd"
  _require_devices_during_lowering(primitive)

  def call(config, shapes, *args):
    del shapes  # static: read by the sharding callbacks
    return tuple(implementation(*args, config=config))

  partitioned = custom_partitioning(call, static_argnums=(0, 1))
  partitioned.def_partition(
      partition=lambda config, shapes, mesh, args, results: _partition(
          kind, implementation, config, shapes, mesh, args),
      infer_sharding_from_operands=lambda config, shapes, mesh, args, results: _infer(
          kind, config, shapes, mesh, args),
      propagate_user_sharding=lambda config, shapes, mesh, user: _propagate_user(
          kind, mesh, user),
      sharding_rule=lambda config, shapes, mesh, *types: _sharding_rule(kind, config, shapes))

  def wrapper(*args, config):
    return partitioned(config, tuple(tuple(x.shape) for x in args), *args)

  lowered = mlir.lower_fun(wrapper, multiple_results=True)

  def rule(ctx, *args, config):
    # Inside shard_map the avals carry varying-manual-axes types; the implementation is traced
    # here per shard, where they mean nothing, and its loops would reject them. Plain avals
    # (public constructor) drop them on every JAX version.
    ctx = ctx.replace(avals_in=[_plain(a) for a in ctx.avals_in],
                      avals_out=[_plain(a) for a in ctx.avals_out])
    return lowered(ctx, *args, config=config)

  return rule


def _require_devices_during_lowering(primitive):
  """Makes `jit` pass the device assignment to the lowering of `primitive`.

  custom_partitioning needs the devices while lowering and `jit` only provides them for
  primitives in this registry; the custom_partitioning call is hidden inside our lowering, so
  the primitive itself has to be listed (as jax's own cuDNN attention does). There is no public
  API for it: the one private import of flash_jax, isolated here.
  """
  from jax._src import dispatch  # pylint: disable=g-import-not-at-top
  dispatch.prim_requires_devices_during_lowering.add(primitive)


def _plain(aval):
  return ShapedArray(aval.shape, aval.dtype, weak_type=aval.weak_type)


# --- the plan -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Mesh axes of each logical axis of the call; `ring`: the sequence runs ring attention."""
  batch: tuple = ()
  heads: tuple = ()
  kv_heads: tuple = ()
  seq_q: tuple = ()
  seq_k: tuple = ()
  ring: bool = False


def _axes(entry):
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec(sharding, ndim, strict=True):
  """Per dimension, the tuple of mesh axes the dimension is sharded over; without `strict` a
  sharding that is not over mesh axes reads as replicated (GSPMD's propagation callbacks)."""
  if sharding is None:  # GSPMD has not assigned one yet
    return ((),) * ndim
  spec = getattr(sharding, "spec", None)
  if spec is None:
    if sharding.is_fully_replicated or not strict:
      return ((),) * ndim
    raise NotImplementedError(
        f"flash_jax attention: sharded operands need a NamedSharding (mesh axes), got {sharding}")
  spec = tuple(_axes(entry) for entry in spec)
  return spec + ((),) * (ndim - len(spec))


def _size(mesh, axes):
  return math.prod(mesh.shape[a] for a in axes)


# Features that read absolute query positions: a query shard cannot run them locally.
def _positional(config):
  return (config.causal or config.has_window or config.dropout_rate > 0 or
          any(name in config.operands for name in ("alibi_slopes", "q_lengths")))


def _plan(kind, config, shapes, mesh, specs, strict=True):
  """The partitioning of the call; `strict`: raise on a sharded head_dim (in `partition`; GSPMD
  aborts the process on exceptions from its propagation callbacks)."""
  for index, name in _QUERY_LIKE[kind] + _KV_LIKE:
    if strict and specs[index][3]:
      raise NotImplementedError(
          f"flash_jax attention: the head_dim axis (axis 3) of `{name}` is sharded over mesh axes "
          f"{specs[index][3]}; attention needs whole heads. Shard batch, heads or sequence "
          "instead (or replicate head_dim before the call).")
  batch, seq_q, heads, _ = shapes[0]
  seq_k, kv_heads = shapes[1][1], shapes[1][2]
  query_spec, key_spec = specs[0], specs[1]

  batch_axes = query_spec[0] if batch % _size(mesh, query_spec[0]) == 0 else ()
  head_axes = query_spec[2] if heads % _size(mesh, query_spec[2]) == 0 else ()
  kv_head_axes = head_axes
  if kv_heads % _size(mesh, head_axes):
    # Leading head axes whose size product is kv_heads: the devices along the remaining axes
    # hold query heads of the same kv head (contiguous groups).
    prefix = [head_axes[:i] for i in range(len(head_axes) + 1)
              if _size(mesh, head_axes[:i]) == kv_heads]
    if prefix:
      kv_head_axes = prefix[0]
    else:
      head_axes = kv_head_axes = ()

  seq_axes = query_spec[1] or key_spec[1]
  used = set(batch_axes) | set(head_axes)
  plan = _Plan(batch=batch_axes, heads=head_axes, kv_heads=kv_head_axes)
  if not seq_axes or used & set(seq_axes):
    return plan
  shards = _size(mesh, seq_axes)
  if query_spec[1] and not key_spec[1] and not _positional(config) and seq_q % shards == 0:
    return dataclasses.replace(plan, seq_q=seq_axes)
  if (seq_q % shards == 0 and seq_k % shards == 0 and
      _ring.unsupported_reason(config, "contiguous") is None):
    return dataclasses.replace(plan, seq_q=seq_axes, seq_k=seq_axes, ring=True)
  return plan


def _entry(axes):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else tuple(axes)


def _optional_spec(name, shape, full, plan):
  """Spec of optional operand `name` of shape `shape`; `full` = (batch, heads, seq_q, seq_k)."""
  batch, heads, seq_q, seq_k = full
  if name in ("q_segment_ids", "q_positions"):
    return (plan.batch, plan.seq_q)
  if name in ("kv_segment_ids", "kv_positions"):
    return (plan.batch, plan.seq_k)
  if name in ("q_lengths", "kv_lengths"):
    return (plan.batch,)
  if name == "dropout_seed":
    return (plan.batch, ())
  # mask, bias [b|1, h|1, sq|1, sk|1] and alibi_slopes [b|1, h]: broadcast axes stay whole.
  logical = ((batch, plan.batch), (heads, plan.heads), (seq_q, plan.seq_q), (seq_k, plan.seq_k))
  return tuple(axes if size == full_size else ()
               for size, (full_size, axes) in zip(shape, logical))


def _specs(kind, config, shapes, plan):
  """PartitionSpecs (as tuples of axes tuples) of the operands and of the results."""
  batch, seq_q, heads, _ = shapes[0]
  full = (batch, heads, seq_q, shapes[1][1])
  query = (plan.batch, plan.seq_q, plan.heads, ())
  kv = (plan.batch, plan.seq_k, plan.kv_heads, ())
  lse = (plan.batch, plan.heads, plan.seq_q)
  optional = [_optional_spec(name, shape, full, plan)
              for name, shape in zip(config.operands, shapes[_DENSE[kind]:])]
  if kind == "fwd":
    return [query, kv, kv] + optional, [query, lse]
  results = [query, kv, kv]
  if "bias" in config.operands:
    results.append(optional[config.operands.index("bias")])
  return [query, kv, kv, query, lse, query, lse] + optional, results


def _reductions(config, shapes, plan):
  """Mesh axes over which each backward result holds partial sums (dq, dk, dv[, dbias])."""
  # dK/dV: summed over the query heads of other shards of a kv head, and over query shards
  # when the keys are not sequence-sharded.
  kv = plan.heads[len(plan.kv_heads):] + (plan.seq_q if not plan.seq_k else ())
  reductions = [(), kv, kv]
  if "bias" in config.operands:
    batch, seq_q, heads, _ = shapes[0]
    bias = shapes[_DENSE["bwd"] + config.operands.index("bias")]
    axes = ()
    for size, full_size, logical in zip(bias, (batch, heads, seq_q),
                                        (plan.batch, plan.heads, plan.seq_q)):
      if size == 1 and full_size > 1:
        axes += logical
    reductions.append(axes)
  return reductions


def _named(mesh, spec):
  return NamedSharding(mesh, PartitionSpec(*(_entry(axes) for axes in spec)))


# --- the callbacks --------------------------------------------------------------------------------


def _arg_specs(args, strict=True):
  return [_spec(arg.sharding, len(arg.shape), strict) for arg in args]


def _partition(kind, implementation, config, shapes, mesh, args):
  plan = _plan(kind, config, shapes, mesh, _arg_specs(args))
  arg_specs, result_specs = _specs(kind, config, shapes, plan)
  reductions = _reductions(config, shapes, plan) if kind == "bwd" else []

  def lower_fn(*operands):
    if plan.ring:
      ring = _ring.Ring(_entry(plan.seq_q), _size(mesh, plan.seq_q))
      run = _ring.ring_forward if kind == "fwd" else _ring.ring_backward
      results = list(run(config, ring, *operands))
    else:
      results = list(implementation(*operands, config=config))
    for i, axes in enumerate(reductions):
      if axes:
        results[i] = lax.psum(results[i], _entry(axes))
    return tuple(results)

  return (mesh, lower_fn, tuple(_named(mesh, s) for s in result_specs),
          tuple(_named(mesh, s) for s in arg_specs))


def _infer(kind, config, shapes, mesh, args):
  plan = _plan(kind, config, shapes, mesh, _arg_specs(args, strict=False),
               strict=False)
  return tuple(_named(mesh, s) for s in _specs(kind, config, shapes, plan)[1])


def _propagate_user(kind, mesh, user):
  """The results' shardings from a user's sharding of the output (dq in the backward)."""
  spec = _spec(user[0].sharding, len(user[0].shape), strict=False)
  batch, seq, heads, _ = spec
  query = (batch, seq, heads, ())
  if kind == "fwd":
    return (_named(mesh, query), _named(mesh, (batch, heads, seq)))
  # K/V sizes may differ from the query's (GQA, seq_k): keep their batch sharding only.
  rest = [_named(mesh, (batch,) + ((),) * (len(r.shape) - 1)) for r in user[1:]]
  return (_named(mesh, query), *rest)


def _sharding_rule(kind, config, shapes):
  """Shardy's einsum-like rule: the factors of each operand and result dimension."""
  batch, seq_q, heads, _ = shapes[0]
  seq_k, kv_heads = shapes[1][1], shapes[1][2]
  # Query and K/V heads are one factor only without GQA; with GQA `partition` derives the
  # K/V head sharding from the query's (see the module docstring).
  kh = "h" if kv_heads == heads else "kh"
  query, kv, lse = "b sq h d", f"b sk {kh} d", "b h sq"
  fresh = iter(f"u{i}" for i in range(64))
  full = {"b": batch, "h": heads, "sq": seq_q, "sk": seq_k}
  optional = []
  for name, shape in zip(config.operands, shapes[_DENSE[kind]:]):
    if name in ("q_segment_ids", "q_positions"):
      factors = ["b", "sq"]
    elif name in ("kv_segment_ids", "kv_positions"):
      factors = ["b", "sk"]
    elif name in ("q_lengths", "kv_lengths"):
      factors = ["b"]
    elif name == "dropout_seed":
      factors = ["b", next(fresh)]
    else:
      logical = ("b", "h", "sq", "sk")[:len(shape)] if name != "alibi_slopes" else ("b", "h")
      factors = [f if size == full[f] else next(fresh) for f, size in zip(logical, shape)]
    optional.append(" ".join(factors))
  if kind == "fwd":
    return ", ".join([query, kv, kv] + optional) + f" -> {query}, {lse}"
  results = [query, kv, kv]
  if "bias" in config.operands:
    results.append(optional[config.operands.index("bias")])
  return (", ".join([query, kv, kv, query, lse, query, lse] + optional) + " -> " +
          ", ".join(results))
