"""Forward and backward on a few tiny odd shapes, for compute-sanitizer on a GPU machine:

  compute-sanitizer --tool memcheck --error-exitcode 3 python tools/sanitize_shapes.py

Odd head dims (padded to a bucket), sequence tails, GQA, causal in both directions of
seq_q != seq_k, a decoding shape that takes the split-KV path, and sequence lengths and segment
ids (including a length of 0 and ids that match no key).
"""

import jax
import jax.numpy as jnp

import flash_jax

SHAPES = [  # batch, seq_q, seq_k, heads, kv_heads, head_dim, causal
    (1, 3, 17, 3, 1, 40, False),
    (2, 17, 5, 4, 2, 59, True),
    (1, 33, 65, 2, 2, 96, True),
    (1, 1, 700, 4, 1, 128, False),
    (2, 9, 130, 2, 1, 256, True),
]


def main():
  for batch, seq_q, seq_k, heads, kv_heads, head_dim, causal in SHAPES:
    keys = jax.random.split(jax.random.key(seq_q * 1000 + seq_k), 4)
    q = jax.random.normal(keys[0], (batch, seq_q, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, seq_k, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, seq_k, kv_heads, head_dim), jnp.bfloat16)
    dout = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    masks = {
        "plain": {},
        "lengths": dict(q_lengths=jnp.arange(batch, dtype=jnp.int32) * seq_q // 2,
                        kv_lengths=jnp.full((batch,), seq_k - 1, jnp.int32)),
        "segments": dict(q_segment_ids=jnp.arange(seq_q)[None].repeat(batch, 0) % 3,
                         kv_segment_ids=(jnp.arange(seq_k)[None].repeat(batch, 0) * 7) % 4),
    }
    for name, kwargs in masks.items():
      out, vjp = jax.vjp(lambda q, k, v: flash_jax.attention(q, k, v, causal=causal, **kwargs),
                         q, k, v)
      grads = vjp(dout)
      jax.block_until_ready((out, grads))
      print(f"ok b={batch} sq={seq_q} sk={seq_k} h={heads}/{kv_heads} d={head_dim} "
            f"causal={causal} {name}")


if __name__ == "__main__":
  main()
