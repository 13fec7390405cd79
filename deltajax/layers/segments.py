"""Packed batches: segment ids [B, T] int32 (0 = padding) -> document starts, positions, cu_seqlens.

A new document starts at t = 0 and wherever the id changes, so padding runs are documents of
their own (their outputs are garbage by design and never reach real tokens). Everything here
is jit-friendly: the number of documents only enters through a static upper bound.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def check_segment_ids(segment_ids, B: int, T: int) -> None:
  """ValueError unless segment_ids is an integer [B, T] array."""
  shape = tuple(np.shape(segment_ids))
  if shape != (B, T):
    raise ValueError(f"segment_ids must have shape [B, T] = {(B, T)}; got {shape}.")
  if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
    raise ValueError(f"segment_ids must be an integer array; got dtype "
                     f"{jnp.result_type(segment_ids)}.")


def starts(segment_ids: jax.Array) -> jax.Array:
  """[B, T] bool: token t begins a document."""
  prev = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  return (segment_ids != prev) | (jnp.arange(segment_ids.shape[1]) == 0)


def positions(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int32: position of each token inside its document (for RoPE)."""
  t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  first = lax.cummax(jnp.where(starts(segment_ids), t, 0), axis=1)
  return t - first


def same_segment_shifted(segment_ids: jax.Array, shift: int) -> jax.Array:
  """[B, T] bool: token t - shift exists and belongs to the same document as token t."""
  if shift == 0:
    return jnp.ones(segment_ids.shape, bool)
  prev = jnp.pad(segment_ids, ((0, 0), (shift, 0)), constant_values=-1)[:, :-shift]
  # The pad value -1 never equals a real id, but ids could be negative: compare positions too.
  return (prev == segment_ids) & (positions(segment_ids) >= shift)


def num_documents(segment_ids: jax.Array) -> jax.Array:
  """[B] int32: documents (padding runs included) in each row."""
  return jnp.sum(starts(segment_ids), axis=1, dtype=jnp.int32)


def cu_seqlens_rows(segment_ids: jax.Array) -> jax.Array:
  """[B, T + 1] int32 per-row document boundaries, padded with T (empty documents).

  T + 1 entries always fit every document of a row, so the shape is fixed under jit.
  """
  B, T = segment_ids.shape
  t = jnp.arange(T, dtype=jnp.int32)
  idx = jnp.sort(jnp.where(starts(segment_ids), t, T), axis=1)
  return jnp.concatenate([idx, jnp.full((B, 1), T, jnp.int32)], axis=1).astype(jnp.int32)
