"""Causal softmax attention with RoPE, optional sliding window, segment masking and a KV cache.

Cache: {"k", "v": [B, max_len, H, Dh], "pos": [] int32 (tokens written so far)} (plus
"delta_memory" [B, H, max_len] for delta attention). A call with the cache writes its T new
keys/values at pos..pos+T-1 and attends over the cache, so prefill and token-by-token decode
reproduce the full forward. max_len bounds the total length.

Sparsity (`sparsity=`):
  TopKConfig     each query attends to k keys (k an int count), chosen among its causal keys
                 by `deltajax.sparsity.topk_mask`: exact and approx keep at most k; the
                 statistical threshold keeps k on average for roughly Gaussian scores, not at
                 most k (kept_keys_max reports it). Softmax over the kept keys only, gradient
                 through the kept scores (or straight-through, as configured). Soft and
                 hard statistical top-k keep the same keys and give the same output here:
                 subtracting a per-query threshold before a softmax changes nothing.
                 `predictor_dim=r` (Spark Transformer's low-cost predictor, You et al. 2025,
                 arXiv:2506.06644, whose abstract says part of the key embedding is
                 reallocated into a predictor of the active entries): the keys are selected
                 by the scores of the first r dimensions of the (rotated) query and key,
                 q[:r] . k[:r], and the kept keys are scored with all dimensions, as this
                 library's issue 15 specifies (the paper's method section could not be read
                 here). No extra parameters: the predictor is a slice of the projections.
  DeltaAttentionConfig   temporal-delta attention for inference (DeltaLLM), see
                 `deltajax.sparsity.delta_attention`: exact weights in a local window of
                 recent keys, thresholded changes from the previous query row outside it.
Metrics ("metrics" collection, under jit): top-k sows kept_keys (mean kept keys per query),
kept_keys_max and density (kept / causal keys); delta attention sows sparsity, macs_skipped
and macs_dense.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deltajax.layers import segments
from deltajax.layers.common import Dtype, dense, output_init
from deltajax.layers.common import head_sizes
from deltajax.sparsity import delta_attention
from deltajax.sparsity.delta_attention import DeltaAttentionConfig
from deltajax.sparsity.spec import parse_spec
from deltajax.sparsity.topk import TopKConfig
from deltajax.sparsity.topk import topk_mask

ATTENTION_TOPK_METHODS = ("exact", "approx", "statistical")


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary embedding (rotate-half convention). x [B, T, H, Dh] (Dh even), positions [B, T]."""
  Dh = x.shape[-1]
  freq = theta ** (-jnp.arange(0, Dh // 2, dtype=jnp.float32) * 2.0 / Dh)
  ang = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, Dh/2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def scores(q, k, scale: float) -> jax.Array:
  """scale * q k^T in float32 [B, H, T, S]. q [B, T, H, d], k [B, S, H, d]."""
  return jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST) * scale


def masked_softmax(s, keep) -> jax.Array:
  """softmax over the keys where keep [B, (H,) T, S] (broadcast over heads); s [B, H, T, S]."""
  return jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1)


def weighted_values(w, v) -> jax.Array:
  """w [B, H, T, S] float32, v [B, S, H, Dh] -> [B, T, H, Dh] float32.

  The barrier makes XLA materialise w in its default layout whatever produced it, so the same
  weights give the same bits (delta attention at threshold 0 equals dense attention exactly;
  without it XLA picks a different summation order after the delta scan).
  """
  w = lax.optimization_barrier(w)
  return jnp.einsum("bhts,bshd->bthd", w, v.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST)


def topk_keys(s, valid, config: TopKConfig, select=None) -> jax.Array:
  """bool [B, H, T, S]: the keys each query keeps among its valid ones.

  s [B, H, T, S] scores; valid [B, T, S] bool; select: the scores that choose the keys
  (Spark's predictor), default s. Exact and approx keep min(k, valid) keys; statistical keeps
  those above its threshold, and always the best one, so that no softmax row is empty (a
  constant row has no entry above its mean).
  """
  select = s if select is None else select
  keep = topk_mask(select, config.k, method=config.method, recall_target=config.recall_target,
                   where=valid[:, None])
  if config.method != "statistical":
    return keep
  best = jnp.max(jnp.where(valid[:, None], select, -jnp.inf), axis=-1, keepdims=True)
  return keep | (valid[:, None] & (select >= best))


def topk_attention(s, valid, config: TopKConfig, select=None):
  """(weights [B, H, T, S], metrics): softmax over each query's top-k keys (`topk_keys`).

  Metrics: kept_keys (mean kept keys per query), kept_keys_max, density (kept / valid).
  """
  keep = topk_keys(s, valid, config, select)
  w = masked_softmax(s, keep)
  if config.gradient == "straight_through":
    dense_w = masked_softmax(s, valid[:, None])
    w = dense_w + lax.stop_gradient(w - dense_w)
  kept = jnp.sum(keep, axis=-1, dtype=jnp.float32)  # [B, H, T]
  return w, {"kept_keys": jnp.mean(kept), "kept_keys_max": jnp.max(kept),
             "density": jnp.sum(kept) / (s.shape[1] * jnp.sum(valid, dtype=jnp.float32))}


def resolve_sparsity(spec):
  """None, a TopKConfig, a DeltaAttentionConfig, or a `parse_spec` string of one of them."""
  spec = parse_spec(spec) if isinstance(spec, str) else spec
  if spec is not None and not isinstance(spec, (TopKConfig, DeltaAttentionConfig)):
    raise ValueError(f"sparsity must be None, a TopKConfig or a DeltaAttentionConfig; "
                     f"got {spec!r}.")
  return spec


