"""The CUDA lowering, checked on any machine: lowering for CUDA needs neither a GPU nor the
compiled extension, so these tests run in CPU-only CI.

They pin what the FFI handlers (csrc/ffi/attention_ffi.cc) rely on: the custom-call targets, the
attribute names and exact types, the operand and result shapes (workspace included), and that
nothing silently falls back to an XLA implementation.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax import _cuda
from flash_jax import _primitives
from flash_jax._config import AttentionConfig

MASK_ATTRS = {"has_q_lengths": "bool", "has_kv_lengths": "bool", "has_segment_ids": "bool"}
FWD_ATTRS = {"softmax_scale": "f32", "causal": "bool", "causal_top_left": "bool",
             "window_left": "i64", "window_right": "i64", "softcap": "f32", "num_splits": "i64",
             "dropout_threshold": "i64", "dropout_scale": "f32", **MASK_ATTRS}
BWD_ATTRS = {"softmax_scale": "f32", "causal": "bool", "causal_top_left": "bool",
             "window_left": "i64", "window_right": "i64", "softcap": "f32",
             "deterministic": "bool", "dropout_threshold": "i64", "dropout_scale": "f32",
             **MASK_ATTRS}
# The optional operands when absent: q/kv lengths, q/kv segment ids, q/kv positions (int32), mask
# (uint8), bias, ALiBi slopes (float32), dropout seeds (uint32).
NO_MASKS = ["0xi32"] * 6 + ["0xui8", "0xf32", "0xf32", "0xui32"]
NO_MASK_TILES = "0xui8"

_CALL = re.compile(r"stablehlo\.custom_call @(?P<target>\w+)\((?P<operands>[^)]*)\) \{(?P<body>.*)"
                   r"\} : \((?P<in_types>.*)\) -> (?P<out_types>.*)$")


def _custom_calls(text):
  """{target: [(attributes {name: (value, type)}, operand types, result types)]}."""
  calls = {}
  for line in text.splitlines():
    match = _CALL.search(line.strip())
    if not match:
      continue
    config = re.search(r"mhlo\.backend_config = \{([^}]*)\}", match["body"])
    attrs = {}
    for item in config[1].split(", ") if config and config[1] else ():
      name, _, value = item.partition(" = ")
      value, _, type_ = value.partition(" : ")
      attrs[name] = (value, type_ or ("bool" if value in ("true", "false") else "?"))
    types = lambda s: re.findall(r"tensor<([^>]*)>", s)
    calls.setdefault(match["target"], []).append(
        (attrs, types(match["in_types"]), types(match["out_types"])))
  return calls


def _lower_for_cuda(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _spec(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def _grad_of(**kwargs):
  def loss(q, k, v):
    result = flash_jax.attention(q, k, v, **kwargs)
    if kwargs.get("return_lse"):
      out, lse = result
      return out.astype(jnp.float32).sum() + lse.sum()
    return result.astype(jnp.float32).sum()
  return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shapes", [
    ((2, 128, 4, 64), (2, 128, 4, 64)),   # MHA
    ((3, 113, 9, 40), (3, 203, 3, 40)),   # GQA, seq_q != seq_k
    ((1, 1, 8, 128), (1, 1024, 1, 128)),  # MQA decoding shape: split-KV
])
def test_grad_lowers_to_both_custom_calls(causal, return_lse, dtype, shapes):
  q_shape, kv_shape = shapes
  text = _lower_for_cuda(_grad_of(causal=causal, return_lse=return_lse),
                         _spec(q_shape, dtype), _spec(kv_shape, dtype), _spec(kv_shape, dtype))
  calls = _custom_calls(text)
  assert set(calls) == {_cuda.FWD_TARGET, _cuda.BWD_TARGET}, text
  assert len(calls[_cuda.FWD_TARGET]) == 1 and len(calls[_cuda.BWD_TARGET]) == 1
  # No XLA attention behind the custom calls: no matrix products, no blockwise scan.
  assert "dot_general" not in text
  assert "stablehlo.while" not in text

  b, sq, h, d = q_shape
  sk, kv_h = kv_shape[1], kv_shape[2]
  element = "bf16" if dtype == jnp.bfloat16 else "f16"
  fwd_attrs, fwd_in, fwd_out = calls[_cuda.FWD_TARGET][0]
  assert {name: t for name, (_, t) in fwd_attrs.items()} == FWD_ATTRS
  assert fwd_attrs["causal"][0] == ("true" if causal else "false")
  assert fwd_attrs["causal_top_left"][0] == "false"
  assert fwd_attrs["window_left"][0] == fwd_attrs["window_right"][0] == "-1"
  assert float(fwd_attrs["softmax_scale"][0]) == pytest.approx(1 / np.sqrt(d), rel=1e-6)
  assert fwd_in == ([f"{b}x{sq}x{h}x{d}x{element}"] + [f"{b}x{sk}x{kv_h}x{d}x{element}"] * 2 +
                    NO_MASKS)
  assert all(fwd_attrs[name][0] == "false" for name in MASK_ATTRS)
  bucket = next(x for x in (32, 64, 96, 128, 192, 256) if d <= x)
  splits = int(fwd_attrs["num_splits"][0])
  assert splits == _cuda.num_splits(b, h, sq, sk, bucket)
  assert (splits > 1) == (q_shape == (1, 1, 8, 128))  # only the decoding shape splits
  assert fwd_out[:2] == [f"{b}x{sq}x{h}x{d}x{element}", f"{b}x{h}x{sq}xf32"]
  if splits > 1:
    assert fwd_out[2:] == [f"{splits}x{b}x{h}x{sq}x{bucket}xf32", f"{splits}x{b}x{h}x{sq}xf32",
                           NO_MASK_TILES]
  else:
    assert fwd_out[2:] == ["0xf32", "0xf32", NO_MASK_TILES]

  bwd_attrs, bwd_in, bwd_out = calls[_cuda.BWD_TARGET][0]
  assert {name: t for name, (_, t) in bwd_attrs.items()} == BWD_ATTRS
  assert bwd_attrs["deterministic"][0] == "false"
  assert len(bwd_in) == 17 and bwd_in[7:] == NO_MASKS
  assert all(bwd_attrs[name][0] == "false" for name in MASK_ATTRS)
  sq_padded = -(-sq // 128) * 128
  # dk and dv come back with the query-head count; the group sum happens outside the call.
  # dbias comes after dv ([0] without bias), the workspace after it.
  assert bwd_out == [f"{b}x{sq}x{h}x{d}x{element}", f"{b}x{sk}x{h}x{d}x{element}",
                     f"{b}x{sk}x{h}x{d}x{element}", "0xf32", f"{b}x{h}x{sq_padded}x{bucket}xf32",
                     f"{b}x{h}x{sq_padded}xf32", NO_MASK_TILES]


def test_head_dim_is_padded_to_a_multiple_of_8():
  spec = _spec((2, 64, 2, 59))
  calls = _custom_calls(_lower_for_cuda(_grad_of(), spec, spec, spec))
  _, fwd_in, fwd_out = calls[_cuda.FWD_TARGET][0]
  assert fwd_in == ["2x64x2x64xbf16"] * 3 + NO_MASKS
  assert fwd_out[0] == "2x64x2x64xbf16"
  _, bwd_in, bwd_out = calls[_cuda.BWD_TARGET][0]
  assert bwd_out[:3] == ["2x64x2x64xbf16"] * 3


def test_deterministic_attribute():
  spec = _spec((2, 64, 2, 64))
  text = _lower_for_cuda(_grad_of(deterministic=True), spec, spec, spec)
  assert _custom_calls(text)[_cuda.BWD_TARGET][0][0]["deterministic"] == ("true", "bool")


def test_export_for_cuda():
  spec = _spec((2, 256, 4, 64))
  # flash_jax's targets are not among jax.export's stable custom calls: exporting them is opted in.
  checks = [jax.export.DisabledSafetyCheck.custom_call(target)
            for target in (_cuda.FWD_TARGET, _cuda.BWD_TARGET)]
  exported = jax.export.export(jax.jit(_grad_of(causal=True)), platforms=["cuda"],
                               disabled_checks=checks)(spec, spec, spec)
  text = exported.mlir_module()
  assert _cuda.FWD_TARGET in text and _cuda.BWD_TARGET in text
  assert "dot_general" not in text


def test_vmap_folds_into_the_batch_of_one_call():
  q = _spec((5, 3, 64, 4, 32))
  kv = _spec((3, 96, 4, 32))
  fn = jax.vmap(lambda q, k, v: flash_jax.attention(q, k, v), in_axes=(0, None, None))
  calls = _custom_calls(_lower_for_cuda(fn, q, kv, kv))
  (_, fwd_in, fwd_out), = calls[_cuda.FWD_TARGET]
  assert fwd_in == ["15x64x4x32xbf16", "15x96x4x32xbf16", "15x96x4x32xbf16"] + NO_MASKS


def test_attributes_carry_the_config():
  config = AttentionConfig(softmax_scale=0.25, causal=True, causal_top_left=True, window_left=7,
                           window_right=0, softcap=30.0, deterministic=True)
  spec = _spec((1, 64, 2, 64))
  lse = _spec((1, 2, 64), jnp.float32)

  def fn(q, k, v, out, lse, dout, dlse):
    return (_primitives.attention_fwd(q, k, v, config=config),
            _primitives.attention_bwd(q, k, v, out, lse, dout, dlse, config=config))

  calls = _custom_calls(_lower_for_cuda(fn, spec, spec, spec, spec, lse, spec, lse))
  for target in (_cuda.FWD_TARGET, _cuda.BWD_TARGET):
    attrs = calls[target][0][0]
    assert float(attrs["softmax_scale"][0]) == 0.25
    assert attrs["causal"][0] == attrs["causal_top_left"][0] == "true"
    assert (attrs["window_left"][0], attrs["window_right"][0]) == ("7", "0")
    assert float(attrs["softcap"][0]) == 30.0
  assert calls[_cuda.BWD_TARGET][0][0]["deterministic"][0] == "true"


def test_float32_is_refused_at_lowering():
  spec = _spec((2, 64, 2, 64), jnp.float32)
  with pytest.raises(NotImplementedError, match="float16 or bfloat16 on GPU, got float32"):
    _lower_for_cuda(lambda q, k, v: flash_jax.attention(q, k, v), spec, spec, spec)
  # The same function still lowers for CPU, where float32 is supported.
  jax.jit(lambda q, k, v: flash_jax.attention(q, k, v)).trace(spec, spec, spec).lower(
      lowering_platforms=("cpu",))


@pytest.mark.parametrize("lengths", [(), ("q_lengths",), ("kv_lengths",),
                                     ("q_lengths", "kv_lengths")])
@pytest.mark.parametrize("segment_ids", [False, True])
def test_lengths_and_segment_ids_reach_both_custom_calls(lengths, segment_ids):
  b, sq, sk, h, d = 3, 80, 144, 4, 64
  kwargs = {name: _spec((b,), jnp.int32) for name in lengths}
  if segment_ids:
    kwargs.update(q_segment_ids=_spec((b, sq), jnp.int32),
                  kv_segment_ids=_spec((b, sk), jnp.int32))
  names = sorted(kwargs)

  def fn(q, k, v, *masks):
    return _grad_of(causal=True, **dict(zip(names, masks)))(q, k, v)

  q, kv = _spec((b, sq, h, d)), _spec((b, sk, h, d))
  text = _lower_for_cuda(fn, q, kv, kv, *(kwargs[name] for name in names))
  calls = _custom_calls(text)
  assert set(calls) == {_cuda.FWD_TARGET, _cuda.BWD_TARGET}, text
  assert "dot_general" not in text and "stablehlo.while" not in text
  expected = [f"{b}xi32" if "q_lengths" in lengths else "0xi32",
              f"{b}xi32" if "kv_lengths" in lengths else "0xi32",
              f"{b}x{sq}xi32" if segment_ids else "0xi32",
              f"{b}x{sk}xi32" if segment_ids else "0xi32"]
  fwd_attrs, fwd_in, _ = calls[_cuda.FWD_TARGET][0]
  bwd_attrs, bwd_in, _ = calls[_cuda.BWD_TARGET][0]
  assert fwd_in[3:7] == expected and bwd_in[7:11] == expected
  for attrs in (fwd_attrs, bwd_attrs):
    assert attrs["has_q_lengths"] == ("true" if "q_lengths" in lengths else "false", "bool")
    assert attrs["has_kv_lengths"] == ("true" if "kv_lengths" in lengths else "false", "bool")
    assert attrs["has_segment_ids"] == ("true" if segment_ids else "false", "bool")


def test_vmapped_segment_ids_fold_into_the_batch():
  q, kv = _spec((2, 3, 64, 2, 32)), _spec((2, 3, 96, 2, 32))
  fn = jax.vmap(lambda q, k, v, qs, ks: flash_jax.attention(q, k, v, q_segment_ids=qs,
                                                            kv_segment_ids=ks))
  calls = _custom_calls(_lower_for_cuda(fn, q, kv, kv, _spec((2, 3, 64), jnp.int32),
                                        _spec((2, 3, 96), jnp.int32)))
  (_, fwd_in, _), = calls[_cuda.FWD_TARGET]
  assert fwd_in[3:7] == ["0xi32", "0xi32", "6x64xi32", "6x96xi32"]


# Position of each extras operand among the optional operands of the custom calls.
_EXTRA_INDEX = {"q_positions": 4, "kv_positions": 5, "mask": 6, "bias": 7, "alibi_slopes": 8,
                "dropout_seed": 9}


@pytest.mark.parametrize("name, operand, expected", [
    ("mask", _spec((2, 1, 1, 4096), jnp.bool_), "2x1x1x4096xui8"),
    ("bias", _spec((1, 2, 1, 4096), jnp.bfloat16), "1x2x1x4096xf32"),
    ("alibi_slopes", _spec((1, 2), jnp.float32), "1x2xf32"),
    ("dropout_seed", _spec((2, 2), jnp.uint32), "2x2xui32"),
])
def test_extras_reach_both_custom_calls_without_split(name, operand, expected):
  config = AttentionConfig(softmax_scale=0.125, operands=(name,),
                           dropout_rate=0.25 if name == "dropout_seed" else 0.0)
  # A decoding shape that would split the keys without extras.
  q, kv = _spec((2, 1, 2, 64)), _spec((2, 4096, 2, 64))
  lse = _spec((2, 2, 1), jnp.float32)

  def fn(q, k, v, x, out, lse, dout, dlse):
    return (_primitives.attention_fwd(q, k, v, x, config=config),
            _primitives.attention_bwd(q, k, v, out, lse, dout, dlse, x, config=config))

  calls = _custom_calls(_lower_for_cuda(fn, q, kv, kv, operand, q, lse, q, lse))
  (fwd_attrs, fwd_in, fwd_out), = calls[_cuda.FWD_TARGET]
  (bwd_attrs, bwd_in, bwd_out), = calls[_cuda.BWD_TARGET]
  expected_in = list(NO_MASKS)
  expected_in[_EXTRA_INDEX[name]] = expected
  assert fwd_in[3:] == expected_in and bwd_in[7:] == expected_in
  assert fwd_attrs["num_splits"][0] == "1"
  assert fwd_attrs["dropout_threshold"][0] == bwd_attrs["dropout_threshold"][0] == (
      "16384" if name == "dropout_seed" else "0")
  assert float(fwd_attrs["dropout_scale"][0]) == pytest.approx(
      4 / 3 if name == "dropout_seed" else 1.0, rel=1e-7)
  mask_tiles = "2x1x1x256xui8" if name == "mask" else NO_MASK_TILES
  assert fwd_out[-1] == bwd_out[-1] == mask_tiles
  assert bwd_out[3] == ("1x2x1x4096xf32" if name == "bias" else "0xf32")


@pytest.mark.parametrize("deterministic", [False, True])
def test_broadcast_bias_gradient(deterministic):
  """A broadcast bias gathers its gradient in its own shape (atomics), except in deterministic
  mode, where the custom call sees the full shape and the sum happens outside it."""
  config = AttentionConfig(softmax_scale=0.125, operands=("bias",), deterministic=deterministic)
  spec, lse = _spec((2, 64, 2, 64)), _spec((2, 2, 64), jnp.float32)
  bias = _spec((1, 2, 1, 64), jnp.float32)
  fn = lambda *args: _primitives.attention_bwd(*args, config=config)
  text = _lower_for_cuda(fn, spec, spec, spec, spec, lse, spec, lse, bias)
  (_, bwd_in, bwd_out), = _custom_calls(text)[_cuda.BWD_TARGET]
  full = "2x2x64x64xf32" if deterministic else "1x2x1x64xf32"
  assert bwd_in[7 + _EXTRA_INDEX["bias"]] == full and bwd_out[3] == full
  grads = jax.eval_shape(fn, spec, spec, spec, spec, lse, spec, lse, bias)
  assert grads[3].shape == (1, 2, 1, 64)


def test_missing_kernels_with_cuda_devices_is_an_error(monkeypatch):
  monkeypatch.setattr(_cuda, "_flash_jax_cuda", None)
  monkeypatch.setattr(_cuda, "_cuda_devices", lambda: ("a CUDA device",))
  spec = _spec((2, 64, 2, 64))
  with pytest.raises(NotImplementedError, match="without its CUDA kernels.*FLASH_JAX_BUILD_CUDA=1"):
    _lower_for_cuda(lambda q, k, v: flash_jax.attention(q, k, v), spec, spec, spec)


# Expected values worked by hand from the formula in csrc/flash_jax/sm80/fwd_launch.cuh.
@pytest.mark.parametrize("batch, heads, seq_q, seq_k, head_dim_padded, expected", [
    # 8 tiles, 64 key blocks of 128: 16 splits fill 128 of 132 SMs (efficiency 0.97); 13 (the
    # last split count before it with a different split length) reaches only 0.79.
    (1, 8, 1, 8192, 128, 16),
    # 4 key blocks of 256: split lengths 4, 2, (2), 1 -> the most splits, 4, is the most efficient.
    (1, 1, 1, 1024, 64, 4),
    # 512 key blocks: capped at 128 splits; 109..127 have the same split length (5) as 103.
    (1, 1, 1, 65536, 128, 128),
    (1, 8, 1, 256, 64, 1),           # a single key block of 256
    (1, 8, 1, 300, 64, 2),           # two key blocks
    (4, 32, 1024, 8192, 128, 1),     # 2048 tiles: the GPU is already full
    (1, 106, 64, 65536, 128, 1),     # 106 tiles >= 0.8 * 132
])
def test_num_splits_heuristic(batch, heads, seq_q, seq_k, head_dim_padded, expected):
  assert _cuda.num_splits(batch, heads, seq_q, seq_k, head_dim_padded, num_sms=132) == expected


@pytest.mark.parametrize("q_shape, kv_shape, what", [
    ((65536, 4, 1, 64), (65536, 4, 1, 64), "batch size must be at most 65535"),
    ((1, 4, 65536, 8), (1, 4, 1, 8), "query heads must be at most 65535"),
    ((1, 1 << 29, 1, 8), (1, 4, 1, 8), "query sequence length must be at most 536870911"),
    ((1, 4, 1, 8), (1, 1 << 29, 1, 8), "key sequence length must be at most 536870911"),
])
def test_kernel_launch_limits_are_refused_at_lowering(q_shape, kv_shape, what):
  fn = lambda q, k, v: flash_jax.attention(q, k, v)
  with pytest.raises(NotImplementedError, match=what):
    _lower_for_cuda(fn, _spec(q_shape), _spec(kv_shape), _spec(kv_shape))


def test_vmapped_axes_count_into_the_batch_limit():
  fn = jax.vmap(lambda q, k, v: flash_jax.attention(q, k, v))
  spec = _spec((2, 40000, 4, 1, 64))
  with pytest.raises(NotImplementedError, match="batch size must be at most 65535.*got 80000"):
    _lower_for_cuda(fn, spec, spec, spec)
