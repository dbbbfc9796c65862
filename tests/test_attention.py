"""flash_jax.attention against the reference: values, lse and gradients over the shape grid."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from oracle import (assert_matches, gpu_devices, gpu_param, random_inputs, reference_outputs,
                    sample_grid)

SHAPE_GRID = sample_grid(
    {
        "head_dim": [40, 59, 64, 96, 128, 256],
        "seqs": [(1, 239), (239, 1), (113, 203), (1023, 1024), (128, 128)],
        "heads": [(9, 3), (9, 1), (4, 4)],
        "batch": [1, 3],
        "causal": [False, True],
        "dtype": ["float32", "bfloat16", "float16"],
    },
    count=18)


def _case_id(case):
  return "d{head_dim}-s{seqs[0]}x{seqs[1]}-h{heads[0]}x{heads[1]}-b{batch}-{c}-{dtype}".format(
      c="causal" if case["causal"] else "full", **case)


def _run_case(case, device, dtype):
  heads, kv_heads = case["heads"]
  seq_q, seq_k = case["seqs"]
  seed = zlib.crc32(_case_id(case).encode()) % 1000  # fixed across processes, unlike hash()
  inputs = random_inputs(seed, case["batch"], seq_q, seq_k, heads, kv_heads, case["head_dim"],
                         jnp.dtype(dtype))
  q, k, v, dout, dlse = jax.device_put(inputs, device)

  @jax.jit
  def run(q, k, v, dout, dlse):
    f = lambda q, k, v: flash_jax.attention(q, k, v, causal=case["causal"], return_lse=True)
    (out, lse), vjp = jax.vjp(f, q, k, v)
    return (out, lse) + vjp((dout, dlse))

  outputs = run(q, k, v, dout, dlse)
  ref = reference_outputs(q, k, v, dout, dlse, precision="float64", causal=case["causal"])
  base = reference_outputs(q, k, v, dout, dlse, precision="input", causal=case["causal"])
  assert_matches(outputs, ref, base)


@pytest.mark.parametrize("case", SHAPE_GRID, ids=_case_id)
def test_matches_reference_cpu(case):
  _run_case(case, jax.devices("cpu")[0], case["dtype"])


GPU_GRID = [gpu_param(dict(case, dtype=dtype)) for case in SHAPE_GRID
            for dtype in ("bfloat16", "float16")]


@pytest.mark.parametrize("case", GPU_GRID, ids=lambda c: _case_id(c))
def test_matches_reference_gpu(case):
  _run_case(case, gpu_devices()[0], case["dtype"])


# On an H100/H200 the plain forward at head dims 64 and 128 runs the Hopper (wgmma) kernel; these
# cases run the sm80 kernels there too (FLASH_JAX_DISABLE_SM90, read by the kernel dispatch on
# every call), so both stay tested on the GPU the tests run on.
SM80_ON_HOPPER_GRID = [
    gpu_param(dict(head_dim=head_dim, seqs=seqs, heads=(4, 2), batch=2, causal=causal,
                   dtype=dtype))
    for head_dim, seqs, causal, dtype in [(64, (1023, 1024), True, "bfloat16"),
                                          (128, (113, 203), False, "float16"),
                                          (128, (300, 700), True, "bfloat16")]]


@pytest.mark.parametrize("case", SM80_ON_HOPPER_GRID, ids=lambda c: _case_id(c))
def test_matches_reference_sm80_kernels_gpu(case, monkeypatch):
  monkeypatch.setenv("FLASH_JAX_DISABLE_SM90", "1")
  _run_case(case, gpu_devices()[0], case["dtype"])


BAND_OPTIONS = {
    "window": dict(window=(300, 40)),
    "window_causal": dict(window=(250, -1), causal=True),
    "lengths_causal": dict(q_lengths=jnp.array([500, 700], jnp.int32),
                           kv_lengths=jnp.array([1100, 390], jnp.int32), causal=True),
}


@pytest.mark.parametrize("head_dim,dtype", [gpu_param(64, "float16"), gpu_param(128, "bfloat16")])
@pytest.mark.parametrize("option", list(BAND_OPTIONS))
def test_band_and_lengths_over_many_key_blocks_gpu(option, head_dim, dtype):
  """Window edges, causal and lengths across several 128-key blocks: the masked blocks at both
  edges of the band and the sequence tails of the Hopper forward (head dims 64 and 128)."""
  kwargs = BAND_OPTIONS[option]
  inputs = random_inputs(11, 2, 700, 1100, 4, 2, head_dim, jnp.dtype(dtype))
  q, k, v, dout, dlse = jax.device_put(inputs, gpu_devices()[0])

  @jax.jit
  def run(q, k, v, dout, dlse):
    f = lambda q, k, v: flash_jax.attention(q, k, v, return_lse=True, **kwargs)
    (out, lse), vjp = jax.vjp(f, q, k, v)
    return (out, lse) + vjp((dout, dlse))

  ref = reference_outputs(q, k, v, dout, dlse, precision="float64", **kwargs)
  base = reference_outputs(q, k, v, dout, dlse, precision="input", **kwargs)
  assert_matches(run(q, k, v, dout, dlse), ref, base)


@pytest.mark.parametrize("device_kind", ["cpu", gpu_param("gpu")])
def test_fully_masked_rows_are_zero_with_neg_inf_lse(device_kind):
  """Causal with seq_q > seq_k: the first seq_q - seq_k queries see no key."""
  device = jax.devices(device_kind)[0]
  dtype = jnp.float32 if device_kind == "cpu" else jnp.bfloat16
  q, k, v, dout, dlse = jax.device_put(random_inputs(3, 2, 50, 20, 4, 2, 64, dtype), device)
  dlse = jnp.where(jnp.isfinite(dlse), dlse, 0.0)

  def f(q, k, v):
    return flash_jax.attention(q, k, v, causal=True, return_lse=True)

  (out, lse), vjp = jax.vjp(f, q, k, v)
  dq, dk, dv = vjp((dout, dlse))
  masked = 50 - 20
  assert bool(jnp.all(out[:, :masked] == 0))
  assert bool(jnp.all(lse[:, :, :masked] == -jnp.inf))
  assert bool(jnp.all(jnp.isfinite(lse[:, :, masked:])))
  for g in (out, dq, dk, dv):
    assert not bool(jnp.any(jnp.isnan(g.astype(jnp.float32))))
  assert bool(jnp.all(dq[:, :masked] == 0))


def test_softmax_scale_and_eager_execution():
  q, k, v, _, _ = random_inputs(5, 2, 33, 47, 2, 2, 32, jnp.float32)
  out = flash_jax.attention(q, k, v, softmax_scale=0.3)  # eager: no jit around the call
  ref = flash_jax.reference_attention(q, k, v, softmax_scale=0.3)
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
  default = flash_jax.attention(q, k, v)
  assert not np.allclose(default, out, atol=1e-3)


@pytest.mark.parametrize("extras", [gpu_param("plain"), gpu_param("bias_dropout")])
def test_deterministic_backward_bitwise_over_20_runs_gpu(extras):
  """deterministic=True on the GPU: 20 runs of the jitted gradient are bitwise equal, on a shape
  with 16 key blocks per query block (the atomic dQ variant would differ in the last bits)."""
  device = gpu_devices()[0]
  batch, seq, heads, head_dim = 2, 2048, 4, 64
  q, k, v, dout, _ = random_inputs(7, batch, seq, seq, heads, heads, head_dim, jnp.bfloat16)
  kwargs = {}
  primals = (q, k, v)
  if extras == "bias_dropout":
    # A broadcast bias (its gradient a sum over the batch) and dropout: both paths of the extras
    # kernels stay reproducible.
    primals += (jax.random.normal(jax.random.key(8), (1, heads, seq, seq), jnp.float32),)
    kwargs = dict(dropout_rate=0.1, dropout_rng=jax.random.key(9))

  def loss(q, k, v, *bias):
    out = flash_jax.attention(q, k, v, deterministic=True, causal=True,
                              **({"bias": bias[0]} if bias else {}), **kwargs)
    return (out.astype(jnp.float32) * dout).sum()

  grad = jax.jit(jax.grad(loss, tuple(range(len(primals)))))
  primals = jax.device_put(primals, device)
  first = [np.asarray(x) for x in grad(*primals)]
  assert all(np.isfinite(x.astype(np.float32)).all() and np.abs(x).max() > 0 for x in first)
  for _ in range(19):
    for a, b in zip(first, grad(*primals)):
      np.testing.assert_array_equal(a, np.asarray(b))


def test_deterministic_forward_and_backward_bitwise_on_cpu():
  q, k, v, dout, _ = random_inputs(6, 2, 64, 96, 4, 2, 32, jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda q, k, v: (flash_jax.attention(q, k, v, deterministic=True)
                                            .astype(jnp.float32) * dout).sum(), (0, 1, 2)))
  first = grad(q, k, v)
  for _ in range(3):
    for a, b in zip(first, grad(q, k, v)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
