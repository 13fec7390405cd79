"""RMSNorm and the gated per-head RMSNorm used on the output of every delta mixer."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deltajax.layers.common import Dtype, partitioned

_GATE_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "sigmoid": jax.nn.sigmoid}


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """y = x / rms(x) * scale over the last axis (statistics in float32). x: [..., D]."""
  eps: float = 1e-5
  axis_name: str = "embed"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", partitioned(nn.initializers.ones_init(), (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    return (rms_normalize(x, self.eps) * scale.astype(jnp.float32)).astype(self.dtype)


class GatedRMSNorm(nn.Module):
  """y = RMSNorm(x) * act(gate), per head: x, gate [..., HV, V], scale [V] shared by heads.

  `activation` is "silu" (DeltaNet, Gated DeltaNet, DeltaProduct, as fla) or "sigmoid" (KDA).
  """
  eps: float = 1e-5
  activation: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
    if self.activation not in _GATE_ACTIVATIONS:
      raise ValueError(f"activation must be one of {tuple(_GATE_ACTIVATIONS)}; "
                       f"got {self.activation!r}.")
    scale = self.param("scale", partitioned(nn.initializers.ones_init(), ("kv",)),
                       (x.shape[-1],), self.param_dtype)
    y = rms_normalize(x, self.eps) * scale.astype(jnp.float32)
    y = y * _GATE_ACTIVATIONS[self.activation](gate.astype(jnp.float32))
    return y.astype(self.dtype)
