"""The op layer: dispatch and the registry, the chunk form's building blocks at their precision
limits, a case worked by hand, jit/vmap behaviour and bad input. Each implementation's values and
gradients against the oracle run through the shared test base (op_test_base.py)."""
from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import OPS, TOL, assert_close, make_inputs
from deltajax import ops
from deltajax.core.problem import Problem
from deltajax.ops import registry
from op_test_base import _vjp


# Per-channel gates that once lost precision: a decay of 75 in one token near the chunk start
# (factored through one reference point, pairs after it carried eps * 75 relative error), and
# -4.9 on every token (sub-blocks decaying by ~78: dg was off by 2e-2), beside -5.5 per token
# (no sub-block fits; banded diagonal blocks). The chunk form and the kernels, gradients at 1e-5
# against float64.
@pytest.mark.parametrize("pattern", ["one_strong_token", "strong_everywhere", "stronger"])
def test_kda_precision_at_the_factoring_limits(pattern):
  args, h0 = make_inputs("kda", B=1, T=128, H=2, K=16, V=8)
  q, k, v, g, beta = args
  t = jnp.arange(128)[None, :, None, None]
  weak = -0.01 * jnp.abs(jax.random.normal(jax.random.PRNGKey(3), g.shape))
  g = weak + {"one_strong_token": -75.0 * (t % 64 == 1), "strong_everywhere": -4.9,
              "stronger": -5.5}[pattern]
  args = (q, k, v, g, beta)
  run = lambda impl: lambda a, h: ops.kda(*a, initial_state=h, output_final_state=True,
                                          impl=impl, chunk_size=64)
  o, s, grads = _vjp(jax.jit(run("chunk")), args, h0)
  with jax.enable_x64(True):
    o_r, s_r, grads_r = _vjp(run("recurrent"), tuple(np.asarray(x, np.float64) for x in args),
                             np.asarray(h0, np.float64))
  assert_close(o, o_r, TOL[jnp.float32], "output")
  assert_close(s, s_r, TOL[jnp.float32], "final state")
  for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads, grads_r):
    assert_close(a, b, TOL[jnp.float32], name)


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(op=st.sampled_from(OPS), T=st.integers(1, 50), H=st.sampled_from([1, 2]),
                  group=st.sampled_from([1, 2]), K=st.sampled_from([8, 16]),
                  V=st.sampled_from([4, 16]))
def test_chunk_forward_property(op, T, H, group, K, V):
  args, h0 = make_inputs(op, B=1, T=T, H=H, HV=H * group, K=K, V=V, seed=T)
  fn = getattr(ops, op)
  run = lambda impl: jax.jit(lambda a, h: fn(*a, initial_state=h, output_final_state=True,
                                             impl=impl, chunk_size=16))(args, h0)
  (o, s), (o_ref, s_ref) = run("chunk"), run("recurrent")
  assert_close(o, o_ref, TOL[jnp.float32], "output")
  assert_close(s, s_ref, TOL[jnp.float32], "final state")


# --- a case worked out on paper ---------------------------------------------------------------

