"""The one validation routine for attention inputs.

`check_operands` works on anything with `.shape` and `.dtype` (arrays, tracers, abstract
values), so the public API and the primitives' abstract evaluation apply the same rules.
User mistakes raise ValueError; valid input that flash_jax does not support raises
NotImplementedError. Messages name the argument, what was expected and what was received.
"""

from __future__ import annotations

import numbers

import numpy as np
import jax
import jax.numpy as jnp

from flash_jax import _dropout

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
  batch = query.shape[0]
  for name, x in zip(config.operands, optional):
    if not x.shape or x.shape[0] not in (batch, 1):
      raise ValueError(f"`{name}` must have a leading batch axis of size {batch} or 1, got "
                       f"shape {list(x.shape)}")
  check_operand_shapes(query, key, optional, config)


def softmax_scale(value, head_dim: int, name: str = "softmax_scale") -> float:
  """The static softmax scale (argument `name`): a Python or NumPy real number, default
  1/sqrt(head_dim)."""
  if value is None:
    return float(1.0 / np.sqrt(head_dim))
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise ValueError(f"`{name}` must be a Python float (a static value), got "
                     f"{type(value).__name__} {value!r}")
  value = float(value)
  if not np.isfinite(value):
    raise ValueError(f"`{name}` must be finite, got {value}")
  return value


def static_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be a Python bool, got {type(value).__name__} {value!r}")
  return bool(value)


def _int_array(name, x, shape):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"`{name}` must be an integer array of shape {list(shape)}, got "
                     f"{_describe(x)}")
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"`{name}` must have shape {list(shape)}, got {list(x.shape)}")
  return x.astype(jnp.int32)


def _broadcast_4d(name, x, full_shape):
  """A mask or bias broadcastable to [b, h, sq, sk] -> rank 4 with each dim full or 1."""
  if x.ndim > 4:
    raise ValueError(f"`{name}` must be broadcastable to [batch, heads, seq_q, seq_k] = "
                     f"{list(full_shape)}, got shape {list(x.shape)}")
  x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
  for size, full in zip(x.shape, full_shape):
    if size not in (1, full):
      raise ValueError(f"`{name}` must be broadcastable to [batch, heads, seq_q, seq_k] = "
                       f"{list(full_shape)}, got shape {list(x.shape)}")
  return x


def window(value):
  """(left, right) with -1 meaning unbounded; None -> (-1, -1)."""
  if value is None:
    return -1, -1
  if (not isinstance(value, (tuple, list)) or len(value) != 2 or
      not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
    raise ValueError(f"`window` must be a pair of Python ints (left, right), got {value!r}")
  left, right = int(value[0]), int(value[1])
  if left < -1 or right < -1:
    raise ValueError(f"`window` sizes must be >= -1 (-1 = unbounded), got ({left}, {right})")
  return left, right


def optional_operands(query, key, *, q_segment_ids, kv_segment_ids, q_lengths, kv_lengths, mask,
                      bias, alibi_slopes, dropout_rate, dropout_rng):
  """Checks the optional array arguments and brings each to the form of
  _config.OPTIONAL_OPERANDS. Returns {name: array} and the dropout rate (a float)."""
  batch, seq_q, heads, _ = query.shape
  seq_k = key.shape[1]
  operands = {}
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("`q_segment_ids` and `kv_segment_ids` must be given together, got only "
                     + ("`q_segment_ids`" if kv_segment_ids is None else "`kv_segment_ids`"))
  if q_segment_ids is not None:
    operands["q_segment_ids"] = _int_array("q_segment_ids", q_segment_ids, (batch, seq_q))
    operands["kv_segment_ids"] = _int_array("kv_segment_ids", kv_segment_ids, (batch, seq_k))
  if q_lengths is not None:
    operands["q_lengths"] = _int_array("q_lengths", q_lengths, (batch,))
  if kv_lengths is not None:
    operands["kv_lengths"] = _int_array("kv_lengths", kv_lengths, (batch,))
  full = (batch, heads, seq_q, seq_k)
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"`mask` must be a boolean array (True = keep), got {_describe(mask)}")
    operands["mask"] = _broadcast_4d("mask", mask, full)
  if bias is not None:
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"`bias` must be a floating array, got {_describe(bias)}")
    operands["bias"] = _broadcast_4d("bias", bias, full)
  if alibi_slopes is not None:
    slopes = jnp.asarray(alibi_slopes)
    if not jnp.issubdtype(slopes.dtype, jnp.floating) or tuple(slopes.shape) not in (
        (heads,), (batch, heads)):
      raise ValueError(f"`alibi_slopes` must be a float array of shape [{heads}] or "
                       f"[{batch}, {heads}], got {_describe(slopes)}")
    operands["alibi_slopes"] = slopes.astype(jnp.float32).reshape(-1, heads)
  if isinstance(dropout_rate, (bool, np.bool_)) or not isinstance(dropout_rate, numbers.Real):
    raise ValueError("`dropout_rate` must be a Python float in [0, 1), got "
                     f"{type(dropout_rate).__name__} {dropout_rate!r}")
  dropout_rate = float(dropout_rate)
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"`dropout_rate` must be in [0, 1), got {dropout_rate}")
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError(f"`dropout_rng` (a JAX PRNG key) is required when dropout_rate > 0, got "
                       f"dropout_rate={dropout_rate} and no key")
    operands["dropout_seed"] = _dropout.row_seeds(dropout_rng, batch)
  return operands, dropout_rate


