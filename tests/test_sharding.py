"""Multi-device attention on 8 forced CPU devices (tests/conftest.py): sharding rules under jit with
NamedShardings (Shardy and GSPMD), per-shard calls in shard_map and pmap, ring attention.

Every sharded result is compared with the unsharded computation on one device; the compiled HLO
shows which collectives a layout costs.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flash_jax
from oracle import gpu_devices
from oracle import gpu_param

COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")
TOLERANCE = dict(rtol=2e-5, atol=2e-5)


def shard_map(f, mesh, in_specs, out_specs):
  """jax.shard_map on newer JAX, jax.experimental.shard_map.shard_map on older."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  from jax.experimental.shard_map import shard_map as experimental_shard_map
  return experimental_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def make_mesh(shape, names, devices=None):
  devices = jax.devices("cpu") if devices is None else devices
  return Mesh(np.array(devices[:int(np.prod(shape))]).reshape(shape), names)


@contextlib.contextmanager
def partitioner(name):
  previous = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", name == "shardy")
  try:
    yield
  finally:
    jax.config.update("jax_use_shardy_partitioner", previous)


def inputs(batch=4, seq=32, heads=8, kv_heads=8, head_dim=16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), jnp.float32)
  dout = jax.random.normal(keys[3], q.shape, jnp.float32)
  return q, k, v, dout


def forward_backward(attention):
  """(q, k, v, dout) -> (out, dq, dk, dv) of `attention(q, k, v)`."""
  def run(q, k, v, dout):
    out, vjp = jax.vjp(attention, q, k, v)
    return (out,) + tuple(vjp(dout))
  return run


def jitted_outputs_and_grads(attention, dout, dlse):
  """jit of (q, k, v) -> (out, lse, dq, dk, dv), where `attention(q, k, v)` returns (out, lse)
  and the cotangents are (dout, dlse)."""
  def run(q, k, v):
    outputs, vjp = jax.vjp(attention, q, k, v)
    return outputs + tuple(vjp((dout, dlse)))
  return jax.jit(run)


def assert_close(actual, expected):
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), **TOLERANCE)


def sharded(run, mesh, q_spec, kv_spec):
  q_sharding, kv_sharding = NamedSharding(mesh, q_spec), NamedSharding(mesh, kv_spec)
  return jax.jit(run, in_shardings=(q_sharding, kv_sharding, kv_sharding, q_sharding),
                 out_shardings=(q_sharding, q_sharding, kv_sharding, kv_sharding))


def collectives(compiled_text):
  return {name for name in COLLECTIVES if name in compiled_text}


def compile_and_run(fn, *args):
  """(outputs, compiled HLO text) from one compilation of the jitted `fn`."""
  compiled = fn.lower(*args).compile()
  return compiled(*args), compiled.as_text()


# --- jit with NamedShardings ---------------------------------------------------------------------

# (mesh shape, mesh axes, q spec, kv spec, kv_heads)
LAYOUTS = {
    "batch": ((4,), ("data",), P("data"), P("data"), 8),
    "heads": ((2, 4), ("data", "model"), P("data", None, "model"), P("data", None, "model"), 8),
    "gqa": ((2, 4), ("data", "model"), P("data", None, "model"), P("data", None, "model"), 4),
    # 2 kv heads over 4 head shards: the kv heads split over "kv", query heads of one kv head
    # over "group"; dK/dV are summed over "group".
    "gqa_shared_kv": ((2, 2, 2), ("data", "kv", "group"), P("data", None, ("kv", "group")),
                      P("data", None, "kv"), 2),
}


@pytest.mark.parametrize("partitioner_name,layout",
                         [("shardy", layout) for layout in LAYOUTS] + [("gspmd", "heads"),
                                                                       ("gspmd", "gqa_shared_kv")])
