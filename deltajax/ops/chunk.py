"""The chunkwise WY/UT parallel form in plain JAX, with a memory-lean `custom_vjp`.

Inside a chunk of C tokens, with cumulative log-gates G (reset per chunk) and q already scaled:

  1. A = strict_lower(diag(beta) (K K^T) * exp(G_i - G_j));  (I + A) is unit lower triangular.
  2. W = (I + A)^-1 (beta * K * exp(G)),  U = (I + A)^-1 (beta * V).
  3. Across chunks, sequentially: V_new = U - W S
        O = (Q * exp(G)) S + tril(Q K^T * exp(G_i - G_j)) V_new
        S <- exp(G_last) * S + (K * exp(G_last - G))^T V_new

Steps 1-2 ("prepare") and the output are parallel over chunks; only the state pass is sequential.
The backward pass keeps only the inputs and the per-chunk states, recomputes the preparation,
runs the state pass backwards, and hands the rest to `jax.vjp` of the parallel parts.

Gate differences G_i - G_j are formed as sums of the gates between j and i, never by subtracting
running sums (which loses precision for strong gates). Per-channel gates (KDA) never form
exp(+x): the score between tokens i >= j is built from factors exp(G_i - G_r) exp(G_r - G_j) with
r between them (the end of j's sub-block), both <= 1, so any gate in (-inf, 0] stays finite.

Legend: B streams, HV heads, nc chunks, C chunk length, K key dim, V value dim, N sequences.
Arrays below are [B, HV, nc, C, ...] float32 unless noted.
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
# Largest decay inside one sub-block for which the factored per-channel scores stay finite:
# their factors reach e^{+decay}, and float32 ends near e^88.
_MAX_FACTORED_DECAY = 80.0


class Prepared(NamedTuple):
  """Per-chunk quantities. Qg, Kd, W: [..., C, K]; U: [..., C, V]; D: [..., K]; Attn: [..., C, C]."""
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


def gated_scores(a, b, g, *, diagonal: bool, precision=None):
  """S_ij = sum_d a_id b_jd exp(sum_{j < s <= i} g_sd) for j < i (j <= i with `diagonal`).

  Args:
    a, b: [..., C, K]; a may carry extra leading axes (several row sets against one b).
    g: None, [..., C] (one log-gate per row) or [..., C, K] (per channel); g <= 0. Any gate in
      (-inf, 0] stays finite.
  Returns:
    [..., C, C].
  """
  C = a.shape[-2]
  mask = _tril(C, diagonal)
  if g is None or g.ndim == b.ndim - 1:
    b = _like(b, a)
    s = jnp.einsum("...ik,...jk->...ij", a, b, precision=precision)
    if g is not None:
      g = jnp.broadcast_to(g, a.shape[:-2] + g.shape[-1:])
    if g is not None:
      s = s * jnp.exp(jnp.where(mask, _segment_sums(g, -1), -jnp.inf))
    return jnp.where(mask, s, 0.0)
  sub = min(_SUB, C)
  decay = -_sum_over(jnp.ones((1, sub), bool), g.reshape(*g.shape[:-2], C // sub, sub, -1), -2)
  fits = jnp.max(decay) < _MAX_FACTORED_DECAY
  # Rematerialised branches: differentiating a cond keeps the residuals of both branches, and
  # the exact branch's ([..., C, sub, K]) would dominate memory even when it is not taken.
  branch = lambda f: jax.checkpoint(functools.partial(f, diagonal=diagonal, precision=precision))
  return lax.cond(fits, branch(_channel_scores_factored), branch(_channel_scores_exact), a, b, g)


def _like(x, a):
  """x broadcast to the extra leading axes of a (a row-set axis, for instance).

  XLA:CPU in jax 0.10 segfaults differentiating, under vmap, einsums and products whose operands
  differ in rank (seen with packed sequences in the layers), so every product of the scores gets
  operands of equal rank; the exponentials are still computed once, before the broadcast.
  """
  return jnp.broadcast_to(x, a.shape[:a.ndim - x.ndim] + x.shape)


def _blocks(C: int):
  """(sub-block size, number of sub-blocks, the sub-block of every position)."""
  sub = min(_SUB, C)
  return sub, C // sub, jnp.arange(C) // sub


def _channel_scores_factored(a, b, g, *, diagonal: bool, precision=None):
  """Per-channel scores as matmuls, through a reference point r(I) before each row block I.

  S_ij = sum_d (a_id e^{g over (r, i]}) (b_jd e^{E_jd}) with E = g over (j, r] for j <= r
  (<= 0) and E = -g over (r, j] for j in block I (>= 0, at most the block's decay). Valid while
  no sub-block decays by more than _MAX_FACTORED_DECAY in any channel (e^80 fits float32).
  """
  C, K = a.shape[-2:]
  sub, nb, block = _blocks(C)
  s = jnp.arange(C)
  ref = jnp.arange(nb) * sub - 1                                    # r(I): last token before I
  # left exponent: g summed over the row's own block up to and including the row.
  own = (block[:, None] == block[None, :]) & (s[None, :] <= s[:, None])
  left = a * _like(jnp.exp(_sum_over(own, g, -2)), a)              # [..., C, K]
  # right exponent: signed sums of g between j and r(I), for every block I (0 where j > I's end).
  after = (s[None, None, :] > s[None, :, None]) & (s[None, None, :] <= ref[:, None, None])
  before = (s[None, None, :] > ref[:, None, None]) & (s[None, None, :] <= s[None, :, None])
  signed = after.astype(g.dtype) - before.astype(g.dtype)           # [nb, C(j), C(s)]
  expo = jnp.einsum("Ijs,...sk->...Ijk", signed, g, precision=lax.Precision.HIGHEST)
  seen = block[None, :] <= jnp.arange(nb)[:, None]                  # [nb, C(j)]
  right = b[..., None, :, :] * jnp.exp(jnp.where(seen[:, :, None], expo, -jnp.inf))
  left = left.reshape(*a.shape[:-2], nb, sub, K)
  scores = jnp.einsum("...Iik,...Ijk->...Iij", left, _like(right, left), precision=precision)
  return jnp.where(_tril(C, diagonal), scores.reshape(*a.shape[:-2], C, C), 0.0)


def _diagonal_block_scores(a, b, g, sub: int, diagonal: bool):
  """The part of the per-channel scores inside the diagonal sub-blocks, one band at a time.

  Band d holds the pairs (i, i - d) of each sub-block: sum_k a_ik b_{i-d,k} e^{g over (i-d, i]}
  (an exponent <= 0). Bands run in a rematerialised loop so that no temporary, forward or
  backward, is larger than [..., C, K]: XLA reserves this branch's memory even when the factored
  one runs.
  """
  C = a.shape[-2]
  s = jnp.arange(C)
  b_padded = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(sub, 0), (0, 0)])

  @jax.checkpoint
  def band(d):
    window = (s[None, :] > s[:, None] - d) & (s[None, :] <= s[:, None])     # (i - d, i]
    b_d = lax.dynamic_slice_in_dim(b_padded, sub - d, C, axis=-2)           # b_{i - d}
    value = jnp.sum(a * _like(b_d * jnp.exp(_sum_over(window, g, -2)), a), axis=-1)
    return jnp.where(s % sub >= d, value, 0.0)

  first = 0 if diagonal else 1
  bands = lax.map(band, jnp.arange(first, sub))                            # [sub', ..., C]
  i, j, d = s[None, :, None], s[None, None, :], jnp.arange(first, sub)[:, None, None]
  return jnp.einsum("d...i,dij->...ij", bands, (i - j == d).astype(a.dtype))


def _channel_scores_exact(a, b, g, *, diagonal: bool, precision=None):
  """Per-channel scores for any gate: every exponent formed is <= 0.

  Diagonal sub-blocks by bands (C * sub * K work); the block below column block J factors
  through the end r of J: exp(g over (j, r]) on the column side, exp(g over (r, i]) on the row.
  """
  C, K = a.shape[-2:]
  sub, nb, _ = _blocks(C)
  scores = _diagonal_block_scores(a, b, g, sub, diagonal)
  if nb == 1:
    return scores
  s = jnp.arange(C)

  @jax.checkpoint
  def below_block(J):                                                      # -> [..., C, sub]
    end = (J + 1) * sub - 1
    cols = lax.dynamic_slice_in_dim(b, J * sub, sub, axis=-2)
    right = cols * jnp.exp(_rest_sums(lax.dynamic_slice_in_dim(g, J * sub, sub, axis=-2), -2))
    after_end = (s[None, :] > end) & (s[None, :] <= s[:, None])             # (r, i]
    expo = jnp.where((s > end)[:, None], _sum_over(after_end, g, -2), -jnp.inf)
    left = a * _like(jnp.exp(expo), a)
    return jnp.einsum("...ik,...jk->...ij", left, _like(right, left), precision=precision)

  off = lax.map(below_block, jnp.arange(nb - 1))                           # [nb-1, ..., C, sub]
  off = jnp.moveaxis(off, 0, -2).reshape(*off.shape[1:-1], (nb - 1) * sub)
  return scores + jnp.pad(off, [(0, 0)] * (off.ndim - 1) + [(0, sub)])


def prepare(q, k, v, beta, g, *, precision=None) -> Prepared:
  """Steps 1-2 for every chunk at once. q, k [..., C, K]; v [..., C, V]; beta [..., C];
  g None, [..., C] or [..., C, K]."""
  # K K^T and Q K^T share their column factors and gate exponents: one call for both.
  KK, Attn = gated_scores(jnp.stack([k, q]), k, g, diagonal=True, precision=precision)
  A = beta[..., :, None] * jnp.where(_tril(q.shape[-2], False), KK, 0.0)
  if g is None:
    Qg, Kd, Kg = q, k, k
    D = jnp.ones(q.shape[:-2] + q.shape[-1:], q.dtype)
  else:
    gc = g[..., None] if g.ndim == q.ndim - 1 else g               # [..., C, 1 or K]
    G = _cumulative(gc, -2)                                         # decay since chunk start
    Qg, Kd, Kg = q * jnp.exp(G), k * jnp.exp(_rest_sums(gc, -2)), k * jnp.exp(G)
    D = jnp.broadcast_to(jnp.exp(G[..., -1, :]), q.shape[:-2] + q.shape[-1:])
  rhs = jnp.concatenate([beta[..., None] * Kg, beta[..., None] * v], axis=-1)
  WU = solve_unit_lower(A, rhs, precision)
  K = q.shape[-1]
  return Prepared(Qg=Qg, Kd=Kd, W=WU[..., :K], U=WU[..., K:], D=D, Attn=Attn)


def _step(S, p: Prepared, precision=None):
  """One chunk of the state pass. S [..., K, V] -> next S."""
  v_new = p.U - jnp.einsum("...ck,...kv->...cv", p.W, S, precision=precision)
  return p.D[..., None] * S + jnp.einsum("...ck,...cv->...kv", p.Kd, v_new, precision=precision)


def _output(S_in, p: Prepared, precision=None):
  """Outputs of every chunk given the state entering it. S_in [..., K, V] -> [..., C, V]."""
  v_new = p.U - jnp.einsum("...ck,...kv->...cv", p.W, S_in, precision=precision)
  return (jnp.einsum("...ck,...kv->...cv", p.Qg, S_in, precision=precision)
          + jnp.einsum("...ij,...jv->...iv", p.Attn, v_new, precision=precision))


def _chunk_axis_first(x):
  return jnp.moveaxis(x, 2, 0)  # [B, HV, nc, ...] -> [nc, B, HV, ...]


def _states(p: Prepared, h0, start, seq, precision):
  """The sequential pass. Returns S_out [B, HV, nc, K, V], the state after every chunk."""
  def body(S, x):
    pc, st, sq = x
    S = jnp.where(st[:, None, None, None], h0[sq], S)
    S = _step(S, pc, precision)
    return S, S
  B, HV, K = *p.Qg.shape[:2], p.Qg.shape[-1]
  S0 = jnp.zeros((B, HV, K, h0.shape[-1]), h0.dtype)
  xs = (jax.tree.map(_chunk_axis_first, p), start.T, seq.T)
  _, S_out = lax.scan(body, S0, xs)
  return jnp.moveaxis(S_out, 0, 2)


def _states_in(S_out, h0, start, seq):
  """The state entering every chunk: the sequence's initial state or the previous S_out."""
  prev = jnp.concatenate([jnp.zeros_like(S_out[:, :, :1]), S_out[:, :, :-1]], axis=2)
  init = jnp.moveaxis(h0[seq], 2, 1)                                # [B, HV, nc, K, V]
  return jnp.where(start[:, None, :, None, None], init, prev)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def chunk_core(q, k, v, beta, g, h0, start, seq, precision=None):
  """O [B, HV, nc, C, V] and S_out [B, HV, nc, K, V] over chunk-aligned inputs.

  q, k [B, HV, nc, C, K]; v [B, HV, nc, C, V]; beta [B, HV, nc, C]; g None, [B, HV, nc, C] or
  [B, HV, nc, C, K]; h0 [N, HV, K, V]; start, seq [B, nc] from the layout.
  """
  return _chunk_fwd(q, k, v, beta, g, h0, start, seq, precision)[0]


def _chunk_fwd(q, k, v, beta, g, h0, start, seq, precision):
  p = prepare(q, k, v, beta, g, precision=precision)
  S_out = _states(p, h0, start, seq, precision)
  o = _output(_states_in(S_out, h0, start, seq), p, precision)
  return (o, S_out), (q, k, v, beta, g, h0, start, seq, S_out)


def _chunk_bwd(precision, res, cts):
  q, k, v, beta, g, h0, start, seq, S_out = res
  do, dS_out = cts
  p, prepare_vjp = jax.vjp(functools.partial(prepare, precision=precision), q, k, v, beta, g)
  S_in = _states_in(S_out, h0, start, seq)
  dp_out, dS_in_direct = jax.vjp(lambda p_, s: _output(s, p_, precision), p, S_in)[1](do)

  # Reverse pass over chunks. dS_next is the cotangent of the state entering chunk c + 1.
  next_start = jnp.concatenate([start[:, 1:], jnp.ones_like(start[:, :1])], axis=1)
  def body(dS_next, x):
    W, Kd, D, dS_in_c, dS_out_c, nxt = x
    dSo = dS_out_c + jnp.where(nxt[:, None, None, None], 0.0, dS_next)
    kd_ds = jnp.einsum("...ck,...kv->...cv", Kd, dSo, precision=precision)
    dS_in = (dS_in_c + D[..., None] * dSo
             - jnp.einsum("...ck,...cv->...kv", W, kd_ds, precision=precision))
    return dS_in, (dSo, dS_in)
  xs = (*map(_chunk_axis_first, (p.W, p.Kd, p.D, dS_in_direct, dS_out)), next_start.T)
  _, (dSo, dS_in) = lax.scan(body, jnp.zeros_like(S_out[:, :, 0]), xs, reverse=True)
  dSo, dS_in = jnp.moveaxis(dSo, 0, 2), jnp.moveaxis(dS_in, 0, 2)

  dp_state = jax.vjp(lambda p_: _step(S_in, p_, precision), p)[1](dSo)[0]
  dp = jax.tree.map(jnp.add, dp_out, dp_state)
  dq, dk, dv, dbeta, dg = prepare_vjp(dp)
  into_h0 = jnp.where(start[:, None, :, None, None], dS_in, 0.0)      # [B, HV, nc, K, V]
  dh0 = jnp.zeros_like(h0).at[seq].add(jnp.moveaxis(into_h0, 2, 1))
  return dq, dk, dv, dbeta, dg, dh0, None, None


chunk_core.defvjp(_chunk_fwd, _chunk_bwd)


def chunk(q, k, v, beta, g, h0, layout: Layout, precision=None):
  """Chunkwise form over a layout from `make_layout(B, T, chunk_size, cu_seqlens)`.

  Args and returns as `deltajax.ops.recurrent.recurrent` (time-major [B, T, HV, ...] float32).
  """
  heads_first = lambda x: None if x is None else jnp.moveaxis(layout.to_chunks(x), 3, 1)
  o, S_out = chunk_core(heads_first(q), heads_first(k), heads_first(v), heads_first(beta),
                        heads_first(g), h0, layout.start, layout.seq, precision)
  finals = S_out[layout.last_stream, :, layout.last_chunk]
  return layout.from_chunks(jnp.moveaxis(o, 1, 3)), finals
