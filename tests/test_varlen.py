"""flash_jax.attention_varlen against one reference_attention call per sequence: values, lse and
gradients with the oracle; causal and windows per sequence, GQA, padding tokens, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from oracle import assert_matches, gpu_devices, gpu_param, reference_vjp, vjp_outputs

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
# Sequence lengths (queries, keys): an empty query sequence, a sequence with no keys (its
# queries see nothing), more queries than keys and the reverse.
CU_Q = np.array([0, 7, 7, 12, 31, 34], np.int32)
CU_K = np.array([0, 9, 13, 13, 24, 40], np.int32)
TOTAL_Q, TOTAL_K = 37, 43  # 3 query and 3 key tokens past the last sequence
MAX_Q, MAX_K = 19, 16


def _inputs(seed, dtype, kv_heads=KV_HEADS, head_dim=HEAD_DIM):
  keys = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
  q = normal(keys[0], (TOTAL_Q, HEADS, head_dim))
  k = normal(keys[1], (TOTAL_K, kv_heads, head_dim))
  v = normal(keys[2], (TOTAL_K, kv_heads, head_dim))
  dout = normal(keys[3], q.shape)
  dlse = jax.random.normal(keys[4], (HEADS, TOTAL_Q), jnp.float32)
  return q, k, v, dout, dlse


def _reference(q, k, v, *, compute_dtype, **kwargs):
  """Packed (out, lse [h, total_q]) from one reference_attention call per sequence; tokens
  outside every sequence (and sequences without keys) get 0 and -inf."""
  out = jnp.zeros(q.shape, q.dtype)
  lse = jnp.full((q.shape[1], q.shape[0]), -jnp.inf, jnp.promote_types(q.dtype, jnp.float32))
  for s in range(len(CU_Q) - 1):
    (q0, q1), (k0, k1) = CU_Q[s:s + 2], CU_K[s:s + 2]
    if q1 == q0 or k1 == k0:
      continue
    o, l = flash_jax.reference_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                         return_lse=True, compute_dtype=compute_dtype, **kwargs)
    out = out.at[q0:q1].set(o[0])
    lse = lse.at[:, q0:q1].set(l[0].astype(lse.dtype))
  return out, lse


def _check(device, dtype, kv_heads=KV_HEADS, head_dim=HEAD_DIM, **kwargs):
  q, k, v, dout, dlse = _inputs(kv_heads + len(kwargs), jnp.dtype(dtype), kv_heads, head_dim)

  def flash(q, k, v):
    return flash_jax.attention_varlen(q, k, v, jnp.asarray(CU_Q), jnp.asarray(CU_K),
                                      max_seqlen_q=MAX_Q, max_seqlen_k=MAX_K, return_lse=True,
                                      **kwargs)

  outputs = jax.jit(lambda p, c: vjp_outputs(flash, p, c))(
      jax.device_put((q, k, v), device), jax.device_put((dout, dlse), device))
  reference = lambda q, k, v, compute_dtype: _reference(q, k, v, compute_dtype=compute_dtype,
                                                        **kwargs)
  ref = reference_vjp(reference, (q, k, v), (dout, dlse), precision="float64")
  base = reference_vjp(reference, (q, k, v), (dout, dlse), precision="input")
  assert_matches(outputs, ref, base)
  return outputs


OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window=(3, 2)),
    "causal_window": dict(causal=True, window=(4, -1)),
    "softcap_alibi_scale": dict(softcap=2.0, alibi_slopes=jnp.linspace(0.1, 0.5, HEADS),
                                softmax_scale=0.5),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_per_sequence_reference(option, dtype):
  _check(jax.devices("cpu")[0], dtype, **OPTIONS[option])


@pytest.mark.parametrize("kv_heads", [1, HEADS], ids=["mqa", "mha"])
def test_kv_head_counts(kv_heads):
  _check(jax.devices("cpu")[0], "float32", kv_heads=kv_heads, causal=True)


@pytest.mark.parametrize("option", [gpu_param(name) for name in OPTIONS])
def test_matches_per_sequence_reference_gpu(option):
  _check(gpu_devices()[0], "bfloat16", **OPTIONS[option])


@pytest.mark.parametrize("option", [gpu_param(name) for name in ("causal", "causal_window")])
def test_head_dim_128_gpu(option):
  """Positions at head dim 128: the Hopper kernels' visibility variant on an H100/H200."""
  _check(gpu_devices()[0], "float16", head_dim=128, **OPTIONS[option])


def test_padding_tokens_and_keyless_sequences():
  out, lse, dq, dk, dv = _check(jax.devices("cpu")[0], "float32", causal=True)
  for rows in (slice(CU_Q[-1], None), slice(CU_Q[2], CU_Q[3])):  # past the end; no keys
    assert bool(jnp.all(out[rows] == 0)) and bool(jnp.all(dq[rows] == 0))
    assert bool(jnp.all(lse[:, rows] == -jnp.inf))
  assert bool(jnp.all(dk[CU_K[-1]:] == 0)) and bool(jnp.all(dv[CU_K[-1]:] == 0))


