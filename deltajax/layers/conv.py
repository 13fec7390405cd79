"""ShortConv: depthwise causal convolution (fla's ShortConvolution) with a decode cache."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deltajax.layers import segments
from deltajax.layers.common import Dtype, partitioned

_ACTIVATIONS = {None: lambda x: x, "silu": jax.nn.silu, "swish": jax.nn.silu}


class ShortConv(nn.Module):
  """y_t = act(sum_j w[W-1-j] * x_{t-j}), per channel, j = 0..W-1 (W = kernel_size).

  Call: `(y, new_cache) = conv(x [B, T, C], segment_ids=None, cache=None)`.
  * segment_ids [B, T]: taps never reach into the previous document of a packed row.
  * cache [B, W-1, C]: the last W-1 inputs before x (zeros at the start of a sequence);
    new_cache holds the last W-1 inputs including x, so decoding token by token equals
    the full convolution. Without a cache new_cache is None.
  """
  features: int
  kernel_size: int = 4
  activation: str | None = "silu"
  use_bias: bool = False
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
    B, T, C = x.shape
    w = self.param("kernel", partitioned(nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                                         ("conv", "heads")), (W, C), self.param_dtype)
    x = x.astype(self.dtype)
    w = w.astype(self.dtype)
    past = jnp.zeros((B, W - 1, C), x.dtype) if cache is None else cache.astype(x.dtype)
    xx = jnp.concatenate([past, x], axis=1)  # [B, W-1+T, C]
    y = jnp.zeros((B, T, C), jnp.float32)
    for j in range(W):  # tap j looks j tokens back; W is small (4)
      tap = xx[:, W - 1 - j: W - 1 - j + T] * w[W - 1 - j]
      if segment_ids is not None:
        tap = jnp.where(segments.same_segment_shifted(segment_ids, j)[..., None], tap, 0)
      y = y + tap.astype(jnp.float32)
    if self.use_bias:
      b = self.param("bias", partitioned(nn.initializers.zeros_init(), ("heads",)), (C,),
                     self.param_dtype)
      y = y + b.astype(jnp.float32)
    y = _ACTIVATIONS[self.activation](y).astype(self.dtype)
    new_cache = None if cache is None else xx[:, T:]
    return y, new_cache
