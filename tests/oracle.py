"""The accuracy oracle of DESIGN.md section 6 and the parameter-grid sampler.

With `ref` the reference in float64 and `base` the same reference computed in the input
precision, an implementation passes when max|out - ref| <= factor * max|base - ref| + floor for
each output (factor 2 for out and lse, 3 for gradients); floor is one rounding step (machine
epsilon) of the output dtype at the magnitude of ref. float64 (rather than float32) for `ref`
keeps the criterion meaningful for float32 inputs, where `base` would otherwise equal `ref`.
"""

from __future__ import annotations

import itertools
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax


def gpu_devices():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


def gpu_param(*values):
  """pytest params for the GPU variant: marked `gpu`, skipped with a reason without a GPU."""
  marks = [pytest.mark.gpu,
           pytest.mark.skipif(not gpu_devices(), reason="no GPU visible to JAX")]
  return pytest.param(*values, marks=marks)


def sample_grid(axes: dict, count: int, seed: int = 0):
  """A fixed-seed sample of the product of `axes` in which every value of every axis appears
  (each axis is a shuffled column, cycled to `count` rows); the whole product when
  FLASH_JAX_FULL_GRID=1 (pytest --full-grid)."""
  names = list(axes)
  if os.environ.get("FLASH_JAX_FULL_GRID") == "1":
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]
  rng = random.Random(seed)
  columns = []
  for values in axes.values():
    column = [values[i % len(values)] for i in range(max(count, len(values)))]
    rng.shuffle(column)
    columns.append(column)
  rows = max(len(c) for c in columns)
  return [{name: column[i % len(column)] for name, column in zip(names, columns)}
          for i in range(rows)]


def random_inputs(seed, batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (batch, seq_q, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (batch, seq_k, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (batch, seq_k, kv_heads, head_dim), jnp.float32).astype(dtype)
  dout = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)
  dlse = jax.random.normal(keys[4], (batch, heads, seq_q), jnp.float32)
  return q, k, v, dout, dlse


def _x64():
  enable = getattr(jax, "enable_x64", None)
  if enable is None:  # older spelling
    from jax.experimental import enable_x64 as enable
  return enable(True)


def vjp_outputs(fn, primals, cotangents):
  """fn's outputs (a tuple) followed by the gradients of every primal for the cotangents."""
  outputs, vjp = jax.vjp(fn, *primals)
  # Each cotangent takes its output's dtype (lse is float32 whatever the inputs' precision).
  cotangents = tuple(c.astype(o.dtype) for c, o in zip(cotangents, outputs))
  return tuple(outputs) + tuple(vjp(cotangents))


def reference_vjp(fn, primals, cotangents, *, precision):
  """vjp_outputs of fn(*primals, compute_dtype=...) as float64 NumPy arrays, on the CPU.

  precision "float64": every floating input in float64 and compute_dtype float64 (the `ref` of
  the oracle); "input": inputs as given and compute_dtype the dtype of the first primal (`base`).
  """
  cpu = jax.devices("cpu")[0]
  host = [np.asarray(x) for x in tuple(primals) + tuple(cotangents)]
  count = len(primals)
  if precision == "float64":
    # Jitted: run op by op (each op compiled and dispatched on its own), a reference written as
    # Python loops (varlen's per-sequence calls) took 97 s instead of 60. Float64 needs no care
    # about fusion's excess precision; the input-precision run below stays eager so that every
    # op rounds as written.
    with _x64(), jax.default_device(cpu):
      arrays = [jnp.asarray(x, jnp.float64) for x in host]
      f = lambda *p: fn(*p, compute_dtype=jnp.float64)
      run = jax.jit(lambda primals, cotangents: vjp_outputs(f, primals, cotangents))
      return [np.asarray(x, np.float64) for x in run(arrays[:count], arrays[count:])]
  with jax.default_device(cpu):
    arrays = [jnp.asarray(x) for x in host]
    f = lambda *p: fn(*p, compute_dtype=jnp.dtype(primals[0].dtype))
    return [np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
            for x in vjp_outputs(f, arrays[:count], arrays[count:])]


def reference_outputs(q, k, v, dout, dlse, *, precision, **kwargs):
  """(out, lse, dq, dk, dv) of the reference; precision "float64" or "input"."""
  def f(q, k, v, compute_dtype):
    return flash_jax.reference_attention(q, k, v, return_lse=True, compute_dtype=compute_dtype,
                                         **kwargs)
  return reference_vjp(f, (q, k, v), (dout, dlse), precision=precision)


def _magnitude(name, names, reference):
  """The scale of an output for the floor: its own largest finite value; for the gradients the
  largest over dq, dk and dv together, since they are one linear map of the same cotangent
  (dq of a one-key row is a near-cancellation whose own magnitude says nothing of its rounding)."""
  group = [n for n in names if n in ("dq", "dk", "dv")] if name in ("dq", "dk", "dv") else [name]
  values = [reference[names.index(n)] for n in group]
  return max(float(np.abs(v[np.isfinite(v)]).max(initial=0.0)) for v in values)


def assert_matches(outputs, reference, base, *, names=("out", "lse", "dq", "dk", "dv"),
                   dtypes=None):
  """Applies the oracle to each output; -inf must sit exactly where the reference has it."""
  for i, name in enumerate(names):
    out = np.asarray(jnp.asarray(outputs[i]).astype(jnp.float32), np.float64)
    ref, low = reference[i], base[i]
    assert out.shape == ref.shape, f"{name}: shape {out.shape}, expected {ref.shape}"
    assert not np.isnan(out).any(), f"{name}: NaN in the output"
    ref_inf = np.isinf(ref)
    np.testing.assert_array_equal(np.isinf(out), ref_inf, err_msg=f"{name}: infinities differ")
    if ref_inf.any():
      np.testing.assert_array_equal(out[ref_inf], ref[ref_inf])
    finite = ~ref_inf
    if not finite.any():
      continue
    factor = 2.0 if name in ("out", "lse") else 3.0
    dtype = jnp.float32 if name == "lse" else (dtypes or {}).get(name, outputs[i].dtype)
    floor = float(jnp.finfo(dtype).eps) * max(_magnitude(name, names, reference), 1e-6)
    error = float(np.abs(out[finite] - ref[finite]).max())
    base_error = float(np.abs(low[finite] - ref[finite]).max())
    bound = factor * base_error + floor
    assert error <= bound, (f"{name}: max error {error:.3e} exceeds {factor} x base error "
                            f"{base_error:.3e} + floor {floor:.3e}")
