"""The one test base every implementation and kernel backend runs, through a short subclass:

    class TestChunk(OpTestBase):
      impl = "chunk"

Each test compares outputs, final states and the gradient of every input (`jax.vjp` with
random cotangents) with the float64 oracle (tests/oracle.py) at DESIGN.md's tolerance for the
input dtype, or checks an identity of the maths. Shapes are small and straddle chunks, so the
Pallas interpreters stay affordable; a subclass may narrow `low_precision_ops` or `T`.

A Pallas interpreter takes tens of seconds per case on a 2-core CI machine, so a kernel
backend's subclass may name the cases it runs on every CI run (`ci_cases`); the rest run with
DELTAJAX_SLOW_TESTS=1 (after a kernel change, on a machine with cores to spare).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import OPS, TOL, assert_close, make_inputs, skip_unless_slow
from oracle import oracle

GATE = {"delta_rule": None, "gated_delta_rule": "head", "kda": "channel",
        "delta_product": "head"}


def split_args(op, args):
  """(q, k, v, beta, g) from an op's positional arguments."""
  if op == "delta_rule":
    q, k, v, beta = args
    return q, k, v, beta, None
  if op == "delta_product":
    return args
  q, k, v, g, beta = args
  return q, k, v, beta, g


def _with_steps(op, q, k, v, beta, g):
  if op == "delta_product":
    return q, k, v, beta, g
  return q, k[:, :, None], v[:, :, None], beta[:, :, None], g


def _vjp(fn, args, h0, seed: int = 1):
  """o, final and the gradients of (args..., h0) for random cotangents of (o, final)."""
  (o, s), vjp = jax.vjp(fn, args, h0)
  ko, ks = jax.random.split(jax.random.PRNGKey(seed))
  cto = jax.random.normal(ko, o.shape, jnp.float32).astype(o.dtype)
  cts = jax.random.normal(ks, s.shape, jnp.float32).astype(s.dtype)
  d_args, d_h0 = vjp((cto, cts))
  return o, s, (*d_args, d_h0)


@functools.lru_cache(maxsize=None)
def _oracle(op, shape_items, kw_items):
  """The oracle's o, final and gradients in float64 for make_inputs(op, **shape)."""
  shape, kw = dict(shape_items), dict(kw_items)
  if "cu_seqlens" in kw:
    kw["cu_seqlens"] = np.asarray(kw["cu_seqlens"])
  args, h0 = make_inputs(op, **shape)
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in args)
    h0 = jnp.asarray(h0, jnp.float64)

    def fn(args, h0):
      return oracle(*_with_steps(op, *split_args(op, args)), h0, gate=GATE[op], **kw)
    return jax.tree.map(np.asarray, _vjp(fn, args, h0))


def _names(op):
  return {"delta_rule": ("q", "k", "v", "beta"), "delta_product": ("q", "k", "v", "beta", "g")
          }.get(op, ("q", "k", "v", "g", "beta")) + ("initial_state",)


