"""Decay-gate parameterisations and their initialisers (Mamba2 / Gated DeltaNet / KDA papers).

g is a natural-log decay (<= 0) in float32:
  Gated DeltaNet, DeltaProduct:  g = -exp(A_log) * softplus(a + dt_bias)
  KDA (per key channel):         the same, or with a lower bound
                                 g = lower_bound * sigmoid(exp(A_log) * (a + dt_bias)).
Init: A ~ U[1, 16], A_log = log A; dt log-uniform in [1e-3, 0.1] (floored at 1e-4) and
dt_bias = softplus^-1(dt), so softplus(dt_bias) = dt at a = 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def a_log_init(key, shape, dtype=jnp.float32, a_min: float = 1.0, a_max: float = 16.0):
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, a_min, a_max)).astype(dtype)


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_floor: float = 1e-4):
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.exp(u * (jnp.log(dt_max) - jnp.log(dt_min)) + jnp.log(dt_min))
  dt = jnp.maximum(dt, dt_floor)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus


def softplus_gate(a, A_log, dt_bias):
  """g = -exp(A_log) * softplus(a + dt_bias); a [..., F], A_log and dt_bias broadcast to F."""
  a = a.astype(jnp.float32) + dt_bias.astype(jnp.float32)
  return -jnp.exp(A_log.astype(jnp.float32)) * jax.nn.softplus(a)


def lower_bound_gate(a, A_log, dt_bias, lower_bound: float):
  """g = lower_bound * sigmoid(exp(A_log) * (a + dt_bias)), in (lower_bound, 0)."""
  a = a.astype(jnp.float32) + dt_bias.astype(jnp.float32)
  return lower_bound * jax.nn.sigmoid(jnp.exp(A_log.astype(jnp.float32)) * a)
