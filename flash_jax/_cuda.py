"""CUDA lowering of the attention primitives: the kernels behind XLA FFI custom calls.

Importing this module registers the FFI targets of the compiled extension (when it was built)
and the CUDA implementation of the primitives. The lowering itself needs no extension: it only
emits the custom calls, so `jax.export` and `.lower(lowering_platforms=("cuda",))` work on a
machine without a GPU. Only a process that has CUDA devices but no kernels is refused, with
instructions, instead of falling back silently.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import _dropout
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

def _preload_cuda_runtime():
  """Loads libcudart.so.13 from the nvidia-cuda-runtime wheel when one is importable, so that the
  extension finds it even where its RUNPATH ($ORIGIN/../nvidia/cu13/lib) misses: flash_jax and
  the runtime installed in different site-packages (a venv with system packages, --user)."""
  try:
    spec = importlib.util.find_spec("nvidia")
  except (ImportError, ValueError):
    return
  for root in (spec.submodule_search_locations or ()) if spec else ():
    library = pathlib.Path(root) / "cu13" / "lib" / "libcudart.so.13"
    if library.is_file():
      try:
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
      except OSError:
        continue  # the import below then reports what is missing
      return


_preload_cuda_runtime()

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
  _require_kernels()


# Optional operands of the custom calls, in their order after the tensors, with the dtype the
# kernels read. Each is always passed so that the FFI handlers have one fixed signature: an
# absent one as an empty [0] array. The first four also carry has_* attributes; the others are
# recognised by their rank (csrc/ffi/attention_ffi.cc). Shapes (csrc/flash_jax/params.h):
# [b] lengths, [b, s] segment ids and positions, [b|1, h|1, sq|1, sk|1] mask (uint8) and bias,
# [b|1, h] ALiBi slopes, [b, 2] dropout seeds.
_KERNEL_OPERANDS = {
    "q_lengths": jnp.int32,
    "kv_lengths": jnp.int32,
    "q_segment_ids": jnp.int32,
    "kv_segment_ids": jnp.int32,
    "q_positions": jnp.int32,
    "kv_positions": jnp.int32,
    "mask": jnp.uint8,
    "bias": jnp.float32,
    "alibi_slopes": jnp.float32,
    "dropout_seed": jnp.uint32,
}
# Operands that only the extras kernel variants read (they run without split-KV).
_EXTRAS = ("q_segment_ids", "kv_segment_ids", "q_positions", "kv_positions", "mask", "bias",
           "alibi_slopes", "dropout_seed")
_MASK_CELL = 16


def _kernel_operands(query, key, config: AttentionConfig, optional, expand_bias=False):
  """(operands, attributes) of the optional inputs for the custom calls. expand_bias: pass the
  bias in its full [b, h, sq, sk] shape (the deterministic backward's dbias needs it)."""
  batch, seq_q, heads, _ = query.shape
  seq_k = key.shape[1]
  given = dict(zip(config.operands, optional))
  full_batch = {"q_lengths": (batch,), "kv_lengths": (batch,),
                "q_segment_ids": (batch, seq_q), "kv_segment_ids": (batch, seq_k),
                "q_positions": (batch, seq_q), "kv_positions": (batch, seq_k)}
  operands = []
  for name, dtype in _KERNEL_OPERANDS.items():
    if name not in given:
      operands.append(jnp.zeros((0,), dtype))
      continue
    x = given[name].astype(dtype)
    if name in full_batch:
      x = jnp.broadcast_to(x, full_batch[name])
    elif name == "bias" and expand_bias:
      x = jnp.broadcast_to(x, (batch, heads, seq_q, seq_k))
    operands.append(x)
  attributes = dict(
      has_q_lengths="q_lengths" in given,
      has_kv_lengths="kv_lengths" in given,
      has_segment_ids="q_segment_ids" in given,
      # The mask's threshold from the same function as the CPU path's, in double precision.
      dropout_threshold=np.int64(_dropout.keep_threshold16(config.dropout_rate)
                                 if config.dropout_rate > 0 else 0),
      dropout_scale=np.float32(1.0 / (1.0 - config.dropout_rate)),
  )
  return operands, attributes


def _uses_extras(config: AttentionConfig) -> bool:
  return any(name in config.operands for name in _EXTRAS)


def _mask_tiles(config: AttentionConfig, optional):
  """Workspace of the dense mask's 16 x 16 cell summary (uint8), [0] without a mask."""
  if "mask" not in config.operands:
    return jax.ShapeDtypeStruct((0,), jnp.uint8)
  b, h, rows, cols = optional[config.operands.index("mask")].shape
  return jax.ShapeDtypeStruct((b, h, -(-rows // _MASK_CELL), -(-cols // _MASK_CELL)), jnp.uint8)


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
  operands, attributes = _kernel_operands(query, key, config, optional)
  batch, seq_q, heads, head_dim = query.shape
  seq_k = key.shape[1]
  aligned = _aligned_head_dim(head_dim)
  query, key, value = (_pad_head_dim(x, aligned) for x in (query, key, value))
  bucket = _head_dim_bucket(aligned)
  splits = 1 if _uses_extras(config) else num_splits(batch, heads, seq_q, seq_k, bucket)
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
       jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32), *workspace,
       _mask_tiles(config, optional)])
  out, lse, *_ = call(query, key, value, *operands, num_splits=np.int64(splits), **attributes,
                      **_common_attributes(config))
  return out[..., :head_dim], lse


def bwd_cuda(query, key, value, out, lse, dout, dlse, *optional, config: AttentionConfig):
  """(dq, dk, dv[, dbias]) from the backward kernel; for GQA the per-query-head dk/dv are summed
  here."""
  _check_supported(query, key, config)
  batch, seq_q, heads, head_dim = query.shape
  seq_k, kv_heads = key.shape[1], key.shape[2]
  bias = optional[config.operands.index("bias")] if "bias" in config.operands else None
  # A broadcast bias gathers its gradient with atomics; the deterministic backward gets the full
  # shape instead (plain stores) and sums here, in a fixed order.
  expand_bias = (bias is not None and config.deterministic and bias.shape[3] != 1 and
                 bias.shape != (batch, heads, seq_q, seq_k))
  operands, attributes = _kernel_operands(query, key, config, optional, expand_bias=expand_bias)
  aligned = _aligned_head_dim(head_dim)
  query, key, value, out, dout = (_pad_head_dim(x, aligned)
                                  for x in (query, key, value, out, dout))
  seq_q_padded = -(-seq_q // _BWD_SEQLEN_Q_PAD_MULTIPLE) * _BWD_SEQLEN_Q_PAD_MULTIPLE
  dkv = jax.ShapeDtypeStruct((batch, seq_k, heads, aligned), key.dtype)
  bias_operand = operands[list(_KERNEL_OPERANDS).index("bias")]
  # A bias constant along the keys shifts all logits of a row alike: softmax ignores it and only
  # the lse moves with it, so its gradient is dlse exactly (0 on rows that see no key). Formed
  # here instead of as the kernel's sum of dS over keys, which cancels to rounding noise of
  # rowsum(dout * out) and would serialise on one atomic address per row.
  kernel_dbias = bias is not None and bias.shape[3] != 1
  dbias_shape = jax.ShapeDtypeStruct(bias_operand.shape if kernel_dbias else (0,), jnp.float32)
  call = jax.ffi.ffi_call(
      BWD_TARGET,
      [jax.ShapeDtypeStruct(query.shape, query.dtype), dkv, dkv,
       dbias_shape,
       jax.ShapeDtypeStruct((batch, heads, seq_q_padded, _head_dim_bucket(aligned)), jnp.float32),
       jax.ShapeDtypeStruct((batch, heads, seq_q_padded), jnp.float32),
       _mask_tiles(config, optional)])
  dq, dk, dv, dbias, *_ = call(query, key, value, out, lse, dout, dlse, *operands,
                               deterministic=bool(config.deterministic), **attributes,
                               **_common_attributes(config))
  if kv_heads != heads:
    group = heads // kv_heads

    def reduce_group(x):
      x = x.reshape(batch, seq_k, kv_heads, group, aligned).astype(jnp.float32)
      return x.sum(axis=3).astype(key.dtype)

    dk, dv = reduce_group(dk), reduce_group(dv)
  grads = [dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]]
  if bias is not None:
    if not kernel_dbias:
      dbias = jnp.where(jnp.isfinite(lse), dlse, 0.0)[..., None]
    broadcast_axes = tuple(axis for axis in range(4) if bias.shape[axis] != dbias.shape[axis])
    grads.append(dbias.sum(axis=broadcast_axes, keepdims=True).astype(bias.dtype))
  return tuple(grads)


_primitives.register_implementation(fwd_cuda, bwd_cuda, platform="cuda")
