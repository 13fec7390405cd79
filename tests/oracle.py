"""One check that every implementation runs against the recurrent reference.

`check_against_reference` compares outputs, final states and the gradients of every input
(`jax.vjp` with random cotangents) at the DESIGN.md tolerance for the input dtype. The reference
runs in float64 on the same (upcast) inputs, so the tolerance measures the path under test, not
the reference's own rounding. The ops tests run it for impl="chunk" and the kernel tests for
impl="pallas".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from conftest import TOL, assert_close, make_inputs


ARG_NAMES = {
    "delta_rule": ("q", "k", "v", "beta"),
    "gated_delta_rule": ("q", "k", "v", "g", "beta"),
    "kda": ("q", "k", "v", "g", "beta"),
    "delta_product": ("q", "k", "v", "beta", "g"),
}


def _vjp_all(fn, args, h0, seed=1):
  """Outputs and the gradients of (args..., h0) of a random linear read-out of (o, final)."""
  (o, s), vjp = jax.vjp(fn, args, h0)
  ko, ks = jax.random.split(jax.random.PRNGKey(seed))
  # Drawn in float32 whatever the dtypes, so the float64 reference sees the same cotangents.
  cto = jax.random.normal(ko, o.shape, jnp.float32).astype(o.dtype)
  cts = jax.random.normal(ks, s.shape, jnp.float32).astype(s.dtype)
  d_args, d_h0 = vjp((cto, cts))
  return o, s, (*d_args, d_h0)


def run_op(op: str, impl: str, args, h0, **kw):
  from deltajax import ops
  fn = getattr(ops, op)
  call = lambda a, h: fn(*a, initial_state=h, output_final_state=True, impl=impl, **kw)
  return _vjp_all(jax.jit(call), args, h0)


@functools.lru_cache(maxsize=None)
def _reference(op, key, kw_items):
  shape = dict(key)
  args, h0 = make_inputs(op, **shape)
  with jax.enable_x64(True):
    up = tuple(jnp.asarray(a, jnp.float64) for a in args)
    out = run_op(op, "recurrent", up, jnp.asarray(h0, jnp.float64), **dict(kw_items))
    return jax.tree.map(np.asarray, out)


def check_against_reference(op: str, impl: str, dtype=jnp.float32, kw=None, **shape):
  """Asserts impl == recurrent (run in float64 on the same inputs) for o, final and grads."""
  kw = kw or {}
  args, h0 = make_inputs(op, dtype=dtype, **shape)
  o, s, grads = run_op(op, impl, args, h0, **kw)
  ref_shape = dict(shape, dtype=dtype)
  o_r, s_r, grads_r = _reference(op, tuple(sorted(ref_shape.items(), key=str)),
                                 tuple(sorted(kw.items())))
  tol = TOL[dtype]
  assert o.dtype == dtype and s.dtype == jnp.float32
  assert_close(o, o_r, tol, f"{op}/{impl} output")
  assert_close(s, s_r, tol, f"{op}/{impl} final state")
  for name, a, b in zip((*ARG_NAMES[op], "initial_state"), grads, grads_r):
    assert_close(a, b, tol, f"{op}/{impl} d{name}")
