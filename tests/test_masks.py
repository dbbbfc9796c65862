"""Masking options of flash_jax.attention against reference_attention with the oracle: window,
lengths, segment ids, dense mask, bias (and its gradient), softcap, ALiBi, both causal
alignments, their combinations, and rows that see no key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax._config import OPTIONAL_OPERANDS, AttentionConfig
from flash_jax._vjp import flash_attention
from oracle import (assert_matches, gpu_devices, gpu_param, random_inputs, reference_vjp,
                    sample_grid, vjp_outputs)

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 16
SEQS = (37, 45)


def _random(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _keep(seed, shape, rate=0.7):
  return jax.random.bernoulli(jax.random.key(seed), rate, shape)


def _segment_ids(batch, seq, boundaries):
  """Sorted ids whose segments start at the fractions `boundaries` of the sequence (so q and kv
  ids line up), shifted by one token per batch row."""
  rows = []
  for b in range(batch):
    starts = [int(f * seq) for f in boundaries]
    rows.append(np.searchsorted(np.array(starts) + b, np.arange(seq), side="right"))
  return jnp.asarray(np.stack(rows), jnp.int32)


def _options(name, batch, seq_q, seq_k):
  """Keyword arguments of attention (and of reference_attention) for one named option."""
  h = HEADS
  options = {
      "window": dict(window=(5, 3)),
      "window_causal": dict(window=(4, -1), causal=True),
      "window_left_unbounded": dict(window=(-1, 2)),
      "window_diagonal": dict(window=(0, 0)),
      "lengths": dict(q_lengths=jnp.array([seq_q - 9, seq_q], jnp.int32)[:batch],
                      kv_lengths=jnp.array([seq_k, 11], jnp.int32)[:batch]),
      "segment_ids": dict(q_segment_ids=_segment_ids(batch, seq_q, (0.0, 0.3, 0.7)),
                          kv_segment_ids=_segment_ids(batch, seq_k, (0.0, 0.3, 0.7))),
      "mask_full": dict(mask=_keep(1, (batch, h, seq_q, seq_k))),
      "mask_1hqk": dict(mask=_keep(2, (1, h, seq_q, seq_k))),
      "mask_b1qk": dict(mask=_keep(3, (batch, 1, seq_q, seq_k))),
      "mask_qk": dict(mask=_keep(4, (seq_q, seq_k))),
      "mask_b11k": dict(mask=_keep(5, (batch, 1, 1, seq_k))),
      "softcap": dict(softcap=1.5),
      # Visibility with softcap runs the kernels' kAll variant with its run-time softcap.
      "segment_ids_softcap": dict(softcap=1.5,
                                  q_segment_ids=_segment_ids(batch, seq_q, (0.0, 0.4)),
                                  kv_segment_ids=_segment_ids(batch, seq_k, (0.0, 0.4))),
      "alibi_h": dict(alibi_slopes=jnp.linspace(0.1, 0.8, h)),
      "alibi_bh": dict(alibi_slopes=jnp.abs(_random(6, (batch, h)))),
      "causal": dict(causal=True),
      "scale": dict(softmax_scale=0.7),
      "combination": dict(causal=True, window=(9, -1), softcap=2.0,
                          alibi_slopes=jnp.linspace(0.05, 0.3, h),
                          kv_lengths=jnp.array([seq_k - 3, seq_k - 20], jnp.int32)[:batch],
                          q_segment_ids=_segment_ids(batch, seq_q, (0.0, 0.5)),
                          kv_segment_ids=_segment_ids(batch, seq_k, (0.0, 0.5)),
                          mask=_keep(7, (batch, 1, seq_q, seq_k), 0.9)),
  }
  return options[name]


def _check(device, dtype, seqs, kwargs, bias=None, fn=flash_jax.attention, ref_kwargs=None,
           head_dim=HEAD_DIM):
  """Runs fn (with bias as a differentiable argument when given) and applies the oracle to
  out, lse, dq, dk, dv (and dbias). Returns the outputs."""
  seq_q, seq_k = seqs
  q, k, v, dout, dlse = random_inputs(sum(seqs) + len(kwargs), BATCH, seq_q, seq_k, HEADS,
                                      KV_HEADS, head_dim, jnp.dtype(dtype))
  primals = (q, k, v) if bias is None else (q, k, v, bias)
  ref_kwargs = kwargs if ref_kwargs is None else ref_kwargs

  def flash(*p):
    extra = {} if bias is None else {"bias": p[3]}
    return fn(*p[:3], return_lse=True, **kwargs, **extra)

  def reference(*p, compute_dtype):
    extra = {} if bias is None else {"bias": p[3]}
    return flash_jax.reference_attention(*p[:3], return_lse=True, compute_dtype=compute_dtype,
                                         **ref_kwargs, **extra)

  outputs = jax.jit(lambda p, c: vjp_outputs(flash, p, c))(jax.device_put(primals, device),
                                                           jax.device_put((dout, dlse), device))
  ref = reference_vjp(reference, primals, (dout, dlse), precision="float64")
  base = reference_vjp(reference, primals, (dout, dlse), precision="input")
  names = ("out", "lse", "dq", "dk", "dv") + (() if bias is None else ("dbias",))
  assert_matches(outputs, ref, base, names=names)
  return outputs


# bfloat16 on CPU is covered by the option grid below; the other tests run float32 there.
DEVICES = [("cpu", "float32"), gpu_param("gpu", "bfloat16")]
OPTION_NAMES = ["window", "window_causal", "window_left_unbounded", "window_diagonal", "lengths",
                "segment_ids", "mask_full", "mask_1hqk", "mask_b1qk", "mask_qk", "mask_b11k",
                "softcap", "segment_ids_softcap", "alibi_h", "alibi_bh", "causal", "scale", "combination"]
CASES = sample_grid({"option": OPTION_NAMES, "seqs": [SEQS, SEQS[::-1]],
                     "dtype": ["float32", "bfloat16"]}, count=len(OPTION_NAMES))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{option}-{seqs[0]}x{seqs[1]}-{dtype}"
                         .format(**c))
def test_option_matches_reference(case):
  kwargs = _options(case["option"], BATCH, *case["seqs"])
  _check(jax.devices("cpu")[0], case["dtype"], case["seqs"], kwargs)


@pytest.mark.parametrize("option", [gpu_param(name) for name in OPTION_NAMES])
def test_option_matches_reference_gpu(option):
  _check(gpu_devices()[0], "bfloat16", SEQS, _options(option, BATCH, *SEQS))


def _cell_mask(seed, shape):
  """A mask of 16 x 16 cells that are each empty, full or random: tiles of every state."""
  *lead, rows, cols = shape
  cells = np.random.default_rng(seed).integers(0, 3, (*lead, -(-rows // 16), -(-cols // 16)))
  cells = np.repeat(np.repeat(cells, 16, -2), 16, -1)[..., :rows, :cols]
  return jnp.asarray(np.where(cells == 2, np.asarray(_keep(seed, shape, 0.5)), cells == 1))


def _long_row_options(name, seq_q, seq_k):
  if name == "segment_ids":
    return dict(q_segment_ids=_segment_ids(BATCH, seq_q, (0.0, 0.3, 0.7)),
                kv_segment_ids=_segment_ids(BATCH, seq_k, (0.0, 0.3, 0.7)))
  if name == "segment_ids_unsorted":
    rng = np.random.default_rng(12)
    return dict(q_segment_ids=jnp.asarray(rng.integers(0, 3, (BATCH, seq_q)), jnp.int32),
                kv_segment_ids=jnp.asarray(rng.integers(0, 3, (BATCH, seq_k)), jnp.int32))
  return dict(mask=_cell_mask(13, (BATCH, 1, seq_q, seq_k)),
              q_lengths=jnp.array([seq_q - 70, seq_q], jnp.int32),
              kv_lengths=jnp.array([seq_k, seq_k - 90], jnp.int32))


@pytest.mark.parametrize("option", [gpu_param(name) for name in
                                    ("segment_ids", "segment_ids_unsorted", "mask_lengths")])
@pytest.mark.parametrize("seqs", [(200, 4645), (4645, 200)], ids=["long_keys", "long_queries"])
def test_long_walked_rows_gpu(option, seqs):
  """The kernels classify all tiles of a CTA's row (forward, dQ) or column (dK/dV) of tiles
  before their loop, reading ids in rounds of 4096 (forward) or 8192 entries: rows longer than a
  round, the 16-byte loads of an aligned row (batch row 0) with its ragged end, and the scalar
  loads of a misaligned one (row 1 starts 4645 ids in)."""
  _check(gpu_devices()[0], "bfloat16", seqs, _long_row_options(option, *seqs))


@pytest.mark.parametrize("option", [gpu_param(name) for name in
                                    ("segment_ids", "segment_ids_unsorted", "mask_lengths")])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_visibility_at_head_dims_64_128_gpu(option, head_dim):
  """Segment ids and a dense mask with lengths over several 128-key blocks with ragged ends, at
  the head dims of the Hopper kernels' visibility variant (on an H100/H200)."""
  seqs = (700, 1100)
  _check(gpu_devices()[0], "bfloat16", seqs, _long_row_options(option, *seqs), head_dim=head_dim)