class Attention(nn.Module):
  """Multi-head causal softmax attention for hybrid stacks; `(y, new_cache) = attn(x, ...)`.

  window: attend to the last `window` tokens only (sliding window), None = full causal.
  cp_axis: the mesh axis a sequence-sharded model splits time over. Attention needs the whole
  sequence: outside shard_map XLA's partitioner gathers its keys and values across the
  shards; inside a shard_map manual over cp_axis it would see one shard, and says so.
  out_init_scale: scales the output projection's init (models: 1 / sqrt(2 * num_layers)).
  sparsity: None, TopKConfig (k an int number of keys), DeltaAttentionConfig (inference
    only), or their `deltajax.sparsity.parse_spec` string; see the module doc.
  predictor_dim: top-k only; select keys with the first predictor_dim dimensions of each
    head (1 <= predictor_dim <= head_dim), score the kept keys with all of them.
  """
  d_model: int
  num_heads: int
  head_dim: int | None = None
  window: int | None = None
  rope_theta: float = 10000.0
  cp_axis: str | None = None
  out_init_scale: float = 1.0
  sparsity: Any = None
  predictor_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _sizes(self) -> tuple[int, int]:
    H, _, Dh, _ = head_sizes(self.d_model, self.num_heads, self.head_dim, None, 1.0)
    if Dh % 2:
      raise ValueError(f"head_dim must be even for RoPE; got {Dh}.")
    if self.window is not None and self.window < 1:
      raise ValueError(f"window must be >= 1 or None; got {self.window}.")
    sp = resolve_sparsity(self.sparsity)
    if isinstance(sp, TopKConfig):
      if isinstance(sp.k, bool) or not isinstance(sp.k, int):
        raise ValueError(f"k must be an int number of keys per query for attention; "
                         f"got k={sp.k!r}.")
      if sp.method not in ATTENTION_TOPK_METHODS:
        raise ValueError(f"method must be one of {ATTENTION_TOPK_METHODS} for attention; "
                         f"got {sp.method!r}.")
    if self.predictor_dim is not None:
      if not isinstance(sp, TopKConfig):
        raise ValueError(f"predictor_dim needs top-k sparsity (a TopKConfig); got "
                         f"sparsity={sp!r}.")
      r = self.predictor_dim
      if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= Dh:
        raise ValueError(f"predictor_dim must be an int in [1, head_dim={Dh}]; got {r!r}.")
    return H, Dh

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    H, Dh = self._sizes()
    kv = jnp.zeros((batch_size, max_len, H, Dh), self.dtype)
    cache = {"k": kv, "v": kv, "pos": jnp.zeros((), jnp.int32)}
    if isinstance(resolve_sparsity(self.sparsity), DeltaAttentionConfig):
      cache["delta_memory"] = jnp.zeros((batch_size, H, max_len), jnp.float32)
    return cache

  def _mask(self, q_pos, k_pos):
    """[B, T, S]: key position <= query position (and within the window)."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if self.window is not None:
      m &= k_pos[:, None, :] > q_pos[:, :, None] - self.window
    return m

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids=None, cache=None):
    H, Dh = self._sizes()
    sp = resolve_sparsity(self.sparsity)
    B, T, D = x.shape
    if self.cp_axis in jax.sharding.get_abstract_mesh().manual_axes:
      raise ValueError(f"Attention needs the whole sequence, but inside this shard_map the time "
                       f"axis is split over cp_axis={self.cp_axis!r}: call the model outside "
                       f"shard_map, under jax.set_mesh, where XLA gathers keys and values.")
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids and cache cannot be combined.")
    num_keys = T if cache is None else cache["k"].shape[1]
    if isinstance(sp, TopKConfig) and sp.k > num_keys:
      raise ValueError(f"k must be <= the number of keys ({num_keys}); got k={sp.k}.")
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
      q_idx = k_idx = t  # row indices in time (positions restart per document)
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
      q_idx = pos
      k_idx = jnp.broadcast_to(jnp.arange(ck.shape[1], dtype=jnp.int32), (B, ck.shape[1]))
      mask = self._mask(q_idx, k_idx)
      k, v = ck, cv
    s = scores(q, k, Dh ** -0.5)
    metrics = {}
    if isinstance(sp, TopKConfig):
      r = self.predictor_dim
      select = None if r is None else scores(q[..., :r], k[..., :r], Dh ** -0.5)
      w, metrics = topk_attention(s, mask, sp, select)
    elif isinstance(sp, DeltaAttentionConfig):
      exact = delta_attention.local_window(q_idx, k_idx, sp.window)
      memory = (jnp.zeros((B, H, s.shape[-1]), jnp.float32) if cache is None
                else cache["delta_memory"])
      w, memory, sent = delta_attention.delta_weights(masked_softmax(s, mask[:, None]), memory,
                                                      exact, mask, sp.threshold)
      if cache is not None:
        new_cache["delta_memory"] = memory
      metrics = delta_attention.attention_metrics(sent, mask, Dh)
    else:
      w = masked_softmax(s, mask[:, None])
    if not self.is_initializing():  # init would store the metrics and apply append to them
      for name, value in metrics.items():
        self.sow("metrics", name, value)
    o = weighted_values(w, v).astype(self.dtype)
    y = dense(D, ("heads", "embed"), name="o_proj", dtype=self.dtype,
              param_dtype=self.param_dtype,
              kernel_init=output_init(self.out_init_scale))(o.reshape(B, T, H * Dh))
    return y, new_cache
