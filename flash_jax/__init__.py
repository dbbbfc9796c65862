"""flash_jax: FlashAttention for JAX."""

from flash_jax import _cpu
from flash_jax import _cuda  # registers the FFI targets and the CUDA lowering
from flash_jax import _primitives
from flash_jax._api import attention
from flash_jax._dropout import dropout_mask
from flash_jax._jaxnn import dot_product_attention
from flash_jax._ring import inverse_zigzag_permutation
from flash_jax._ring import ring_attention
from flash_jax._ring import zigzag_permutation
from flash_jax._ring import zigzag_shard
from flash_jax._ring import zigzag_unshard
from flash_jax._varlen import attention_varlen
from flash_jax.reference import reference_attention

_primitives.register_implementation(_cpu.attention_fwd, _cpu.attention_bwd)

__all__ = ["attention", "attention_varlen", "dot_product_attention", "dropout_mask",
           "inverse_zigzag_permutation", "reference_attention", "ring_attention",
           "zigzag_permutation", "zigzag_shard", "zigzag_unshard"]
__version__ = "0.1.0"