def test_batch_and_head_sharding_match_one_device(partitioner_name, layout):
  shape, names, q_spec, kv_spec, kv_heads = LAYOUTS[layout]
  q, k, v, dout = inputs(kv_heads=kv_heads)
  run = forward_backward(functools.partial(flash_jax.attention, causal=True))
  expected = jax.jit(run)(q, k, v, dout)
  with partitioner(partitioner_name):
    outputs, text = compile_and_run(sharded(run, make_mesh(shape, names), q_spec, kv_spec),
                                    q, k, v, dout)
  assert_close(outputs, expected)
  # Batch and head sharding need no communication, except the dK/dV sum over the query heads
  # that share a kv head.
  allowed = {"all-reduce"} if layout == "gqa_shared_kv" else set()
  assert collectives(text) <= allowed, collectives(text)


@pytest.mark.parametrize("partitioner_name,options",
                         [("shardy", "plain"), ("shardy", "causal"), ("gspmd", "causal"),
                          ("shardy", "causal_window_alibi")])
def test_sequence_sharding_runs_ring_attention(partitioner_name, options):
  q, k, v, dout = inputs(kv_heads=4)
  options = {"plain": {}, "causal": dict(causal=True),
             "causal_window_alibi": dict(causal=True, window=(7, -1),
                                         alibi_slopes=jnp.linspace(0.1, 0.8, 8))}[options]
  run = forward_backward(functools.partial(flash_jax.attention, **options))
  expected = jax.jit(run)(q, k, v, dout)
  spec = P("data", "seq")
  with partitioner(partitioner_name):
    outputs, text = compile_and_run(sharded(run, make_mesh((2, 4), ("data", "seq")), spec, spec),
                                    q, k, v, dout)
  assert_close(outputs, expected)
  assert "collective-permute" in text
  assert "all-gather" not in text and "all-to-all" not in text


def test_query_sequence_sharding_without_positions_stays_local():
  q, k, v, dout = inputs()
  attention = lambda q, k, v: flash_jax.attention(q, k, v)
  expected = jax.jit(attention)(q, k, v)
  mesh = make_mesh((8,), ("seq",))
  fn = jax.jit(attention, in_shardings=(NamedSharding(mesh, P(None, "seq")),
                                         NamedSharding(mesh, P()), NamedSharding(mesh, P())),
               out_shardings=NamedSharding(mesh, P(None, "seq")))
  out, text = compile_and_run(fn, q, k, v)
  assert_close([out], [expected])
  assert not collectives(text)


def test_optional_operands_follow_the_batch_sharding():
  q, k, v, dout = inputs(batch=4, seq=16)
  ids = jnp.tile(jnp.repeat(jnp.arange(4, dtype=jnp.int32), 4)[None], (4, 1))
  ids = ids.at[1].set(jnp.repeat(jnp.arange(2, dtype=jnp.int32), 8))
  bias = jax.random.normal(jax.random.key(7), (1, 8, 16, 16), jnp.float32)

  def run(q, k, v, bias, dout):
    f = lambda q, k, v, bias: flash_jax.attention(q, k, v, bias=bias, q_segment_ids=ids,
                                                  kv_segment_ids=ids, causal=True)
    out, vjp = jax.vjp(f, q, k, v, bias)
    return (out,) + tuple(vjp(dout))

  expected = jax.jit(run)(q, k, v, bias, dout)
  mesh = make_mesh((4, 2), ("data", "model"))
  dense = NamedSharding(mesh, P("data", None, "model"))
  bias_sharding = NamedSharding(mesh, P(None, "model"))
  fn = jax.jit(run, in_shardings=(dense, dense, dense, bias_sharding, dense),
               out_shardings=(dense, dense, dense, dense, bias_sharding))
  outputs, text = compile_and_run(fn, q, k, v, bias, dout)
  assert_close(outputs, expected)
  # The broadcast bias's gradient is summed over the batch shards, nothing else moves.
  assert collectives(text) == {"all-reduce"}


@pytest.mark.parametrize("partitioner_name", ["shardy", "gspmd"])
def test_head_dim_sharding_is_refused(partitioner_name):
  q, k, v, _ = inputs()
  sharding = NamedSharding(make_mesh((2,), ("model",)), P(None, None, None, "model"))
  fn = jax.jit(flash_jax.attention, in_shardings=(sharding,) * 3)
  with partitioner(partitioner_name), pytest.raises(Exception, match="head_dim .*`query`"):
    fn.lower(q, k, v).compile()


