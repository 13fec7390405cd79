"""Shared test helpers: tolerances, the relative RMS error, and random inputs for every op."""
from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# DELTAJAX_SLOW_TESTS=1 also runs the cases CI leaves out for time (the Pallas interpreters'
# narrowed cases, multi-process runs): run it after changing what they cover.
SLOW_TESTS = os.environ.get("DELTAJAX_SLOW_TESTS") == "1"


def skip_unless_slow(why: str) -> None:
  """Skips the calling test on CI runs, saying why that is safe."""
  if not SLOW_TESTS:
    pytest.skip(reason=f"{why} (DELTAJAX_SLOW_TESTS=1 runs it)")


@contextlib.contextmanager
def fast_compile_mode():
  """XLA's fast-compile mode (its optimisation passes dominate tiny tests' time).

  The flag is not part of jit's cache key, so the caches are cleared on the way in and out: no
  executable compiled without optimisations outlives the block (one that did made a later
  in-process run differ in the last bits from the same run in a fresh process).
  """
  old = jax.config.read("jax_disable_most_optimizations")
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
    jax.clear_caches()


@pytest.fixture(scope="module")
def fast_compile():
  """fast_compile_mode for a whole module: `pytestmark = pytest.mark.usefixtures(...)`."""
  with fast_compile_mode():
    yield


# DESIGN.md: paths agree to 1e-5 in float32 and 1e-2 with bfloat16 (or float16) inputs.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}


def rel_rms(a, b) -> float:
  """rms(a - b) / rms(b), in float64 on the host."""
  a = np.asarray(a).astype(np.float64)
  b = np.asarray(b).astype(np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))


def assert_close(a, b, tol: float, what: str = "") -> None:
  assert np.all(np.isfinite(np.asarray(jnp.asarray(a, jnp.float32)))), f"{what}: non-finite"
  err = rel_rms(a, b)
  assert err < tol, f"{what}: relative RMS error {err:.3g} >= {tol:.0e}"


def make_inputs(op: str, *, B=2, T=37, H=2, HV=None, K=16, V=8, n=2, dtype=jnp.float32,
                seed=0, gate_scale=1.0, N=None):
  """Random (args, initial_state) for `op` in the argument order of its public function.

  Keys are unit-norm (as the layers use them); beta in (0, 1); log-gates <= 0.
  """
  HV = HV or H
  N = N or B
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  kshape = (B, T, n, H, K) if op == "delta_product" else (B, T, H, K)
  vshape = (B, T, n, HV, V) if op == "delta_product" else (B, T, HV, V)
  bshape = (B, T, n, HV) if op == "delta_product" else (B, T, HV)
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], kshape)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], vshape)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], bshape))
  h0 = jax.random.normal(ks[6], (N, HV, K, V))
  cast = lambda x: x.astype(dtype)
  if op == "delta_rule":
    args = (q, k, v, beta)
  elif op == "gated_delta_rule":
    g = -gate_scale * jax.nn.softplus(jax.random.normal(ks[4], (B, T, HV)))
    args = (q, k, v, g, beta)
  elif op == "kda":
    g = -gate_scale * jax.nn.softplus(jax.random.normal(ks[5], (B, T, HV, K)))
    args = (q, k, v, g, beta)
  elif op == "delta_product":
    g = -gate_scale * jax.nn.softplus(jax.random.normal(ks[4], (B, T, HV)))
    args = (q, k, v, beta, g)
  else:
    raise KeyError(op)
  return tuple(map(cast, args)), h0


OPS = ("delta_rule", "gated_delta_rule", "kda", "delta_product")


@pytest.fixture(scope="session")
def ops_module():
  from deltajax import ops
  return ops
