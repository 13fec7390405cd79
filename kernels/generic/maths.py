"""In-kernel maths of one chunk, on 2-D float32 values (no refs, no backend specifics).

Only operations every Pallas backend lowers are used: 2-D matmuls (plain, A B^T, A^T B),
elementwise ops, iota masks, reductions and, for per-channel gates, [s, s, K] broadcasts and
one [s*s, K] -> [s, s, K] reshape. No cumsum (Mosaic TPU lacks it: gate sums come from matmuls
by 0/1 triangular or segment matrices, or masked reductions), no triangular_solve (no backend lowers it: the unit-lower-triangular inverse is
built by block doubling), no slicing of values (Triton cannot: row blocks are selected by 0/1
matmuls, exact at HIGHEST precision).

States are held transposed, S^T [V, K], so that the per-key-channel decay scales columns by a
row vector and no kernel needs a transposed vector.

Legend: C chunk length, K key dim, V value dim, s sub-block rows.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST
_F32 = jnp.float32


def _dot(a, b, dims):
  return lax.dot_general(a, b, (dims, ((), ())), precision=_HI, preferred_element_type=_F32)


def mm(a, b):
  """a @ b."""
  return _dot(a, b, ((1,), (0,)))


def mm_nt(a, b):
  """a @ b^T."""
  return _dot(a, b, ((1,), (1,)))


def mm_tn(a, b):
  """a^T @ b."""
  return _dot(a, b, ((0,), (0,)))


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def tril(C: int, diagonal: bool):
  """[C, C] bool, True where row >= col (row > col without the diagonal)."""
  i, j = _iota((C, C), 0), _iota((C, C), 1)
  return i >= j if diagonal else i > j


def select_rows(n: int, C: int, first: int):
  """[n, C] 0/1 matrix E with (E @ x) = x[first:first + n] and (E^T @ y) placing y there."""
  return (_iota((n, C), 1) == _iota((n, C), 0) + first).astype(_F32)


def _eye(C: int):
  return _iota((C, C), 0) == _iota((C, C), 1)


def col_to_row(x):
  """[C, 1] -> [1, C] without a transpose (a masked reduction)."""
  return jnp.sum(jnp.where(_eye(x.shape[0]), x, 0.0), axis=0, keepdims=True)


def row_to_col(x):
  """[1, C] -> [C, 1] without a transpose."""
  return jnp.sum(jnp.where(_eye(x.shape[1]), x, 0.0), axis=1, keepdims=True)


def segment_matrix(n: int):
  """[n * n, n] 0/1 matrix: row (i, j) selects the tokens t with j < t <= i, so that
  (M @ g)[(i, j)] is the segment sum of g from token j (excluded) to token i."""
  r, t = _iota((n * n, n), 0), _iota((n * n, n), 1)
  shift = n.bit_length() - 1
  i, j = r >> shift, r & (n - 1)
  return ((j < t) & (t <= i)).astype(_F32)


def head_gate_sums(g_row):
  """Sums of one log-gate per token, g_row [1, C], each formed from only the terms it covers.

  Returns G_col [C, 1] (sum over t <= i: the decay from the chunk start), rest_col [C, 1]
  (sum over t > i: the decay to the chunk end), seg [C, C] (sum over j < t <= i: the decay
  from token j to token i) and G_last [1, 1]. Differences of running sums would lose
  |G| * eps of absolute precision (|G| reaches hundreds with strong gates), which shows up as
  ~1e-5 relative error in dg; segment sums do not (cf. deltajax.ops.chunk._segment_sums).
  """
  C = g_row.shape[1]
  i, j = _iota((C, C), 0), _iota((C, C), 1)
  G_col = jnp.sum(jnp.where(j <= i, g_row, 0.0), axis=1, keepdims=True)
  rest_col = jnp.sum(jnp.where(j > i, g_row, 0.0), axis=1, keepdims=True)
  terms = jnp.where(i > j, row_to_col(g_row), 0.0)                 # [t, j]: g_t for t > j
  seg = mm(tril(C, True).astype(_F32), terms)                      # [i, j]
  G_last = jnp.sum(g_row, axis=1, keepdims=True)
  return G_col, rest_col, seg, G_last


def channel_gate_sums(g):
  """g [C, K] -> (G [C, K] sum over t <= i, rest [C, K] sum over t > i, G_last [1, K])."""
  C = g.shape[0]
  G = mm(tril(C, True).astype(_F32), g)
  rest = mm((_iota((C, C), 0) < _iota((C, C), 1)).astype(_F32), g)
  return G, rest, jnp.sum(g, axis=0, keepdims=True)


def head_scores(a, b, seg, *, diagonal: bool):
  """[C, C]: (a b^T)_ij exp(seg_ij) on the lower triangle, else 0. seg None: no gate."""
  C = a.shape[0]
  s = mm_nt(a, b)
  if seg is not None:
    s = s * jnp.exp(jnp.minimum(seg, 0.0))
  return jnp.where(tril(C, diagonal), s, 0.0)


def _channel_tile(g, I: int, s: int):
  """Gate factors of row tile I (rows r0 .. r0 + s - 1) for per-channel log-gates g [C, K].

  Returns (E [s, C] the tile's row selector, M2 [s*s, s] the tile's segment matrix,
  e3 [s, s, K] = exp(sum_{j < t <= i} g_t) for i, j in the tile, and for I > 0
  eL [s, K] = exp(sum_{r0 <= t <= i} g_t), Mr [C, C] selecting j < t < r0 and
  eR [C, K] = exp(sum_{j < t < r0} g_t) for j < r0, else 0).
  """
  C, K = g.shape
  r0 = I * s
  E = select_rows(s, C, r0)
  gI = mm(E, g)
  M2 = segment_matrix(s)
  e3 = jnp.exp(jnp.minimum(mm(M2, gI).reshape(s, s, K), 0.0))
  if not I:
    return E, M2, e3, None, None, None
  eL = jnp.exp(jnp.minimum(mm(tril(s, True).astype(_F32), gI), 0.0))
  t, j = _iota((C, C), 1), _iota((C, C), 0)
  Mr = ((j < t) & (t < r0)).astype(_F32)
  eR = jnp.where(_iota((C, 1), 0) < r0, jnp.exp(jnp.minimum(mm(Mr, g), 0.0)), 0.0)
  return E, M2, e3, eL, Mr, eR


def channel_scores(a, b, g, *, diagonal: bool, sub: int):
  """[C, C]: sum_d a_id b_jd exp(sum_{j < t <= i} g_td) on the lower triangle, else 0.

  Inside a diagonal s x s tile the [s, s, K] factors are formed exactly; for a row tile
  starting at r0 and columns j < r0 the score factors at r0: exp(g over [r0, i]) exp(g over
  (j, r0)), both <= 1, so any gates in (-inf, 0] stay finite.
  """
  C, K = a.shape
  s = min(sub, C)
  inner = tril(s, diagonal)[:, :, None]
  out = jnp.zeros((C, C), _F32)
  for I in range(C // s):
    E, _, e3, eL, _, eR = _channel_tile(g, I, s)
    aI, bI = mm(E, a), mm(E, b)                                   # [s, K]
    tile = jnp.sum(aI[:, None, :] * bI[None, :, :] * jnp.where(inner, e3, 0.0), axis=-1)
    strip = mm(tile, E)                                           # [s, C], columns r0..r0+s
    if I:
      strip = strip + mm_nt(aI * eL, b * eR)
    out = out + mm_tn(E, strip)
  return out


def unit_lower_inverse(A):
  """(I + A)^-1 for strictly lower-triangular A [C, C], C a power of two, by block doubling.

  With P the inverse of the block diagonal of (I + A) at block size b, the inverse at block
  size 2b is P - P A_b P, where A_b keeps A's lower-left b x b block inside each 2b x 2b
  diagonal block ([[L11, 0], [L21, L22]]^-1 = [[X11, 0], [-X22 L21 X11, X22]]). Every
  intermediate is a block of the true inverse, so nothing grows beyond it; unlike the Neumann
  product (I - A)(I + A^2)(I + A^4)..., whose powers of A overflow for nearly parallel keys.
  """
  C = A.shape[0]
  i, j = _iota((C, C), 0), _iota((C, C), 1)
  P = (i == j).astype(_F32)
  shift = 0
  while (1 << shift) < C:
    same = (i >> (shift + 1)) == (j >> (shift + 1))
    lower_left = ((i >> shift) & 1) == 1
    upper_right = ((j >> shift) & 1) == 0
    A_b = jnp.where(same & lower_left & upper_right, A, 0.0)
    P = P - mm(mm(P, A_b), P)
    shift += 1
  return P


class _Gated:
  """The gate's view of one chunk: elementwise factors and the score function.

  eQ multiplies q and k into Qg and Kg (exp(G)); eD multiplies k into Kd (exp(rest), the
  decay to the chunk end); D [1, K] is exp(G_last). One gate per token: [C, 1] factors.
  """

  def __init__(self, gate, C: int, K: int, sub: int):
    self.kind = None if gate is None else gate[0]
    self.sub = sub
    if gate is None:
      self.eQ = self.eD = jnp.ones((C, 1), _F32)
      self.D = jnp.ones((1, K), _F32)
    elif self.kind == "head":
      G_col, rest_col, self.seg, G_last = head_gate_sums(gate[1])
      self.eQ, self.eD = jnp.exp(G_col), jnp.exp(rest_col)
      self.D = jnp.broadcast_to(jnp.exp(G_last), (1, K))
    else:
      self.g = gate[1]
      G, rest, G_last = channel_gate_sums(self.g)
      self.eQ, self.eD, self.D = jnp.exp(G), jnp.exp(rest), jnp.exp(G_last)

  def scores(self, a, b, diagonal: bool):
    if self.kind == "channel":
      return channel_scores(a, b, self.g, diagonal=diagonal, sub=self.sub)
    return head_scores(a, b, self.seg if self.kind else None, diagonal=diagonal)


def _forward_parts(q, k, v, beta, gate, sub):
  C, K = q.shape
  gt = _Gated(gate, C, K, sub)
  Kg = k * gt.eQ
  S_kk = gt.scores(k, k, False)
  P = unit_lower_inverse(beta * S_kk)
  return gt, Kg, S_kk, P, mm(P, beta * Kg), mm(P, beta * v)


def prepare(q, k, v, beta, gate, *, sub: int):
  """Per-chunk quantities of the WY form.

  Args:
    q, k: [C, K] (q scaled); v: [C, V]; beta: [C, 1].
    gate: None, ("head", g_row [1, C]) or ("channel", g [C, K]).
  Returns:
    Qg, Kd, W [C, K]; U [C, V]; D [1, K] (the chunk's decay of each key row of S);
    Attn [C, C] (intra-chunk output scores, diagonal included).
  """
  gt, _, _, _, W, U = _forward_parts(q, k, v, beta, gate, sub)
  return q * gt.eQ, k * gt.eD, W, U, gt.D, gt.scores(q, k, True)


def head_scores_backward(a, b, seg, dS, *, diagonal: bool):
  """vjp of `head_scores` for cotangent dS [C, C]: (da, db, and the gates' part of dg [1, C]).

  The pair (i > j) depends on g_t for j < t <= i, so its H_ij = dS_ij S_ij goes to exactly
  those dg_t: summing the pairs straddling t never adds and cancels O(1) terms.
  """
  C = a.shape[0]
  M = tril(C, diagonal).astype(_F32)
  if seg is not None:
    M = M * jnp.exp(jnp.minimum(seg, 0.0))
  X = dS * M
  da, db = mm(X, b), mm_tn(X, a)
  if seg is None:
    return da, db, None
  H = jnp.where(tril(C, False), X * mm_nt(a, b), 0.0)
  i, t = _iota((C, C), 0), _iota((C, C), 1)
  R = mm(H, (i < t).astype(_F32))                                  # R_it = sum_{j<t} H_ij
  return da, db, jnp.sum(jnp.where(i >= t, R, 0.0), axis=0, keepdims=True)


def channel_scores_backward(a, b, g, dS, *, diagonal: bool, sub: int):
  """vjp of `channel_scores` for cotangent dS [C, C]: (da, db, dg), each [C, K].

  Each factor's gradient goes straight to the g_t it sums (the transposed segment matrices),
  so dg is never a difference of large running sums.
  """
  C, K = a.shape
  s = min(sub, C)
  inner = tril(s, diagonal)[:, :, None]
  tail_s = tril(s, True).astype(_F32)
  da, db, dg = (jnp.zeros((C, K), _F32) for _ in range(3))
  for I in range(C // s):
    E, M2, e3, eL, Mr, eR = _channel_tile(g, I, s)
    aI, bI = mm(E, a), mm(E, b)
    dSI = mm(E, dS)                                               # [s, C]: this row tile
    T3 = mm_nt(dSI, E)[:, :, None] * jnp.where(inner, e3, 0.0)    # [s, s, K]
    daI = jnp.sum(T3 * bI[None, :, :], axis=1)
    dbI = jnp.sum(T3 * aI[:, None, :], axis=0)
    H3 = jnp.where(tril(s, False)[:, :, None], T3 * aI[:, None, :] * bI[None, :, :], 0.0)
    dgI = mm_tn(M2, H3.reshape(s * s, K))                         # [s, K]
    if I:
      left, right = aI * eL, b * eR
      dleft, dright = mm(dSI, right), mm_tn(dSI, left)            # [s, K], [C, K]
      daI = daI + dleft * eL
      db = db + dright * eR
      dgI = dgI + mm_tn(tail_s, dleft * left)
      dg = dg + mm_tn(Mr, dright * right)
    da, db, dg = da + mm_tn(E, daI), db + mm_tn(E, dbI), dg + mm_tn(E, dgI)
  return da, db, dg


def prepare_backward(q, k, v, beta, gate, cts, *, sub: int):
  """vjp of `prepare` (recomputing it): cotangents of (q, k, v, beta, gate arrays).

  cts = (dQg, dKd, dW, dU, dD, dAttn) shaped like `prepare`'s outputs. Returns dq, dk [C, K],
  dv [C, V], dbeta [C, 1] and dg: None, [1, C] (one gate per token) or [C, K].
  """
  dQg, dKd, dW, dU, dD, dAttn = cts
  C, K = q.shape
  gt, Kg, S_kk, P, W, U = _forward_parts(q, k, v, beta, gate, sub)
  dRw, dRu = mm_tn(P, dW), mm_tn(P, dU)                           # through W = P (beta Kg)
  dA = jnp.where(tril(C, False), -(mm_nt(dRw, W) + mm_nt(dRu, U)), 0.0)
  dbeta = jnp.sum(dRw * Kg, axis=1, keepdims=True) + jnp.sum(dRu * v, axis=1, keepdims=True)
  dbeta = dbeta + jnp.sum(dA * S_kk, axis=1, keepdims=True)
  dv = beta * dRu
  dKg, dS_kk = beta * dRw, beta * dA
  dq = dQg * gt.eQ
  dk = dKg * gt.eQ + dKd * gt.eD
  if gt.kind == "channel":
    bwd = lambda a, b, d, diag: channel_scores_backward(a, b, gt.g, d, diagonal=diag, sub=sub)
  else:
    seg = gt.seg if gt.kind else None
    bwd = lambda a, b, d, diag: head_scores_backward(a, b, seg, d, diagonal=diag)
  da_k, db_k, dg_A = bwd(k, k, dS_kk, False)
  da_q, db_q, dg_O = bwd(q, k, dAttn, True)
  dq, dk = dq + da_q, dk + da_k + db_k + db_q
  if gt.kind is None:
    return dq, dk, dv, dbeta, None
  # g_t enters exp(G_i) (Qg, Kg) for t <= i, exp(rest_i) (Kd) for t > i, exp(G_last) (D) for
  # every t, and the scores for j < t <= i: each term goes straight to the g_t it covers.
  HQK, HD = dQg * q * gt.eQ + dKg * Kg, dKd * k * gt.eD
  if gt.kind == "channel":
    dg = (mm_tn(tril(C, True).astype(_F32), HQK) + mm(tril(C, False).astype(_F32), HD)
          + dD * gt.D + dg_A + dg_O)
    return dq, dk, dv, dbeta, dg
  hqk, hd = jnp.sum(HQK, axis=1, keepdims=True), jnp.sum(HD, axis=1, keepdims=True)
  i, m = _iota((C, C), 0), _iota((C, C), 1)
  dg = (jnp.sum(jnp.where(i >= m, hqk, 0.0), axis=0, keepdims=True)          # [1, C]
        + jnp.sum(jnp.where(i < m, hd, 0.0), axis=0, keepdims=True)
        + jnp.sum(dD * gt.D, keepdims=True) + dg_A + dg_O)
  return dq, dk, dv, dbeta, dg


def forward_step(ST, Qg, Kd, W, U, D, Attn):
  """One chunk of the state pass and its outputs.

  ST [V, K] is the (transposed) state entering the chunk. Returns (O [C, V], ST_next [V, K]):
  V_new = U - W S, O = Qg S + Attn V_new, S_next = D * S + Kd^T V_new.
  """
  v_new = U - mm_nt(W, ST)
  o = mm_nt(Qg, ST) + mm(Attn, v_new)
  return o, D * ST + mm_tn(v_new, Kd)


def backward_step(dST_next, ST, Qg, Kd, W, U, D, Attn, dO, dST_out):
  """One chunk of the reverse pass (the vjp of `forward_step` plus the carried state cotangent).

  Args:
    dST_next: cotangent of the state leaving the chunk through the next chunk ([V, K]; zero
      when the next chunk starts a new sequence). ST: state entering the chunk.
    dO [C, V], dST_out [V, K]: cotangents of this chunk's outputs and of its S_out.
  Returns:
    dST_in [V, K] (cotangent of the entering state), and the per-chunk cotangents
    (dQg, dKd, dW [C, K], dU [C, V], dD [1, K], dAttn [C, C]).
  """
  dSo = dST_out + dST_next
  v_new = U - mm_nt(W, ST)
  dv_new = mm_nt(Kd, dSo) + mm_tn(Attn, dO)                       # [C, V]
  dST_in = D * dSo + mm_tn(dO, Qg) - mm_tn(dv_new, W)
  grads = (mm(dO, ST), mm(v_new, dSo), -mm(dv_new, ST), dv_new,
           jnp.sum(dSo * ST, axis=0, keepdims=True), mm_nt(dO, v_new))
  return dST_in, grads
