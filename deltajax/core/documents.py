"""Packed documents as per-token flags, the picture every implementation works from.

Documents never move: token t of stream b stays at (b, t) whatever the packing. A document
boundary is a flag on the token that starts it; the state resets there (as a decay to zero
would) and, with initial states, loads the document's own. So a chunked implementation keeps
ceil(T / C) chunks per stream whatever the number of documents, and masks the pairs of tokens
that belong to different documents inside a chunk.

`cu_seqlens` comes in two forms:
  [N + 1]      the flash-linear-attention convention: one stream (B = 1) of N documents.
  [B, S + 1]   per stream, S documents each (pad with T: empty documents), numbered row-major,
               so document s of stream b is state row b * S + s (N = B * S).
Both are non-decreasing from 0 to T; a repeated boundary is an empty document, whose final
state is its initial state.

Legend: B streams, T tokens, N documents.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Documents:
  """Where documents start and end.

  Attributes:
    reset: [B, T] bool, the token starts a document (always True at t = 0).
    doc: [B, T] int32, the document of each token (its row of the initial/final states).
    stream, first, last: [N] int32, each document's stream and its first and last token
      (first = last + 1 for an empty document, which has no tokens).
    N: the number of documents (static).
  """
  reset: jax.Array
  doc: jax.Array
  stream: jax.Array
  first: jax.Array
  last: jax.Array
  N: int = dataclasses.field(metadata=dict(static=True))

  @property
  def empty(self) -> jax.Array:
    """[N] bool: the document has no tokens."""
    return self.last < self.first


def from_cu_seqlens(cu_seqlens, B: int, T: int) -> Documents:
  """Documents from `cu_seqlens` [N + 1] (B = 1) or [B, S + 1] (see the module docstring)."""
  cu = jnp.asarray(cu_seqlens, jnp.int32)
  if cu.ndim == 1:
    cu = cu[None]
  S = cu.shape[1] - 1
  t = jnp.arange(T, dtype=jnp.int32)
  # A token's document is the last one starting at or before it (empty ones start and end at
  # the same boundary, so the non-empty one after them wins).
  local = jax.vmap(lambda c: jnp.searchsorted(c[:-1], t, side="right") - 1)(cu)
  local = jnp.clip(local, 0, S - 1).astype(jnp.int32)
  row = jnp.arange(B, dtype=jnp.int32)[:, None]
  reset = jnp.zeros((B, T + 1), bool).at[row, cu[:, :-1]].set(True)[:, :T]
  return Documents(
      reset=reset,
      doc=row * S + local,
      stream=jnp.repeat(jnp.arange(B, dtype=jnp.int32), S),
      first=cu[:, :-1].reshape(-1),
      last=cu[:, 1:].reshape(-1) - 1,
      N=B * S)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkDocuments:
  """Documents seen through chunks of Ct tokens (stream-major).

  Attributes:
    start: [B, nc] bool, the chunk's first token starts a document: the state entering the
      chunk is that document's initial state (zeros without one), not the previous chunk's.
    seq: [B, nc] int32, that document (the row of the initial states to load).
    segment: [B, nc, Ct] int32, the segment of each token inside its chunk: 0 for the tokens
      that continue the state entering the chunk, +1 at every document start after position 0.
      Pairs of tokens in different segments never interact; the state leaving the chunk is
      that of its last segment.
  """
  start: jax.Array
  seq: jax.Array
  segment: jax.Array


def _by_chunks(x, Ct: int, nc: int, mode: str = "constant"):
  """[B, T, ...] -> [B, nc, Ct, ...], the tail padded."""
  B, T = x.shape[:2]
  x = jnp.pad(x, [(0, 0), (0, nc * Ct - T)] + [(0, 0)] * (x.ndim - 2), mode=mode)
  return x.reshape(B, nc, Ct, *x.shape[2:])


def chunk_documents(docs: Documents, Ct: int, nc: int) -> ChunkDocuments:
  reset = _by_chunks(docs.reset, Ct, nc)
  doc = _by_chunks(docs.doc, Ct, nc, mode="edge")
  segment = jnp.cumsum(reset.at[..., 0].set(False), axis=-1, dtype=jnp.int32)
  return ChunkDocuments(start=reset[..., 0], seq=doc[..., 0], segment=segment)