@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_two_tokens_by_hand(impl):
  """K=2, V=1, one head, scale 1.

  Token 1: k=[1,0], v=2, beta=1/2: S = k (beta v)^T = [[1],[0]]; q=[1,1] -> o = 1.
  Token 2: k=[.6,.8], v=1, beta=1: S^T k = .6, error .4, S = [[1.24],[.32]]; q=[1,0] -> 1.24.
  With g_2 = log(1/2) the state first halves to [[.5],[0]]: S^T k = .3, error .7,
  S = [[.92],[.56]] -> o = .92.
  """
  q = jnp.array([[1.0, 1.0], [1.0, 0.0]]).reshape(1, 2, 1, 2)
  k = jnp.array([[1.0, 0.0], [0.6, 0.8]]).reshape(1, 2, 1, 2)
  v = jnp.array([2.0, 1.0]).reshape(1, 2, 1, 1)
  beta = jnp.array([0.5, 1.0]).reshape(1, 2, 1)
  kw = dict(scale=1.0, output_final_state=True, impl=impl, chunk_size=16)
  o, s = ops.delta_rule(q, k, v, beta, **kw)
  np.testing.assert_allclose(o.ravel(), [1.0, 1.24], rtol=1e-6)
  np.testing.assert_allclose(s.ravel(), [1.24, 0.32], rtol=1e-6)
  g = jnp.log(jnp.array([1.0, 0.5])).reshape(1, 2, 1)
  o, s = ops.gated_delta_rule(q, k, v, g, beta, **kw)
  np.testing.assert_allclose(o.ravel(), [1.0, 0.92], rtol=1e-6)
  np.testing.assert_allclose(s.ravel(), [0.92, 0.56], rtol=1e-6)


def _call(op, args, **kw):
  kw = dict(dict(output_final_state=True, chunk_size=16), **kw)
  return getattr(ops, op)(*args, **kw)


def test_packed_under_jit_with_fixed_size_cu_seqlens():
  args, h0 = make_inputs("delta_rule", B=1, T=24, N=3)
  run = jax.jit(lambda cu: _call("delta_rule", args, initial_state=h0, cu_seqlens=cu,
                                 impl="chunk"))
  o, s = run(jnp.array([0, 10, 10, 24], jnp.int32))
  o_ref, s_ref = _call("delta_rule", args, initial_state=h0,
                       cu_seqlens=np.array([0, 10, 10, 24], np.int32), impl="recurrent")
  assert_close(o, o_ref, 1e-5, "output")
  assert_close(s, s_ref, 1e-5, "final state")
  np.testing.assert_array_equal(s[1], h0[1])  # the empty sequence passes its state through


def test_vmap_equals_a_loop():
  args, h0 = make_inputs("gated_delta_rule", B=1, T=20)
  stack = lambda x: jnp.stack([x, 0.5 * x])
  batched = tuple(map(stack, args))
  fn = lambda *a: _call("gated_delta_rule", a, initial_state=h0, impl="chunk")
  o, s = jax.vmap(fn)(*batched)
  for i in range(2):
    o_i, s_i = fn(*(a[i] for a in batched))
    assert_close(o[i], o_i, 1e-6, "vmapped output")
    assert_close(s[i], s_i, 1e-6, "vmapped state")


def test_final_state_is_none_unless_asked():
  args, _ = make_inputs("delta_rule", B=1, T=5)
  o, s = ops.delta_rule(*args)
  assert s is None and o.shape == args[2].shape


@pytest.mark.parametrize("T, n, want", [(1, 1, "recurrent"), (16, 1, "recurrent"),
                                         (17, 1, "chunk"), (9, 2, "chunk")])
def test_auto_picks_the_token_loop_for_decode_and_the_chunk_form_otherwise(T, n, want):
  p = Problem(gate="head", B=1, T=T, H=1, HV=1, K=16, V=16, n=n, N=1)
  for platform in registry.PLATFORMS:
    assert ops.resolve_impl("auto", p, platform) == want
  assert ops.resolve_impl("chunk", p) == "chunk"


def test_registry_states_what_each_implementation_supports():
  p = Problem(gate="channel", B=1, T=64, H=1, HV=1, K=512, V=16, N=1)
  assert registry.IMPLEMENTATIONS["chunk"].unsupported(p) is None
  assert "K=512" in registry.IMPLEMENTATIONS["pallas"].unsupported(p)
  for impl in registry.IMPLEMENTATIONS.values():  # every entry says why auto may pick it
    assert impl.why and set(impl.features) <= set(registry.FEATURES)


