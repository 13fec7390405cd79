"""Shared pieces of every layer: dtypes, logically-partitioned initialisers, projections.

Logical axis names used on parameters (map them to mesh axes with `nn.logical_axis_rules`):
  "embed"  model width D          "heads"  flattened head features (H * K, HV * V, ...)
  "kv"     per-head feature dim   "mlp"    MLP hidden width           "vocab"  vocabulary
  "conv"   short-conv taps (never sharded in practice)
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.lecun_normal()


def output_init(scale: float = 1.0):
  """Init of a projection back into the residual stream: lecun normal times `scale`.

  Models pass scale = 1 / sqrt(2 * num_layers) (GPT-2 style) so the residual stream does not
  grow with depth and the stack at init is not overly sensitive to small perturbations.
  """
  return nn.initializers.variance_scaling(scale ** 2, "fan_in", "truncated_normal")


def as_dtype(dtype) -> Any:
  """Accepts a jnp dtype or its name ("float32", "bfloat16")."""
  return jnp.dtype(dtype)


def partitioned(init, axes: Sequence[str | None]):
  """An initialiser whose parameter carries logical axis names (so training can shard it)."""
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, axes: tuple[str | None, str | None], *, name: str, dtype, param_dtype,
          use_bias: bool = False, kernel_init=default_kernel_init) -> nn.Dense:
  """A Dense layer whose kernel ([in, out]) and bias ([out]) carry logical axis names."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=partitioned(kernel_init, axes),
                  bias_init=partitioned(nn.initializers.zeros_init(), (axes[1],)))


def head_sizes(d_model: int, num_heads: int, head_dim, num_v_heads, expand_v) -> tuple[int, ...]:
  """(H, HV, K, V) with ValueErrors naming the field that does not fit."""
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1; got {num_heads}.")
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide d_model={d_model} "
                       f"(or set head_dim).")
    head_dim = d_model // num_heads
  if head_dim < 1:
    raise ValueError(f"head_dim must be >= 1; got {head_dim}.")
  HV = num_heads if num_v_heads is None else num_v_heads
  if HV < 1 or HV % num_heads:
    raise ValueError(f"num_v_heads={num_v_heads} must be a positive multiple of "
                     f"num_heads={num_heads}.")
  V = head_dim * expand_v
  if V < 1 or V != int(V):
    raise ValueError(f"expand_v={expand_v} times head_dim={head_dim} must be a positive "
                     f"integer; got {V}.")
  return num_heads, HV, head_dim, int(V)
