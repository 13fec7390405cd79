"""The chunkwise WY/UT parallel form in plain JAX, with a memory-lean `custom_vjp`.

Inside a chunk of C tokens, with cumulative log-gates G (reset per chunk) and q already scaled:

  1. A = strict_lower(diag(beta) (K K^T) * exp(G_i - G_j));  (I + A) is unit lower triangular.
  2. W = (I + A)^-1 (beta * K * exp(G)),  U = (I + A)^-1 (beta * V).
  3. Across chunks, sequentially: V_new = U - W S
        O = (Q * exp(G)) S + tril(Q K^T * exp(G_i - G_j)) V_new
        S <- exp(G_last) * S + (K * exp(G_last - G))^T V_new

Steps 1-2 ("prepare") and the output are parallel over chunks; only the state pass is sequential.
The backward pass keeps only the inputs, the per-chunk states and V_new, recomputes the
preparation, goes back through the output and the state pass by hand, and hands the rest to
`jax.vjp` of the preparation.

Scalar gate differences G_i - G_j are formed as sums of the gates between j and i, never by
subtracting running sums (which loses precision for strong gates). Per-channel gates (KDA)
factor exp(G_i - G_j) as exp(G_i) exp(-G_j) only while no channel decays by more than e^80 over
a chunk (or a 16-token sub-block), where float32 holds both factors; stronger gates use factors
exp(G_i - G_r) exp(G_r - G_j) through a point r between the tokens, both <= 1, so any gate in
(-inf, 0] stays finite.

Legend: B streams, HV heads, nc chunks, C chunk length, K key dim, V value dim, N sequences.
Arrays below are chunk-major, [nc, B, HV, C, ...] float32 unless noted: the state passes scan
over the leading axis with no transposes in or out.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from deltajax.ops.layout import Layout
from deltajax.ops.triangular import solve_unit_lower

_SUB = 16  # sub-block of the per-channel gate scores; the diagonal blocks cost C * _SUB * K.
_GROUP = 16  # chunks per step of the per-channel sub-block loop (bounds its memory)
# Largest decay over a chunk (or sub-block) for which per-channel scores factor through its
# start: the column factors reach e^{+decay}, and float32 ends near e^88.
_MAX_FACTORED_DECAY = 80.0
# Gates rounded to this grid sum without rounding error in float32 while the sums stay below
# 2^7 in magnitude (7 + 16 bits of a 24-bit significand).
_GRID = 2.0 ** 16


class Prepared(NamedTuple):
  """Per-chunk quantities. Qg, Kd, W: [..., C, K]; U: [..., C, V]; D: [..., K];
  Attn: [..., C, C]."""
  Qg: jax.Array
  Kd: jax.Array
  W: jax.Array
  U: jax.Array
  D: jax.Array
  Attn: jax.Array


def _tril(C: int, diagonal: bool) -> jax.Array:
  return jnp.tril(jnp.ones((C, C), bool), 0 if diagonal else -1)


def _sum_over(mask, g, axis: int):
  """out_i = sum_s mask[i, s] g_s along `axis`, as a matmul with a 0/1 matrix.

  Cumulative gate sums are matmuls here: XLA's cumsum runs at a few ns per element on CPU and
  Mosaic TPU has none, and a masked matmul adds only the terms it names (exact zeros elsewhere),
  so it is as precise as a running sum. Always at HIGHEST precision: gates are never bfloat16.
  """
  g = jnp.moveaxis(g, axis, -1)
  out = jnp.einsum("is,...s->...i", mask.astype(g.dtype), g, precision=lax.Precision.HIGHEST)
  return jnp.moveaxis(out, -1, axis)


def _segment_sums(g, axis: int):
  """seg[..., i, j, ...] = sum_{j < s <= i} g_s along `axis` (0 on and above the diagonal).

  Built by summing only the terms between j and i rather than subtracting two running sums:
  G_i - G_j loses |G| * eps of absolute precision (strong gates reach |G| ~ 1e3 in a chunk),
  which shows up as 1e-5 relative error in the gate gradients.
  """
  axis %= g.ndim
  C = g.shape[axis]
  s = jnp.arange(C)
  between = (s[None, :, None] <= s[:, None, None]) & (s[None, :, None] > s[None, None, :])
  g = jnp.moveaxis(g, axis, -1)                                    # [..., C]
  seg = jnp.einsum("isj,...s->...ij", between.astype(g.dtype), g,
                   precision=lax.Precision.HIGHEST)                # [..., i, j]
  return jnp.moveaxis(seg, (-2, -1), (axis, axis + 1))


def _cumulative(g, axis: int):
  """sum_{s <= i} g_s along `axis`: the decay from the chunk start through token i."""
  C = g.shape[axis]
  return _sum_over(_tril(C, True), g, axis)


def _rest_sums(g, axis: int):
  """sum_{s > i} g_s along `axis`: the decay from token i to the end of its (sub-)chunk."""
  C = g.shape[axis]
  return _sum_over(~_tril(C, True), g, axis)


def gated_scores(rows, b, g, *, diagonal: bool, precision=None):
  """S_ij = sum_d a_id b_jd exp(sum_{j < s <= i} g_sd) for j < i (j <= i with `diagonal`).

  Args:
    rows: row factors a, each [..., C, K] like b. They share b's gate exponentials; each is its
      own product (on CPU two products cost less than one over stacked operands).
    b: [..., C, K].
    g: None, [..., C] (one log-gate per row) or [..., C, K] (per channel); g <= 0. Any gate in
      (-inf, 0] stays finite.
  Returns:
    a tuple of [..., C, C], one per row factor.
  """
  C = b.shape[-2]
  if g is not None and g.ndim == b.ndim:
    scores = _channel_scores(tuple(rows), b, g, precision=precision)
    if not diagonal:
      return scores
    # The diagonal (no decay) on its own: inside a factored product its gate gradients would
    # be two large terms that cancel, leaving rounding noise in dg for strong gates.
    eye = jnp.eye(C, dtype=b.dtype)
    return tuple(s + jnp.sum(a * b, axis=-1)[..., :, None] * eye for s, a in zip(scores, rows))
  mask = _tril(C, diagonal)
  decay = None if g is None else jnp.exp(jnp.where(mask, _segment_sums(g, -1), -jnp.inf))
  scores = (jnp.einsum("...ik,...jk->...ij", a, b, precision=precision) for a in rows)
  return tuple(jnp.where(mask, s, 0.0) if decay is None else s * decay for s in scores)


def _split(g):
  """g = hi + lo with hi on the 2^-16 grid and |lo| <= 2^-17. Sums of hi of magnitude < 128 are
  exact; hi carries no gradient (lo carries all of it, so d/dg is unchanged)."""
  hi = jnp.where(jnp.abs(g) < 2.0 ** 20, jnp.round(g * _GRID) / _GRID, g)
  hi = lax.stop_gradient(hi)
  return hi, g - hi


def _exp_split(hi, lo):
  """e^{hi + lo} for |lo| <= 2^-10, never rounding hi + lo.

  A factor e^x computed from a rounded x is off by eps |x| relative; factoring e^{G_i - G_j}
  through a reference point makes |x| large (up to 40 here) even for pairs whose own decay is
  small, so the exponent is carried exactly as an exact grid part and a small remainder whose
  exponential is a cubic (error < 2^-40).
  """
  return jnp.exp(hi) * _exp_small(lo)


def _exp_small(y):
  return 1 + y * (1 + y / 2 * (1 + y / 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _factored_scores(rows, b, x, lo, precision):
  """Strictly lower (a e^{x + lo}) (b e^{-x - lo})^T for each a in rows, [..., C, C].

  x [..., C, K] is exact and carries no gradient (`_split`); lo is the small remainder. The
  backward recomputes the factors instead of keeping them: two [C, K] arrays of residuals
  instead of seven.
  """
  return _factored_fwd(rows, b, x, lo, precision)[0]


def _factored_fwd(rows, b, x, lo, precision):
  left, right = _exp_split(x, lo), b * _exp_split(-x, -lo)
  mask = _tril(b.shape[-2], False)
  scores = tuple(jnp.where(mask, jnp.einsum("...ik,...jk->...ij", a * left, right,
                                            precision=precision), 0.0) for a in rows)
  return scores, (rows, b, x, lo)


def _factored_bwd(precision, res, d_scores):
  rows, b, x, lo = res
  up, down = jnp.exp(x), jnp.exp(-x)
  left, col = up * _exp_small(lo), down * _exp_small(-lo)            # e^{x+lo}, e^{-x-lo}
  right = b * col
  mask = _tril(b.shape[-2], False)
  d_rows, d_left, d_right = [], 0.0, 0.0
  for a, d in zip(rows, d_scores):
    d = jnp.where(mask, d, 0.0)
    d_row_factor = jnp.einsum("...ij,...jk->...ik", d, right, precision=precision)
    d_rows.append(d_row_factor * left)
    d_left = d_left + d_row_factor * a
    d_right = d_right + jnp.einsum("...ij,...ik->...jk", d, a * left, precision=precision)
  # d/dy of the cubic in _exp_small is the quadratic 1 + y + y^2 / 2.
  d_exp_small = lambda y: 1 + y * (1 + y / 2)
  d_lo = d_left * up * d_exp_small(lo) - d_right * b * down * d_exp_small(-lo)
  return tuple(d_rows), d_right * col, jnp.zeros_like(x), d_lo


_factored_scores.defvjp(_factored_fwd, _factored_bwd)


def _channel_scores(rows, b, g, *, precision=None):
  """Per-channel scores below the diagonal: one product per row factor while they fit float32,
  else by sub-blocks.

  While no channel decays by more than _MAX_FACTORED_DECAY over the chunk, e^{G_i - G_j}
  factors through the midpoint M of each channel's decay as e^{G_i - M} e^{M - G_j}, both
  within e^{+-40} and accurate to a few ulp (`_exp_split`), and each score matrix is one C x C
  product, as for scalar gates. Stronger gates take `_sub_block_scores`, exact for any gate in
  (-inf, 0]; the choice is one `lax.cond` over the whole batch. XLA reserves the memory of
  both branches, so the sub-block one runs rematerialised, over groups of `_GROUP` entries of
  the leading (chunk) axis at a time: its memory does not grow with the sequence.
  """
  C, sub = b.shape[-2], min(_SUB, b.shape[-2])
  hi, lo = (_cumulative(x, -2) for x in _split(g))                # g over (chunk start, i]
  fits = jnp.max(-hi[..., -1, :]) < _MAX_FACTORED_DECAY
  sub_decay = -jnp.sum(g.reshape(*g.shape[:-2], C // sub, sub, -1), axis=-2)
  sub_blocks_fit = jnp.max(sub_decay) < _MAX_FACTORED_DECAY

  def factored(rows, b, g):
    centre = jnp.round(hi[..., -1:, :] * (_GRID / 2)) / _GRID     # M, on the grid
    return _factored_scores(rows, b, hi - centre, lo, precision)   # hi - centre is exact

  by_block = jax.checkpoint(functools.partial(
      _sub_block_scores, diagonal_fits=sub_blocks_fit, precision=precision))
  by_blocks = lambda *xs: lax.map(lambda x: by_block(*x), xs, batch_size=_GROUP)
  return lax.cond(fits, factored, by_blocks, rows, b, g)


def _sub_block_scores(rows, b, g, *, diagonal_fits, precision=None):
  """Per-channel scores below the diagonal by sub-blocks of `_SUB` rows (I) and columns (J),
  for any gate.

  Row factors are a e^{own_i - m_I}: own is g over (start of I, i] and m_I half of block I's
  decay (0 when the diagonal blocks are banded), so the exponent stays within
  +-_MAX_FACTORED_DECAY / 2 (or <= 0). Below the diagonal blocks (J < I) the column factors are
  b e^{rest_j + mid_IJ + m_I}: g over (j, end of J], over the whole blocks between J and I, and
  m_I, all <= 0. Inside a diagonal block the column factor is b e^{m_I - own_j}, within
  e^{+-40} while no sub-block decays by more than _MAX_FACTORED_DECAY in any channel
  (`diagonal_fits`, one scalar for the whole batch); else the diagonal blocks are summed band
  by band with exponents <= 0 (`_diagonal_block_scores`). Exponents are carried as exact grid
  parts plus small remainders (`_exp_split`); where the grid sums are not exact (beyond 2^7)
  the factors are below e^-88 and the pairs they scale vanish in float32 anyway. Every row
  block has its own column factors ([..., nb, C, K] in all), which is why `_channel_scores`
  runs this over a few chunks at a time.
  """
  C, K = b.shape[-2:]
  sub = min(_SUB, C)
  nb = C // sub
  blocked = lambda x: x.reshape(*x.shape[:-2], nb, sub, x.shape[-1])
  blk = jnp.arange(nb)
  between = (blk[None, None, :] > blk[None, :, None]) & (blk[None, None, :] < blk[:, None, None])

  def sums(x):                                                      # x: a grid or remainder part
    xb = blocked(x)
    own = _sum_over(_tril(sub, True), xb, -2)                       # over (start of I, i]
    rest = _sum_over(~_tril(sub, True), xb, -2)                     # over (j, end of J]
    mid = jnp.einsum("IJL,...Lk->...IJk", between.astype(x.dtype), own[..., -1, :],
                     precision=lax.Precision.HIGHEST)               # [..., nb(I), nb(J), K]
    return own, rest, mid

  (own, rest, mid), (own_lo, rest_lo, mid_lo) = map(sums, _split(g))
  # m_I only where the diagonal blocks are factored; else 0 keeps every exponent <= 0.
  half = jnp.where(diagonal_fits, jnp.round(own[..., -1:, :] * (_GRID / 2)) / _GRID, 0.0)
  pick = lambda x, I: lax.dynamic_index_in_dim(x, I, axis=x.ndim - 3, keepdims=False)

  def row_block(I):                                                 # -> [..., sub, C] per row
    J = blk[:, None, None]
    m = pick(half, I)[..., None, :, :]                              # [..., 1, 1, K]
    below, diag = J < I, (J == I) & diagonal_fits
    expo = jnp.where(below, rest + pick(mid, I)[..., None, :] + m, -jnp.inf)
    expo = jnp.where(diag, m - own, expo)                           # [..., nb(J), sub, K]
    expo_lo = jnp.where(below, rest_lo + pick(mid_lo, I)[..., None, :], -own_lo)
    right = b * _exp_split(expo, expo_lo).reshape(g.shape)
    left = _exp_split(pick(own, I) - m[..., 0, :, :], pick(own_lo, I))
    return tuple(jnp.einsum("...ik,...jk->...ij", pick(blocked(a), I) * left, right,
                            precision=precision) for a in rows)

  by_rows = jax.vmap(row_block)(blk)                               # [nb, ..., sub, C] each
  mask = _tril(C, False)
  scores = (jnp.where(mask, jnp.moveaxis(x, 0, -3).reshape(*x.shape[1:-2], C, C), 0.0)
            for x in by_rows)
  bands = lax.cond(diagonal_fits,
                   lambda *_: tuple(jnp.zeros(b.shape[:-1] + (C,), b.dtype) for _ in rows),
                   functools.partial(_diagonal_block_scores, sub=sub), rows, b, g)
  return tuple(map(jnp.add, scores, bands))


def _diagonal_block_scores(rows, b, g, *, sub: int):
  """The per-channel scores strictly below the diagonal inside the diagonal sub-blocks, one
  band at a time, for any gate.

  Band d >= 1 holds the pairs (i, i - d) of each sub-block:
  sum_k a_ik b_{i-d,k} e^{g over (i-d, i]} (an exponent <= 0). Bands run in a rematerialised
  loop so that no temporary, forward or backward, is larger than [..., C, K].
  """
  C = b.shape[-2]
  s = jnp.arange(C)
  b_padded = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(sub, 0), (0, 0)])

  @jax.checkpoint
  def band(d):
    window = (s[None, :] > s[:, None] - d) & (s[None, :] <= s[:, None])     # (i - d, i]
    b_d = lax.dynamic_slice_in_dim(b_padded, sub - d, C, axis=-2)           # b_{i - d}
    col = b_d * jnp.exp(_sum_over(window, g, -2))
    return tuple(jnp.where(s % sub >= d, jnp.sum(a * col, axis=-1), 0.0) for a in rows)

  bands = lax.map(band, jnp.arange(1, sub))                                # [sub-1, ..., C] each
  i, j, d = s[None, :, None], s[None, None, :], jnp.arange(1, sub)[:, None, None]
  on_band = (i - j == d).astype(b.dtype)
  return tuple(jnp.einsum("d...i,dij->...ij", x, on_band) for x in bands)


def prepare(q, k, v, beta, g, *, precision=None) -> Prepared:
  """Steps 1-2 for every chunk at once. q, k [..., C, K]; v [..., C, V]; beta [..., C];
  g None, [..., C] or [..., C, K]."""
  KK, Attn = gated_scores((k, q), k, g, diagonal=True, precision=precision)
  A = beta[..., :, None] * jnp.where(_tril(q.shape[-2], False), KK, 0.0)
  if g is None:
    Qg, Kd, Kg = q, k, k
    D = jnp.ones(q.shape[:-2] + q.shape[-1:], q.dtype)
  else:
    gc = g[..., None] if g.ndim == q.ndim - 1 else g               # [..., C, 1 or K]
    G = _cumulative(gc, -2)                                         # decay since chunk start
    Qg, Kd, Kg = q * jnp.exp(G), k * jnp.exp(_rest_sums(gc, -2)), k * jnp.exp(G)
    D = jnp.broadcast_to(jnp.exp(G[..., -1, :]), q.shape[:-2] + q.shape[-1:])
  W, U = solve_unit_lower(A, (beta[..., None] * Kg, beta[..., None] * v), precision)
  return Prepared(Qg=Qg, Kd=Kd, W=W, U=U, D=D, Attn=Attn)


def _step(S, W, U, Kd, D, precision=None):
  """One chunk of the state pass. S [..., K, V] -> (next S, V_new [..., C, V])."""
  v_new = U - jnp.einsum("...ck,...kv->...cv", W, S, precision=precision)
  S = D[..., None] * S + jnp.einsum("...ck,...cv->...kv", Kd, v_new, precision=precision)
  return S, v_new


def _output(S_in, v_new, p: Prepared, precision=None):
  """Outputs of every chunk from the state entering it. S_in [..., K, V] -> [..., C, V]."""
  return (jnp.einsum("...ck,...kv->...cv", p.Qg, S_in, precision=precision)
          + jnp.einsum("...ij,...jv->...iv", p.Attn, v_new, precision=precision))


def _states(p: Prepared, h0, start, seq, precision):
  """The sequential pass: S_out [nc, B, HV, K, V], the state after every chunk, and V_new."""
  def body(S, x):
    st, sq, *step_inputs = x
    S = jnp.where(st[:, None, None, None], h0[sq], S)
    S, v_new = _step(S, *step_inputs, precision)
    return S, (S, v_new)
  B, HV, K = *p.Qg.shape[1:3], p.Qg.shape[-1]
  S0 = jnp.zeros((B, HV, K, h0.shape[-1]), h0.dtype)
  _, (S_out, v_new) = lax.scan(body, S0, (start, seq, p.W, p.U, p.Kd, p.D))
  return S_out, v_new


def _states_in(S_out, h0, start, seq):
  """The state entering every chunk: the sequence's initial state or the previous S_out."""
  prev = jnp.concatenate([jnp.zeros_like(S_out[:1]), S_out[:-1]], axis=0)
  return jnp.where(start[:, :, None, None, None], h0[seq], prev)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def chunk_core(q, k, v, beta, g, h0, start, seq, precision=None):
  """O [nc, B, HV, C, V] and S_out [nc, B, HV, K, V] over chunk-aligned inputs.

  q, k [nc, B, HV, C, K]; v [nc, B, HV, C, V]; beta [nc, B, HV, C]; g None, [nc, B, HV, C] or
  [nc, B, HV, C, K]; h0 [N, HV, K, V]; start, seq [nc, B] (the layout's, transposed).
  """
  return _chunk_fwd(q, k, v, beta, g, h0, start, seq, precision)[0]