def _band_cut_options(name, seq_q, seq_k):
  """Documents and mask regions longer than a tile, cut by a causal diagonal, a window or
  lengths: the tiles whose ids (or mask cells) keep every entry but the index band does not."""
  ids = dict(q_segment_ids=_segment_ids(BATCH, seq_q, (0.0, 0.45)),
             kv_segment_ids=_segment_ids(BATCH, seq_k, (0.0, 0.45)))
  if name == "segment_ids_causal":
    return dict(causal=True, **ids)
  if name == "segment_ids_window_lengths":
    return dict(window=(150, 60), q_lengths=jnp.array([seq_q - 37, seq_q], jnp.int32),
                kv_lengths=jnp.array([seq_k, seq_k - 201], jnp.int32), **ids)
  # Regions of 256 x 256 entries kept, empty, or kept at random (the random ones test entries).
  rows, cols = np.arange(seq_q)[:, None], np.arange(seq_k)[None, :]
  region = (rows // 256 + cols // 256) % 3
  keep = (region == 0) | ((region == 1) & np.asarray(_keep(14, (seq_q, seq_k), 0.6)))
  return dict(causal=True, mask=jnp.asarray(keep), kv_lengths=jnp.array([seq_k - 77, seq_k], jnp.int32))


BAND_CUT_OPTIONS = ("segment_ids_causal", "segment_ids_window_lengths", "mask_causal_lengths")


@pytest.mark.parametrize("option", [gpu_param(name) for name in BAND_CUT_OPTIONS])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_band_cut_tiles_of_uniform_visibility_gpu(option, head_dim):
  """Tiles that segment ids and the mask keep whole are masked by the index band alone
  (TileState kTileBand): forward and both backward kernels of the sm80 extras variant (d16) and
  of the Hopper visibility variant (d64/d128 on an H100/H200). Keys a multiple of 16: the mask
  summary's 16-byte loads."""
  seqs = (700, 1104)
  _check(gpu_devices()[0], "bfloat16", seqs, _band_cut_options(option, *seqs), head_dim=head_dim)


@pytest.mark.parametrize("option", [gpu_param(name) for name in BAND_CUT_OPTIONS])
def test_band_cut_tiles_sm80_kernels_gpu(option, monkeypatch):
  """The same with the sm80 extras kernels at d128 (FLASH_JAX_DISABLE_SM90 on Hopper)."""
  monkeypatch.setenv("FLASH_JAX_DISABLE_SM90", "1")
  seqs = (1100, 704)
  _check(gpu_devices()[0], "bfloat16", seqs, _band_cut_options(option, *seqs), head_dim=128)


BIAS_SHAPES = [(BATCH, HEADS, *SEQS), (1, HEADS, 1, SEQS[1]), SEQS, (BATCH, 1, SEQS[0], 1)]


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bias_and_its_gradient_in_the_broadcast_shape(device, dtype, shape):
  bias = _random(8, shape)
  outputs = _check(jax.devices(device)[0], dtype, SEQS, {"causal": True}, bias=bias)
  assert outputs[5].shape == bias.shape and outputs[5].dtype == bias.dtype


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_bias_with_mask_softcap_and_alibi(device, dtype):
  kwargs = dict(mask=_keep(9, (1, HEADS, *SEQS)), softcap=3.0, alibi_slopes=jnp.full(HEADS, 0.2),
                window=(6, 6))
  _check(jax.devices(device)[0], dtype, SEQS, kwargs, bias=_random(10, (BATCH, HEADS, *SEQS)))


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("seqs", [SEQS, SEQS[::-1]], ids=["sq<sk", "sq>sk"])
@pytest.mark.parametrize("window", [None, (3, 2)], ids=["causal", "causal_window"])
def test_top_left_alignment(device, dtype, seqs, window):
  """dot_product_attention aligns causal masks and windows to the top-left corner."""
  kwargs = dict(is_causal=True, local_window_size=window)
  ref_kwargs = dict(causal=True, causal_top_left=True, window=window)
  seq_q, seq_k = seqs
  q, k, v, dout, _ = random_inputs(11, BATCH, seq_q, seq_k, HEADS, KV_HEADS, HEAD_DIM,
                                   jnp.dtype(dtype))

  def reference(q, k, v, compute_dtype):
    return (flash_jax.reference_attention(q, k, v, compute_dtype=compute_dtype, **ref_kwargs),)

  device = jax.devices(device)[0]
  flash = lambda q, k, v: (flash_jax.dot_product_attention(q, k, v, **kwargs),)
  outputs = jax.jit(lambda p, c: vjp_outputs(flash, p, c))(jax.device_put((q, k, v), device),
                                                           jax.device_put((dout,), device))
  ref = reference_vjp(reference, (q, k, v), (dout,), precision="float64")
  base = reference_vjp(reference, (q, k, v), (dout,), precision="input")
  assert_matches(outputs, ref, base, names=("out", "dq", "dk", "dv"))
  # The test can tell the alignments apart: bottom-right (attention's causal) differs.
  bottom_right = flash_jax.reference_attention(q, k, v, causal=True, window=window)
  assert not np.allclose(np.asarray(outputs[0], np.float32),
                         np.asarray(bottom_right, np.float32), atol=1e-2)


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_padded_query_rows_are_zero_with_zero_gradients(device, dtype):
  q_lengths = jnp.array([20, SEQS[0]], jnp.int32)
  outputs = _check(jax.devices(device)[0], dtype, SEQS, dict(q_lengths=q_lengths, causal=True))
  out, lse, dq = outputs[:3]
  assert bool(jnp.all(out[0, 20:] == 0)) and bool(jnp.all(dq[0, 20:] == 0))
  assert bool(jnp.all(lse[0, :, 20:] == -jnp.inf))
  assert bool(jnp.all(jnp.isfinite(lse[0, :, :20]))) and bool(jnp.all(jnp.isfinite(lse[1])))


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("how", ["mask", "kv_length_zero", "window", "segment"])
def test_row_with_no_visible_key(device, dtype, how):
  """0 output, lse -inf, zero dq on that row and no NaN anywhere, gradients included."""
  seq_q, seq_k = SEQS
  seqs = SEQS
  if how == "mask":
    mask = np.ones((BATCH, 1, seq_q, seq_k), bool)
    mask[1, :, 5] = False
    kwargs, empty = dict(mask=jnp.asarray(mask)), (1, 5)
  elif how == "kv_length_zero":
    kwargs, empty = dict(kv_lengths=jnp.array([seq_k, 0], jnp.int32)), (1, slice(None))
  elif how == "window":
    # seq_q > seq_k: the diagonal starts at key seq_k - seq_q = -8, so query i sees keys
    # [i - 10, i - 8]: none for the first 8 queries.
    seqs = SEQS[::-1]
    kwargs, empty = dict(window=(2, 0)), (slice(None), slice(0, 8))
  else:
    q_ids = jnp.zeros((BATCH, seq_q), jnp.int32).at[0, 7].set(5)
    kwargs, empty = dict(q_segment_ids=q_ids,
                         kv_segment_ids=jnp.zeros((BATCH, seq_k), jnp.int32)), (0, 7)
  out, lse, dq, dk, dv = _check(jax.devices(device)[0], dtype, seqs, kwargs)
  assert bool(jnp.all(out[empty] == 0)) and bool(jnp.all(dq[empty] == 0))
  b, rows = empty
  assert bool(jnp.all(lse[b, :, rows] == -jnp.inf))
  for x in (out, lse, dq, dk, dv):
    assert not bool(jnp.any(jnp.isnan(x.astype(jnp.float32))))


# --- bad input: one pytest.raises per rule ---------------------------------------------------


def _small():
  q, k, v, _, _ = random_inputs(0, BATCH, 8, 12, HEADS, KV_HEADS, HEAD_DIM, jnp.float32)
  return q, k, v


@pytest.mark.parametrize("kwargs,match", [
    (dict(q_segment_ids=jnp.zeros((BATCH, 8), jnp.int32)),
     "`q_segment_ids` and `kv_segment_ids` must be given together, got only `q_segment_ids`"),
    (dict(q_segment_ids=jnp.zeros((BATCH, 9), jnp.int32),
          kv_segment_ids=jnp.zeros((BATCH, 12), jnp.int32)),
     r"`q_segment_ids` must have shape \[2, 8\], got \[2, 9\]"),
    (dict(q_segment_ids=jnp.zeros((BATCH, 8), jnp.int32),
          kv_segment_ids=jnp.zeros((BATCH, 12), jnp.float32)),
     r"`kv_segment_ids` must be an integer array of shape \[2, 12\], got float32\[2, 12\]"),
    (dict(q_lengths=jnp.array([3], jnp.int32)), r"`q_lengths` must have shape \[2\], got \[1\]"),
    (dict(kv_lengths=jnp.array([3.0, 4.0])), r"`kv_lengths` must be an integer array"),
    (dict(mask=jnp.ones((8, 12), jnp.float32)), "`mask` must be a boolean array .* float32"),
    (dict(mask=jnp.ones((BATCH, 3, 8, 12), bool)),
     r"`mask` must be broadcastable to \[batch, heads, seq_q, seq_k\] = \[2, 4, 8, 12\], got "
     r"shape \[2, 3, 8, 12\]"),
    (dict(mask=jnp.ones((1, BATCH, HEADS, 8, 12), bool)), r"`mask` must be broadcastable"),
    (dict(bias=jnp.ones((8, 12), jnp.int32)), r"`bias` must be a floating array, got int32"),
    (dict(bias=jnp.ones((8, 13))), r"`bias` must be broadcastable .* got shape \[1, 1, 8, 13\]"),
    (dict(alibi_slopes=jnp.ones((HEADS + 1,))),
     r"`alibi_slopes` must be a float array of shape \[4\] or \[2, 4\], got float32\[5\]"),
    (dict(alibi_slopes=jnp.ones((HEADS,), jnp.int32)), r"`alibi_slopes` must be a float array"),
    (dict(window=(-2, 0)), r"`window` sizes must be >= -1 \(-1 = unbounded\), got \(-2, 0\)"),
    (dict(window=(1, -5)), r"`window` sizes must be >= -1 .* got \(1, -5\)"),
    (dict(window=3), r"`window` must be a pair of Python ints \(left, right\), got 3"),
    (dict(softcap=-1.0), "`softcap` must be a positive finite float, got -1.0"),
    (dict(softcap=jnp.float32(2.0)), "`softcap` must be a positive Python float"),
])
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    flash_jax.attention(*_small(), **kwargs)


@pytest.mark.parametrize("name,operand,match", [
    ("q_positions", jnp.zeros((BATCH, 9), jnp.int32),
     r"`q_positions` must be integer \[batch\|1, 8\], got int32\[2, 9\]"),
    ("kv_positions", jnp.zeros((BATCH, 12), jnp.float32),
     r"`kv_positions` must be integer \[batch\|1, 12\], got float32\[2, 12\]"),
    ("mask", jnp.ones((BATCH, 3, 8, 12), bool), r"`mask` must be bool \[batch\|1, 4, 8, 12\] "
                                                r"\(each axis full or 1\), got bool\[2, 3, 8, 12\]"),
    ("q_lengths", jnp.ones((BATCH, 1), jnp.int32), r"`q_lengths` must be integer \[batch\|1\]"),
])
def test_malformed_operands_reaching_the_primitive(name, operand, match):
  """Operands built internally (positions for attention_varlen) are checked at abstract
  evaluation too, so a malformed one fails at trace time."""
  q, k, v = _small()
  operands = {name: operand}
  if name in ("q_positions", "kv_positions"):
    other = "kv_positions" if name == "q_positions" else "q_positions"
    operands[other] = jnp.zeros((BATCH, 12 if other == "kv_positions" else 8), jnp.int32)
  names = tuple(n for n in OPTIONAL_OPERANDS if n in operands)
  config = AttentionConfig(softmax_scale=0.25, operands=names)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda *x: flash_attention(config, *x), q, k, v,
                   *(operands[n] for n in names))