class OpTestBase:
  """Subclasses set `impl` (and `kernel_config` for a kernel backend)."""
  impl: str = ""
  kernel_config = None
  chunk_size = 16
  T = 37
  low_precision_ops = OPS
  ci_cases: frozenset[str] | None = None  # test ids such as "test_packed_documents[kda]"

  @pytest.fixture(autouse=True)
  def _only_ci_cases(self, request):
    if self.ci_cases is not None and request.node.name not in self.ci_cases:
      skip_unless_slow(f"{type(self).__name__}: its interpreter is slow; CI runs ci_cases")

  def call(self, op, args, h0, **kw):
    """o, final and every gradient of `op` under jit with this implementation."""
    fn = getattr(__import__("deltajax").ops, op)
    kw.setdefault("chunk_size", self.chunk_size)
    run = lambda a, h: fn(*a, initial_state=h, output_final_state=True, impl=self.impl,
                          kernel_config=self.kernel_config, **kw)
    return _vjp(jax.jit(run), args, h0)

  def check(self, op, dtype=jnp.float32, kw=None, **shape):
    """This implementation against the oracle: outputs, final states, every gradient."""
    kw = dict(kw or {})
    shape = dict(shape, dtype=dtype)
    args, h0 = make_inputs(op, **shape)
    o, s, grads = self.call(op, args, h0, **kw)
    oracle_kw = tuple(sorted((k, v) for k, v in kw.items() if k != "chunk_size"))
    ref_o, ref_s, ref_grads = _oracle(op, tuple(sorted(shape.items(), key=str)), oracle_kw)
    tol = TOL[dtype]
    what = f"{op}/{self.impl}"
    assert o.dtype == dtype and s.dtype == jnp.float32, (o.dtype, s.dtype)
    assert_close(o, ref_o, tol, f"{what} output")
    assert_close(s, ref_s, tol, f"{what} final state")
    for name, a, b in zip(_names(op), grads, ref_grads):
      assert_close(a, b, tol, f"{what} d{name}")

  # --- against the oracle ---------------------------------------------------------------

  @pytest.mark.parametrize("op", OPS)
  def test_matches_oracle(self, op):
    # T straddles chunks and ends in a partial one; grouped value heads; K != V.
    self.check(op, B=2, T=self.T, H=2, HV=4)

  def test_qk_l2norm_and_scale(self):
    self.check("gated_delta_rule", B=1, T=self.T, kw=dict(use_qk_l2norm=True, scale=0.3))

  @pytest.mark.parametrize("op", OPS)
  def test_packed_documents(self, op):
    # Documents of 5, 0 (empty), 16 and 19 tokens in one row: with chunks of 16 tokens (8 for
    # delta_product's 2 steps) they start inside chunks, one spans a chunk boundary, and each
    # has its own initial and final state.
    self.check(op, B=1, T=40, H=1, HV=2, N=4, kw=dict(cu_seqlens=(0, 5, 5, 21, 40)))

  def test_packed_per_stream(self):
    # cu_seqlens [B, S + 1]: two streams, three documents each (one empty), rows b * S + s.
    cu = ((0, 7, 30, 30), (0, 18, 19, 30))
    self.check("kda", B=2, T=30, N=6, kw=dict(cu_seqlens=cu))

  @pytest.mark.parametrize("op", OPS)
  def test_bfloat16_inputs(self, op):
    if op not in self.low_precision_ops:
      pytest.skip(reason=f"{type(self).__name__} checks bfloat16 on {self.low_precision_ops}")
    self.check(op, jnp.bfloat16, B=1, T=self.T)

  @pytest.mark.parametrize("op", ["gated_delta_rule", "kda"])
  def test_strong_gates(self, op):
    # g around -20 per token: exp(+G) over a chunk would overflow float32.
    self.check(op, B=1, T=self.T, gate_scale=20.0)

  def test_gates_at_minus_infinity(self):
    # A log-gate of -inf forgets everything (a reset by decay); values and gradients stay
    # finite and match the oracle, whose e^-inf is exactly 0.
    args, h0 = make_inputs("kda", B=1, T=self.T)
    q, k, v, g, beta = args
    t, c = np.arange(self.T)[:, None], np.arange(q.shape[-1])[None]
    g = jnp.where(jnp.asarray((t % 7 == 3) & (c % 3 == 0))[None, :, None], -jnp.inf, g)
    o, s, grads = self.call("kda", (q, k, v, g, beta), h0)
    with jax.enable_x64(True):
      up = lambda x: jnp.asarray(x, jnp.float64)
      ref = _vjp(lambda a, h: oracle(*_with_steps("kda", *split_args("kda", a)), h,
                                     gate="channel"),
                 tuple(map(up, (q, k, v, g, beta))), up(h0))
    assert_close(o, ref[0], 1e-5, "output")
    assert_close(s, ref[1], 1e-5, "final state")
    for name, a, b in zip(_names("kda"), grads, ref[2]):
      assert_close(a, b, 1e-5, f"d{name}")

  # --- identities ------------------------------------------------------------------------

  def run(self, op, args, **kw):
    fn = getattr(__import__("deltajax").ops, op)
    kw = dict(dict(output_final_state=True, chunk_size=self.chunk_size, impl=self.impl,
                   kernel_config=self.kernel_config), **kw)
    return jax.jit(lambda a: fn(*a, **kw))(args)

  def test_without_states(self):
    (args, _) = make_inputs("gated_delta_rule", B=1, T=self.T)
    o, s = self.run("gated_delta_rule", args, output_final_state=False)
    q, k, v, g, beta = args
    ref, _ = oracle(q, k[:, :, None], v[:, :, None], beta[:, :, None], g, None, gate="head")
    assert s is None
    assert_close(o, ref, 1e-5, "output from zero states")

  def test_packed_equals_each_document_alone(self):
    lengths = (7, 20, 3)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    args, h0 = make_inputs("kda", B=1, T=int(cu[-1]), N=len(lengths))
    o, s = self.run("kda", args, initial_state=h0, cu_seqlens=cu)
    for i in range(len(lengths)):
      part = tuple(a[:, cu[i]:cu[i + 1]] for a in args)
      o_i, s_i = self.run("kda", part, initial_state=h0[i:i + 1])
      assert_close(o[:, cu[i]:cu[i + 1]], o_i, 1e-5, f"output of document {i}")
      assert_close(s[i:i + 1], s_i, 1e-5, f"final state of document {i}")

  def test_two_halves_equal_the_whole(self):
    args, h0 = make_inputs("gated_delta_rule", B=1, T=40)
    o, s = self.run("gated_delta_rule", args, initial_state=h0)
    o1, s1 = self.run("gated_delta_rule", tuple(a[:, :23] for a in args), initial_state=h0)
    o2, s2 = self.run("gated_delta_rule", tuple(a[:, 23:] for a in args), initial_state=s1)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, 1e-5, "output")
    assert_close(s2, s, 1e-5, "final state")

  def test_special_cases_of_one_another(self):
    (q, k, v, beta, g), h0 = make_inputs("delta_product", n=1, B=1, T=30)
    gdn = (q, k[:, :, 0], v[:, :, 0], g, beta[:, :, 0])
    o, s = self.run("gated_delta_rule", gdn, initial_state=h0)
    # DeltaProduct with one step is Gated DeltaNet.
    o_p, s_p = self.run("delta_product", (q, k, v, beta, g), initial_state=h0)
    assert_close(o_p, o, 1e-5, "delta_product n=1 output")
    assert_close(s_p, s, 1e-5, "delta_product n=1 state")
    # KDA with every channel's gate equal is Gated DeltaNet.
    g_channels = jnp.broadcast_to(g[..., None], (*g.shape, q.shape[-1]))
    o_k, s_k = self.run("kda", (q, gdn[1], gdn[2], g_channels, gdn[4]), initial_state=h0)
    assert_close(o_k, o, 1e-5, "kda equal channels output")
    assert_close(s_k, s, 1e-5, "kda equal channels state")
    # Gated DeltaNet with g = 0 is DeltaNet.
    o_0, s_0 = self.run("gated_delta_rule", gdn[:3] + (jnp.zeros_like(g), gdn[4]),
                        initial_state=h0)
    o_d, s_d = self.run("delta_rule", gdn[:3] + (gdn[4],), initial_state=h0)
    assert_close(o_0, o_d, 1e-5, "g=0 output")
    assert_close(s_0, s_d, 1e-5, "g=0 state")
    # beta = 0 writes nothing: the state stays h0 and every output reads it.
    o_b, s_b = self.run("delta_rule", gdn[:3] + (jnp.zeros_like(gdn[4]),), initial_state=h0)
    np.testing.assert_allclose(s_b, h0, rtol=0, atol=0)
    assert_close(o_b, jnp.einsum("bthk,bhkv->bthv", q * q.shape[-1] ** -0.5, h0), 1e-5,
                 "beta=0 output")

  # --- bad input ---------------------------------------------------------------------------

  def test_bad_input_fails_before_tracing(self):
    (q, k, v, beta), _ = make_inputs("delta_rule", B=1, T=8)
    bad = jax.jit(lambda q: __import__("deltajax").ops.delta_rule(
        q, k, v, beta, impl=self.impl, kernel_config=self.kernel_config))
    with pytest.raises(ValueError, match="k must have shape"):
      bad(q[:, :, :1])

