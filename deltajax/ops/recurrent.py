"""The token-by-token recurrence: the decode path, and the plainest statement of the maths.

Per value head, with state S [K, V] in float32 and q scaled:

    S <- exp(g_t) * S                              (g: none, per head, or per key channel)
    S <- S + k_tj (beta_tj (v_tj - S^T k_tj))^T    for each Householder step j
    o_t = S^T q_t

A token that starts a document first replaces S by the document's initial state (or zeros).

Heads are grouped as [H, G]: value head h * G + i reads query/key head h, by broadcasting, so
q and k are never repeated. Legend as in deltajax.core.problem.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from deltajax.core.documents import Documents
from deltajax.core.inputs import load_qk
from deltajax.core.problem import Problem

_HI = lax.Precision.HIGHEST


def recurrent(p: Problem, q, k, v, beta, g, h0, docs: Documents | None):
  """Runs the recurrence with `lax.scan` over tokens; arguments as deltajax.core.problem.

  Returns o [B, T, HV, V] in q's dtype and the final states [N, HV, K, V] float32 (or None).
  """
  compute = jnp.result_type(q, k, v, beta, *(() if g is None else (g,)), jnp.float32)
  q, k = load_qk(p, q, k)
  B, T, H, G, K, V, N = p.B, p.T, p.H, p.G, p.K, p.V, p.N
  c = lambda x: x.astype(compute)
  # Time-major, heads grouped [H, G] (q and k broadcast over G).
  xs = dict(
      q=jnp.moveaxis(c(q), 1, 0)[..., None, :],                              # [T,B,H,1,K]
      k=jnp.moveaxis(c(k), 1, 0)[..., None, :],                              # [T,B,n,H,1,K]
      v=jnp.moveaxis(c(v), 1, 0).reshape(T, B, p.n, H, G, V),
      beta=jnp.moveaxis(c(beta), 1, 0).reshape(T, B, p.n, H, G))
  if g is not None:
    xs["g"] = jnp.moveaxis(c(g), 1, 0).reshape(T, B, H, G, *g.shape[3:])
  h0 = (jnp.zeros((N, p.HV, K, V), compute) if h0 is None else c(h0)).reshape(N, H, G, K, V)
  finals = None
  if docs is not None:
    is_last = jnp.concatenate([docs.reset[:, 1:], jnp.ones((B, 1), bool)], axis=1)
    xs.update(reset=docs.reset.T, doc=docs.doc.T, last=is_last.T)
    if p.output_final_state:
      finals = jnp.zeros_like(h0)

  def step(carry, x):
    S, finals = carry
    if docs is not None:
      S = jnp.where(x["reset"][:, None, None, None, None], h0[x["doc"]], S)
    if "g" in x:
      decay = jnp.exp(x["g"])
      S = S * (decay[..., None, None] if p.gate == "head" else decay[..., None])
    for j in range(p.n):
      kj = x["k"][:, j]
      err = x["v"][:, j] - jnp.einsum("bhgkv,bhgk->bhgv", S, jnp.broadcast_to(
          kj, S.shape[:-1]), precision=_HI)
      S = S + kj[..., None] * (x["beta"][:, j][..., None] * err)[..., None, :]
    o = jnp.einsum("bhgkv,bhgk->bhgv", S, jnp.broadcast_to(x["q"], S.shape[:-1]),
                   precision=_HI)
    if finals is not None:
      keep = x["last"][:, None, None, None, None]
      finals = finals.at[x["doc"]].set(jnp.where(keep, S, finals[x["doc"]]))
    return (S, finals), o

  S0 = h0 if docs is None else jnp.zeros((B, H, G, K, V), compute)
  (S, finals), o = lax.scan(step, (S0, finals), xs)
  o = jnp.moveaxis(o, 0, 1).reshape(B, T, p.HV, V).astype(p.dtype)
  if not p.output_final_state:
    return o, None
  final = S if docs is None else finals
  return o, final.reshape(-1, p.HV, K, V).astype(jnp.promote_types(compute, jnp.float32))
