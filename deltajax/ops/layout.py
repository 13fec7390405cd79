"""Where each token sits when time is cut into chunks, for plain and packed batches.

Every implementation sees the same picture: `B` streams of `nc` chunks of `C` tokens, each chunk
belonging to exactly one sequence. Packed sequences (`cu_seqlens`) are realigned so that every
sequence starts on a chunk boundary; the holes, and the tail of the last chunk, are filled with
identity tokens (k = v = beta = g = 0, which leave the state unchanged). A chunk that starts a
sequence loads that sequence's initial state; a sequence's final state is the state after its
last chunk. With C = 1 this is the token-by-token picture the recurrent reference uses.

Legend: B streams, T tokens, N sequences, nc chunks per stream, C tokens per chunk.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layout:
  """Index arrays of one chunked picture; static sizes in the metadata fields.

  Attributes:
    src: [B, nc * C] int32 token index into the flattened [B * T] input for each slot, or
      B * T (a zero row) for identity padding; None for a plain batch (pad at the end only).
    start: [B, nc] bool, the chunk begins a sequence (load its initial state).
    seq: [B, nc] int32, the sequence each chunk belongs to (row of the initial/final states).
    last_stream, last_chunk: [N] int32, where each sequence's last chunk sits.
  """
  src: Any
  start: jax.Array
  seq: jax.Array
  last_stream: jax.Array
  last_chunk: jax.Array
  T: int = dataclasses.field(metadata=dict(static=True))
  C: int = dataclasses.field(metadata=dict(static=True))
  nc: int = dataclasses.field(metadata=dict(static=True))

  def to_chunks(self, x: jax.Array) -> jax.Array:
    """[B, T, ...] -> [B, nc, C, ...], identity-padded."""
    B = x.shape[0]
    if self.src is None:
      pad = self.nc * self.C - self.T
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    else:
      flat = x.reshape(B * self.T, *x.shape[2:])
      flat = jnp.concatenate([flat, jnp.zeros((1, *x.shape[2:]), x.dtype)])
      x = flat[self.src]
    return x.reshape(B, self.nc, self.C, *x.shape[2:])

  def from_chunks(self, y: jax.Array) -> jax.Array:
    """[B, nc, C, ...] -> [B, T, ...], dropping the padding."""
    B = y.shape[0]
    y = y.reshape(B, self.nc * self.C, *y.shape[3:])
    if self.src is None:
      return y[:, :self.T]
    # Every real token sits in exactly one slot: invert src by a scatter of slot positions.
    slots = jnp.arange(self.nc * self.C, dtype=jnp.int32)
    pos = jnp.zeros((B * self.T + 1,), jnp.int32).at[self.src.reshape(-1)].set(slots)
    return y.reshape(B * self.nc * self.C, *y.shape[2:])[pos[:-1]].reshape(B, self.T, *y.shape[2:])


def make_layout(B: int, T: int, C: int, cu_seqlens=None) -> Layout:
  """Builds the chunked picture of a batch [B, T] (or one packed row with `cu_seqlens`)."""
  if cu_seqlens is None:
    nc = cdiv(T, C)
    chunk = jnp.arange(nc, dtype=jnp.int32)
    return Layout(
        src=None,
        start=jnp.broadcast_to(chunk == 0, (B, nc)),
        seq=jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, nc)),
        last_stream=jnp.arange(B, dtype=jnp.int32),
        last_chunk=jnp.full((B,), nc - 1, jnp.int32),
        T=T, C=C, nc=nc)
  cu = jnp.asarray(cu_seqlens, jnp.int32)
  N = cu.shape[0] - 1
  lengths = cu[1:] - cu[:-1]
  chunks_per_seq = (lengths + C - 1) // C
  first_chunk = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(chunks_per_seq)[:-1]])
  # sum_n ceil(L_n / C) < T / C + N, so this static bound always fits (exact when C == 1).
  nc = T if C == 1 else cdiv(T, C) + N - 1
  chunk = jnp.arange(nc, dtype=jnp.int32)
  seq = jnp.clip(jnp.searchsorted(first_chunk, chunk, side="right") - 1, 0, N - 1)
  seq = seq.astype(jnp.int32)
  slot = jnp.arange(nc * C, dtype=jnp.int32)
  slot_seq = seq[slot // C]
  offset = slot - first_chunk[slot_seq] * C
  src = jnp.where(offset < lengths[slot_seq], cu[slot_seq] + offset, T)
  return Layout(
      src=src[None].astype(jnp.int32),
      start=(first_chunk[seq] == chunk)[None],
      seq=seq[None],
      last_stream=jnp.zeros((N,), jnp.int32),
      last_chunk=(first_chunk + chunks_per_seq - 1).astype(jnp.int32),
      T=T, C=C, nc=nc)
