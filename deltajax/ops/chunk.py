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


def _segment_sums(g, axis: int):
  """seg[..., i, j, ...] = sum_{j < s <= i} g_s along `axis` (0 on and above the diagonal).

  Built by summing only the terms between j and i rather than subtracting two running sums:
  G_i - G_j loses |G| * eps of absolute precision (strong gates reach |G| ~ 1e3 in a chunk),
  which shows up as 1e-5 relative error in the gate gradients.
  """
  axis %= g.ndim
  g = jnp.moveaxis(g, axis, -1)                                    # [..., C]
  C = g.shape[-1]
  terms = jnp.where(_tril(C, False), g[..., :, None], 0.0)        # [..., i=s, j]
  seg = jnp.cumsum(terms, axis=-2)                                 # [..., i, j]
  return jnp.moveaxis(seg, (-2, -1), (axis, axis + 1))


def _rest_sums(g, axis: int):
  """sum_{s > i} g_s along `axis`: the decay from token i to the end of its (sub-)chunk."""
  rev = jnp.flip(g, axis)
  return jnp.flip(jnp.cumsum(rev, axis) - rev, axis)


def gated_scores(a, b, g, *, diagonal: bool, precision=None):
  """S_ij = sum_d a_id b_jd exp(sum_{j < s <= i} g_sd) for j < i (j <= i with `diagonal`).

  Args:
    a, b: [..., C, K].
    g: None, [..., C] (one log-gate per row) or [..., C, K] (per channel); g <= 0, so every
      exponent formed here is <= 0 and any gate in (-inf, 0] stays finite.
  Returns:
    [..., C, C].
  """
  C, K = a.shape[-2:]
  mask = _tril(C, diagonal)
  if g is None or g.ndim == a.ndim - 1:
    s = jnp.einsum("...ik,...jk->...ij", a, b, precision=precision)
    if g is not None:
      s = s * jnp.exp(jnp.where(mask, _segment_sums(g, -1), -jnp.inf))
    return jnp.where(mask, s, 0.0)
  sub = min(_SUB, C)
  nb = C // sub
  blocks = lambda x: x.reshape(*x.shape[:-2], nb, sub, K)
  ab, bb, gb = blocks(a), blocks(b), blocks(g)
  # Diagonal blocks, exactly, as an elementwise product summed over K.
  sub_mask = _tril(sub, diagonal)[:, :, None]
  expo = jnp.where(sub_mask, _segment_sums(gb, -2), -jnp.inf)      # [..., nb, sub, sub, K]
  diag = jnp.sum(ab[..., :, None, :] * bb[..., None, :, :] * jnp.exp(expo), axis=-1)
  eye = jnp.eye(nb, dtype=a.dtype)
  scores = jnp.einsum("...Iij,IJ->...IiJj", diag, eye).reshape(*a.shape[:-2], C, C)
  if nb == 1:
    return scores
  # Off-diagonal blocks (row block > column block J) factor through the end r of block J:
  # exp(g over (j, r]) on the column side, exp(g over (r, i]) on the row side.
  right = bb * jnp.exp(_rest_sums(gb, -2))                         # [..., nb, sub, K]
  row_block = jnp.arange(C) // sub
  below = row_block[None, :] > jnp.arange(nb)[:, None]             # [nb(J), C(i)]
  after_r = jnp.cumsum(jnp.where(below[:, :, None], g[..., None, :, :], 0.0), axis=-2)
  left = a[..., None, :, :] * jnp.exp(jnp.where(below[:, :, None], after_r, -jnp.inf))
  off = jnp.einsum("...Jik,...Jjk->...iJj", left, right, precision=precision)
  return scores + off.reshape(*a.shape[:-2], C, C)


def prepare(q, k, v, beta, g, *, precision=None) -> Prepared:
  """Steps 1-2 for every chunk at once. q, k [..., C, K]; v [..., C, V]; beta [..., C];
  g None, [..., C] or [..., C, K]."""
  A = beta[..., :, None] * gated_scores(k, k, g, diagonal=False, precision=precision)
  Attn = gated_scores(q, k, g, diagonal=True, precision=precision)
  if g is None:
    Qg, Kd, Kg = q, k, k
    D = jnp.ones(q.shape[:-2] + q.shape[-1:], q.dtype)
  else:
    gc = g[..., None] if g.ndim == q.ndim - 1 else g               # [..., C, 1 or K]
    G = jnp.cumsum(gc, axis=-2)                                    # decay since chunk start
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
