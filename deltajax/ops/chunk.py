"""The chunkwise WY/UT parallel form in plain JAX, with a memory-lean `custom_vjp`.

Time is cut into chunks of C Householder steps (Ct whole tokens of n steps each). Inside a
chunk, with G the log-decay summed from the start of each token's segment (see below), rows i
and columns j over steps, and q scaled:

  1. A = strict_lower(diag(beta) (K K^T) * exp(G_i - G_j) * same_i_j);  (I + A) unit lower.
  2. W = (I + A)^-1 (beta * K * exp(G)),  U = (I + A)^-1 (beta * V).
  3. Across chunks, sequentially: V_new = U - (first * W) S
        O = (first * Q exp(G)) S + (Q K^T * exp(G_i - G_j) * same_i_j) V_new   (j <= i)
        S <- D S + (last * K * exp(rest))^T V_new

Documents live inside the chunk grid: a token that starts a document splits its chunk into
segments. `same_i_j` masks pairs of different segments; `first` keeps the rows of the segment
that continues the state entering the chunk, `last` those of the segment that leaves it, and
D = exp(decay of the chunk) is 0 when the chunk holds a boundary. A chunk whose first token
starts a document enters with that document's initial state (zeros without one); a document
starting inside a chunk starts from zeros here, and its initial state (like the final state of
one ending inside a chunk) is a linear correction around this core (deltajax.core.packing). So
the chunk count is ceil(T / Ct) whatever the number of documents.

DeltaProduct's n steps per token are rows of their own (the gate on a token's first step); q
is read at each token's last step, so O and the scores Q K^T have Ct rows, not C.

Steps 1-2 ("prepare") and the outputs are parallel over chunks; only the state pass is
sequential. The backward keeps the raw inputs, the state after every chunk and V_new,
recomputes the preparation, goes back through the output and the state pass by hand, and hands
the rest to `jax.vjp` of the preparation. Inputs stay in their dtype until `prepare` loads them
(cast, L2 norm and scale happen there, per chunk), and q/k keep their H heads: value heads are
grouped [H, G] and q/k broadcast over G.

Legend: nc chunks, B streams, H q/k heads, G value heads per q/k head, C steps and Ct tokens
per chunk, K key dim, V value dim, N sequences. Arrays are chunk-major, [nc, B, H, G, C, ...]
(q and k with G = 1), so the state passes scan over the leading axis with no transposes.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from deltajax.core import packing
from deltajax.core.documents import Documents, chunk_documents
from deltajax.core.inputs import as_float32, load_g, load_qk
from deltajax.core.problem import Problem
from deltajax.ops.scores import gated_scores, segment_sums, sum_over, tril
from deltajax.ops.triangular import solve_unit_lower


class Prepared(NamedTuple):
  """What the state pass needs from each chunk (masked for the segments it touches).

  Qg [.., Ct, K] (rows of the first segment), W [.., C, K] (first segment), Kd [.., C, K]
  (last segment), U [.., C, V], D [.., K] (0 when the chunk holds a boundary),
  Attn [.., Ct, C].
  """
  Qg: jax.Array
  Kd: jax.Array
  W: jax.Array
  U: jax.Array
  D: jax.Array
  Attn: jax.Array


def _gate_steps(g, n: int):
  """Per-token head gates [.., Ct] -> per-step [.., Ct * n], on each token's first step.

  (Per-channel gates belong to kda, which has one step per token.)
  """
  if g is None or n == 1:
    return g
  steps = jnp.zeros((*g.shape, n), g.dtype).at[..., 0].set(g)
  return steps.reshape(*g.shape[:-1], g.shape[-1] * n)


def _readout(x, n: int, axis: int):
  """The rows of each token's last step along `axis` (every row when n == 1)."""
  if n == 1:
    return x
  return lax.slice_in_dim(x, n - 1, x.shape[axis], n, axis=axis)