def test_single_device_jit_has_no_partitioning_overhead():
  q, k, v, _ = inputs(batch=1)
  text = jax.jit(flash_jax.attention).lower(q, k, v).as_text()
  assert "CustomSPMDPartitioning" not in text


# --- shard_map and pmap ----------------------------------------------------------------------------


def test_per_shard_attention_in_shard_map():
  q, k, v, dout = inputs()
  run = forward_backward(functools.partial(flash_jax.attention, causal=True))
  expected = jax.jit(run)(q, k, v, dout)
  mesh = make_mesh((2, 4), ("data", "model"))
  spec = P("data", None, "model")
  fn = jax.jit(shard_map(run, mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 4))
  assert_close(fn(q, k, v, dout), expected)


def test_per_shard_attention_in_pmap():
  q, k, v, _ = inputs(batch=8)
  expected = flash_jax.attention(q, k, v, causal=True)
  split = lambda x: x.reshape((8, 1) + x.shape[1:])
  out = jax.pmap(functools.partial(flash_jax.attention, causal=True))(*map(split, (q, k, v)))
  assert_close([out.reshape(expected.shape)], [expected])


RING_CASES = {
    # name: (mesh shape, mesh axes, spec of q/k/v, ring axis, kv_heads, causal, layout)
    "1d_causal": ((8,), ("seq",), P(None, "seq"), "seq", 4, True, "contiguous"),
    "2d_zigzag": ((2, 4), ("data", "seq"), P("data", "seq"), "seq", 8, True, "zigzag"),
    "2d_heads": ((2, 4), ("model", "seq"), P(None, "seq", "model"), "seq", 2, False,
                 "contiguous"),
}


@pytest.mark.parametrize("case", list(RING_CASES))
def test_ring_attention_matches_one_device(case):
  shape, names, spec, axis, kv_heads, causal, layout = RING_CASES[case]
  q, k, v, dout = inputs(kv_heads=kv_heads)
  dlse = jax.random.normal(jax.random.key(3), (4, 8, 32), jnp.float32)

  def reference(q, k, v):
    return flash_jax.attention(q, k, v, causal=causal, return_lse=True)

  def ring(q, k, v):
    return flash_jax.ring_attention(q, k, v, axis_name=axis, causal=causal, layout=layout,
                                    return_lse=True)

  num = shape[names.index(axis)]
  lse_spec = P(spec[0], spec[2] if len(spec) > 2 else None, spec[1])
  ring = shard_map(ring, make_mesh(shape, names), in_specs=(spec,) * 3,
                   out_specs=(spec, lse_spec))
  if layout == "zigzag":
    def ring(q, k, v, ring=ring):
      out, lse = ring(*(flash_jax.zigzag_shard(x, num) for x in (q, k, v)))
      return flash_jax.zigzag_unshard(out, num), flash_jax.zigzag_unshard(lse, num, axis=2)

  run = functools.partial(jitted_outputs_and_grads, dout=dout, dlse=dlse)
  outputs, text = compile_and_run(run(ring), q, k, v)
  assert_close(outputs, run(reference)(q, k, v))
  assert "collective-permute" in text
  if layout == "contiguous":  # zigzag_shard itself moves tokens between devices
    assert "all-gather" not in text


# name: (keyword arguments of attention, layout, kv_heads, seq_k); the ring runs on 4 devices.
# Options are combined so that five compilations cover every one in both layouts.
RING_OPTION_CASES = {
    "window_softcap_gqa": (dict(window=(5, 3), softcap=2.0), "contiguous", 2, 32),
    "causal_window_segment_ids_zigzag": (dict(causal=True, window=(6, -1), segment_ids=True),
                                         "zigzag", 4, 32),
    "alibi_causal_lengths": (dict(causal=True, alibi=True, lengths=True), "contiguous", 8, 32),
    "alibi_window_zigzag": (dict(window=(-1, 4), alibi=True), "zigzag", 8, 32),
    # Bottom-right causal alignment with twice as many keys as queries.
    "causal_longer_keys_zigzag": (dict(causal=True, window=(9, 0)), "zigzag", 8, 64),
}


