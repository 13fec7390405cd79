"""How every implementation loads q and k: in float32 (float64 stays), L2-normalised over K if
asked, q scaled. The one place this is written, so every path normalises alike."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from deltajax.core.problem import Problem


def as_float32(x):
  """x in float32, or float64 for float64 x (how the tests run references); None stays."""
  return None if x is None else x.astype(jnp.promote_types(x.dtype, jnp.float32))


# Log-gates below this are clamped to it: e^-8192 is 0 in float32 (and float64), so a gate of
# -inf (a full reset) decays exactly as before, while sums of gates stay finite and the 0/1
# matrix products that form them never meet 0 * -inf.
GATE_FLOOR = -8192.0


def load_g(g):
  """The log-gates in float32 (float64 stays), clamped at GATE_FLOOR; None stays None."""
  return None if g is None else jnp.maximum(as_float32(g), GATE_FLOOR)


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum(x^2) + eps) over the last axis, in float32 (or float64 for float64 x)."""
  x = as_float32(x)
  return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def load_k(p: Problem, k: jax.Array) -> jax.Array:
  return l2norm(k) if p.use_qk_l2norm else as_float32(k)


def load_qk(p: Problem, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  return load_k(p, q) * p.scale, load_k(p, k)
