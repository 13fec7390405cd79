"""References for the Mosaic TPU kernels, on the raw arrays of deltajax.core.problem.

* `token_loop`: the recurrence token by token, written from the maths (DESIGN.md), in the
  inputs' precision (float64 in the tests). It shares nothing with the kernels but the
  q/k loading rule of deltajax.core.inputs.
* `chunked`: the kernels' own per-chunk maths (`maths.chunk_forward`) driven by `lax.scan`
  instead of Pallas: same arithmetic, no memory plumbing. A difference between it and the
  kernels is a bug in the blocks, index maps, DMAs or loops; a difference between it and
  `token_loop` is a bug in the maths.

Legend as in deltajax.core.problem.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from deltajax.core.documents import Documents, chunk_documents
from deltajax.core.inputs import load_qk
from deltajax.core.problem import Problem

from . import maths


def token_loop(p: Problem, q, k, v, beta, g, h0, docs: Documents | None):
  """o [B, T, HV, V] and the final states [N, HV, K, V] (None unless asked)."""
  dt = jnp.result_type(q.dtype, jnp.float32)
  q, k = load_qk(p, q, k)
  q, k, v, beta = (x.astype(dt) for x in (q, k, v, beta))
  G = p.G
  rep = lambda x, axis: jnp.repeat(x, G, axis=axis)                     # q/k head per value head
  qh, kh = rep(q, 2), rep(k, 3)                                          # [B,T,HV,K], [B,T,n,HV,K]
  h0 = jnp.zeros((p.N, p.HV, p.K, p.V), dt) if h0 is None else h0.astype(dt)
  S0 = h0[:p.B] if docs is None else jnp.zeros((p.B, p.HV, p.K, p.V), dt)
  finals = jnp.zeros_like(h0)
  xs = dict(q=jnp.moveaxis(qh, 1, 0), k=jnp.moveaxis(kh, 1, 0), v=jnp.moveaxis(v, 1, 0),
            beta=jnp.moveaxis(beta, 1, 0))
  if g is not None:
    xs["g"] = jnp.moveaxis(g.astype(dt), 1, 0)
  if docs is not None:
    # max, not set: an empty document shares its `last` with the one before it.
    is_last = jnp.zeros((p.B, p.T), bool).at[docs.stream, docs.last].max(~docs.empty)
    xs.update(reset=docs.reset.T, doc=docs.doc.T, last=is_last.T)

  def step(carry, x):
    S, finals = carry
    if docs is not None:
      S = jnp.where(x["reset"][:, None, None, None], h0[x["doc"]], S)
    if "g" in x:
      e = jnp.exp(x["g"])
      S = S * (e[..., None, None] if p.gate == "head" else e[..., None])
    for s in range(p.n):
      kj = x["k"][:, s]                                                  # [B, HV, K]
      err = x["v"][:, s] - jnp.einsum("bhkv,bhk->bhv", S, kj)
      S = S + kj[..., None] * (x["beta"][:, s][..., None] * err)[..., None, :]
    o = jnp.einsum("bhkv,bhk->bhv", S, x["q"])
    if docs is not None:
      keep = x["last"][:, None, None, None]
      finals = finals.at[x["doc"]].set(jnp.where(keep, S, finals[x["doc"]]))
    return (S, finals), o

  with jax.default_matmul_precision("highest"):
    (S, finals), o = lax.scan(step, (S0, finals), xs)
  o = jnp.moveaxis(o, 0, 1).astype(p.dtype)
  if not p.output_final_state:
    return o, None
  if docs is None:
    return o, S
  return o, jnp.where(docs.empty[:, None, None, None], h0, finals)


def chunked(p: Problem, q, k, v, beta, g, h0, docs: Documents | None, numerics=None):
  """`maths.chunk_forward` over the chunks with `lax.scan`; documents only on chunk starts.

  (Documents that start inside a chunk need deltajax.core.packing's glue for their initial
  and final states; this reference takes h0 only for documents starting on a chunk boundary and
  returns the state after the last chunk of each stream.)
  """
  Ct, n, nc = p.tokens_per_chunk, p.n, p.num_chunks
  C = Ct * n
  ctx = maths.Chunk(Ct=Ct, n=n, gate=p.gate, scale=p.scale, l2norm=p.use_qk_l2norm,
                    numerics=numerics or maths.Numerics("float32"), packed=docs is not None)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, nc * Ct - p.T)] + [(0, 0)] * (x.ndim - 2))
  G = p.G
  qc = pad(q).reshape(p.B, nc, Ct, p.H, p.K)
  kc = pad(k).reshape(p.B, nc, C, p.H, p.K)
  vc = pad(v).reshape(p.B, nc, C, p.HV, p.V)
  bc = pad(beta).reshape(p.B, nc, C, p.HV)
  if g is None:
    gc = None
  elif p.gate == "head":
    gs = jnp.zeros((*g.shape[:2], n, p.HV), g.dtype).at[:, :, 0].set(g)
    gc = pad(gs).reshape(p.B, nc, C, p.HV)
  else:
    gc = pad(g).reshape(p.B, nc, C, p.HV, p.K)
  if docs is not None:
    cd = chunk_documents(docs, Ct, nc)
    start, seq, segment = cd.start, cd.seq, cd.segment.astype(jnp.float32)
  else:
    start = jnp.broadcast_to(jnp.arange(nc) == 0, (p.B, nc))
    seq = jnp.broadcast_to(jnp.arange(p.B)[:, None], (p.B, nc))
    segment = None
  h0 = jnp.zeros((p.N, p.HV, p.K, p.V), jnp.float32) if h0 is None else h0.astype(jnp.float32)

  heads = jnp.arange(p.HV)

  def scan_one(b, hv):
    """Every chunk of stream b, value head hv: o [nc, Ct, V], final [K, V]."""
    h = hv // G

    def step(S, c):
      gg = None
      if gc is not None:
        gg = (gc[b, c, :, hv][None].astype(jnp.float32) if p.gate == "head"
              else gc[b, c, :, hv])
      seg = None
      if segment is not None:
        st = jnp.repeat(segment[b, c], n)
        seg = (st[:, None], st[None, :], segment[b, c][:, None])
      S = jnp.where(start[b, c], h0[seq[b, c], hv], S)
      o, S, _ = maths.chunk_forward(qc[b, c, :, h], kc[b, c, :, h], vc[b, c, :, hv],
                                    bc[b, c, :, hv][None].astype(jnp.float32), gg, S, seg, ctx)
      return S, o

    S, o = lax.scan(step, jnp.zeros((p.K, p.V), jnp.float32), jnp.arange(nc))
    return o, S

  over_heads = jax.vmap(scan_one, in_axes=(None, 0))
  o, finals = jax.jit(jax.vmap(over_heads, in_axes=(0, None)))(jnp.arange(p.B), heads)
  o = jnp.moveaxis(o, 1, 3).reshape(p.B, nc * Ct, p.HV, p.V)[:, :p.T].astype(p.dtype)
  return o, finals