def test_unsupported_shape_names_an_implementation_that_supports_it():
  (q, k, v, beta), _ = make_inputs("delta_rule", B=1, T=8, K=272, V=8)
  _raises(lambda: ops.delta_rule(q, k, v, beta, impl="pallas"), "impl='pallas'", "K=272",
          "'recurrent' or 'chunk'")


def test_l2norm_gradient_matches_finite_differences():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8)).astype(jnp.float64 if
                                                               jax.config.x64_enabled else
                                                               jnp.float32)
  f = lambda x: jnp.sum(ops.l2norm(x) * jnp.arange(8.0))
  g = jax.grad(f)(x)
  eps = 1e-3
  e = jnp.zeros_like(x).at[1, 2].set(eps)
  fd = (f(x + e) - f(x - e)) / (2 * eps)
  assert abs(float(g[1, 2]) - float(fd)) < 1e-3 * max(1.0, abs(float(fd)))


# --- bad input -------------------------------------------------------------------------------

def _good(op="delta_rule", **kw):
  return make_inputs(op, B=1, T=8, **kw)


def _raises(fn, *names):
  with pytest.raises(ValueError) as info:
    fn()
  for name in names:
    assert name in str(info.value), f"{name!r} not in: {info.value}"


def test_bad_rank_and_shapes():
  (q, k, v, beta), h0 = _good()
  _raises(lambda: ops.delta_rule(q[0], k, v, beta), "q", "rank 4")
  _raises(lambda: ops.delta_rule(q, k[:, :4], v, beta), "k", "(1, 8, 2, 16)")
  _raises(lambda: ops.delta_rule(q, k, v[:, :, :, :], beta[:, :4]), "beta")
  _raises(lambda: ops.delta_rule(q, k, v[:, :4], beta), "v")
  _raises(lambda: ops.delta_rule(q, k, v, beta, initial_state=h0[..., :3]), "initial_state",
          "[B, HV, K, V]")


def test_value_heads_must_be_a_multiple_of_heads():
  (q, k, v, beta), _ = _good(H=2, HV=3)
  _raises(lambda: ops.delta_rule(q, k, v, beta), "HV=3", "H=2")


def test_bad_gates():
  (q, k, v, g, beta), _ = _good("gated_delta_rule")
  _raises(lambda: ops.gated_delta_rule(q, k, v, g[..., None], beta), "g", "[B, T, HV]")
  _raises(lambda: ops.kda(q, k, v, g, beta), "g", "[B, T, HV, K]")
  (q, k, v, beta, g), _ = _good("delta_product")
  _raises(lambda: ops.delta_product(q, k, v, beta[:, :, :1], g), "beta")
  _raises(lambda: ops.delta_product(q, k[:, :, 0], v, beta, g), "k", "rank 5")


def test_bad_dtypes():
  (q, k, v, beta), _ = _good()
  _raises(lambda: ops.delta_rule(q.astype(jnp.int32), k, v, beta), "q", "int32")
  _raises(lambda: ops.delta_rule(q, k, v, beta.astype(jnp.int8)), "beta", "int8")


@pytest.mark.parametrize("cu, what", [
    ((0, 4, 2, 8), "non-decreasing"),
    ((1, 4, 8), "start at 0"),
    ((0, 4, 7), "end at T=8"),
    ((8,), "[N + 1]"),
])
def test_bad_cu_seqlens(cu, what):
  (q, k, v, beta), _ = _good()
  _raises(lambda: ops.delta_rule(q, k, v, beta, cu_seqlens=np.array(cu, np.int32)),
          "cu_seqlens", what)


def test_cu_seqlens_needs_batch_one_and_integers():
  (q, k, v, beta), _ = make_inputs("delta_rule", B=2, T=8)
  _raises(lambda: ops.delta_rule(q, k, v, beta, cu_seqlens=np.array([0, 8])), "B=2",
          "[B, S + 1]")
  _raises(lambda: ops.delta_rule(q, k, v, beta, cu_seqlens=np.array([[0, 8]] * 3)),
          "cu_seqlens", "B=2", "(3, 2)")
  _raises(lambda: ops.delta_rule(q, k, v, beta, cu_seqlens=np.array([[0, 8], [0, 7]])),
          "cu_seqlens", "end at T=8")
  (q, k, v, beta), _ = _good()
  _raises(lambda: ops.delta_rule(q, k, v, beta, cu_seqlens=np.array([0.0, 8.0])), "integer")


