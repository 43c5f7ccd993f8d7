"""x W over the last axis of x and the first of W, with a backward pass written for the weight gradient.

Autodiff's weight gradient of y = x W contracts x and dy over their rows (every axis of x but the last) in
place. XLA's CPU backend runs that as a generic dot, or first copies dy, the wider operand, into transposed
order; the same product over an explicit transpose of x goes to its matmul library. In the Quick start's
step the output layer's weight gradient took 27.8 ms that way against 13.6 ms with x transposed
(BENCHMARKS.md). x's transpose is held behind an optimization barrier so XLA does not fold it back into the
dot. It is one path for every backend: a transpose of the activations is a small copy next to the matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def matmul(x: Array, w: Array, out_dtype=None) -> Array:
  """x [..., D] times w [D, ...] -> [..., *w.shape[1:]], accumulated (and returned) in `out_dtype` (None: the
  inputs' result type). Gradients flow to both."""
  dtype = jnp.result_type(x, w)  # as an einsum of the two would compute
  return _matmul(x.astype(dtype), w.astype(dtype), None if out_dtype is None else jnp.dtype(out_dtype))


def _forward(x, w, out_dtype):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, out_dtype):
  return _forward(x, w, out_dtype)


def _matmul_fwd(x, w, out_dtype):
  return _forward(x, w, out_dtype), (x, w)


def _matmul_bwd(out_dtype, residuals, g):
  x, w = residuals
  rows, outs = x.ndim - 1, w.ndim - 1  # g is [*rows, *outs]
  f32 = jnp.float32
  # dx: g against w over w's output axes (w read in place: a matmul with its second operand transposed).
  dx = jax.lax.dot_general(g, w, ((tuple(range(rows, rows + outs)), tuple(range(1, 1 + outs))), ((), ())),
                           preferred_element_type=f32).astype(x.dtype)
  # dw: x^T [D, *rows] against g over the rows, x^T a copy of its own.
  xT = jax.lax.optimization_barrier(jnp.moveaxis(x, -1, 0))
  dw = jax.lax.dot_general(xT, g, ((tuple(range(1, 1 + rows)), tuple(range(rows))), ((), ())),
                           preferred_element_type=f32).astype(w.dtype)
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
