"""One launch of each kernel worth a stall breakdown, for Nsight Compute on a GPU machine:

  XLA_PYTHON_CLIENT_PREALLOCATE=false \
  ncu --kernel-name regex:'fwd_kernel|dkdv_kernel' --launch-count 6 \
      --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
      python tools/profile_kernels.py

Each kernel below is launched exactly once, in this order, so that --launch-count 6 profiles
each of them (a warm-up would be profiled in its place); without preallocation JAX holds little
device memory, which kernel replay saves and restores on every pass:
  1. plain forward, bf16, batch 2, seq 4096, 16 heads, d 128, non-causal (fwd_kernel)
  2. plain backward of the same (dkdv_kernel, atomic dQ)
  3. forward with the segment ids of 2 documents packed in each row (fwd_kernel, extras variant)
  4. backward of the same (dkdv_kernel, extras variant)
  5. forward with dropout 0.1 (fwd_kernel, the dropout-only extras variant)
  6. backward of the same (dkdv_kernel, same variant)
Batch 2 x 16 heads x 32 query blocks fill the 132 SMs several times over: the stall mix is the
steady state of the main loop, as at the benchmark's s16384.
"""

import jax
import jax.numpy as jnp

import flash_jax

BATCH, SEQ, HEADS, HEAD_DIM = 2, 4096, 16, 128


def main():
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (BATCH, SEQ, HEADS, HEAD_DIM)
  q, k, v, dout = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
  ids = (jnp.arange(SEQ, dtype=jnp.int32)[None] >= SEQ // 2).astype(jnp.int32).repeat(BATCH, 0)
  cases = (("plain", {}), ("segment_ids", dict(q_segment_ids=ids, kv_segment_ids=ids)),
           ("dropout", dict(dropout_rate=0.1, dropout_rng=jax.random.key(1))))
  for name, kwargs in cases:
    out, vjp = jax.vjp(lambda q, k, v: flash_jax.attention(q, k, v, **kwargs), q, k, v)
    out = jax.block_until_ready(out)
    # vjp is a pytree: passed as an argument, its residuals are not baked in as constants.
    grads = jax.block_until_ready(jax.jit(lambda vjp, dout: vjp(dout))(vjp, dout))
    print(f"{name}: out {out.shape}, dq {grads[0].shape}", flush=True)


if __name__ == "__main__":
  main()