@pytest.mark.parametrize("chunk_size", [0, 8, 48, 64.0, True])
def test_bad_chunk_size(chunk_size):
  (q, k, v, beta), _ = _good()
  _raises(lambda: ops.delta_rule(q, k, v, beta, chunk_size=chunk_size), "chunk_size",
          "power of two >= 16")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True])
def test_scale_must_be_a_finite_number(scale):
  (q, k, v, beta), _ = _good()
  _raises(lambda: ops.delta_rule(q, k, v, beta, scale=scale), "scale", "finite number",
          repr(scale))


def test_kernel_config_must_fit_the_platform():
  from deltajax.kernels import KernelConfig
  (q, k, v, beta), _ = _good()
  _raises(lambda: ops.delta_rule(q, k, v, beta, impl="pallas",
                                 kernel_config=KernelConfig(backend="tpu")),
          "KernelConfig.backend='tpu'", "platform is 'cpu'", "interpret=True")
  _raises(lambda: KernelConfig(backend="npu"), "KernelConfig.backend", "'npu'")
  _raises(lambda: KernelConfig(interpret=True), "interpret=True needs backend")


def test_interpret_needs_the_backends_interpreter(monkeypatch):
  from deltajax.kernels import KernelConfig, config
  monkeypatch.setitem(config._INTERPRETERS, "tpu", lambda: None)  # a jax without it
  (q, k, v, beta), _ = _good()
  _raises(lambda: ops.delta_rule(q, k, v, beta, impl="pallas",
                                 kernel_config=KernelConfig(backend="tpu", interpret=True)),
          "KernelConfig.interpret=True", "backend='tpu'", "interpreter", "impl='chunk'")


def test_unknown_impl():
  (q, k, v, beta), _ = _good()
  _raises(lambda: ops.delta_rule(q, k, v, beta, impl="triton"), "impl", "'triton'",
          "'chunk'")


def test_checks_run_before_tracing():
  # A bad shape under jit fails with the same message at trace time, never deep inside XLA.
  (q, k, v, beta), _ = _good()
  bad = jax.jit(lambda q: ops.delta_rule(q, k, v, beta))
  _raises(lambda: bad(q[:, :, :1]), "k must have shape")


# --- the unit-lower-triangular solve the chunk form is built on -------------------------------

# beta = 1.95 on thirty identical keys is the worst case of the negative-eigenvalue regime: the
# solve amplifies rounding (LAPACK's own float32 gradient error there is 4e-6), hence 1e-4.
@pytest.mark.parametrize("beta, tol", [(0.9, 1e-5), (1.95, 1e-4)])
def test_solve_unit_lower_on_nearly_parallel_keys(beta, tol):
  """Thirty repeated tokens (k_i = k_j): the block-doubling inverse stays finite and matches a
  float64 LAPACK solve, values and gradients."""
  from jax import lax
  from deltajax.ops.triangular import solve_unit_lower
  k = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 16))
  k = k.at[:, 10:40].set(k[:, 10:11])
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 8))
  A = jnp.tril(beta * k @ jnp.swapaxes(k, -1, -2), -1)
  R = beta * jnp.concatenate([k, v], axis=-1)
  loss = lambda solve: lambda A, R: jnp.sum(jnp.sin(solve(A, R)))
  with jax.enable_x64(True):
    A64, R64 = A.astype(jnp.float64), R.astype(jnp.float64)
    lapack = lambda A, R: lax.linalg.triangular_solve(
        jnp.eye(64) + jnp.tril(A, -1), R, left_side=True, lower=True, unit_diagonal=True)
    x_ref = np.asarray(lapack(A64, R64))
    dA_ref, dR_ref = map(np.asarray, jax.grad(loss(lapack), (0, 1))(A64, R64))
  # Two right-hand sides sharing the inverse, as the chunk form solves for W and U.
  hi = lambda A, R: jnp.concatenate(
      solve_unit_lower(A, (R[..., :16], R[..., 16:]), lax.Precision.HIGHEST), axis=-1)
  assert_close(hi(A, R), x_ref, tol, "solve")
  dA, dR = jax.grad(loss(hi), (0, 1))(A, R)
  assert_close(dA, np.tril(dA_ref, -1), tol, "dA")
  assert_close(dR, dR_ref, tol, "dR")


