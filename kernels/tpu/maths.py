"""The maths of one chunk of one value head, on 2-D values: what the Mosaic TPU kernels run.

Pure functions of arrays (no refs, no Pallas), so the same code runs inside the kernels, under
plain `jax.jit` in the tests, and under `jax.vjp`: the backward kernel differentiates
`chunk_forward` in-kernel, so the two passes cannot disagree and every gradient of the gate sums
goes through the transposed 0/1 sum matrices (no difference of large running sums anywhere).

Only what Mosaic TPU lowers is used: 2-D `dot_general` (plain, A B^T, A^T B), elementwise ops,
iota masks, reductions, static slices and concatenations at (8, 128)-aligned offsets. Mosaic has
no cumsum and no triangular solve: gate sums are products with 0/1 matrices and the inverse of
the unit lower-triangular I + A is block doubling by matmuls. A row [1, C] becomes a column
[C, 1] (and back) by a masked reduction against the identity, not a transpose.

Precision (`Numerics`): the data products take operands in `operand` dtype (bfloat16 for 16-bit
inputs: one MXU pass with float32 accumulation; float32 at HIGHEST otherwise). Sums of gates by
0/1 matrices split the float32 gates into three bfloat16 parts ("mask" products: three exact
passes whose float32 sum is the gate sum to float32 rounding), and the inverse multiplies
float32 by float32 in three bfloat16 passes ("x3", ~2^-16 relative) in the 16-bit mode.

Legend: C steps per chunk (Ct tokens of n steps), Kp, Vp key and value dims padded to 128.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
BF16 = jnp.bfloat16
_HI = lax.Precision.HIGHEST
# Log-gates are clamped here: e^-8192 is 0 in float32 like e^-inf, -8192 is exact in bfloat16,
# and sums over a chunk stay finite, so g = -inf needs no special case (its gradient is 0, as
# the derivative of e^g at -inf).
GATE_FLOOR = -8192.0

NN = ((1,), (0,))
NT = ((1,), (1,))
TN = ((0,), (0,))


@dataclasses.dataclass(frozen=True)
class Numerics:
  """operand: dtype of the data products' operands ("bfloat16" or "float32").

  inverse: passes of the inverse's products in the bfloat16 mode: "x3" (three bfloat16
  passes, ~2^-16 relative) or "bfloat16" (one pass; ~55% fewer MXU FLOPs at chunk 64, less
  accurate: for tuning on a device).
  """
  operand: str = "bfloat16"
  inverse: str = "x3"

  @property
  def f32(self) -> bool:
    return self.operand == "float32"


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Static description of a chunk: Ct tokens of n steps (C = Ct * n), gate kind, q/k loading.

  packed: segments are given (documents start inside chunks).
  """
  Ct: int
  n: int
  gate: str | None
  scale: float
  l2norm: bool
  numerics: Numerics = Numerics()
  packed: bool = False

  @property
  def C(self) -> int:
    return self.Ct * self.n


# --------------------------------------------------------------------------------------------
# Products.

def _dot(a, b, dims, precision=None):
  return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=F32)


def mm(a, b, dims, nm: Numerics):
  """A data product: operands in nm.operand, float32 accumulation."""
  if nm.f32:
    return _dot(a.astype(F32), b.astype(F32), dims, _HI)
  return _dot(a.astype(BF16), b.astype(BF16), dims)


def _split3(x):
  """x (float32) as three bfloat16 parts whose float32 sum is x exactly (finite x)."""
  hi = x.astype(BF16)
  r = x - hi.astype(F32)
  mid = r.astype(BF16)
  lo = (r - mid.astype(F32)).astype(BF16)
  return hi, mid, lo


def mm_mask(m, x, dims, nm: Numerics):
  """m (0/1 entries, exact in bfloat16) times float32 x, to float32 rounding of the sums."""
  if nm.f32:
    return _dot(m.astype(F32), x.astype(F32), dims, _HI)
  m = m.astype(BF16)
  hi, mid, lo = _split3(x)
  return _dot(m, hi, dims) + _dot(m, mid, dims) + _dot(m, lo, dims)


