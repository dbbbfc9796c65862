"""One pytest.raises per validation rule: the error type and a message naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax


def _qkv(q_shape=(2, 8, 4, 16), kv_shape=(2, 8, 2, 16), dtype=jnp.float32, v_shape=None):
  q = jnp.ones(q_shape, dtype)
  k = jnp.ones(kv_shape, dtype)
  v = jnp.ones(v_shape or kv_shape, dtype)
  return q, k, v


def test_wrong_rank():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"`query` must have rank 4 .* got shape \[8, 4, 16\]"):
    flash_jax.attention(q[0], k, v)


def test_mismatched_dtypes():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="must share one dtype.*bfloat16"):
    flash_jax.attention(q, k.astype(jnp.bfloat16), v)


def test_mismatched_batch():
  q, k, v = _qkv(kv_shape=(3, 8, 2, 16))
  with pytest.raises(ValueError, match=r"`key` batch size must equal `query`'s \(2\), got 3"):
    flash_jax.attention(q, k, v)


def test_mismatched_head_dim():
  q, k, v = _qkv(kv_shape=(2, 8, 2, 32))
  with pytest.raises(ValueError, match=r"`key` head_dim must equal `query`'s \(16\), got 32"):
    flash_jax.attention(q, k, v)


def test_key_value_shape_mismatch():
  q, k, v = _qkv(v_shape=(2, 9, 2, 16))
  with pytest.raises(ValueError, match="`key` and `value` must have the same shape"):
    flash_jax.attention(q, k, v)


def test_heads_not_divisible():
  q, k, v = _qkv(q_shape=(2, 8, 5, 16))
  with pytest.raises(ValueError, match=r"heads \(5\) must be a multiple of .* got 2 kv heads"):
    flash_jax.attention(q, k, v)


def test_head_dim_too_large():
  q, k, v = _qkv(q_shape=(1, 4, 1, 264), kv_shape=(1, 4, 1, 264))
  with pytest.raises(NotImplementedError, match="head_dim must be <= 256, got 264"):
    flash_jax.attention(q, k, v)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
def test_integer_dtypes(dtype):
  q, k, v = _qkv(dtype=dtype)
  with pytest.raises(ValueError, match="`query` must have a floating dtype"):
    flash_jax.attention(q, k, v)


@pytest.mark.parametrize("scale", ["0.5", jnp.float32(0.5), True, [0.5]])
def test_non_float_softmax_scale(scale):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="`softmax_scale` must be a Python float"):
    flash_jax.attention(q, k, v, softmax_scale=scale)


def test_traced_softmax_scale():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="`softmax_scale` must be a Python float"):
    jax.jit(lambda s: flash_jax.attention(q, k, v, softmax_scale=s))(0.5)


def test_numpy_scalar_softmax_scale_is_accepted():
  q, k, v = _qkv()
  np.testing.assert_allclose(flash_jax.attention(q, k, v, softmax_scale=np.float32(0.5)),
                             flash_jax.attention(q, k, v, softmax_scale=0.5))


def test_non_bool_flags():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="`causal` must be a Python bool, got str"):
    flash_jax.attention(q, k, v, causal="yes")
  with pytest.raises(ValueError, match="`return_lse` must be a Python bool"):
    flash_jax.attention(q, k, v, return_lse=1)


def test_errors_raise_at_trace_time():
  q, k, v = _qkv(q_shape=(2, 8, 5, 16))
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
  with pytest.raises(ValueError, match="must be a multiple"):
    jax.eval_shape(flash_jax.attention, *shapes)  # abstract values only: nothing runs