@pytest.mark.parametrize("case", list(RING_OPTION_CASES))
def test_ring_attention_options_match_one_device(case):
  options, layout, kv_heads, seq_k = RING_OPTION_CASES[case]
  num, batch, seq_q, heads = 4, 2, 32, 8
  q, _, _, dout = inputs(batch=batch, seq=seq_q, heads=heads, kv_heads=kv_heads)
  _, k, v, _ = inputs(batch=batch, seq=seq_k, heads=heads, kv_heads=kv_heads, seed=1)
  options = dict(options)
  replicated = {}  # per-batch or per-head arguments, the same on every device
  tokens = {}      # per-token arguments, sharded like the sequence
  if options.pop("alibi", False):
    replicated["alibi_slopes"] = jnp.linspace(0.05, 0.4, heads)
  if options.pop("lengths", False):
    replicated["q_lengths"] = jnp.array([seq_q - 5, 11], jnp.int32)
    replicated["kv_lengths"] = jnp.array([seq_k - 3, 20], jnp.int32)
  if options.pop("segment_ids", False):  # three documents of uneven lengths
    ids = lambda n: jnp.broadcast_to((jnp.arange(n) >= 5).astype(jnp.int32) +
                                     (jnp.arange(n) >= 19), (batch, n))
    tokens = dict(q_segment_ids=ids(seq_q), kv_segment_ids=ids(seq_k))
  dlse = jax.random.normal(jax.random.key(3), (batch, heads, seq_q), jnp.float32)

  def reference(q, k, v):
    return flash_jax.attention(q, k, v, return_lse=True, **options, **replicated, **tokens)

  def ring_local(q, k, v, tokens, replicated):
    return flash_jax.ring_attention(q, k, v, axis_name="seq", layout=layout, return_lse=True,
                                    **options, **tokens, **replicated)

  seq = P(None, "seq")
  ring = shard_map(ring_local, make_mesh((num,), ("seq",)),
                   in_specs=(seq, seq, seq, {n: seq for n in tokens},
                             {n: P() for n in replicated}),
                   out_specs=(seq, P(None, None, "seq")))
  order = (lambda x: flash_jax.zigzag_shard(x, num)) if layout == "zigzag" else (lambda x: x)
  unorder = ((lambda x, axis=1: flash_jax.zigzag_unshard(x, num, axis)) if layout == "zigzag"
             else (lambda x, axis=1: x))

  def ring_global(q, k, v):
    out, lse = ring(order(q), order(k), order(v), {n: order(x) for n, x in tokens.items()},
                    replicated)
    return unorder(out), unorder(lse, 2)

  run = functools.partial(jitted_outputs_and_grads, dout=dout, dlse=dlse)
  outputs, text = compile_and_run(run(ring_global), q, k, v)
  assert_close(outputs, run(reference)(q, k, v))
  assert "collective-permute" in text


def test_sequence_sharded_varlen_runs_ring_attention():
  """attention_varlen's packed tokens sharded over the sequence: their positions travel with the
  chunks around the ring."""
  keys = jax.random.split(jax.random.key(5), 4)
  q, k, v, dout = (jax.random.normal(key, (32, 4, 16), jnp.float32) for key in keys)
  cu_seqlens = jnp.array([0, 5, 19, 30], jnp.int32)
  run = forward_backward(functools.partial(
      flash_jax.attention_varlen, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
      max_seqlen_q=14, max_seqlen_k=14, causal=True, window=(3, -1)))
  expected = jax.jit(run)(q, k, v, dout)
  spec = NamedSharding(make_mesh((4,), ("seq",)), P("seq"))
  outputs, text = compile_and_run(jax.jit(run, in_shardings=(spec,) * 4,
                                          out_shardings=(spec,) * 4), q, k, v, dout)
  assert_close(outputs, expected)
  assert "collective-permute" in text and "all-gather" not in text


def test_ring_attention_in_pmap():
  q, k, v, _ = inputs(batch=2, kv_heads=4)
  expected = flash_jax.attention(q, k, v, causal=True)
  split = lambda x: x.reshape((2, 4, 8) + x.shape[2:]).transpose(1, 0, 2, 3, 4)
  ring = functools.partial(flash_jax.ring_attention, axis_name="ring", causal=True)
  out = jax.pmap(ring, axis_name="ring", devices=jax.devices("cpu")[:4])(*map(split, (q, k, v)))
  assert_close([out.transpose(1, 0, 2, 3, 4).reshape(expected.shape)], [expected])


