"""Top-k masking of activations (spatial sparsity): keep the k largest entries per token.

Methods (all along the last axis, per token):
  "exact"        `lax.top_k` indices; exactly k kept.
  "approx"       `lax.approx_max_k` (fast on TPU; elsewhere it falls back to sort and slice).
  "statistical"  Spark Transformer's statistical top-k: threshold = mean + std * Phi^-1(1 - k/d)
                 per token, no sort. Hard: keep x where x > threshold; soft: max(x - thr, 0).
                 About k kept when the token's entries are roughly Gaussian.
  "fatrelu"      ReLU with a threshold (ProSparse's FATReLU): keep x where x > threshold; k unused.

Gradient modes:
  "kept"              d y_i / d x_j = [i == j and i kept] (the threshold or the index choice is
                      not differentiated: gradient only through the kept entries, as in TopK SAEs).
  "straight_through"  forward is the sparse y, backward is the identity.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import ndtri

from deltajax.sparsity import checks
from deltajax.sparsity import metrics

METHODS = ("exact", "approx", "statistical", "fatrelu")
GRADIENTS = ("kept", "straight_through")


@dataclasses.dataclass(frozen=True)
class TopKConfig:
  """How to sparsify activations [..., d].

  k: int count in [1, d] or float fraction in (0, 1] of d (floor(k * d), at least 1).
  method: one of METHODS. gradient: one of GRADIENTS.
  soft: statistical only; subtract the threshold (Spark Transformer) instead of masking.
  threshold: fatrelu only; entries <= threshold become 0.
  recall_target: approx only; passed to `lax.approx_max_k`.

  A config is itself a pure callable `config(h) -> y`; `TopK(config)` adds metrics.
  """
  k: int | float = 0.1
  method: str = "exact"
  gradient: str = "kept"
  soft: bool = False
  threshold: float = 0.0
  recall_target: float = 0.95

  def __post_init__(self):
    checks.check_choice("method", self.method, METHODS)
    checks.check_choice("gradient", self.gradient, GRADIENTS)
    if self.method != "fatrelu":
      checks.check_k(self.k)
    if not isinstance(self.soft, bool):
      raise ValueError(f"soft must be a bool; got {self.soft!r}.")
    if self.soft and self.method != "statistical":
      raise ValueError(f"soft=True needs method='statistical'; got method={self.method!r}.")
    if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
      raise ValueError(f"threshold must be a real number; got {self.threshold!r}.")
    if not 0.0 < self.recall_target <= 1.0:
      raise ValueError(f"recall_target must lie in (0, 1]; got {self.recall_target!r}.")

  def __call__(self, x):
    return topk(x, self)


def _check_x(x) -> int:
  shape = tuple(jnp.shape(x))
  checks.check_rank("x", shape, 1, "[..., d]")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"x must be a floating-point array; got dtype {jnp.result_type(x)}.")
  return shape[-1]


def _index_mask(idx, d: int):
  """Boolean [..., d] with True at idx [..., k] (per row)."""
  lead, k = idx.shape[:-1], idx.shape[-1]
  flat = idx.reshape(-1, k)
  rows = jnp.arange(flat.shape[0])[:, None]
  mask = jnp.zeros((flat.shape[0], d), bool).at[rows, flat].set(True)
  return mask.reshape(*lead, d)


def statistical_threshold(x, k: int | float, *, where=None):
  """mean + std * Phi^-1(1 - k/d) per token, float32 [..., 1]; -inf when k >= d (keep all).

  where: optional bool [..., d] (broadcastable): only these entries count, so d, the mean and
  the std are per token over them (attention rows, whose causal prefix grows with the query).
  """
  d = _check_x(x)
  kk = checks.resolve_k(k, d)
  xf = x.astype(jnp.float32)
  if where is None:
    if kk == d:
      return jnp.full(xf.shape[:-1] + (1,), -jnp.inf, jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    std = jnp.std(xf, axis=-1, keepdims=True)
    return mean + std * ndtri(jnp.float32(1.0 - kk / d))
  where = jnp.broadcast_to(where, xf.shape)
  n = jnp.sum(where, axis=-1, keepdims=True, dtype=jnp.float32)
  safe_n = jnp.maximum(n, 1.0)
  mean = jnp.sum(jnp.where(where, xf, 0.0), axis=-1, keepdims=True) / safe_n
  var = jnp.sum(jnp.where(where, jnp.square(xf - mean), 0.0), axis=-1, keepdims=True) / safe_n
  # Rows with at most k entries keep them all; 0.5 keeps ndtri finite on the branch not taken.
  z = ndtri(jnp.where(n > kk, 1.0 - kk / safe_n, 0.5))
  return jnp.where(n > kk, mean + jnp.sqrt(var) * z, -jnp.inf)


def topk_mask(x, k: int | float = 0.1, *, method: str = "exact", threshold: float = 0.0,
              recall_target: float = 0.95, where=None):
  """Boolean mask [..., d] of the entries to keep in x [..., d] (no gradient).

  where: optional bool [..., d] (broadcastable): entries outside it are never kept, and the
  k largest are taken among the rest (all of them when fewer than k), e.g. the causal keys of
  an attention row.
  """
  checks.check_choice("method", method, METHODS)
  d = _check_x(x)
  x = lax.stop_gradient(x)
  if method == "fatrelu":
    mask = x > threshold
  elif method == "statistical":
    kk = checks.resolve_k(k, d)
    mask = x.astype(jnp.float32) > statistical_threshold(x, kk, where=where)
  else:
    kk = checks.resolve_k(k, d)
    if where is not None:
      x = jnp.where(where, x, -jnp.inf)
    if method == "exact":
      _, idx = lax.top_k(x, kk)
    else:
      _, idx = lax.approx_max_k(x, kk, recall_target=recall_target)
    mask = _index_mask(idx, d)
  return mask if where is None else mask & where


def topk(x, config: TopKConfig = TopKConfig()):
  """Sparsified x [..., d] (same dtype): zeros outside the kept entries, see the module doc."""
  d = _check_x(x)
  if config.method != "fatrelu" and checks.resolve_k(config.k, d) == d:
    y = x  # keep everything (a soft threshold of -inf would be degenerate)
  elif config.method == "statistical" and config.soft:
    thr = lax.stop_gradient(statistical_threshold(x, config.k))
    y = jnp.maximum(x.astype(jnp.float32) - thr, 0.0).astype(x.dtype)
  else:
    mask = topk_mask(x, config.k, method=config.method,
                     threshold=config.threshold, recall_target=config.recall_target)
    y = jnp.where(mask, x, jnp.zeros((), x.dtype))
  if config.gradient == "straight_through":
    y = x + lax.stop_gradient(y - x)
  return y


def fatrelu(x, threshold: float = 0.0):
  """ReLU with a threshold: x where x > threshold, else 0 (threshold 0 is ReLU)."""
  return jnp.where(x > threshold, x, jnp.zeros((), x.dtype))


class TopK(nn.Module):
  """Linen wrapper of `topk` that sows "density" (non-zero fraction of the output) and "l1"
  (mean per-token sum |y|, for an L1 schedule) into the "metrics" collection.

  Use as `MLP(sparsity=TopK(TopKConfig(k=0.1)))`; the MLP calls `h = sparsity(h)`.
  """
  config: TopKConfig = TopKConfig()

  @nn.compact
  def __call__(self, h):
    y = topk(h, self.config)
    if self.is_initializing():  # init would store the metrics and apply would append to them
      return y
    self.sow("metrics", "density", metrics.density(y))
    self.sow("metrics", "l1", metrics.l1_penalty(y, 1, batch_dims=y.ndim - 1))
    return y