def _chunk_fwd(q, k, v, beta, g, h0, start, seq, precision):
  p = prepare(q, k, v, beta, g, precision=precision)
  S_out, v_new = _states(p, h0, start, seq, precision)
  o = _output(_states_in(S_out, h0, start, seq), v_new, p, precision)
  return (o, S_out), (q, k, v, beta, g, h0, start, seq, S_out, v_new)


def _chunk_bwd(precision, res, cts):
  """Back through the output and the state pass by hand (their products written once each),
  then `jax.vjp` of the preparation, recomputed."""
  q, k, v, beta, g, h0, start, seq, S_out, v_new = res
  do, dS_out = cts
  mm = functools.partial(jnp.einsum, precision=precision)
  p, prepare_vjp = jax.vjp(functools.partial(prepare, precision=precision), q, k, v, beta, g)
  S_in = _states_in(S_out, h0, start, seq)
  # Through o = Qg S_in + Attn V_new, with V_new = U - W S_in: the parts that need no state
  # cotangent, so the reverse pass below stays two products per chunk.
  attn_do = mm("...ji,...jv->...iv", p.Attn, do)                      # dV_new from o
  dS_direct = mm("...ck,...cv->...kv", p.Qg, do) - mm("...ck,...cv->...kv", p.W, attn_do)

  # Reverse pass. dS_next is the cotangent of the state entering chunk c + 1; at each chunk
  # dSo is that of the state leaving it, through S_out = D S_in + Kd^T V_new.
  next_start = jnp.concatenate([start[1:], jnp.ones_like(start[:1])], axis=0)
  def body(dS_next, x):
    W, Kd, D, dS_direct_c, dS_out_c, nxt = x
    dSo = dS_out_c + jnp.where(nxt[:, None, None, None], 0.0, dS_next)
    kd_dso = mm("...ck,...kv->...cv", Kd, dSo)                        # dV_new from S_out
    dS_in = dS_direct_c + D[..., None] * dSo - mm("...ck,...cv->...kv", W, kd_dso)
    return dS_in, (dSo, dS_in, kd_dso)
  xs = (p.W, p.Kd, p.D, dS_direct, dS_out, next_start)
  _, (dSo, dS_in, kd_dso) = lax.scan(body, jnp.zeros_like(S_out[0]), xs, reverse=True)

  dv_new = attn_do + kd_dso
  dp = Prepared(
      Qg=mm("...cv,...kv->...ck", do, S_in),
      Kd=mm("...cv,...kv->...ck", v_new, dSo),
      W=-mm("...cv,...kv->...ck", dv_new, S_in),
      U=dv_new,
      D=jnp.sum(dSo * S_in, axis=-1),
      Attn=mm("...iv,...jv->...ij", do, v_new))
  dq, dk, dv, dbeta, dg = prepare_vjp(dp)
  into_h0 = jnp.where(start[:, :, None, None, None], dS_in, 0.0)      # [nc, B, HV, K, V]
  dh0 = jnp.zeros_like(h0).at[seq].add(into_h0)
  return dq, dk, dv, dbeta, dg, dh0, None, None


chunk_core.defvjp(_chunk_fwd, _chunk_bwd)


def chunk(q, k, v, beta, g, h0, layout: Layout, precision=None):
  """Chunkwise form over a layout from `make_layout(B, T, chunk_size, cu_seqlens)`.

  Args and returns as `deltajax.ops.recurrent.recurrent` (time-major [B, T, HV, ...] float32).
  """
  # [B, nc, C, HV, ...] <-> [nc, B, HV, C, ...]
  chunk_major = lambda x: None if x is None else jnp.moveaxis(layout.to_chunks(x), (1, 3), (0, 2))
  o, S_out = chunk_core(chunk_major(q), chunk_major(k), chunk_major(v), chunk_major(beta),
                        chunk_major(g), h0, layout.start.T, layout.seq.T, precision)
  finals = S_out[layout.last_chunk, layout.last_stream]
  return layout.from_chunks(jnp.moveaxis(o, (0, 2), (1, 3))), finals
