"""The one validation routine for attention inputs.

`check_operands` works on anything with `.shape` and `.dtype` (arrays, tracers, abstract
values), so the public API and the primitives' abstract evaluation apply the same rules.
User mistakes raise ValueError; valid input that flash_jax does not support raises
NotImplementedError. Messages name the argument, what was expected and what was received.
"""

from __future__ import annotations

import numbers

import numpy as np
import jax.numpy as jnp

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def _describe(x) -> str:
  return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def check_dense(query, key, value) -> None:
  """Shapes and dtypes of query [b, sq, h, d] and key/value [b, sk, kv_h, d]."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if len(x.shape) != 4:
      raise ValueError(f"`{name}` must have rank 4 [batch, seq, heads, head_dim], "
                       f"got shape {list(x.shape)}")
    dtype = jnp.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"`{name}` must have a floating dtype (float16, bfloat16 or float32), "
                       f"got {dtype.name}")
    if dtype not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
      raise NotImplementedError(f"`{name}` dtype {dtype.name} is not supported: expected "
                                f"float16, bfloat16 or float32")
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError("`query`, `key` and `value` must share one dtype, got "
                     f"{_describe(query)}, {_describe(key)}, {_describe(value)}")
  if key.shape != value.shape:
    raise ValueError(f"`key` and `value` must have the same shape, got {list(key.shape)} and "
                     f"{list(value.shape)}")
  batch, _, heads, head_dim = query.shape
  if key.shape[0] != batch:
    raise ValueError(f"`key` batch size must equal `query`'s ({batch}), got {key.shape[0]}")
  if key.shape[3] != head_dim:
    raise ValueError(f"`key` head_dim must equal `query`'s ({head_dim}), got {key.shape[3]}")
  kv_heads = key.shape[2]
  if kv_heads == 0 or heads % kv_heads != 0:
    raise ValueError(f"`query` heads ({heads}) must be a multiple of `key`/`value` heads, got "
                     f"{kv_heads} kv heads")
  if head_dim > MAX_HEAD_DIM:
    raise NotImplementedError(f"head_dim must be <= {MAX_HEAD_DIM}, got {head_dim}")
  if min(query.shape) == 0 or min(key.shape) == 0:
    raise ValueError(f"attention inputs must be non-empty, got `query` {list(query.shape)} and "
                     f"`key` {list(key.shape)}")


def check_operands(query, key, value, optional, config) -> None:
  """Everything the primitives need: dense operands plus the optional ones named in config."""
  check_dense(query, key, value)
  if len(optional) != len(config.operands):
    raise ValueError(f"attention: expected optional operands {config.operands}, got "
                     f"{len(optional)} arrays")


def softmax_scale(value, head_dim: int) -> float:
  """The static softmax scale: a Python or NumPy real number, default 1/sqrt(head_dim)."""
  if value is None:
    return float(1.0 / np.sqrt(head_dim))
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise ValueError("`softmax_scale` must be a Python float (a static value), got "
                     f"{type(value).__name__} {value!r}")
  value = float(value)
  if not np.isfinite(value):
    raise ValueError(f"`softmax_scale` must be finite, got {value}")
  return value


def static_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be a Python bool, got {type(value).__name__} {value!r}")
  return bool(value)
