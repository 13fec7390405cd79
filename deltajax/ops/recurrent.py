"""The token-by-token recurrence: the readable reference every other path is tested against.

Per value head, with state S [K, V] in float32 and q already scaled:

    S <- exp(g_t) * S                       (g: none, per head, or per key channel)
    S <- S + k_t (beta_t (v_t - S^T k_t))^T  (the delta step)
    o_t = S^T q_t

Legend: B streams, T tokens, HV value heads (q and k already repeated to HV), K key dim,
V value dim, N sequences.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from deltajax.ops.layout import Layout

_HI = lax.Precision.HIGHEST


def recurrent(q, k, v, beta, g, h0, layout: Layout):
  """Runs the recurrence over a token-level layout (`layout.C == 1`).

  Args:
    q, k: [B, T, HV, K] float32, q scaled.
    v: [B, T, HV, V] float32.
    beta: [B, T, HV] float32.
    g: None, [B, T, HV] or [B, T, HV, K] float32 log-decays.
    h0: [N, HV, K, V] float32 initial states.
    layout: from `make_layout(B, T, 1, cu_seqlens)`.

  Returns:
    o [B, T, HV, V] float32 and the final states [N, HV, K, V] float32.
  """
  assert layout.C == 1
  B = q.shape[0]
  tokens = lambda x: None if x is None else jnp.moveaxis(layout.to_chunks(x)[:, :, 0], 1, 0)
  is_last = jnp.zeros((B, layout.nc), bool).at[layout.last_stream, layout.last_chunk].set(True)
  xs = dict(q=tokens(q), k=tokens(k), v=tokens(v), beta=tokens(beta), g=tokens(g),
            start=layout.start.T, seq=layout.seq.T, last=is_last.T)

  def step(carry, x):
    S, finals = carry
    S = jnp.where(x["start"][:, None, None, None], h0[x["seq"]], S)
    if x["g"] is not None:
      decay = jnp.exp(x["g"])
      S = S * (decay[..., None, None] if decay.ndim == 2 else decay[..., None])
    err = x["v"] - jnp.einsum("bhkv,bhk->bhv", S, x["k"], precision=_HI)
    S = S + jnp.einsum("bhk,bhv->bhkv", x["k"], x["beta"][..., None] * err, precision=_HI)
    o = jnp.einsum("bhkv,bhk->bhv", S, x["q"], precision=_HI)
    keep = x["last"][:, None, None, None]
    finals = finals.at[x["seq"]].set(jnp.where(keep, S, finals[x["seq"]]))
    return (S, finals), o

  S0 = jnp.zeros((B, *h0.shape[1:]), h0.dtype)
  (_, finals), o = lax.scan(step, (S0, jnp.zeros_like(h0)), xs)
  o = jnp.moveaxis(o, 0, 1)[:, :, None]
  return layout.from_chunks(o), finals