def test_traced_cu_seqlens_under_jit():
  """cu_seqlens as jit arguments (traced, unchecked) give the same result as concrete ones."""
  q, k, v, _, _ = _inputs(1, jnp.float32)
  run = lambda cu_q, cu_k: flash_jax.attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=MAX_Q,
                                                      max_seqlen_k=MAX_K, causal=True)
  # Not bitwise: XLA compiles the two programs differently (constants folded in one).
  np.testing.assert_allclose(jax.jit(run)(CU_Q, CU_K), run(CU_Q, CU_K), atol=2e-6)


def test_dropout_uses_one_batch_row_over_packed_indices():
  """The documented mask: dropout_mask(rng, 1, heads, total_q, total_k, rate)[0] indexed by
  packed query and key indices, i.e. attention on the packed batch-1 problem."""
  q, k, v, _, _ = _inputs(2, jnp.float32)
  rng = jax.random.key(3)
  out = flash_jax.attention_varlen(q, k, v, CU_Q, CU_K, max_seqlen_q=MAX_Q, max_seqlen_k=MAX_K,
                                   dropout_rate=0.3, dropout_rng=rng)
  seq_ids = lambda cu, total: np.searchsorted(cu[1:], np.arange(total), side="right")
  q_ids, k_ids = seq_ids(CU_Q, TOTAL_Q), seq_ids(CU_K, TOTAL_K)
  mask = (q_ids[:, None] == k_ids[None, :]) & (q_ids[:, None] < len(CU_Q) - 1)
  expected = flash_jax.reference_attention(q[None], k[None], v[None], mask=mask,
                                           dropout_rate=0.3, dropout_rng=rng)[0]
  np.testing.assert_allclose(out, expected, atol=2e-5)
  assert not np.allclose(out, flash_jax.attention_varlen(
      q, k, v, CU_Q, CU_K, max_seqlen_q=MAX_Q, max_seqlen_k=MAX_K), atol=1e-3)


# --- argument errors -------------------------------------------------------------------------


def _call(cu_q=CU_Q, cu_k=CU_K, max_q=MAX_Q, max_k=MAX_K, q_shape=None, **kwargs):
  q, k, v, _, _ = _inputs(0, jnp.float32)
  if q_shape is not None:
    q = jnp.ones(q_shape, jnp.float32)
  return flash_jax.attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                                    **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(cu_q=np.array([1, 7, 37])), r"`cu_seqlens_q` must start at 0, be non-decreasing .* "
                                      r"\(37\), got \[1, 7, 37\]"),
    (dict(cu_k=np.array([0, 9, 5, 40])), r"`cu_seqlens_k` must start at 0, be non-decreasing"),
    (dict(cu_q=np.array([0, 7, 38])), r"`cu_seqlens_q` .* at most at the number of tokens "
                                      r"\(37\), got \[0, 7, 38\]"),
    (dict(cu_q=np.array([0.0, 7.0])), r"`cu_seqlens_q` must be an integer array of shape "
                                      r"\[n_seqs \+ 1\] .* got float32\[2\]"),
    (dict(cu_k=np.array([0])), r"`cu_seqlens_k` must be an integer array .* got int32\[1\]"),
    (dict(cu_k=np.array([[0, 9]])), r"`cu_seqlens_k` must be an integer array .*int32\[1, 2\]"),
    (dict(cu_k=np.array([0, 9, 16])), r"`cu_seqlens_q` and `cu_seqlens_k` must describe the same "
                                      r"number of sequences, got shapes \[6\] and \[3\]"),
    (dict(max_q=18), r"`max_seqlen_q` \(18\) must be at least the longest sequence of "
                     r"`cu_seqlens_q`, got a sequence of 19 tokens"),
    (dict(max_k=15), r"`max_seqlen_k` \(15\) must be at least .* 16 tokens"),
    (dict(max_q=0), r"`max_seqlen_q` must be a positive Python int .* got int 0"),
    (dict(max_k=16.0), r"`max_seqlen_k` must be a positive Python int .* got float 16.0"),
    (dict(q_shape=(1, TOTAL_Q, HEADS, HEAD_DIM)), r"`query` must have rank 3 \[total_tokens, "
                                                  r"heads, head_dim\], got shape \[1, 37"),
    (dict(alibi_slopes=jnp.ones((2, HEADS))), r"`alibi_slopes` must be a float array of shape "
                                              r"\[4\] for attention_varlen .* got shape \[2, 4\]"),
    (dict(window=(-2, 3)), r"`window` sizes must be >= -1"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), r"`dropout_rate` must be in \[0, 1\)"),
])
def test_argument_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _call(**kwargs)


def test_per_sequence_alibi_slopes_not_implemented():
  with pytest.raises(NotImplementedError, match=r"`alibi_slopes` .* got shape \[5, 4\]"):
    _call(alibi_slopes=jnp.ones((len(CU_Q) - 1, HEADS)))


def test_max_seqlen_must_be_static_under_jit():
  with pytest.raises(ValueError, match="`max_seqlen_q` must be a positive Python int"):
    jax.jit(lambda m: _call(max_q=m))(MAX_Q)