# Three regimes of the per-channel scores, by gate scale: 0.5, no channel decays by e^80 over
# the chunk (one product per row factor); 3, the chunk does but no 16-token sub-block (products
# by row blocks); 8, sub-blocks do too (banded diagonal blocks). Each against float64.
@pytest.mark.parametrize("gate_scale, chunk_fits, sub_blocks_fit",
                         [(0.5, True, True), (3.0, False, True), (8.0, False, False)])
@pytest.mark.parametrize("diagonal", [False, True])
def test_channel_scores_against_float64(gate_scale, chunk_fits, sub_blocks_fit, diagonal):
  from deltajax.ops import scores
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  # 18 chunks: the sub-block form runs 16 at a time, so this covers a group and a remainder.
  a, b = jax.random.normal(ks[0], (2, 18, 64, 32)), jax.random.normal(ks[1], (18, 64, 32))
  g = -gate_scale * jax.nn.softplus(jax.random.normal(ks[2], (18, 64, 32)))
  limit = scores._MAX_FACTORED_DECAY
  assert 16 <= scores._GROUP < 18
  assert (-np.asarray(g).sum(axis=1).min() < limit) == chunk_fits
  assert (-np.asarray(g).reshape(18, 4, 16, 32).sum(axis=2).min() < limit) == sub_blocks_fit
  mask = np.tril(np.ones((64, 64), bool), 0 if diagonal else -1)
  a64, b64, g64 = (np.asarray(x, np.float64) for x in (a, b, g))
  G = np.cumsum(g64, axis=-2)
  decay = np.exp(np.where(mask[..., None], G[:, :, None, :] - G[:, None, :, :], -np.inf))
  want = np.einsum("nbik,bjk,bijk->nbij", a64, b64, decay)
  got = scores.gated_scores(tuple(a), b, g, diagonal=diagonal, precision=jax.lax.Precision.HIGHEST)
  assert_close(jnp.stack(got), want, 1e-5, "scores")


@pytest.mark.parametrize("op", ["gated_delta_rule", "kda"])
def test_gate_gradients_of_packed_rows_under_vmap(op):
  """The layers vmap the op over rows, each with its own fixed-size cu_seqlens. Differentiating
  the gates through that once crashed XLA:CPU (a segfault); here it must match the reference."""
  args, _ = make_inputs(op, B=3, T=40)
  cu = jnp.array([[0, 12, 30, 40, 40], [0, 40, 40, 40, 40], [0, 1, 2, 3, 40]], jnp.int32)

  def loss(impl, g):
    a = list(args)
    a[3] = g
    row = lambda *xs: getattr(ops, op)(*(x[None] for x in xs[:-1]), cu_seqlens=xs[-1],
                                       impl=impl, chunk_size=16)[0]
    return jnp.sum(jnp.sin(jax.vmap(row)(*a, cu)))
  dg = jax.jit(jax.grad(functools.partial(loss, "chunk")))(args[3])
  dg_ref = jax.jit(jax.grad(functools.partial(loss, "recurrent")))(args[3])
  assert_close(dg, dg_ref, 1e-5, "dg")