def mm_x3(a, b, dims, nm: Numerics):
  """float32 by float32 in three bfloat16 passes (hi*hi + hi*lo + lo*hi), ~2^-16 relative."""
  if nm.f32:
    return _dot(a.astype(F32), b.astype(F32), dims, _HI)
  ah = a.astype(BF16)
  al = (a - ah.astype(F32)).astype(BF16)
  bh = b.astype(BF16)
  bl = (b - bh.astype(F32)).astype(BF16)
  return _dot(ah, bh, dims) + _dot(ah, bl, dims) + _dot(al, bh, dims)


# --------------------------------------------------------------------------------------------
# Masks and layout changes.

def iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def f01(mask):
  """A bool mask as float32 0/1, by a select (Mosaic rejects some i1 -> i8 extensions)."""
  return jnp.where(mask, 1.0, 0.0).astype(F32)


def row_to_col(x):
  """[1, C] -> [C, 1], by a masked reduction (no transpose)."""
  C = x.shape[1]
  return jnp.sum(jnp.where(iota((C, C), 0) == iota((C, C), 1), x, 0.0), axis=1, keepdims=True)


def col_to_row(x):
  """[C, 1] -> [1, C]."""
  C = x.shape[0]
  return jnp.sum(jnp.where(iota((C, C), 0) == iota((C, C), 1), x, 0.0), axis=0, keepdims=True)


def readout_rows(Ct: int, n: int, C: int):
  """[Ct, C] int: the step index of each token's read-out (its last step), broadcast."""
  return iota((Ct, C), 0) * n + (n - 1)


# --------------------------------------------------------------------------------------------
# q and k as every implementation loads them (deltajax.core.inputs): float32, L2-normalised
# over K if asked (eps 1e-6), q scaled. Padded lanes are zero and change no norm.

def load_k(x, l2norm: bool):
  x = x.astype(F32)
  if l2norm:
    x = x * lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + 1e-6)
  return x


# --------------------------------------------------------------------------------------------
# The inverse.

def unit_lower_inverse(A, nm: Numerics):
  """(I + A)^-1 for A [C, C] strictly lower triangular, C a power of two.

  Block doubling: with P the inverse of the block diagonal of I + A at block size b, the
  inverse at 2b is P - P A_b P, where A_b keeps A's lower-left b x b block inside each 2b x 2b
  diagonal block ([[L11, 0], [L21, L22]]^-1 = [[X11, 0], [-X22 L21 X11, X22]]). Every
  intermediate is a block of the true inverse (no Neumann powers of A, which overflow on nearly
  parallel keys). The first round (b = 1) is I - A_1, no product; then 2 log2(C) - 2 products.
  """
  C = A.shape[0]
  i, j = iota((C, C), 0), iota((C, C), 1)
  eye = f01(i == j)
  P = eye - jnp.where(((i >> 1) == (j >> 1)) & (i > j), A, 0.0)
  b = 2
  while b < C:
    sh = b.bit_length() - 1
    keep = ((i >> (sh + 1)) == (j >> (sh + 1))) & (((i >> sh) & 1) == 1) & (((j >> sh) & 1) == 0)
    A_b = jnp.where(keep, A, 0.0)
    prod = mm if nm.inverse == "bfloat16" else mm_x3
    P = P - prod(P, prod(A_b, P, NN, nm), NN, nm)
    b *= 2
  return P


# --------------------------------------------------------------------------------------------
# Gates.

