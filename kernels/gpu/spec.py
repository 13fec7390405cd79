"""The static description every Mosaic GPU kernel of this folder is built from.

Legend: B streams, T steps (tokens x Householder steps, padded to a multiple of C), H q/k heads,
HV value heads (G = HV / H per q/k head), K and V head dims padded to multiples of 64, C steps
per chunk (64: one wgmma row tile), nc = T / C chunks, P bf16 pieces per float32 operand.

Array layouts in HBM (what the kernels read and write):
  q, k      [B, T, H, K]     raw dtype (bf16, f16 or f32), neither normed nor scaled
  v         [B, T, HV, V]    raw dtype
  beta      [B, HV, T]       float32
  G         [B, HV, T] (per head) or [B, T, HV, K] (per channel) float32: the log-decay summed
            from the start of each chunk (gates already raised to MIN_CHANNEL_GATE per channel)
  seg, first, last  [B, T] float32 (packed documents only): the segment of each step inside
            its chunk, whether it reads the state entering its chunk, whether it writes the
            state leaving it
  D         [B, HV, nc, K]   float32: the decay of the state across each chunk (0 where the
            state is replaced inside the chunk or at the next chunk's start)
  h0, final [B, HV, K, V]    float32: the state entering chunk 0 / leaving the last chunk
  S_add     [B, HV, nc, K, V] float32: added to the state leaving each chunk (documents)
  o         [B, T, HV, V]    q's dtype
Every intermediate that a later kernel multiplies with is stored as P bf16 pieces (x = sum of
the pieces; P = 1 for 16-bit inputs, so then it is just bf16), which the next kernel copies
straight into its wgmma operand tiles:
  W, Kd, Qg [B, HV, P, T, K];  U, V_new, dV_direct, dV_new [B, HV, P, T, V]
  h, dSo    [B, HV, nc, P, K, V]: the state entering each chunk, the cotangent of the state
            leaving it
The kernels see these flattened to [B * HV * P, T, .] and [B * HV * nc * P, K, V]: a TMA copy
takes at most 5 strided dimensions once the SMEM tiling has split the last two.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

CHUNK = 64


@dataclasses.dataclass(frozen=True)
class Spec:
  """Sizes and options of one call of the kernels (hashable: a static argument)."""
  B: int
  T: int
  H: int
  HV: int
  K: int
  V: int
  gate: str | None          # None, "head" or "channel"
  packed: bool              # seg/first/last are given
  l2norm: bool              # q and k are L2-normalised in the kernels
  scale: float              # q's scale
  dtype: str                # q/k/v dtype name
  parts: int                # bf16 pieces per float32 operand (1 for 16-bit inputs)
  inverse_parts: int        # bf16 pieces in the unit-lower inverse
  block_v: int              # V columns per program of the state passes
  C: int = CHUNK

  @property
  def G(self) -> int:
    return self.HV // self.H

  @property
  def nc(self) -> int:
    return self.T // self.C

  @property
  def in_dtype(self):
    return jnp.dtype(self.dtype)

  def pieces(self, b, h):
    """The P rows of (stream b, value head h) in a flattened [B * HV * P, T, .] array."""
    return pl.ds((b * self.HV + h) * self.parts, self.parts)

  def state_pieces(self, b, h, c):
    """The P rows of (stream b, value head h, chunk c) in a [B * HV * nc * P, K, V] array."""
    return pl.ds(((b * self.HV + h) * self.nc + c) * self.parts, self.parts)

  def step_shape(self, n: int) -> tuple[int, ...]:
    return (self.B * self.HV * self.parts, self.T, n)

  @property
  def state_shape(self) -> tuple[int, ...]:
    return (self.B * self.HV * self.nc * self.parts, self.K, self.V)

  @property
  def vblocks(self) -> int:
    return self.V // self.block_v
