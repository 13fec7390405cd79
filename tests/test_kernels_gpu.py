"""The Mosaic GPU kernels (kernels/gpu) in the Mosaic GPU interpreter on CPU.

* `TestMosaicGPU`: the shared test base (tests/op_test_base.py: outputs, final states and the
  gradient of every input against the float64 oracle at DESIGN.md's tolerances) on
  impl="pallas" with `KernelConfig(backend="gpu", interpret=True)`, narrowed to what nothing
  else checks on these kernels (each narrowing says why it is safe), with shapes that reach
  what the base's do not here: the kernels' chunk is always 64 steps, so T crosses it.
* Each kernel against its float64 reference (kernels/gpu/reference.py), on a few chunks: what
  tells which kernel a failure is in; with DELTAJAX_SLOW_TESTS=1 only.

The interpreter simulates every TMA copy, barrier, SMEM access and wgmma through a host
callback, so a forward+backward through the seven kernels costs seconds even on one chunk.
`DELTAJAX_SLOW_TESTS=1` also runs the narrowed cases (what to run after changing kernels/gpu).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from op_test_base import OpTestBase

from conftest import OPS, rel_rms, skip_unless_slow
from deltajax.kernels import GpuOptions, KernelConfig
from deltajax.kernels.gpu import gates, output, prepare, prepare_backward, reference, state
from deltajax.kernels.gpu.spec import Spec

def narrowed(why: str) -> None:
  """Skips a case in CI, saying why that is safe; with DELTAJAX_SLOW_TESTS=1 the caller goes
  on (a narrowed shared-base case then runs as the base has it)."""
  skip_unless_slow(f"Mosaic GPU interpreter, narrowed for CI: {why}")


class TestMosaicGPU(OpTestBase):
  """The shared test base on the Mosaic GPU kernels in their interpreter.

  A forward+backward here costs ~8 s of CPU to compile the interpreted kernels plus ~1-2 s per
  block (chunk x value head) to run them, and the float64 oracle of a packed case as much
  again, so the cases below combine what the base spreads over several, and every narrowing
  names where its ground is covered.
  """
  impl = "pallas"
  kernel_config = KernelConfig(backend="gpu", interpret=True)

  @pytest.mark.parametrize("op", OPS)
  def test_matches_oracle(self, op):
    # Every op forward and backward, with initial and final states, T ending inside the
    # kernels' 64-step chunk. Narrowed from the base's B = H = 2, HV = 4: delta_rule keeps two
    # batches and grouped value heads (two read q/k head 0), gated_delta_rule and kda the
    # grouped heads, and run the base's test_strong_gates (g ~ -20 per token: the compensated
    # head-gate sums, KDA's reference rows and its clamp at MIN_CHANNEL_GATE, which ~30% of
    # these gates fall below). DeltaProduct (20 tokens of 2 steps, one head) runs the base's
    # test_bfloat16_inputs: bfloat16 inputs take the same kernel code with one bf16 piece per
    # operand instead of three (each kernel's bf16 case is in its own test below), and
    # DeltaProduct's glue (steps, q and o on the last) is what it adds.
    if op == "delta_rule":
      self.check(op, B=2, T=37, H=1, HV=2)
    elif op == "delta_product":
      self.check(op, jnp.bfloat16, B=1, T=20, H=1, HV=1)
    else:
      self.check(op, B=1, T=37, H=1, HV=2, gate_scale=20.0)

  @pytest.mark.parametrize("op", OPS)
  def test_bfloat16_inputs(self, op):
    narrowed("test_matches_oracle runs DeltaProduct with bfloat16 inputs")
    super().test_bfloat16_inputs(op)

  @pytest.mark.parametrize("op", ["gated_delta_rule", "kda"])
  def test_strong_gates(self, op):
    narrowed("test_matches_oracle runs gated_delta_rule and kda with these gates")
    super().test_strong_gates(op)

  def test_qk_l2norm_and_scale(self):
    narrowed("q/k L2 norm and a scale are in test_packed_documents")
    super().test_qk_l2norm_and_scale()

  @pytest.mark.parametrize("op", OPS)
  def test_packed_documents(self, op):
    # KDA (per-channel gates, whose document masks reach the most kernel code) over three
    # 64-step chunks, documents each with its own initial and final state: one starts inside
    # chunk 0 and spans the boundary at 64 (its state crosses chunks), one starts inside
    # chunk 1, an empty one, one starts exactly at the boundary at 128 (its initial state
    # enters through S_add; the chunk before passes nothing on). With q/k L2 norm and a scale
    # (the base's test_qk_l2norm_and_scale).
    if op != "kda":
      narrowed("the document masks are one code path for every gate kind, run here on KDA; "
               "DeltaProduct's documents as steps are test_documents_as_steps")
      return super().test_packed_documents(op)
    cu = (0, 10, 100, 128, 128, 140)
    self.check(op, B=1, T=140, H=1, HV=1, N=5,
               kw=dict(cu_seqlens=cu, use_qk_l2norm=True, scale=0.3))

  def test_packed_per_stream(self):
    narrowed("per-stream cu_seqlens differ from one stream's in the op layer's Documents, "
             "shared by every implementation and tested on them; the kernels then see "
             "documents (test_packed_documents) and batches (test_matches_oracle[delta_rule])")
    super().test_packed_per_stream()

  def test_gates_at_minus_infinity(self):
    narrowed("run.py raises every per-channel gate to MIN_CHANNEL_GATE = -20 before anything "
             "else, so g = -inf reaches the kernels as -20 with a zero gradient, as the "
             "gates below -20 of test_matches_oracle[kda] (~30% of them) do")
    super().test_gates_at_minus_infinity()

  def test_without_states(self):
    narrowed("a missing initial state is a zero state for the kernels and a final state not "
             "asked for is dropped in XLA (run.py); the kernel code is that of "
             "test_matches_oracle")
    super().test_without_states()

  def test_packed_equals_each_document_alone(self):
    narrowed("test_packed_documents checks every document against the oracle, which runs "
             "each one alone from its own initial state")
    super().test_packed_equals_each_document_alone()

  def test_two_halves_equal_the_whole(self):
    narrowed("test_matches_oracle checks initial and final states (and their gradients) "
             "against the oracle, which is what makes two halves equal the whole")
    super().test_two_halves_equal_the_whole()

  def test_special_cases_of_one_another(self):
    narrowed("identities of the maths, checked on the other implementations; every op here "
             "is checked against the oracle itself")
    super().test_special_cases_of_one_another()


def test_documents_as_steps():
  # DeltaProduct's n steps per token become steps of their own (run._as_steps); its documents
  # must then be the documents of cu_seqlens * n over T * n steps.
  import sys  # pylint: disable=g-import-not-at-top
  from deltajax.core.documents import from_cu_seqlens
  from deltajax.core.problem import Problem
  import deltajax.kernels.gpu  # pylint: disable=unused-import
  run_module = sys.modules["deltajax.kernels.gpu.run"]
  B, T, n, H, K = 2, 9, 3, 1, 4
  cu = np.array([[0, 2, 2, 7, 9], [0, 4, 9, 9, 9]])
  p = Problem(gate="head", B=B, T=T, H=H, HV=H, K=K, V=K, n=n, N=8, packed=True)
  x = jnp.zeros((B, T, n, H, K))
  *_, docs = run_module._as_steps(p, x[:, :, 0], x, x, x[..., 0], x[:, :, 0, :, 0],
                                  from_cu_seqlens(cu, B, T))
  want = from_cu_seqlens(cu * n, B, T * n)
  for name in ("reset", "doc", "stream", "first", "last"):
    np.testing.assert_array_equal(getattr(docs, name), getattr(want, name), err_msg=name)
  assert docs.N == want.N


# -- each kernel against its reference ------------------------------------------------------

def _spec_and_inputs(gate, packed, dtype, *, B=1, T=128, H=1, HV=2, K=64, V=64, seed=0,
                     gate_scale=1.0):
  parts = 3 if dtype == "float32" else 1
  spec = Spec(B=B, T=T, H=H, HV=HV, K=K, V=V, gate=gate, packed=packed, l2norm=True,
              scale=K ** -0.5, dtype=dtype, parts=parts, inverse_parts=max(parts, 2),
              block_v=64)
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  f32 = jnp.float32
  x = dict(q=jax.random.normal(ks[0], (B, T, H, K), f32).astype(dtype),
           k=jax.random.normal(ks[1], (B, T, H, K), f32).astype(dtype),
           v=jax.random.normal(ks[2], (B, T, HV, V), f32).astype(dtype),
           beta=jax.nn.sigmoid(jax.random.normal(ks[3], (B, HV, T), f32)), gates=(), G=None,
           masks=())
  if gate == "head":
    g = -gate_scale * jax.nn.softplus(jax.random.normal(ks[4], (B, HV, T), f32))
    x["G"] = jnp.cumsum(g.reshape(B, HV, T // 64, 64), -1).reshape(B, HV, T)
    rest = (x["G"].reshape(B, HV, T // 64, 64)[..., -1:] - x["G"].reshape(B, HV, T // 64, 64))
    x["gates"] = (x["G"], jnp.zeros_like(x["G"]), rest.reshape(B, HV, T))   # G, lo, G_rev
  elif gate == "channel":
    g = -gate_scale * jax.nn.softplus(jax.random.normal(ks[4], (B, T, HV, K), f32))
    g = jnp.maximum(g, gates.MIN_CHANNEL_GATE)
    x["G"] = jnp.cumsum(g.reshape(B, T // 64, 64, HV, K), 2).reshape(B, T, HV, K)
    x["gates"] = (x["G"], x["G"].reshape(B, T // 4, 4, HV, K))
  if packed:   # documents start at steps 10 and 100 (inside chunks) and 64 (a chunk start)
    reset = np.zeros((B, T), bool)
    reset[:, [10, 100]] = True
    seg = np.cumsum(reset.reshape(B, -1, 64), -1).reshape(B, T).astype(np.float32)
    last_seg = seg.reshape(B, -1, 64)[..., -1:].repeat(64, -1).reshape(B, T)
    x["masks"] = tuple(map(jnp.asarray, (seg, (seg == 0).astype(np.float32),
                                         (seg == last_seg).astype(np.float32))))
  return spec, x


def _pieces(x, parts, axis):
  out, rest = [], x.astype(jnp.float32)
  for _ in range(parts):
    piece = rest.astype(jnp.bfloat16)
    out.append(piece)
    rest = rest - piece.astype(jnp.float32)
  return jnp.stack(out, axis)


def _total(x, axis):
  return np.asarray(x.astype(jnp.float32), np.float64).sum(axis)


TOL = {"float32": 1e-5, "bfloat16": 1e-2}
KERNEL_LEVEL = ("every kernel runs forward and backward in TestMosaicGPU (every gate kind, "
                "float32 and bf16, packed); this test tells which kernel a failure is in")


@pytest.mark.parametrize("gate, dtype, packed", [
    ("channel", "float32", "packed"), ("head", "bfloat16", "plain"), (None, "float32", "plain")])
def test_prepare(gate, dtype, packed):
  narrowed(KERNEL_LEVEL)
  spec, x = _spec_and_inputs(gate, packed == "packed", dtype, gate_scale=8.0)
  W, U, Kd = prepare.prepare(spec, x["k"], x["v"], x["beta"], x["gates"], x["masks"],
                             interpret=True)
  with jax.enable_x64(True):
    ref = reference.prepare(spec, x["k"], x["v"], x["beta"], x["G"], x["masks"])
  for name, got, want in zip("W U Kd".split(), (W, U, Kd), ref):
    assert rel_rms(_total(got, 2), want) < TOL[dtype], name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_passes(dtype):
  narrowed(KERNEL_LEVEL)
  spec, _ = _spec_and_inputs("head", False, dtype, T=192)
  B, HV, T, K, V, P, nc = spec.B, spec.HV, spec.T, spec.K, spec.V, spec.parts, spec.nc
  ks = jax.random.split(jax.random.PRNGKey(1), 9)
  f32 = jnp.float32
  W, Kd, Qg = (_pieces(jax.random.normal(k, (B, HV, T, K), f32) * 0.1, P, 2) for k in ks[:3])
  U = _pieces(jax.random.normal(ks[3], (B, HV, T, V), f32), P, 2)
  D = jax.random.uniform(ks[4], (B, HV, nc, K), f32)
  h0 = jax.random.normal(ks[5], (B, HV, K, V), f32)
  S_add = jax.random.normal(ks[6], (B, HV, nc, K, V), f32)
  dO = jax.random.normal(ks[7], (B, T, HV, V), f32).astype(dtype)
  dvd = _pieces(jax.random.normal(ks[8], (B, HV, T, V), f32), P, 2)
  h, vn, final = state.forward(spec, W, U, Kd, D, h0, S_add, interpret=True)
  dso, dvn, dh0 = state.reverse(spec, Qg, W, Kd, D, dO, dvd, final, S_add, interpret=True)
  with jax.enable_x64(True):
    tot = lambda x: jnp.asarray(_total(x, 2))
    ref_f = reference.state_forward(spec, tot(W), tot(U), tot(Kd), D, h0, S_add)
    ref_r = reference.state_reverse(spec, tot(Qg), tot(W), tot(Kd), D, dO, tot(dvd), final,
                                    S_add)
  for got, want in zip((_total(h, 3), _total(vn, 2), final, _total(dso, 3), _total(dvn, 2),
                        dh0), ref_f + ref_r):
    assert rel_rms(got, want) < TOL[dtype]


@pytest.mark.parametrize("gate, dtype, packed", [("channel", "bfloat16", "packed"),
                                                 ("head", "float32", "plain")])
def test_output_and_its_backward(gate, dtype, packed):
  narrowed(KERNEL_LEVEL)
  spec, x = _spec_and_inputs(gate, packed == "packed", dtype)
  B, HV, nc, T, K, V, P = spec.B, spec.HV, spec.nc, spec.T, spec.K, spec.V, spec.parts
  ks = jax.random.split(jax.random.PRNGKey(2), 3)
  h = _pieces(jax.random.normal(ks[0], (B, HV, nc, K, V)), P, 3)
  vn = _pieces(jax.random.normal(ks[1], (B, HV, T, V)), P, 2)
  dO = jax.random.normal(ks[2], (B, T, HV, V)).astype(dtype)
  args = (x["q"], x["k"], x["gates"], x["masks"])
  o = output.forward(spec, *args, h, vn, interpret=True)
  got = output.backward(spec, *args, dO, h, vn, interpret=True)
  with jax.enable_x64(True):
    hs, vns = jnp.asarray(_total(h, 3)), jnp.asarray(_total(vn, 2))
    assert rel_rms(o, reference.output(spec, x["q"], x["k"], x["G"], x["masks"], hs, vns)) < \
        TOL[dtype]
    want = reference.output_backward(spec, x["q"], x["k"], x["G"], x["masks"], dO, hs, vns)
  got = (_total(got[0], 2), _total(got[1], 2)) + got[2:]
  for name, a, b in zip(("dV_direct", "Qg", "dq", "dk", "dG"), got, want):
    assert rel_rms(a, b) < TOL[dtype], name


@pytest.mark.parametrize("gate, dtype, packed", [("channel", "float32", "packed"),
                                                 ("head", "bfloat16", "plain")])
def test_prepare_backward(gate, dtype, packed):
  narrowed(KERNEL_LEVEL)
  spec, x = _spec_and_inputs(gate, packed == "packed", dtype)
  B, HV, nc, T, K, V, P = spec.B, spec.HV, spec.nc, spec.T, spec.K, spec.V, spec.parts
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  h = jax.random.normal(ks[0], (B, HV, nc, K, V))
  dso = _pieces(jax.random.normal(ks[1], (B, HV, nc, K, V)), P, 3)
  dvn = _pieces(jax.random.normal(ks[2], (B, HV, T, V)), P, 2)
  # The kernel relies on V_new = U - W h, as the state pass makes it.
  with jax.enable_x64(True):
    W, U, _ = reference.prepare(spec, x["k"], x["v"], x["beta"], x["G"], x["masks"])
    vn_true = (U.reshape(B, HV, nc, 64, V) - W.reshape(B, HV, nc, 64, K) @ h).reshape(
        B, HV, T, V)
  vn, hp = _pieces(vn_true, P, 2), _pieces(h, P, 3)
  got = prepare_backward.prepare_backward(spec, x["k"], x["v"], x["beta"], x["gates"],
                                          x["masks"], dvn, hp, vn, dso, interpret=True)
  with jax.enable_x64(True):
    t = lambda x, a: jnp.asarray(_total(x, a))
    want = reference.prepare_backward(spec, x["k"], x["v"], x["beta"], x["G"], x["masks"],
                                      t(dvn, 2), t(hp, 3), t(vn, 2), t(dso, 3))
  dk, dv, dbeta, dD, dG = got
  if gate == "head":   # (dG, dG_rev): G_rev = G_last - G in each chunk, as the glue forms it
    d, d_rev = (x.reshape(B, HV, nc, 64) for x in dG)
    dG = (d - d_rev).at[..., -1].add(d_rev.sum(-1)).reshape(B, HV, T)
  elif gate == "channel":
    dG, = dG
  for name, a, b in zip(("dk", "dv", "dbeta", "dD", "dG"), (dk, dv, dbeta, dD, dG), want):
    if a is not None:
      b = jnp.moveaxis(b, 1, 2) if name == "dv" else b
      assert rel_rms(a, b) < TOL[dtype], name


# -- configuration and bad input ----------------------------------------------------------

def test_gpu_options_are_checked():
  with pytest.raises(ValueError, match="float32_pieces"):
    GpuOptions(float32_pieces=4)
  with pytest.raises(ValueError, match="block_v"):
    GpuOptions(block_v=48)


def test_unsupported_sizes_name_the_way_out():
  from deltajax.core.problem import Problem
  from deltajax.kernels.gpu import check_supported
  base = dict(gate="head", B=1, T=64, H=1, HV=1, n=1, N=1)
  check_supported(Problem(K=256, V=256, dtype="bfloat16", **base))
  for kw in (dict(K=320, V=64, dtype="bfloat16"), dict(K=128, V=256, dtype="float32"),
             dict(K=64, V=64, dtype="float64")):
    with pytest.raises(ValueError, match="impl='chunk'"):
      check_supported(Problem(**kw, **base))
  with pytest.raises(ValueError, match="float32_pieces=3"):
    check_supported(Problem(K=128, V=128, dtype="float32", **base),
                    GpuOptions(float32_pieces=3))