def prepare(q, k, v, beta, g, segment, *, p: Problem, precision=None) -> Prepared:
  """Steps 1-2 for every chunk at once.

  Args:
    q: [.., 1, Ct, K]; k: [.., 1, C, K]; v: [.., G, C, V]; beta: [.., G, C]; g: None,
      [.., G, Ct] or [.., G, Ct, K] — raw inputs in their dtypes (cast, normed, scaled here).
    segment: None (no document starts inside a chunk) or [.., 1, 1, C] int32, the segment of
      each step (deltajax.core.documents.ChunkDocuments, per step).
  """
  n, C = p.n, k.shape[-2]
  q, k = load_qk(p, q, k)
  v, beta = as_float32(v), as_float32(beta)
  gs = _gate_steps(load_g(g), n)
  gc = None if gs is None else (gs[..., None] if p.gate == "head" else gs)   # [.., C, 1|K]
  same = None if segment is None else segment[..., :, None] == segment[..., None, :]

  if p.gate == "channel":  # the scores decay per value head: no q/k product to share
    q, k = (jnp.broadcast_to(x, x.shape[:-3] + (p.G,) + x.shape[-2:]) for x in (q, k))
  if n == 1:
    KK, Attn = gated_scores((k, q), k, gs, diagonal=True, precision=precision)
  else:  # per-head (or no) gates: one decay matrix, and its read-out rows for Attn
    decay = tril(C, True) if gs is None else jnp.exp(
        jnp.where(tril(C, True), segment_sums(gs, -1), -jnp.inf))
    mm = functools.partial(jnp.einsum, precision=precision)
    KK = mm("...ik,...jk->...ij", k, k) * decay
    Attn = mm("...ik,...jk->...ij", q, k) * _readout(decay, n, -2)
  if same is not None:
    KK = jnp.where(same, KK, 0.0)
    Attn = jnp.where(_readout(same, n, -2), Attn, 0.0)
  A = beta[..., :, None] * jnp.where(tril(C, False), KK, 0.0)

  G = rest = None
  Kg = k
  if gc is not None:
    # Decay from the start of each step's segment through it, and after it to the segment's end.
    through = tril(C, True) if same is None else tril(C, True) & same
    after = ~tril(C, True) if same is None else ~tril(C, True) & same
    G, rest = sum_over(through, gc, -2), sum_over(after, gc, -2)
    Kg = k * jnp.exp(G)
  W, U = solve_unit_lower(A, (beta[..., None] * Kg, beta[..., None] * v), precision)
  Qg = q if G is None else q * jnp.exp(_readout(G, n, -2))
  Kd = k if rest is None else k * jnp.exp(rest)
  heads = W.shape[:-2]                                                  # [.., G]
  D = jnp.ones(heads + (p.K,), W.dtype) if G is None else jnp.broadcast_to(
      jnp.exp(G[..., -1, :]), heads + (p.K,))
  Qg, Kd, Attn = (jnp.broadcast_to(x, heads + x.shape[-2:]) for x in (Qg, Kd, Attn))
  if segment is not None:
    first = (segment == 0)[..., None]
    last = (segment == segment[..., -1:])[..., None]
    Qg = jnp.where(_readout(first, n, -2), Qg, 0.0)
    W = jnp.where(first, W, 0.0)
    Kd = jnp.where(last, Kd, 0.0)
    D = jnp.where(segment[..., -1:] > 0, 0.0, D)                       # a boundary inside
  return Prepared(Qg=Qg, Kd=Kd, W=W, U=U, D=D, Attn=Attn)


def _entering(S_out, h0, start, seq):
  """The state entering every chunk: the sequence's initial state (zeros without one) where
  the chunk starts a sequence, else the state the previous chunk left."""
  prev = jnp.concatenate([jnp.zeros_like(S_out[:1]), S_out[:-1]], axis=0)
  first = jnp.zeros_like(prev) if h0 is None else as_float32(h0)[seq]
  return jnp.where(start[:, :, None, None, None, None], first, prev)