def _head_gates(g_row, ctx: Chunk):
  """One log-gate per step, g_row [1, C] (0 on every step but a token's first).

  Returns (eG [C, 1] e^{sum_{t<=i} g}, eGro [Ct, 1] the same at read-out rows, eRest [C, 1]
  e^{sum_{t>i} g}, D [1, 1] e^{sum g}, E_kk [C, C] e^{sum_{j<t<=i} g} strictly below the
  diagonal, E_qk [Ct, C] e^{sum_{j<t<=ro(i)} g} for j <= ro(i)). Every sum is formed from only
  the terms it covers, as a 0/1 matrix product (all terms <= 0: no cancellation).
  """
  C, Ct, n, nm = ctx.C, ctx.Ct, ctx.n, ctx.numerics
  g_col = row_to_col(g_row)                                        # [C, 1]
  t, j = iota((C, C), 0), iota((C, C), 1)
  terms = jnp.where(t > j, g_col, 0.0)                             # [t, j]: g_t for t > j
  seg = mm_mask(f01(t >= j), terms, NN, nm)               # [i, j]: sum_{j<t<=i} g_t
  g0 = g_col[0:1, :]
  G = seg[:, 0:1] + g0
  rest = row_to_col(seg[C - 1:C, :])
  D = seg[C - 1:C, 0:1] + g0
  lower = t > j
  E_kk = jnp.where(lower, jnp.exp(jnp.where(lower, seg, 0.0)), 0.0)
  if n == 1:
    seg_ro, G_ro = seg, G
  else:
    ro = readout_rows(Ct, n, C)
    R = f01(iota((Ct, C), 1) <= ro)                       # [i, t]: t <= ro(i)
    seg_ro = mm_mask(R, terms, NN, nm)
    G_ro = seg_ro[:, 0:1] + g0
  upto = iota((Ct, C), 1) <= readout_rows(Ct, n, C)
  E_qk = jnp.where(upto, jnp.exp(jnp.where(upto, seg_ro, 0.0)), 0.0)
  return jnp.exp(G), jnp.exp(G_ro), jnp.exp(rest), jnp.exp(D), E_kk, E_qk


def _level_sums(g, nm: Numerics):
  """Per-channel gate sums for the hierarchical scores, g [C, K].

  For each level b = C/2, ..., 1 (blocks of 2b steps split in halves of b): for a step i in an
  upper half, the sum of g over (m, i]; for j in a lower half, over (j, m]; m is the last step
  of the lower half. Returns a list of (upper [C, 1] bool, E [C, K] those sums).
  """
  C = g.shape[0]
  i, t = iota((C, C), 0), iota((C, C), 1)
  out = []
  b = C // 2
  while b >= 1:
    sh = b.bit_length() - 1
    upper_i = ((i >> sh) & 1) == 1
    m = ((i >> (sh + 1)) << (sh + 1)) + (b - 1)                    # m of row i's 2b-block
    M = jnp.where(upper_i, f01((t > m) & (t <= i)), f01((t > i) & (t <= m)))
    E = mm_mask(M, g, NN, nm)
    upper = ((iota((C, 1), 0) >> sh) & 1) == 1
    out.append((b, upper, E))
    b //= 2
  return out


def channel_scores(k, q, g, nm: Numerics):
  """Per-channel gated scores, exact for any gate in (-inf, 0].

  KK_ij = sum_d k_id k_jd e^{sum_{j<t<=i} g_td} (i > j) and QK_ij likewise with q_i (i >= j).
  Every pair i > j meets at exactly one level b: i in the upper and j in the lower half of one
  2b-block, whose split point m gives e^{G_i - G_j} = e^{sum_(m,i] g} e^{sum_(j,m] g}, both
  factors <= 1. So each level is one [2C, K] x [K, C] product of factors that cannot overflow,
  log2(C) of them; the diagonal of QK is q_i . k_i.
  """
  C = k.shape[0]
  i, j = iota((C, C), 0), iota((C, C), 1)
  KK = jnp.zeros((C, C), F32)
  QK = jnp.where(i == j, jnp.sum(q * k, axis=1, keepdims=True), 0.0)
  for b, upper, E in _level_sums(g, nm):
    sh = b.bit_length() - 1
    e = jnp.exp(jnp.minimum(E, 0.0))
    left = jnp.where(upper, e, 0.0)
    right = jnp.where(upper, 0.0, k * e)
    s = mm(jnp.concatenate([k * left, q * left], axis=0), right, NT, nm)   # [2C, C]
    pair = ((i >> (sh + 1)) == (j >> (sh + 1))) & (((i >> sh) & 1) == 1) & (((j >> sh) & 1) == 0)
    KK = KK + jnp.where(pair, s[:C], 0.0)
    QK = QK + jnp.where(pair, s[C:], 0.0)
  return KK, QK


