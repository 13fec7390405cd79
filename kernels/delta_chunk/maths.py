"""In-kernel maths of one chunk, on 2-D float32 values (no refs, no backend specifics).

Only operations every Pallas backend lowers are used: 2-D matmuls (plain, A B^T, A^T B),
elementwise ops, iota masks, reductions and one small 3-D broadcast (per-channel gates).
No cumsum (Mosaic TPU lacks it: cumulative gates come from a lower-triangular matmul or a masked
reduction), no triangular_solve (no backend lowers it: the unit-lower-triangular inverse is
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


def cumsum_head(g_col, g_row):
  """Inclusive cumulative sums of one gate per token, as a column and as a row.

  g_col [C, 1] and g_row [1, C] hold the same C log-gates. Returns (G_col [C, 1], G_row [1, C],
  G_last [1, 1]), by masked reductions (the matmul by a lower-triangular ones matrix).
  """
  C = g_col.shape[0]
  lower = tril(C, True)
  G_col = jnp.sum(jnp.where(lower, g_row, 0.0), axis=1, keepdims=True)
  upper = _iota((C, C), 0) <= _iota((C, C), 1)
  G_row = jnp.sum(jnp.where(upper, g_col, 0.0), axis=0, keepdims=True)
  G_last = jnp.sum(g_col, axis=0, keepdims=True)
  return G_col, G_row, G_last


def cumsum_channel(g):
  """g [C, K] -> (G [C, K] inclusive cumsum along C, G_last [1, K]) by a triangular matmul."""
  C = g.shape[0]
  G = mm(tril(C, True).astype(_F32), g)
  return G, mm(select_rows(1, C, C - 1), G)


def head_scores(a, b, G_col, G_row, *, diagonal: bool):
  """[C, C]: (a b^T)_ij exp(G_i - G_j) on the lower triangle, else 0. G_* None: no gate."""
  C = a.shape[0]
  s = mm_nt(a, b)
  if G_col is not None:
    s = s * jnp.exp(jnp.minimum(G_col - G_row, 0.0))
  return jnp.where(tril(C, diagonal), s, 0.0)


def channel_scores(a, b, G, *, diagonal: bool, sub: int):
  """[C, C]: sum_d a_id b_jd exp(G_id - G_jd) on the lower triangle, else 0.

  No exponent is ever positive, so any gates in (-inf, 0] stay finite: inside a diagonal
  s x s tile the exponents G_i - G_j (i >= j) are formed exactly (an [s, s, K] product); for a
  row tile starting at r0 and columns j < r0 the score goes through the reference row
  r = r0 - 1: exp(G_i - G_r) exp(G_r - G_j), both factors <= 1.
  """
  C, K = a.shape
  s = min(sub, C)
  row = _iota((C, 1), 0)
  inner = tril(s, diagonal)[:, :, None]
  out = jnp.zeros((C, C), _F32)
  for I in range(C // s):
    r0 = I * s
    E = select_rows(s, C, r0)                                     # [s, C]
    aI, bI, GI = mm(E, a), mm(E, b), mm(E, G)                     # [s, K]
    expo = jnp.minimum(GI[:, None, :] - GI[None, :, :], 0.0)      # [s, s, K]
    tile = jnp.sum(aI[:, None, :] * bI[None, :, :] * jnp.where(inner, jnp.exp(expo), 0.0),
                   axis=-1)                                       # [s, s]
    strip = mm(tile, E)                                           # [s, C], columns r0..r0+s
    if I:
      G_ref = mm(select_rows(1, C, r0 - 1), G)                    # [1, K]
      left = aI * jnp.exp(jnp.minimum(GI - G_ref, 0.0))
      right = jnp.where(row < r0, b * jnp.exp(jnp.minimum(G_ref - G, 0.0)), 0.0)
      strip = strip + mm_nt(left, right)
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


def prepare(q, k, v, beta, gate, *, sub: int):
  """Per-chunk quantities of the WY form.

  Args:
    q, k: [C, K] (q scaled); v: [C, V]; beta: [C, 1].
    gate: None, ("head", g_col [C, 1], g_row [1, C]) or ("channel", g [C, K]).
  Returns:
    Qg, Kd, W [C, K]; U [C, V]; D [1, K] (the chunk's decay of each key row of S);
    Attn [C, C] (intra-chunk output scores, diagonal included).
  """
  C, K = q.shape
  if gate is None:
    scores = lambda a, b, d: head_scores(a, b, None, None, diagonal=d)
    Qg, Kg, Kd = q, k, k
    D = jnp.ones((1, K), _F32)
  elif gate[0] == "head":
    G_col, G_row, G_last = cumsum_head(gate[1], gate[2])
    scores = lambda a, b, d: head_scores(a, b, G_col, G_row, diagonal=d)
    Qg, Kg, Kd = q * jnp.exp(G_col), k * jnp.exp(G_col), k * jnp.exp(G_last - G_col)
    D = jnp.broadcast_to(jnp.exp(G_last), (1, K))
  else:
    G, G_last = cumsum_channel(gate[1])
    scores = lambda a, b, d: channel_scores(a, b, G, diagonal=d, sub=sub)
    Qg, Kg = q * jnp.exp(G), k * jnp.exp(G)
    Kd = k * jnp.exp(jnp.minimum(G_last - G, 0.0))
    D = jnp.exp(G_last)
  A = beta * scores(k, k, False)
  Attn = scores(q, k, True)
  P = unit_lower_inverse(A)
  return Qg, Kd, mm(P, beta * Kg), mm(P, beta * v), D, Attn


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
