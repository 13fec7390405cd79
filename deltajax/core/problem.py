"""The static description of one op call, and the chunk-size rule.

Every implementation receives the same raw arrays (in the caller's dtypes, q/k neither
normalised nor scaled, q/k with H heads however many value heads there are) and a `Problem`:

  q     [B, T, H, K]              read once per token, after its last Householder step
  k     [B, T, n, H, K]           step j of token t uses k[:, t, j]
  v     [B, T, n, HV, V]
  beta  [B, T, n, HV]
  g     None, [B, T, HV] ("head") or [B, T, HV, K] ("channel"), applied before step 0
  h0    None or [N, HV, K, V]     initial states, any float dtype
  docs  None or `deltajax.core.documents.Documents`

and returns o [B, T, HV, V] in q's dtype and, when asked, the final states [N, HV, K, V] in
float32. Value head i reads query/key head i // G with G = HV // H.

Legend: B streams, T tokens, H query/key heads, HV value heads, K key dim, V value dim,
n Householder steps per token, N sequences (B, or documents when packed).
"""
from __future__ import annotations

import dataclasses

import numpy as np

GATES = (None, "head", "channel")


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def check_chunk_size(chunk_size) -> None:
  """The chunk-size rule: a power of two >= 16 (the block-doubling inverse halves it)."""
  if (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
      or chunk_size < 16 or chunk_size & (chunk_size - 1)):
    raise ValueError(f"chunk_size must be a power of two >= 16; got {chunk_size!r}.")


def tokens_per_chunk(chunk_size: int, n: int) -> int:
  """Tokens in one chunk of `chunk_size` Householder steps: whole tokens only, at least one.

  A chunk holds chunk_size // n tokens, i.e. (chunk_size // n) * n <= chunk_size steps; for n
  a power of two that is exactly chunk_size steps.
  """
  return max(1, chunk_size // n)


@dataclasses.dataclass(frozen=True)
class Problem:
  """Sizes and options of one call; hashable, so it can be a static argument of jit.

  Attributes:
    gate: None, "head" (one log-decay per value head and token) or "channel" (per key channel).
    B, T, H, HV, K, V, n, N: see the module legend.
    packed: documents are given (`cu_seqlens`); states reset at their boundaries.
    scale: the query scale (K ** -0.5 by default).
    use_qk_l2norm: normalise q and k over K before use.
    chunk_size: Householder steps per chunk of the chunkwise paths.
    has_initial_state: h0 is given (else every sequence starts from zeros).
    output_final_state: return the final states.
    dtype: q's dtype name; the output's dtype.
  """
  gate: str | None
  B: int
  T: int
  H: int
  HV: int
  K: int
  V: int
  n: int = 1
  N: int = 0
  packed: bool = False
  scale: float = 1.0
  use_qk_l2norm: bool = False
  chunk_size: int = 64
  has_initial_state: bool = False
  output_final_state: bool = False
  dtype: str = "float32"

  @property
  def G(self) -> int:
    """Value heads per query/key head."""
    return self.HV // self.H

  @property
  def tokens_per_chunk(self) -> int:
    return tokens_per_chunk(self.chunk_size, self.n)

  @property
  def steps_per_chunk(self) -> int:
    return self.tokens_per_chunk * self.n

  @property
  def num_chunks(self) -> int:
    return cdiv(self.T, self.tokens_per_chunk)
