"""CUDA lowering of the attention primitives: the kernels behind XLA FFI custom calls.

Importing this module registers the FFI targets of the compiled extension (when it was built)
and the CUDA implementation of the primitives. The lowering itself needs no extension: it only
emits the custom calls, so `jax.export` and `.lower(lowering_platforms=("cuda",))` work on a
machine without a GPU. Only a process that has CUDA devices but no kernels is refused, with
instructions, instead of falling back silently.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import _primitives
from flash_jax._config import AttentionConfig

FWD_TARGET = "flash_jax_attention_fwd_cuda"
BWD_TARGET = "flash_jax_attention_bwd_cuda"

# Mirrors csrc/flash_jax/params.h: the head-dim buckets with instantiated kernels, the row
# padding of the backward's workspace and the 16-byte (8-element) vector loads along head_dim.
_HEAD_DIM_BUCKETS = (32, 64, 96, 128, 192, 256)
_BWD_SEQLEN_Q_PAD_MULTIPLE = 128
_HEAD_DIM_ALIGNMENT = 8
# Launch limits of the kernels (csrc/flash_jax/sm80/*_launch.cuh): batch and heads index CUDA grid
# dimensions y/z, and the mask arithmetic keeps sequence positions below 2^29 in int32.
_MAX_GRID_DIM = 65535
_MAX_SEQLEN = (1 << 29) - 1

# Split-KV heuristic of the forward, as documented at the top of csrc/flash_jax/sm80/fwd_launch.cuh
# (the kernels accept any num_splits >= 1; this picks one and sizes the workspace for it).
_SPLIT_BLOCK_M = 64
_MAX_SPLITS = 128
_DEFAULT_NUM_SMS = 132  # H100 SXM, used when no CUDA device is visible (lowering on CPU)

try:
  # Not `from flash_jax import ...`: during the package's own import that form reports a missing
  # submodule as a generic ImportError, which would hide "not built" behind "failed to load".
  import flash_jax._flash_jax_cuda as _flash_jax_cuda
except ModuleNotFoundError as error:
  if error.name != "flash_jax._flash_jax_cuda":
    raise
  _flash_jax_cuda = None
  _EXTENSION_ERROR = "the extension flash_jax._flash_jax_cuda was not built"
except ImportError as error:  # built, but cannot be loaded here (e.g. a missing library)
  _flash_jax_cuda = None
  _EXTENSION_ERROR = f"the extension flash_jax._flash_jax_cuda failed to load: {error}"
else:
  _EXTENSION_ERROR = None
  # Registration before the CUDA plugin is initialised is queued by jaxlib.
  for _name, _capsule in _flash_jax_cuda.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")


def kernels_available() -> bool:
  """Whether this installation has the compiled CUDA kernels."""
  return _flash_jax_cuda is not None


@functools.lru_cache(maxsize=None)
def _cuda_devices():
  try:
    return tuple(jax.devices("cuda"))
  except RuntimeError:  # no CUDA backend in this process
    return ()


def _require_kernels():
  if _flash_jax_cuda is None and _cuda_devices():
    raise NotImplementedError(
        f"flash_jax was installed without its CUDA kernels ({_EXTENSION_ERROR}), but this "
        "process has CUDA devices. Rebuild it with the CUDA toolkit (nvcc) available: "
        "`FLASH_JAX_BUILD_CUDA=1 pip install --force-reinstall --no-deps <path to flash_jax>`; "
        "see docs/building.md for FLASH_JAX_CUDA_ARCHS and MAX_JOBS.")


def _check_supported(query, key, config: AttentionConfig):
  """Valid input the kernels do not handle yet: refused at lowering, never silently replaced."""
  batch, seq_q, heads, _ = query.shape
  for what, value, limit in (("batch size", batch, _MAX_GRID_DIM),
                             ("query heads", heads, _MAX_GRID_DIM),
                             ("query sequence length", seq_q, _MAX_SEQLEN),
                             ("key sequence length", key.shape[1], _MAX_SEQLEN)):
    if value > limit:
      raise NotImplementedError(
          f"flash_jax on GPU: the {what} must be at most {limit} for the CUDA kernels (vmapped "
          f"axes count into the batch), got {value}")
  dtype = jnp.dtype(query.dtype)
  if dtype not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
    raise NotImplementedError(
        f"flash_jax on GPU: `query`, `key` and `value` must be float16 or bfloat16 on GPU, got "
        f"{dtype.name}")
  unsupported = [name for name in config.operands if name not in _KERNEL_OPERANDS]
  if unsupported:
    raise NotImplementedError(
        f"flash_jax on GPU: the CUDA kernels do not support {', '.join(unsupported)} yet; "
        f"expected operands among {list(_KERNEL_OPERANDS)}, got {list(config.operands)}")
  if config.dropout_rate > 0:
    raise NotImplementedError(
        f"flash_jax on GPU: `dropout_rate` must be 0 with the CUDA kernels for now, got "
        f"{config.dropout_rate}")
  _require_kernels()


# Optional operands the kernels take, in the order of the custom calls' operands after the
# tensors. Each is always passed (an absent one as an empty int32 [0] array, with the matching
# has_* attribute False) so that the FFI handlers have one fixed signature. After the API's
# normalisation they are int32 with the full batch: [b] lengths, [b, sq] / [b, sk] segment ids.
_KERNEL_OPERANDS = ("q_lengths", "kv_lengths", "q_segment_ids", "kv_segment_ids")


def _mask_operands(config: AttentionConfig, optional):
  """(operands, attributes) of the masks for the custom calls."""
  given = dict(zip(config.operands, optional))
  absent = jnp.zeros((0,), jnp.int32)
  operands = [given[name].astype(jnp.int32) if name in given else absent
              for name in _KERNEL_OPERANDS]
  attributes = dict(
      has_q_lengths="q_lengths" in given,
      has_kv_lengths="kv_lengths" in given,
      has_segment_ids="q_segment_ids" in given,
  )
  return operands, attributes


def _head_dim_bucket(head_dim: int) -> int:
  return next(bucket for bucket in _HEAD_DIM_BUCKETS if head_dim <= bucket)


def _pad_head_dim(x, head_dim: int):
  if x.shape[-1] == head_dim:
    return x
  return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, head_dim - x.shape[-1]),))


def _aligned_head_dim(head_dim: int) -> int:
  # Zero columns leave q.k, rowsum(dout * out) and the first head_dim output columns unchanged.
  return -(-head_dim // _HEAD_DIM_ALIGNMENT) * _HEAD_DIM_ALIGNMENT


def _num_sms() -> int:
  devices = _cuda_devices()
  return getattr(devices[0], "core_count", _DEFAULT_NUM_SMS) if devices else _DEFAULT_NUM_SMS


def num_splits(batch: int, heads: int, seq_q: int, seq_k: int, head_dim_padded: int,
               num_sms: int | None = None) -> int:
  """How many CTAs share the keys of one (batch, head, query block) tile in the forward.

  Splitting fills an otherwise idle GPU (decoding shapes: few query rows, small batch * heads,
  long keys); the split count is the smallest that reaches 85% of the best wave efficiency.
  """
  num_sms = _num_sms() if num_sms is None else num_sms
  block_n = 256 if head_dim_padded <= 64 else 128 if head_dim_padded <= 128 else 64
  work = batch * heads * -(-seq_q // _SPLIT_BLOCK_M)
  key_blocks = -(-seq_k // block_n)
  if work >= 0.8 * num_sms or key_blocks < 2:
    return 1
  efficiency = {}
  for splits in range(1, min(_MAX_SPLITS, num_sms, key_blocks) + 1):
    # More splits with the same keys per split would only add combine work.
    if splits > 1 and -(-key_blocks // splits) == -(-key_blocks // (splits - 1)):
      continue
    waves = work * splits / num_sms
    efficiency[splits] = waves / math.ceil(waves)
  best = max(efficiency.values())
  return min(s for s, e in efficiency.items() if e >= 0.85 * best)


def _common_attributes(config: AttentionConfig) -> dict:
  # Exact types: the handlers bind float (f32), int64_t and bool attributes, and a mismatch would
  # only surface when the executable runs.
  return dict(
      softmax_scale=np.float32(config.softmax_scale),
      causal=bool(config.causal),
      causal_top_left=bool(config.causal_top_left),
      window_left=np.int64(config.window_left),
      window_right=np.int64(config.window_right),
      softcap=np.float32(config.softcap),
  )


def fwd_cuda(query, key, value, *optional, config: AttentionConfig):
  """(out, lse) from the forward kernel; the split-KV workspace outputs are dropped."""
  _check_supported(query, key, config)
  masks, mask_attributes = _mask_operands(config, optional)
  batch, seq_q, heads, head_dim = query.shape
  seq_k = key.shape[1]
  aligned = _aligned_head_dim(head_dim)
  query, key, value = (_pad_head_dim(x, aligned) for x in (query, key, value))
  bucket = _head_dim_bucket(aligned)
  splits = num_splits(batch, heads, seq_q, seq_k, bucket)
  if splits > 1:
    workspace = [
        jax.ShapeDtypeStruct((splits, batch, heads, seq_q, bucket), jnp.float32),
        jax.ShapeDtypeStruct((splits, batch, heads, seq_q), jnp.float32),
    ]
  else:
    workspace = [jax.ShapeDtypeStruct((0,), jnp.float32)] * 2
  call = jax.ffi.ffi_call(
      FWD_TARGET,
      [jax.ShapeDtypeStruct(query.shape, query.dtype),
       jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32), *workspace])
  out, lse, _, _ = call(query, key, value, *masks, num_splits=np.int64(splits),
                        **mask_attributes, **_common_attributes(config))
  return out[..., :head_dim], lse


def bwd_cuda(query, key, value, out, lse, dout, dlse, *optional, config: AttentionConfig):
  """(dq, dk, dv) from the backward kernel; for GQA the per-query-head dk/dv are summed here."""
  _check_supported(query, key, config)
  masks, mask_attributes = _mask_operands(config, optional)
  batch, seq_q, heads, head_dim = query.shape
  seq_k, kv_heads = key.shape[1], key.shape[2]
  aligned = _aligned_head_dim(head_dim)
  query, key, value, out, dout = (_pad_head_dim(x, aligned)
                                  for x in (query, key, value, out, dout))
  seq_q_padded = -(-seq_q // _BWD_SEQLEN_Q_PAD_MULTIPLE) * _BWD_SEQLEN_Q_PAD_MULTIPLE
  dkv = jax.ShapeDtypeStruct((batch, seq_k, heads, aligned), key.dtype)
  call = jax.ffi.ffi_call(
      BWD_TARGET,
      [jax.ShapeDtypeStruct(query.shape, query.dtype), dkv, dkv,
       jax.ShapeDtypeStruct((batch, heads, seq_q_padded, _head_dim_bucket(aligned)), jnp.float32),
       jax.ShapeDtypeStruct((batch, heads, seq_q_padded), jnp.float32)])
  dq, dk, dv, _, _ = call(query, key, value, out, lse, dout, dlse, *masks,
                          deterministic=bool(config.deterministic), **mask_attributes,
                          **_common_attributes(config))
  if kv_heads != heads:
    group = heads // kv_heads

    def reduce_group(x):
      x = x.reshape(batch, seq_k, kv_heads, group, aligned).astype(jnp.float32)
      return x.sum(axis=3).astype(key.dtype)

    dk, dv = reduce_group(dk), reduce_group(dv)
  return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]


_primitives.register_implementation(fwd_cuda, bwd_cuda, platform="cuda")
