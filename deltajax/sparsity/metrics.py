"""Sparsity metrics as pure functions of arrays: scalars that work under `jit`, `vmap` and `scan`.

Densities are fractions of non-zero entries (float32 in [0, 1]); MAC counts assume each non-zero
entry of a layer's output costs `fan_out` multiply-accumulates in the next layer (a dense layer
with N outputs has fan-out N; a KxK convolution with C_out channels has K*K*C_out).
"""
from __future__ import annotations

import jax.numpy as jnp


def nonzero_count(x) -> jnp.ndarray:
  """Number of non-zero entries of x (any shape), float32 scalar (exact below 2**24)."""
  return jnp.sum(x != 0, dtype=jnp.float32)


def density(x) -> jnp.ndarray:
  """Fraction of non-zero entries of x (any shape), float32 scalar."""
  return jnp.mean(x != 0, dtype=jnp.float32)


def delta_density(delta, time_axis: int = 1) -> jnp.ndarray:
  """Fraction of non-zero temporal deltas, the first frame excluded (it is sent dense).

  delta: [B, T, ...] with time on `time_axis`; T == 1 gives 0.
  """
  rest = jnp.take(delta, jnp.arange(1, delta.shape[time_axis]), axis=time_axis)
  return density(rest) if rest.size else jnp.zeros((), jnp.float32)


def effective_macs(x, fan_out: int) -> jnp.ndarray:
  """MACs the next layer spends when it skips zeros of x: nonzero(x) * fan_out (float32)."""
  return nonzero_count(x) * jnp.float32(fan_out)


def dense_macs(x, fan_out: int) -> jnp.ndarray:
  """MACs the next layer spends on x without skipping zeros: size(x) * fan_out (float32)."""
  return jnp.float32(x.size) * jnp.float32(fan_out)


def l1_penalty(x, fan_out: int = 1, batch_dims: int = 2) -> jnp.ndarray:
  """fan_out * sum|x| per row, averaged over rows (float32 scalar).

  x: [*rows, *features] with `batch_dims` leading row axes (e.g. [B, T] frames or tokens).
  Weighting by fan-out makes the penalty track the MACs the non-zeros cost downstream; averaging
  over rows keeps it independent of the batch size and the length.
  """
  rows = 1
  for n in x.shape[:batch_dims]:
    rows *= n
  return jnp.float32(fan_out) * jnp.sum(jnp.abs(x.astype(jnp.float32))) / max(rows, 1)