# --------------------------------------------------------------------------------------------
# One chunk.

def chunk_forward(q, k, v, beta, g, S, seg, ctx: Chunk):
  """One chunk of one value head: the WY preparation and the state step, fused.

  Args:
    q: [Ct, Kp] raw (not normed or scaled); k: [C, Kp]; v: [C, Vp]; beta: [1, C] float32;
      g: None, [1, C] (one log-gate per step) or [C, Kp] (per channel; n == 1).
    S: [Kp, Vp] float32, the state entering the chunk.
    seg: None, or (seg_col [C, 1], seg_row [1, C], seg_tok [Ct, 1]) float32 segment ids
      (deltajax.core.documents.ChunkDocuments.segment per step and per token).
  Returns:
    o [Ct, Vp], S_next [Kp, Vp] (before any S_add), V_new [C, Vp]; float32.
  """
  C, Ct, nm = ctx.C, ctx.Ct, ctx.numerics
  Kp = k.shape[1]
  qf = load_k(q, ctx.l2norm) * ctx.scale
  kf = load_k(k, ctx.l2norm)
  vf = v.astype(F32)
  beta_col = row_to_col(beta)
  i, j = iota((C, C), 0), iota((C, C), 1)
  upto = iota((Ct, C), 1) <= readout_rows(Ct, ctx.n, C)
  q_ro = qf

  if ctx.gate == "channel":
    gg = jnp.maximum(g, GATE_FLOOR)
    KK, QK = channel_scores(kf, qf, gg, nm)
    G = mm_mask(f01(i >= j), gg, NN, nm)
    rest = mm_mask(f01(j > i), gg, NN, nm)
    eG = eG_ro = jnp.exp(G)
    eRest = jnp.exp(rest)
    D = row_to_col(jnp.exp(G[C - 1:C, :]))                           # [Kp, 1]
  else:
    KK = jnp.where(i > j, mm(kf, kf, NT, nm), 0.0)
    QK = jnp.where(upto, mm(q_ro, kf, NT, nm), 0.0)
    if ctx.gate == "head":
      eG, eG_ro, eRest, D, E_kk, E_qk = _head_gates(jnp.maximum(g, GATE_FLOOR), ctx)
      KK, QK = KK * E_kk, QK * E_qk
    else:
      eG = eG_ro = eRest = None
      D = None

  first = first_ro = last = None
  if seg is not None:
    seg_col, seg_row, seg_tok = seg
    KK = jnp.where(seg_col == seg_row, KK, 0.0)
    QK = jnp.where(seg_tok == seg_row, QK, 0.0)
    first, first_ro = seg_col == 0.0, seg_tok == 0.0
    last = seg_col == seg_col[C - 1:C, :]
    boundary = seg_col[C - 1:C, :] > 0.0                              # [1, 1]
    D = jnp.where(boundary, 0.0, 1.0 if D is None else D)

  A = beta_col * KK
  P = unit_lower_inverse(A, nm)
  Kg = kf if eG is None else kf * eG
  WU = mm(P, jnp.concatenate([beta_col * Kg, beta_col * vf], axis=1), NN, nm)
  W, U = WU[:, :Kp], WU[:, Kp:]
  Qg = qf if eG_ro is None else qf * eG_ro
  Kd = kf if eRest is None else kf * eRest
  if first is not None:
    W = jnp.where(first, W, 0.0)
    Qg = jnp.where(first_ro, Qg, 0.0)
    Kd = jnp.where(last, Kd, 0.0)
  WQS = mm(jnp.concatenate([W, Qg], axis=0), S, NN, nm)           # [C + Ct, Vp]
  v_new = U - WQS[:C]
  o = WQS[C:] + mm(QK, v_new, NN, nm)
  S_decayed = S if D is None else D * S
  S_next = S_decayed + mm(Kd, v_new, TN, nm)
  return o, S_next, v_new
