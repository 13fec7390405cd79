"""ShortConv: depthwise causal convolution (fla's ShortConvolution) with a decode cache."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deltajax.layers import segments
from deltajax.layers.common import Dtype, partitioned
from deltajax.ops import context_parallel

_ACTIVATIONS = {None: lambda x: x, "silu": jax.nn.silu, "swish": jax.nn.silu}


def causal_conv(x, past, w, starts=None, past_starts=None):
  """sum_j w[W-1-j] * x_{t-j}, j = 0..W-1, over the taps inside token t's document; float32.

  x [B, T, C]; past [B, W-1, C] the inputs before x; w [W, C]. starts [B, T] bool: the token
  starts a document (None: no boundaries); past_starts [B, W-1] the same for past (None:
  none there). A tap reaches t - j when no document starts in (t - j, t].
  """
  W, T = w.shape[0], x.shape[1]
  xx = jnp.concatenate([past.astype(x.dtype), x], axis=1)         # [B, W-1+T, C]
  if starts is not None:
    if past_starts is None:
      past_starts = jnp.zeros(starts.shape[:1] + (W - 1,), bool)
    count = jnp.cumsum(jnp.concatenate([past_starts, starts], axis=1), axis=1)
  y = jnp.zeros(x.shape, jnp.float32)
  for j in range(W):  # tap j looks j tokens back; W is small (4)
    tap = xx[:, W - 1 - j: W - 1 - j + T] * w[W - 1 - j]
    if starts is not None and j:
      keep = count[:, W - 1:] == count[:, W - 1 - j: W - 1 - j + T]
      tap = jnp.where(keep[..., None], tap, 0)
    y = y + tap.astype(jnp.float32)
  return y


def _halo(x, n: int, cp_axis: str):
  """The last n time steps of the previous shard along cp_axis (zeros on shard 0)."""
  shards = lax.axis_size(cp_axis)
  return lax.ppermute(x[:, x.shape[1] - n:], cp_axis, [(i, i + 1) for i in range(shards - 1)])


def sharded_causal_conv(x, w, segment_ids, cp_axis: str):
  """`causal_conv` on one shard of the time axis (inside a shard_map manual over cp_axis):
  the W - 1 inputs before it, and whether documents start there, come from the previous
  shard by `ppermute`."""
  W, T = w.shape[0], x.shape[1]
  if T < W - 1:
    raise ValueError(f"each shard of the time axis over cp_axis={cp_axis!r} needs at least "
                     f"conv_size - 1 = {W - 1} tokens; got {T}.")
  past = _halo(x, W - 1, cp_axis)
  if segment_ids is None:
    return causal_conv(x, past, w)
  first_shard = lax.axis_index(cp_axis) == 0
  before = _halo(segment_ids, 1, cp_axis)[:, 0]
  starts = segments.starts(segment_ids)
  starts = starts.at[:, 0].set(first_shard | (segment_ids[:, 0] != before))
  return causal_conv(x, past, w, starts, _halo(starts, W - 1, cp_axis))


class ShortConv(nn.Module):
  """y_t = act(sum_j w[W-1-j] * x_{t-j}), per channel, j = 0..W-1 (W = kernel_size).

  Call: `(y, new_cache) = conv(x [B, T, C], segment_ids=None, cache=None)`.
  * segment_ids [B, T]: taps never reach into the previous document of a packed row.
  * cache [B, W-1, C]: the last W-1 inputs before x (zeros at the start of a sequence);
    new_cache holds the last W-1 inputs including x, so decoding token by token equals
    the full convolution. Without a cache new_cache is None.
  * cp_axis: the time axis is split over this mesh axis (context parallelism): each shard
    takes the W-1 inputs before it from its neighbour (not with a cache).
  """
  features: int
  kernel_size: int = 4
  activation: str | None = "silu"
  use_bias: bool = False
  cp_axis: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def init_cache(self, batch_size: int, dtype=None) -> jax.Array:
    return jnp.zeros((batch_size, self.kernel_size - 1, self.features), dtype or self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids=None, cache=None):
    W = self.kernel_size
    if W < 1:
      raise ValueError(f"kernel_size must be >= 1; got {W}.")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}; got {self.activation!r}.")
    if self.cp_axis is not None and cache is not None:
      raise ValueError("cp_axis and cache cannot be combined: decoding runs the whole "
                       "sequence on every device (use cp_axis=None).")
    B, T, C = x.shape
    w = self.param("kernel", partitioned(nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                                         ("conv", "heads")), (W, C), self.param_dtype)
    x = x.astype(self.dtype)
    w = w.astype(self.dtype)
    new_cache = None
    if self.cp_axis is not None:
      y = context_parallel.shard_time(
          lambda t, w: sharded_causal_conv(t[0], w, t[1], self.cp_axis), self.cp_axis,
          (x, segment_ids), w, True)
    else:
      past = jnp.zeros((B, W - 1, C), x.dtype) if cache is None else cache.astype(x.dtype)
      starts = None if segment_ids is None else segments.starts(segment_ids)
      y = causal_conv(x, past, w, starts)
      if cache is not None:
        new_cache = jnp.concatenate([past, x], axis=1)[:, T:]
    if self.use_bias:
      b = self.param("bias", partitioned(nn.initializers.zeros_init(), ("heads",)), (C,),
                     self.param_dtype)
      y = y + b.astype(jnp.float32)
    y = _ACTIVATIONS[self.activation](y).astype(self.dtype)
    return y, new_cache
