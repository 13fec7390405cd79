"""Causal softmax attention with RoPE, optional sliding window, segment masking and a KV cache.

Cache: {"k", "v": [B, max_len, H, Dh], "pos": [] int32 (tokens written so far)}. A call with
the cache writes its T new keys/values at pos..pos+T-1 and attends over the cache, so prefill
and token-by-token decode reproduce the full forward. max_len bounds the total length.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deltajax.layers import segments
from deltajax.layers.common import Dtype, dense, output_init
from deltajax.layers.common import head_sizes


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary embedding (rotate-half convention). x [B, T, H, Dh] (Dh even), positions [B, T]."""
  Dh = x.shape[-1]
  freq = theta ** (-jnp.arange(0, Dh // 2, dtype=jnp.float32) * 2.0 / Dh)
  ang = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, Dh/2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attend(q, k, v, mask) -> jax.Array:
  """softmax(q k^T / sqrt(Dh) masked) v in float32. q [B,T,H,Dh], k/v [B,S,H,Dh], mask [B,T,S]."""
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST) * q.shape[-1] ** -0.5
  s = jnp.where(mask[:, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", p, v.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST)


class Attention(nn.Module):
  """Multi-head causal softmax attention for hybrid stacks; `(y, new_cache) = attn(x, ...)`.

  window: attend to the last `window` tokens only (sliding window), None = full causal.
  cp_axis: the mesh axis a sequence-sharded model splits time over. Attention needs the whole
  sequence: outside shard_map XLA's partitioner gathers its keys and values across the
  shards; inside a shard_map manual over cp_axis it would see one shard, and says so.
  out_init_scale: scales the output projection's init (models: 1 / sqrt(2 * num_layers)).
  """
  d_model: int
  num_heads: int
  head_dim: int | None = None
  window: int | None = None
  rope_theta: float = 10000.0
  cp_axis: str | None = None
  out_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _sizes(self) -> tuple[int, int]:
    H, _, Dh, _ = head_sizes(self.d_model, self.num_heads, self.head_dim, None, 1.0)
    if Dh % 2:
      raise ValueError(f"head_dim must be even for RoPE; got {Dh}.")
    if self.window is not None and self.window < 1:
      raise ValueError(f"window must be >= 1 or None; got {self.window}.")
    return H, Dh

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    H, Dh = self._sizes()
    kv = jnp.zeros((batch_size, max_len, H, Dh), self.dtype)
    return {"k": kv, "v": kv, "pos": jnp.zeros((), jnp.int32)}

  def _mask(self, q_pos, k_pos):
    """[B, T, S]: key position <= query position (and within the window)."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if self.window is not None:
      m &= k_pos[:, None, :] > q_pos[:, :, None] - self.window
    return m

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids=None, cache=None):
    H, Dh = self._sizes()
    B, T, D = x.shape
    if self.cp_axis in jax.sharding.get_abstract_mesh().manual_axes:
      raise ValueError(f"Attention needs the whole sequence, but inside this shard_map the time "
                       f"axis is split over cp_axis={self.cp_axis!r}: call the model outside "
                       f"shard_map, under jax.set_mesh, where XLA gathers keys and values.")
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids and cache cannot be combined.")
    x = x.astype(self.dtype)
    proj = lambda name: dense(H * Dh, ("embed", "heads"), name=name, dtype=self.dtype,
                              param_dtype=self.param_dtype)(x).reshape(B, T, H, Dh)
    q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    new_cache = None
    if cache is None:
      pos = t
      if segment_ids is not None:
        segments.check_segment_ids(segment_ids, B, T)
        pos = segments.positions(segment_ids)
      q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
      mask = self._mask(t, t)
      if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    else:
      pos = cache["pos"] + t
      q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
      start = (0, cache["pos"], 0, 0)
      ck = lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
      cv = lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
      new_cache = {"k": ck, "v": cv, "pos": cache["pos"] + T}
      k_pos = jnp.broadcast_to(jnp.arange(ck.shape[1], dtype=jnp.int32), (B, ck.shape[1]))
      mask = self._mask(pos, k_pos)
      k, v = ck, cv
    o = attend(q, k, v, mask).astype(self.dtype)
    y = dense(D, ("heads", "embed"), name="o_proj", dtype=self.dtype,
              param_dtype=self.param_dtype,
              kernel_init=output_init(self.out_init_scale))(o.reshape(B, T, H * Dh))
    return y, new_cache
