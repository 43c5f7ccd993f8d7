"""models/matmul.py: x W with a hand-written backward equals autodiff of the plain contraction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.models.matmul import matmul


@pytest.mark.parametrize('w_shape', [(16, 40), (16, 2, 12), (16, 3, 4, 5)])  # a dense, stacked gate/up, heads
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_gradients_equal_autodiff_of_the_einsum(w_shape, dtype):
  dt = jnp.dtype(dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 16)).astype(dt)
  w = jax.random.normal(jax.random.PRNGKey(1), w_shape).astype(dt)
  out_shape = (3, 8) + w_shape[1:]
  t = jax.random.normal(jax.random.PRNGKey(2), out_shape)

  def ours(x, w):
    return jnp.sum(t * jnp.sin(matmul(x, w).astype(jnp.float32)))

  def plain(x, w):
    return jnp.sum(t * jnp.sin(jnp.tensordot(x, w, axes=1).astype(jnp.float32)))

  assert matmul(x, w).shape == out_shape and matmul(x, w).dtype == dt
  np.testing.assert_array_equal(np.asarray(matmul(x, w), np.float32),
                                np.asarray(jnp.tensordot(x, w, axes=1), np.float32))
  for g, h in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
    assert g.dtype == h.dtype == dt
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32),
                               rtol=3e-2 if dtype == 'bfloat16' else 1e-5, atol=1e-5 if dtype == 'float32' else 3e-2)


def test_float32_accumulation_of_bfloat16_inputs_and_mixed_dtypes():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(1), (8, 6)).astype(jnp.bfloat16)
  assert matmul(x, w, jnp.float32).dtype == jnp.float32
  assert matmul(x, w.astype(jnp.float32)).dtype == jnp.float32  # promoted as an einsum would
  gx, gw = jax.grad(lambda x, w: jnp.sum(matmul(x, w, jnp.float32)), (0, 1))(x, w)
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
