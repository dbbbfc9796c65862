"""The custom_vjp that ties the forward primitive to the backward primitive.

Residuals are the inputs, the output and the lse (plus the optional operands, which carry the
dropout seed), so the backward recomputes probabilities instead of storing them.
"""

from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name

from flash_jax import _primitives

# Names of the forward's residuals, for jax.checkpoint policies such as
# save_only_these_names(OUT_NAME, LSE_NAME): saving both lets a rematerialised backward skip the
# attention forward entirely.
OUT_NAME = "flash_jax_out"
LSE_NAME = "flash_jax_lse"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(config, query, key, value, *optional):
  """Returns (out, lse); both are differentiable."""
  return tuple(_primitives.attention_fwd(query, key, value, *optional, config=config))


def _forward(config, query, key, value, *optional):
  out, lse = _primitives.attention_fwd(query, key, value, *optional, config=config)
  out, lse = checkpoint_name(out, OUT_NAME), checkpoint_name(lse, LSE_NAME)
  return (out, lse), (query, key, value, out, lse, optional)


def _backward(config, residuals, cotangents):
  query, key, value, out, lse, optional = residuals
  dout, dlse = cotangents
  grads = _primitives.attention_bwd(query, key, value, out, lse, dout.astype(query.dtype), dlse,
                                    *optional, config=config)
  optional_grads = [None] * len(optional)
  if "bias" in config.operands:
    optional_grads[config.operands.index("bias")] = grads[3]
  return (grads[0], grads[1], grads[2], *optional_grads)


flash_attention.defvjp(_forward, _backward)
