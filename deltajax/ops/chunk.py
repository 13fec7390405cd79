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

Per-channel gates (KDA) never form exp(+x): the score between tokens i >= j is built from
factors exp(G_i - G_r) exp(G_r - G_j) with r between them (the end of j's sub-block), both <= 1,
so any gate in (-inf, 0] stays finite.

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


def gated_scores(a, b, G, *, diagonal: bool, precision=None):
  """S_ij = sum_d a_id b_jd exp(G_id - G_jd) for j < i (j <= i with `diagonal`), else 0.

  Args:
    a, b: [..., C, K].
    G: None, [..., C] (one gate per row) or [..., C, K] (per channel) cumulative log-gates,
      non-increasing along C.
  Returns:
    [..., C, C].
  """
  C, K = a.shape[-2:]
  mask = _tril(C, diagonal)
  if G is None or G.ndim == a.ndim - 1:
    s = jnp.einsum("...ik,...jk->...ij", a, b, precision=precision)
    if G is not None:
      s = s * jnp.exp(jnp.where(mask, G[..., :, None] - G[..., None, :], -jnp.inf))
    return jnp.where(mask, s, 0.0)
  sub = min(_SUB, C)
  nb = C // sub
  blocks = lambda x: x.reshape(*x.shape[:-2], nb, sub, K)
  ab, bb, Gb = blocks(a), blocks(b), blocks(G)
  # Diagonal blocks, exactly: exponents G_i - G_j <= 0 wherever the mask keeps them.
  sub_mask = _tril(sub, diagonal)[:, :, None]
  expo = jnp.where(sub_mask, Gb[..., :, None, :] - Gb[..., None, :, :], -jnp.inf)
  diag = jnp.sum(ab[..., :, None, :] * bb[..., None, :, :] * jnp.exp(expo), axis=-1)
  eye = jnp.eye(nb, dtype=a.dtype)
  scores = jnp.einsum("...Iij,IJ->...IiJj", diag, eye).reshape(*a.shape[:-2], C, C)
  if nb == 1:
    return scores
  # Off-diagonal blocks (row block > column block J), through the end r of block J.
  G_end = Gb[..., :, -1, :]                                        # [..., nb, K]
  right = bb * jnp.exp(G_end[..., :, None, :] - Gb)                # [..., nb, sub, K]
  row_block = jnp.arange(C) // sub
  below = row_block[None, :] > jnp.arange(nb)[:, None]             # [nb, C]
  expo = jnp.where(below[:, :, None], G[..., None, :, :] - G_end[..., :, None, :], -jnp.inf)
  left = a[..., None, :, :] * jnp.exp(expo)                        # [..., nb, C, K]
  off = jnp.einsum("...Jik,...Jjk->...iJj", left, right, precision=precision)
  return scores + off.reshape(*a.shape[:-2], C, C)


def prepare(q, k, v, beta, g, *, precision=None) -> Prepared:
  """Steps 1-2 for every chunk at once. q, k [..., C, K]; v [..., C, V]; beta [..., C];
  g None, [..., C] or [..., C, K]."""
  C = q.shape[-2]
  G = None if g is None else jnp.cumsum(g, axis=q.ndim - 2)
  A = beta[..., :, None] * gated_scores(k, k, G, diagonal=False, precision=precision)
  Attn = gated_scores(q, k, G, diagonal=True, precision=precision)
  eye = jnp.eye(C, dtype=A.dtype)
  if G is None:
    Qg, Kd, Kg = q, k, k
    D = jnp.ones(q.shape[:-2] + q.shape[-1:], q.dtype)
  else:
    Gc = G[..., None] if G.ndim == q.ndim - 1 else G               # [..., C, 1 or K]
    G_last = Gc[..., -1:, :]
    Qg, Kd, Kg = q * jnp.exp(Gc), k * jnp.exp(G_last - Gc), k * jnp.exp(Gc)
    D = jnp.broadcast_to(jnp.exp(G_last[..., 0, :]), q.shape[:-2] + q.shape[-1:])
  rhs = jnp.concatenate([beta[..., None] * Kg, beta[..., None] * v], axis=-1)
  WU = lax.linalg.triangular_solve(eye + A, rhs, left_side=True, lower=True,
                                   unit_diagonal=True)
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
  S0 = jnp.zeros((B, HV, K, h0.shape[-1]), jnp.float32)
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
