"""Forward and backward on a few tiny odd shapes, for compute-sanitizer on a GPU machine:

  compute-sanitizer --tool memcheck --error-exitcode 3 python tools/sanitize_shapes.py

Odd head dims (padded to a bucket), sequence tails, GQA, causal in both directions of
seq_q != seq_k, a decoding shape that takes the split-KV path, sequence lengths and segment ids
(including a length of 0 and ids that match no key), and the extras variants' operands: a dense
mask broadcast over batch, a bias broadcast over heads (with its gradient) plus ALiBi, dropout,
and packed variable-length sequences (positions).
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
    (1, 200, 300, 2, 1, 128, True),  # several 128-key blocks of the Hopper kernels, ragged ends
    (1, 40, 160, 2, 1, 64, False),  # keys a multiple of 16: the mask summary's 16-byte loads
]


def operand_variants(keys, batch, seq_q, seq_k, heads):
  """name -> (keyword arguments, names of those that are differentiated too)."""
  return {
      "plain": ({}, ()),
      "lengths": (dict(q_lengths=jnp.arange(batch, dtype=jnp.int32) * seq_q // 2,
                       kv_lengths=jnp.full((batch,), seq_k - 1, jnp.int32)), ()),
      "segments": (dict(q_segment_ids=jnp.arange(seq_q)[None].repeat(batch, 0) % 3,
                        kv_segment_ids=(jnp.arange(seq_k)[None].repeat(batch, 0) * 7) % 4), ()),
      "mask": (dict(mask=jax.random.bernoulli(keys[4], 0.7, (1, heads, seq_q, seq_k))), ()),
      "bias_alibi": (dict(bias=jax.random.normal(keys[5], (batch, 1, seq_q, seq_k)),
                          alibi_slopes=jnp.linspace(0.1, 0.5, heads)), ("bias",)),
      "dropout": (dict(dropout_rate=0.25, dropout_rng=keys[6]), ()),
  }


def run(attention, dout, inputs, kwargs, differentiated):
  """Forward and backward of attention(*inputs, **kwargs) with respect to the inputs and the
  named keyword arguments, blocked until done."""
  fixed = {name: value for name, value in kwargs.items() if name not in differentiated}
  extra = tuple(kwargs[name] for name in differentiated)

  def call(*args):
    return attention(*args[:3], **fixed, **dict(zip(differentiated, args[3:])))

  out, vjp = jax.vjp(call, *inputs, *extra)
  jax.block_until_ready((out, vjp(dout)))


def main():
  for batch, seq_q, seq_k, heads, kv_heads, head_dim, causal in SHAPES:
    keys = jax.random.split(jax.random.key(seq_q * 1000 + seq_k), 7)
    q = jax.random.normal(keys[0], (batch, seq_q, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, seq_k, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, seq_k, kv_heads, head_dim), jnp.bfloat16)
    dout = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    for name, (kwargs, differentiated) in operand_variants(keys, batch, seq_q, seq_k,
                                                           heads).items():
      run(lambda *a, **kw: flash_jax.attention(*a, causal=causal, **kw), dout, (q, k, v), kwargs,
          differentiated)
      print(f"ok b={batch} sq={seq_q} sk={seq_k} h={heads}/{kv_heads} d={head_dim} "
            f"causal={causal} {name}")
    # The same tokens as packed sequences of uneven lengths (the last one cut short).
    cu_q = jnp.array([0, seq_q // 3, seq_q], jnp.int32)
    cu_k = jnp.array([0, (2 * seq_k) // 3, seq_k - 1], jnp.int32)
    run(lambda q, k, v: flash_jax.attention_varlen(
            q, k, v, cu_q, cu_k, max_seqlen_q=seq_q, max_seqlen_k=seq_k, causal=causal),
        dout[0], (q[0], k[0], v[0]), {}, ())
    print(f"ok varlen total_q={seq_q} total_k={seq_k} h={heads}/{kv_heads} d={head_dim} "
          f"causal={causal}")


if __name__ == "__main__":
  main()