def _state_pass(pm: Prepared, S_add, h0, start, seq, precision):
  """The sequential pass: the state after every chunk, S_out [nc, B, H, G, K, V], and V_new."""
  mm = functools.partial(jnp.einsum, precision=precision)
  h0 = as_float32(h0)

  def body(S, x):
    st, sq, W, U, Kd, D, S_extra = x
    entry = jnp.zeros_like(S) if h0 is None else h0[sq]
    S = jnp.where(st[:, None, None, None, None], entry, S)
    v_new = U - mm("...ck,...kv->...cv", W, S)
    S = D[..., None] * S + mm("...ck,...cv->...kv", Kd, v_new)
    if S_extra is not None:
      S = S + S_extra
    return S, (S, v_new)

  S0 = jnp.zeros(pm.W.shape[1:-2] + (pm.W.shape[-1], pm.U.shape[-1]), pm.W.dtype)
  _, (S_out, v_new) = lax.scan(body, S0, (start, seq, pm.W, pm.U, pm.Kd, pm.D, S_add))
  return S_out, v_new


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def chunk_core(p: Problem, precision, q, k, v, beta, g, h0, segment, S_add, start, seq):
  """O [nc, B, H, G, Ct, V], S_out [nc, B, H, G, K, V] and V_new [nc, B, H, G, C, V].

  Inputs chunk-major in their own dtypes: q [nc, B, H, 1, Ct, K], k [nc, B, H, 1, C, K],
  v [nc, B, H, G, C, V], beta [.., C], g None / [nc, B, H, G, Ct(, K)]; h0 None or
  [N, H, G, K, V]; segment None or [nc, B, 1, 1, C] int32; S_add None or like S_out (added to
  the state leaving each chunk); start, seq [nc, B] (the chunk starts a sequence; which).
  """
  return _chunk_fwd(p, precision, q, k, v, beta, g, h0, segment, S_add, start, seq)[0]


def _chunk_fwd(p, precision, q, k, v, beta, g, h0, segment, S_add, start, seq):
  mm = functools.partial(jnp.einsum, precision=precision)
  pm = prepare(q, k, v, beta, g, segment, p=p, precision=precision)
  S_out, v_new = _state_pass(pm, S_add, h0, start, seq, precision)
  S_in = _entering(S_out, h0, start, seq)
  o = mm("...ck,...kv->...cv", pm.Qg, S_in) + mm("...ij,...jv->...iv", pm.Attn, v_new)
  return (o, S_out, v_new), (q, k, v, beta, g, h0, segment, S_add, start, seq, S_out, v_new)


def _chunk_bwd(p, precision, res, cts):
  """Back through the output and the state pass by hand (their products written once each),
  then `jax.vjp` of the preparation, recomputed."""
  q, k, v, beta, g, h0, segment, S_add, start, seq, S_out, v_new = res
  do, dS_out, dv_new_out = cts
  mm = functools.partial(jnp.einsum, precision=precision)
  pm, prepare_vjp = jax.vjp(
      lambda q, k, v, beta, g: prepare(q, k, v, beta, g, segment, p=p, precision=precision),
      q, k, v, beta, g)
  S_in = _entering(S_out, h0, start, seq)
  # Through o = Qg S_in + Attn V_new, with V_new = U - W S_in: the parts that need no state
  # cotangent, so the reverse pass below stays two products per chunk.
  dv_direct = mm("...ji,...jv->...iv", pm.Attn, do) + dv_new_out
  dS_direct = mm("...ck,...cv->...kv", pm.Qg, do) - mm("...ck,...cv->...kv", pm.W, dv_direct)

  # Reverse pass. dS_next is the cotangent of the state entering chunk c + 1; at each chunk
  # dSo is that of the state leaving it, through S_out = D S_in + Kd^T V_new (+ S_add).
  next_start = jnp.concatenate([start[1:], jnp.ones_like(start[:1])], axis=0)

  def body(dS_next, x):
    W, Kd, D, dS_direct_c, dS_out_c, nxt = x
    dSo = dS_out_c + jnp.where(nxt[:, None, None, None, None], 0.0, dS_next)
    kd_dso = mm("...ck,...kv->...cv", Kd, dSo)                          # dV_new from S_out
    dS_in = dS_direct_c + D[..., None] * dSo - mm("...ck,...cv->...kv", W, kd_dso)
    return dS_in, (dSo, dS_in, kd_dso)

  xs = (pm.W, pm.Kd, pm.D, dS_direct, dS_out, next_start)
  _, (dSo, dS_in, kd_dso) = lax.scan(body, jnp.zeros_like(S_out[0]), xs, reverse=True)

  dv_new = dv_direct + kd_dso
  dp = Prepared(
      Qg=mm("...cv,...kv->...ck", do, S_in),
      Kd=mm("...cv,...kv->...ck", v_new, dSo),
      W=-mm("...cv,...kv->...ck", dv_new, S_in),
      U=dv_new,
      D=jnp.sum(dSo * S_in, axis=-1),
      Attn=mm("...iv,...jv->...ij", do, v_new))
  dq, dk, dv, dbeta, dg = prepare_vjp(dp)
  dh0 = None
  if h0 is not None:
    into_h0 = jnp.where(start[:, :, None, None, None, None], dS_in, 0.0)
    dh0 = jnp.zeros(h0.shape, into_h0.dtype).at[seq].add(into_h0).astype(h0.dtype)
  dS_add = None if S_add is None else dSo.astype(S_add.dtype)
  return dq, dk, dv, dbeta, dg, dh0, None, dS_add, None, None