def softcap(value) -> float:
  if value is None:
    return 0.0
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise ValueError(f"`softcap` must be a positive Python float, got {type(value).__name__} "
                     f"{value!r}")
  if not (float(value) > 0 and np.isfinite(value)):
    raise ValueError(f"`softcap` must be a positive finite float, got {value}")
  return float(value)


# --- jax.nn.dot_product_attention and attention_varlen arguments --------------------------------


def jax_nn_inputs(query, key, value):
  """query, key, value of jax.nn.dot_product_attention, BTNH or TNH, as BTNH arrays: a missing
  batch axis becomes 1 (jax.nn's _ensure_4d), then the rules of `check_dense` apply."""
  arrays = []
  for name, x in (("query", query), ("key", key), ("value", value)):
    x = jnp.asarray(x)
    if x.ndim not in (3, 4):
      raise ValueError(f"`{name}` must have rank 4 [batch, seq, heads, head_dim] or 3 "
                       f"[seq, heads, head_dim], got shape {list(x.shape)}")
    arrays.append(x.reshape((1,) * (4 - x.ndim) + tuple(x.shape)))
  check_dense(*arrays)
  return arrays


def optional_lengths(name, value, batch):
  """An optional int [batch] array of sequence lengths, as int32."""
  return None if value is None else _int_array(name, value, (batch,))


def local_window_size(value):
  """jax.nn's local_window_size: None, an int (symmetric) or (left, right), each >= 0 keys on that
  side of the query's top-left-aligned diagonal. Returns (left, right), -1 = unbounded."""
  if value is None:
    return -1, -1
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
  if is_int(value):
    value = (value, value)
  if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(map(is_int, value)):
    raise ValueError(f"`local_window_size` must be a Python int or a pair of ints (left, right), "
                     f"got {value!r}")
  left, right = int(value[0]), int(value[1])
  if left < 0 or right < 0:
    raise ValueError(f"`local_window_size` sizes must be >= 0, got ({left}, {right})")
  return left, right


def varlen_inputs(query, key, value):
  """Packed query [total_q, h, d] and key/value [total_k, kv_h, d] as batch-1 BSHD arrays."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if len(x.shape) != 3:
      raise ValueError(f"`{name}` must have rank 3 [total_tokens, heads, head_dim], got shape "
                       f"{list(x.shape)}")
  arrays = [x[None] for x in (query, key, value)]
  check_dense(*arrays)
  return arrays


def positive_static_int(name, value) -> int:
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
      or value <= 0):
    raise ValueError(f"`{name}` must be a positive Python int (a static value), got "
                     f"{type(value).__name__} {value!r}")
  return int(value)


def cu_seqlens(name, value, total, max_seqlen, max_seqlen_name):
  """Cumulative sequence lengths int [n + 1], as int32. When the values are concrete (not
  traced) they are checked: start at 0, non-decreasing, end <= total, no sequence longer than
  max_seqlen. Traced values cannot be checked at trace time."""
  x = jnp.asarray(value)
  if not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim != 1 or x.shape[0] < 2:
    raise ValueError(f"`{name}` must be an integer array of shape [n_seqs + 1] with n_seqs >= 1, "
                     f"got {_describe(x)}")
  try:
    host = np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    return x.astype(jnp.int32)
  lengths = np.diff(host)
  if host[0] != 0 or (lengths < 0).any() or host[-1] > total:
    raise ValueError(f"`{name}` must start at 0, be non-decreasing and end at most at the "
                     f"number of tokens ({total}), got {host.tolist()}")
  if lengths.max() > max_seqlen:
    raise ValueError(f"`{max_seqlen_name}` ({max_seqlen}) must be at least the longest sequence "
                     f"of `{name}`, got a sequence of {int(lengths.max())} tokens")
  return x.astype(jnp.int32)


def check_operand_shapes(query, key, optional, config) -> None:
  """Trailing shapes and dtypes of the optional operands (after their leading batch axis), so a
  malformed operand reaching the primitives directly fails at trace time, not inside a lowering."""
  _, seq_q, heads, _ = query.shape
  seq_k = key.shape[1]
  integer = lambda dtype: jnp.issubdtype(dtype, jnp.integer)
  floating = lambda dtype: jnp.issubdtype(dtype, jnp.floating)
  rules = {
      "q_segment_ids": ([seq_q], integer, "integer"),
      "kv_segment_ids": ([seq_k], integer, "integer"),
      "q_positions": ([seq_q], integer, "integer"),
      "kv_positions": ([seq_k], integer, "integer"),
      "q_lengths": ([], integer, "integer"),
      "kv_lengths": ([], integer, "integer"),
      "mask": ([heads, seq_q, seq_k], lambda dtype: dtype == jnp.bool_, "bool"),
      "bias": ([heads, seq_q, seq_k], floating, "floating"),
      "alibi_slopes": ([heads], floating, "floating"),
      "dropout_seed": ([2], lambda dtype: dtype == jnp.uint32, "uint32"),
  }
  for name, x in zip(config.operands, optional):
    trailing, dtype_ok, dtype_name = rules[name]
    shape = list(x.shape[1:])
    # mask and bias broadcast: each trailing axis is full or 1.
    broadcast = name in ("mask", "bias")
    shape_ok = len(shape) == len(trailing) and all(
        size == full or (broadcast and size == 1) for size, full in zip(shape, trailing))
    if not shape_ok or not dtype_ok(jnp.dtype(x.dtype)):
      expected = " (each axis full or 1)" if broadcast else ""
      axes = ", ".join(["batch|1"] + [str(size) for size in trailing])
      raise ValueError(f"`{name}` must be {dtype_name} [{axes}]{expected}, got {_describe(x)}")
