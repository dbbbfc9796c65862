"""Outputs and gradients of any reference function in float64 and in input precision, for the
oracle of oracle.py when the reference is not a single `reference_attention` call (a
differentiable bias, a loop over packed sequences)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from oracle import _x64


def vjp_outputs(fn, primals, cotangents):
  """fn's outputs (a tuple) followed by the gradients of every primal for the cotangents."""
  outputs, vjp = jax.vjp(fn, *primals)
  # reference_attention's lse stays float32 in a float64 run when softmax_scale is a Python
  # float (its scores are cast to float32), so each cotangent takes its output's dtype.
  cotangents = tuple(c.astype(o.dtype) for c, o in zip(cotangents, outputs))
  return tuple(outputs) + tuple(vjp(cotangents))


def reference_vjp(fn, primals, cotangents, *, precision):
  """vjp_outputs of fn(*primals, compute_dtype=...) as float64 NumPy arrays.

  precision "float64": every floating input in float64 and compute_dtype float64 (the `ref` of
  the oracle); "input": inputs as given and compute_dtype the dtype of the first primal (`base`).
  """
  cpu = jax.devices("cpu")[0]
  host = [np.asarray(x) for x in tuple(primals) + tuple(cotangents)]
  count = len(primals)
  if precision == "float64":
    with _x64(), jax.default_device(cpu):
      arrays = [jnp.asarray(x, jnp.float64) for x in host]
      f = lambda *p: fn(*p, compute_dtype=jnp.float64)
      return [np.asarray(x, np.float64)
              for x in vjp_outputs(f, arrays[:count], arrays[count:])]
  with jax.default_device(cpu):
    arrays = [jnp.asarray(x) for x in host]
    f = lambda *p: fn(*p, compute_dtype=jnp.dtype(primals[0].dtype))
    return [np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
            for x in vjp_outputs(f, arrays[:count], arrays[count:])]
