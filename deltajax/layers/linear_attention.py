"""Plain causal linear attention S_t = S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, in chunked form.

Documents of a packed row are separated by `resets` (the state is zeroed before a reset
token). Inside a chunk of C tokens, with c_t the number of resets up to t in the chunk:
  token i reads token j of the chunk iff j <= i and c_i == c_j,
  token i reads the carried state iff c_i == 0,
  the state after the chunk is [c_last == 0] S + sum_{j : c_j == c_last} k_j v_j^T.
Only the chunk-to-chunk state pass is sequential (T / C steps).

Legend: B batch, T tokens, H heads, K key dim, V value dim, nc chunks, C chunk length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


def linear_attention(q, k, v, *, resets=None, initial_state=None, chunk_size: int = 64):
  """q, k [B, T, H, K] (q already scaled), v [B, T, H, V], resets [B, T] bool or None,
  initial_state [B, H, K, V]. Returns o [B, T, H, V] (q's dtype) and the final state (float32).
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  out_dtype = q.dtype
  C = min(chunk_size, T)
  nc = -(-T // C)
  pad = nc * C - T
  f32 = lambda x: jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  q, k, v = f32(q), f32(k), f32(v)  # padded tokens have k = v = 0: they add nothing
  r = jnp.zeros((B, T), bool) if resets is None else resets
  r = jnp.pad(r, ((0, 0), (0, pad)))
  chunks = lambda x: x.reshape(B, nc, C, *x.shape[2:])
  q, k, v, r = chunks(q), chunks(k), chunks(v), chunks(r)
  c = jnp.cumsum(r.astype(jnp.int32), axis=2)  # [B, nc, C]
  sees_prev = c == 0
  to_state = c == c[..., -1:]
  mask = jnp.tril(jnp.ones((C, C), bool)) & (c[..., :, None] == c[..., None, :])
  scores = jnp.einsum("bnihk,bnjhk->bnhij", q, k, precision=_HI) * mask[:, :, None]
  o = jnp.einsum("bnhij,bnjhv->bnihv", scores, v, precision=_HI)
  kv = jnp.einsum("bnjhk,bnjhv->bnhkv", k * to_state[..., None, None], v, precision=_HI)
  keep = sees_prev[..., -1]  # [B, nc]: no reset in the chunk

  def step(S, x):
    kv_n, keep_n = x
    return jnp.where(keep_n[:, None, None, None], S, 0.0) + kv_n, S

  S0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  final, S_before = lax.scan(step, S0, (jnp.moveaxis(kv, 1, 0), keep.T))
  S_before = jnp.moveaxis(S_before, 0, 1)  # [B, nc, H, K, V]
  inter = jnp.einsum("bnihk,bnhkv->bnihv", q, S_before, precision=_HI)
  o = o + inter * sees_prev[..., None, None]
  o = o.reshape(B, nc * C, H, V)[:, :T]
  return o.astype(out_dtype), final