chunk_core.defvjp(_chunk_fwd, _chunk_bwd)


def chunk(p: Problem, q, k, v, beta, g, h0, docs: Documents | None, precision=None):
  """The chunkwise form; arguments and returns as deltajax.core.problem describes."""
  B, T, H, G, n = p.B, p.T, p.H, p.G, p.n
  Ct, nc = p.tokens_per_chunk, p.num_chunks
  C = Ct * n
  S_add = o_add = None
  if docs is not None and h0 is not None:
    v, o_add, S_add = packing.inject_initial_states(p, q, k, v, g, h0, docs)

  def chunks(x):                                      # [B, T, ...] -> [nc, B, Ct, ...]
    x = jnp.pad(x, [(0, 0), (0, nc * Ct - T)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(B, nc, Ct, *x.shape[2:]), 1, 0)

  qc = jnp.moveaxis(chunks(q), 3, 2)[:, :, :, None]                          # [nc,B,H,1,Ct,K]
  kc = jnp.moveaxis(chunks(k).reshape(nc, B, C, H, p.K), 3, 2)[:, :, :, None]  # [nc,B,H,1,C,K]
  vc = jnp.moveaxis(chunks(v).reshape(nc, B, C, H, G, p.V), 2, 4)            # [nc,B,H,G,C,V]
  bc = jnp.moveaxis(chunks(beta).reshape(nc, B, C, H, G), 2, 4)              # [nc,B,H,G,C]
  gc = None if g is None else jnp.moveaxis(
      chunks(g).reshape(nc, B, Ct, H, G, *g.shape[3:]), 2, 4)                # [nc,B,H,G,Ct(,K)]
  h0c = None if h0 is None else h0.reshape(p.N, H, G, p.K, p.V)
  heads = lambda x: x.reshape(*x.shape[:2], H, G, *x.shape[3:])

  if docs is None:
    segment = None
    start = jnp.broadcast_to((jnp.arange(nc) == 0)[:, None], (nc, B))
    seq = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[None], (nc, B))
  else:
    cd = chunk_documents(docs, Ct, nc)
    start, seq = cd.start.T, cd.seq.T
    segment = jnp.moveaxis(jnp.repeat(cd.segment, n, axis=-1), 1, 0)[:, :, None, None]
    if S_add is not None:
      S_add = heads(jnp.moveaxis(S_add, 1, 0))                                # [nc,B,H,G,K,V]

  o, S_out, v_new = chunk_core(p, precision, qc, kc, vc, bc, gc, h0c, segment, S_add,
                               start, seq)
  o = jnp.moveaxis(o, 4, 2).reshape(nc, B, Ct, p.HV, p.V)
  o = jnp.moveaxis(o, 0, 1).reshape(B, nc * Ct, p.HV, p.V)[:, :T]
  if o_add is not None:
    o = o + o_add
  o = o.astype(p.dtype)
  if not p.output_final_state:
    return o, None
  if docs is None:
    return o, S_out[-1].reshape(B, p.HV, p.K, p.V)
  flat = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, nc, p.HV, *x.shape[-2:])
  S_in = flat(_entering(S_out, h0c, start, seq))                             # [B,nc,HV,K,V]
  v_steps = jnp.moveaxis(jnp.moveaxis(v_new, 0, 1).reshape(B, nc, p.HV, C, p.V), 3, 2)
  return o, packing.document_finals(p, k, g, h0, docs, S_in, v_steps)
