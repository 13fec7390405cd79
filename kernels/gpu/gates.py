"""In-kernel gate and document maths of one chunk: decayed scores and their transposes.

Inside a chunk of C steps, with G the log-decay summed from the chunk start (per head [C] or
per key channel [C, K]) and `same` the pairs of steps in one document segment:

  scores(a, b)_ij  = sum_d a_id b_jd exp(G_id - G_jd)        for j < i (j <= i: `diagonal`)
  apply(M, b)_id   = sum_j M_ij b_jd exp(G_id - G_jd)        (M lower triangular, masked)
  apply_t(M, a)_jd = sum_i M_ij a_id exp(G_id - G_jd)

Per-head gates: one C x C decay matrix exp(G_i - G_j), formed only where i >= j (an exponent
<= 0, so any gate in (-inf, 0] stays finite), times one matmul.

Per-channel gates (KDA) cannot leave the sum over d, so the decay is split into factors
through a reference row r between j and i: exp(G_i - G_r) exp(G_r - G_j), both <= 1. One
reference serves every pair only inside a dyadic block, so the pairs are covered by levels:
at level h (h = C/2, ..., 8) the pairs with i in the second and j in the first half of the same
2h-block, through the last row of the first half (r = 2h floor(i / 2h) + h - 1). Each level is
one [C, K] x [K, C] matmul of the factored operands, masked to its pairs; every pair with
i // 8 > j // 8 is in exactly one level, with factors exp(-|G - G_r|) <= 1, exact for any gate.
The remaining pairs, inside the diagonal 8 x 8 blocks, use the block's row 3 as reference:
exponents stay within +-80 because the caller raises each step's gate to at least
`MIN_CHANNEL_GATE` = -20 (4 steps x 20; e^-20 ~ 2e-9 is below float32's resolution of the
state it scales). The reference rows (3, 7, 11, ... mod 4 = 3) come from one strided TMA copy.

The diagonal (i = j, no decay) is a row-wise dot product, added exactly.

Legend: C steps per chunk, K key dim (padded), P bf16 pieces per operand.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .mosaic import F32, Chip, Operand

MIN_CHANNEL_GATE = -20.0
DIAGONAL_BLOCK = 8
REFERENCE_STRIDE = 4   # reference rows are the rows r with r % 4 == 3
REFERENCE_OFFSET = 3


def levels(C: int) -> list[int]:
  """Half-sizes h of the dyadic levels of the per-channel scores: C/2, ..., 8."""
  out, h = [], C // 2
  while h >= DIAGONAL_BLOCK:
    out.append(h)
    h //= 2
  return out


@dataclasses.dataclass
class ChunkGates:
  """The gates and document segments of one chunk, loaded.

  Attributes:
    chip: the kernel's helpers.
    kind: None, "head" or "channel".
    C: steps per chunk.
    g_rows, g_cols: head gates G [C] along rows / columns (None otherwise), and lo_rows,
      lo_cols the compensation of their running sums (G = g + lo to twice float32's
      precision): G_i - G_j = (g_i - g_j) + (lo_i - lo_j) is then accurate relative to the
      difference, not to |G| (strong gates reach |G| ~ 1e3 in a chunk).
    g: per-channel G [C, K] float32 registers (None otherwise).
    g_refs: SMEM [C / 4, K]: rows 3, 7, 11, ... of G (per-channel only).
    seg_rows, seg_cols: segment ids [C] (float) along rows / columns; None without documents.
    scratch: (a, b) operand buffers [P, C, K] and m, an operand buffer [P, C, C], for the
      factored per-channel operands and masked score matrices.
  """
  chip: Chip
  kind: str | None
  C: int
  g_rows: Any = None
  g_cols: Any = None
  lo_rows: Any = None
  lo_cols: Any = None
  g: Any = None
  g_refs: Any = None
  seg_rows: Any = None
  seg_cols: Any = None
  scratch: Any = None

  # -- masks -------------------------------------------------------------------------------
  def _ij(self):
    shape = (self.C, self.C)
    return self.chip.iota(shape, 0), self.chip.iota(shape, 1)

  def pairs(self, diagonal: bool):
    """bool [C, C]: j < i (j <= i with `diagonal`) and both in the same segment."""
    i, j = self._ij()
    mask = i >= j if diagonal else i > j
    if self.seg_rows is not None:
      shape = (self.C, self.C)
      same = self.chip.to_rows(self.seg_rows, shape) == self.chip.to_cols(self.seg_cols, shape)
      mask = mask & same
    return mask

  def decay(self, diagonal: bool):
    """Head gates: exp(G_i - G_j) on `pairs(diagonal)`, 0 elsewhere; None gates: the mask."""
    mask = self.pairs(diagonal)
    if self.kind is None:
      return jnp.where(mask, 1.0, 0.0).astype(F32)
    shape = (self.C, self.C)
    rows, cols = self.chip.to_rows, self.chip.to_cols
    diff = ((rows(self.g_rows, shape) - cols(self.g_cols, shape))
            + (rows(self.lo_rows, shape) - cols(self.lo_cols, shape)))
    return jnp.exp(jnp.where(mask, diff, -jnp.inf))

  # -- per-channel factors -----------------------------------------------------------------
  def _reference(self, size: int, offset: int):
    """[C, K]: row i holds G at row size * (i // size) + offset (a reference row)."""
    shape = self.g.shape
    rows = self.chip.iota(shape, 0)
    out = None
    for blk in range(self.C // size):
      r = size * blk + offset
      assert r % REFERENCE_STRIDE == REFERENCE_OFFSET, r
      val = self.chip.to_cols(self.chip.cols(self.g_refs.at[r // REFERENCE_STRIDE]), shape)
      out = val if out is None else jnp.where(rows >= size * blk, val, out)
    return out

  def _factors(self):
    """[(row factor [C, K], column factor [C, K], pair mask [C, C])] for every level and the
    diagonal blocks. Row factors scale a_i, column factors b_j."""
    C, shape = self.C, self.g.shape
    rows = self.chip.iota(shape, 0)
    i, j = self._ij()
    out = []
    for h in levels(C):
      e = jnp.exp(-jnp.abs(self.g - self._reference(2 * h, h - 1)))
      second = (rows & (2 * h - 1)) >= h
      out.append((jnp.where(second, e, 0.0), jnp.where(second, 0.0, e),
                  ((i // (2 * h)) == (j // (2 * h))) & ((i & (2 * h - 1)) >= h)
                  & ((j & (2 * h - 1)) < h)))
    d = self.g - self._reference(DIAGONAL_BLOCK, REFERENCE_OFFSET)
    out.append((jnp.exp(d), jnp.exp(-d),
                ((i // DIAGONAL_BLOCK) == (j // DIAGONAL_BLOCK)) & (i > j)))
    return out

  # -- the three products ------------------------------------------------------------------
  def scores(self, a, a_op: Operand, b, b_op: Operand, diagonal: bool):
    """sum_d a_id b_jd exp(G_id - G_jd) on `pairs(diagonal)`: [C, C]. a, b: float32 [C, K]
    registers; a_op, b_op: the same as operands (used by head / no gates)."""
    chip = self.chip
    if self.kind != "channel":
      return chip.mm(a_op, b_op.T) * self.decay(diagonal)
    sa, sb, _ = self.scratch
    total = None
    for row_f, col_f, mask in self._factors():
      part = chip.mm(chip.put(a * row_f, sa), chip.put(b * col_f, sb).T)
      part = jnp.where(mask, part, 0.0)
      total = part if total is None else total + part
    if diagonal:
      i, j = self._ij()
      dot = chip.to_rows(jnp.sum(a * b, axis=1), (self.C, self.C))
      total = jnp.where(i == j, dot, total)
    return jnp.where(self.pairs(diagonal), total, 0.0)

  def _diag(self, M):
    i, j = self._ij()
    return jnp.sum(jnp.where(i == j, M, 0.0), axis=1)

  def apply(self, M, b, b_op: Operand):
    """sum_j M_ij b_jd exp(G_id - G_jd): [C, K]. M [C, C] float32, zero off its pairs."""
    chip = self.chip
    sa, sb, sm = self.scratch
    if self.kind != "channel":
      return chip.mm(chip.put(M * self.decay(True), sm), b_op)
    total = chip.to_rows(self._diag(M), b.shape) * b
    for row_f, col_f, mask in self._factors():
      total = total + row_f * chip.mm(chip.put(jnp.where(mask, M, 0.0), sm),
                                      chip.put(b * col_f, sb))
    return total

  def apply_t(self, M, a, a_op: Operand):
    """sum_i M_ij a_id exp(G_id - G_jd): [C, K] (row j). M as in `apply`."""
    chip = self.chip
    sa, sb, sm = self.scratch
    if self.kind != "channel":
      return chip.mm(chip.put(M * self.decay(True), sm).T, a_op)
    total = chip.to_rows(self._diag(M), a.shape) * a
    for row_f, col_f, mask in self._factors():
      total = total + col_f * chip.mm(chip.put(jnp.where(mask, M, 0.0), sm).T,
                                      chip.put(a * row_f, sa))
    return total


def unit_lower_inverse(chip: Chip, A, ops):
  """(I + A)^-1 for A [C, C] strictly lower triangular, by block doubling.

  Start from the inverse of the 2 x 2 diagonal blocks (I - A restricted to them); at block size
  b, X <- X - X (A * M_b) X with M_b the lower-left b x b block of every 2b x 2b diagonal block:
  [[X1, 0], [L, X2]]^-1 = [[X1, 0], [-X2 L X1, X2]]. Every intermediate is a block of the true
  inverse, so nothing grows beyond it (unlike the Neumann product). Two C x C matmuls per
  level, log2(C) - 1 levels; ops = (a, x, t) operand buffers [P, C, C], P pieces (float32-like
  with P = 2 or 3 whatever the input dtype: the inverse is where precision is lost).
  """
  a_op, x_op, t_op = ops
  C = A.shape[0]
  i, j = chip.iota((C, C), 0), chip.iota((C, C), 1)
  first = ((i // 2) == (j // 2)) & (i > j)
  X = jnp.where(i == j, 1.0, 0.0) - jnp.where(first, A, 0.0)
  b = 2
  while b < C:
    block = ((i // (2 * b)) == (j // (2 * b))) & ((i & (2 * b - 1)) >= b) & ((j & (2 * b - 1)) < b)
    xo = chip.put(X, x_op)
    t = chip.mm(chip.put(jnp.where(block, A, 0.0), a_op), xo)      # (A * M_b) X
    X = X - chip.mm(xo, chip.put(t, t_op))                           # X (A * M_b) X
    b *= 2
  return X
