"""Solves with unit lower-triangular matrices by matrix products only.

`lax.linalg.triangular_solve` on a batch of small matrices runs at about 1 GFLOP/s on CPU (one
LAPACK call per matrix) and lowers in no Pallas backend; batched 64 x 64 matmuls run at tens of
GFLOP/s everywhere. The inverse of M = I + A (A strictly lower, C x C, C a power of two) is
built from its diagonal blocks upwards: with the inverses X1, X2 of two neighbouring diagonal
blocks of size b and the block L below the first,

    [[B1, 0], [L, B2]]^-1 = [[X1, 0], [-X2 L X1, X2]],

so log2(C) rounds of batched b x b products give M^-1 exactly (no series truncation, so no
overflow on nearly parallel keys, unlike the Neumann product (I - A)(I + A^2)(I + A^4)...).

The Pallas kernels use the same recursion on whole 2-D [C, C] tiles (kernels/*/maths.py), where
full C x C products on the matrix unit beat slicing out the b x b blocks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _diagonal_blocks(x: jax.Array, size: int) -> jax.Array:
  """[..., C, C] -> [..., C // size, size, size], the diagonal blocks."""
  C = x.shape[-1]
  n = C // size
  x = x.reshape(*x.shape[:-2], n, size, n, size)
  return jnp.moveaxis(jnp.diagonal(x, axis1=-4, axis2=-2), -1, -3)


# Blocks up to this size are multiplied as broadcast sums: XLA:CPU runs a batched dot as one
# GEMM call per matrix, which for 4 x 4 blocks costs more than the arithmetic.
_BROADCAST_MATMUL_MAX = 8


def _matmul(x, y, precision):
  if x.shape[-1] <= _BROADCAST_MATMUL_MAX:
    return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)
  return jnp.matmul(x, y, precision=precision)


def invert_unit_lower(A: jax.Array, precision=None) -> jax.Array:
  """(I + A)^-1 for A [..., C, C] strictly lower triangular.

  Any C: other sizes are padded to the next power of two with identity rows, whose inverse
  block is the identity and leaves the top-left C x C block exact.
  """
  C = A.shape[-1]
  if C & (C - 1):
    P = 1 << (C - 1).bit_length()
    A = jnp.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, P - C), (0, P - C)])
    return invert_unit_lower(A, precision)[..., :C, :C]
  X = jnp.ones((*A.shape[:-2], C, 1, 1), A.dtype)      # inverses of the 1 x 1 diagonal blocks
  b = 1
  while b < C:
    pairs = _diagonal_blocks(A, 2 * b)                 # [..., n, 2b, 2b]
    L = pairs[..., b:, :b]                             # block below the first of each pair
    X = X.reshape(*X.shape[:-3], -1, 2, b, b)
    X1, X2 = X[..., 0, :, :], X[..., 1, :, :]
    Y = -_matmul(X2, _matmul(L, X1, precision), precision)
    top = jnp.concatenate([X1, jnp.zeros_like(X1)], axis=-1)
    bottom = jnp.concatenate([Y, X2], axis=-1)
    X = jnp.concatenate([top, bottom], axis=-2)        # [..., n, 2b, 2b]
    b *= 2
  return X[..., 0, :, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def solve_unit_lower(A: jax.Array, rhs: tuple[jax.Array, ...], precision=None):
  """(I + A)^-1 R for every R in rhs; A [..., C, C] strictly lower triangular, R [..., C, N].

  Several right-hand sides share one inverse; they stay separate operands because on CPU two
  products cost less than concatenating them into one wider product.
  """
  Minv = invert_unit_lower(A, precision)
  return tuple(jnp.matmul(Minv, R, precision=precision) for R in rhs)


def _solve_fwd(A, rhs, precision):
  Minv = invert_unit_lower(A, precision)
  X = tuple(jnp.matmul(Minv, R, precision=precision) for R in rhs)
  return X, (Minv, X)


def _solve_bwd(precision, res, dX):
  # X = M^-1 R: dR = M^-T dX and dM = -sum dR X^T, of which only the strict lower part is A's.
  Minv, X = res
  dR = tuple(jnp.einsum("...ji,...jn->...in", Minv, d, precision=precision) for d in dX)
  dA = -sum(jnp.einsum("...in,...jn->...ij", r, x, precision=precision) for r, x in zip(dR, X))
  C = dA.shape[-1]
  return jnp.where(jnp.tril(jnp.ones((C, C), bool), -1), dA, 0.0), dR


solve_unit_lower.defvjp(_solve_fwd, _solve_bwd)