def test_zigzag_permutation_round_trip():
  perm = flash_jax.zigzag_permutation(16, 4)
  np.testing.assert_array_equal(perm.reshape(8, 2)[:2], [[0, 1], [14, 15]])
  x = jnp.arange(2 * 16).reshape(2, 16)
  np.testing.assert_array_equal(flash_jax.zigzag_unshard(flash_jax.zigzag_shard(x, 4), 4), x)
  np.testing.assert_array_equal(perm[flash_jax.inverse_zigzag_permutation(16, 4)],
                                np.arange(16))
  with pytest.raises(ValueError, match="seq_len.*multiple of 2 \\* num_devices"):
    flash_jax.zigzag_permutation(12, 4)


def test_ring_attention_bad_arguments():
  q, k, v, _ = inputs(seq=8)
  mesh = make_mesh((4,), ("seq",))

  def call(**kwargs):
    f = lambda q, k, v: flash_jax.ring_attention(q, k, v, **kwargs)
    return jax.jit(shard_map(f, mesh, in_specs=(P(None, "seq"),) * 3,
                             out_specs=P(None, "seq")))(q, k, v)

  with pytest.raises(ValueError, match="`layout` must be one of"):
    call(axis_name="seq", layout="striped")
  with pytest.raises(ValueError, match="`axis_name` 'nope' is not a mapped axis"):
    call(axis_name="nope")
  lengths = jnp.full((4,), 8, jnp.int32)
  with pytest.raises(NotImplementedError, match="q_lengths/kv_lengths with the zigzag layout"):
    call(axis_name="seq", causal=True, layout="zigzag", q_lengths=lengths, kv_lengths=lengths)
  with pytest.raises(ValueError, match="`window` sizes must be >= -1"):
    call(axis_name="seq", window=(-2, 3))
  with pytest.raises(ValueError, match="local sequence lengths must be even, got 1"):
    jax.jit(shard_map(lambda q, k, v: flash_jax.ring_attention(
        q, k, v, axis_name="seq", causal=True, layout="zigzag"), make_mesh((8,), ("seq",)),
        in_specs=(P(None, "seq"),) * 3, out_specs=P(None, "seq")))(q, k, v)


# --- GPU: the same paths on a one-device mesh --------------------------------------------------


# The ring's two ways of masking: by chunk pairs, and by global positions (window, ALiBi).
GPU_RING_OPTIONS = {"causal": dict(causal=True),
                    "causal_window_alibi": dict(causal=True, window=(7, -1), alibi=True)}


@pytest.mark.parametrize("dtype", [gpu_param(jnp.bfloat16)])
@pytest.mark.parametrize("option", list(GPU_RING_OPTIONS))
def test_gpu_one_device_mesh(dtype, option):
  device = gpu_devices()[:1]
  q, k, v, dout = (x.astype(dtype) for x in inputs(kv_heads=4))
  q, k, v, dout = (jax.device_put(x, device[0]) for x in (q, k, v, dout))
  mesh = make_mesh((1,), ("seq",), device)
  options = dict(GPU_RING_OPTIONS[option])
  if options.pop("alibi", False):
    options["alibi_slopes"] = jnp.linspace(0.1, 0.8, 8)
  run = forward_backward(functools.partial(flash_jax.attention, **options))
  expected = jax.jit(run)(q, k, v, dout)
  spec = P(None, "seq")
  assert_close_bf16 = lambda a, e: [np.testing.assert_allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=2e-2, atol=2e-2)
      for x, y in zip(a, e)]
  assert_close_bf16(sharded(run, mesh, spec, spec)(q, k, v, dout), expected)
  ring = shard_map(lambda q, k, v: flash_jax.ring_attention(q, k, v, axis_name="seq",
                                                            **options),
                   mesh, in_specs=(spec,) * 3, out_specs=spec)
  assert_close_bf16(jax.jit(forward_backward(ring))(q, k, v, dout), expected)
