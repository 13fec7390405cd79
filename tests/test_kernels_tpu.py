"""The Mosaic TPU kernels (deltajax.kernels.tpu) in the TPU interpreter, and their maths,
options and errors on CPU.

`TestMosaicTPU` runs the shared test base (tests/op_test_base.py) on the kernels in the TPU
interpreter with its checks on (uninitialised memory reads as NaN, out-of-bounds reads raise,
races are detected). The interpreter is slow (every memory op is a host callback and K, V pad
to 128 lanes), so the few cases here add only what the base does not reach: value heads split
over grid steps (dq, dk summed across steps), row blocks running past the end, g = -inf,
packed documents without initial states, and the race check made to fail the test.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltajax.core.documents import from_cu_seqlens
from deltajax.core.problem import Problem
from deltajax.kernels import KernelConfig
from deltajax.kernels.config import TpuOptions
from deltajax.kernels.tpu import api, maths, reference, run
from op_test_base import OpTestBase


class TestMosaicTPU(OpTestBase):
  """The shared test base on the TPU kernels in the TPU interpreter (checks on)."""
  impl = "pallas"
  kernel_config = KernelConfig(backend="tpu", interpret=True)
  low_precision_ops = ("delta_product",)
  # Every op against the oracle (grouped heads, partial chunk, h0, all gradients), in-kernel
  # L2 norm and scale, bfloat16, strong gates, packed documents once (the cases below add
  # packed KDA over split grid steps and with g = -inf). Measured on 2 loaded cores: 210 s of
  # the whole class's 490 s.
  ci_cases = frozenset({
      *(f"test_matches_oracle[{op}]" for op in ("delta_rule", "gated_delta_rule", "kda",
                                               "delta_product")),
      "test_packed_documents[gated_delta_rule]", "test_qk_l2norm_and_scale",
      "test_bfloat16_inputs[delta_product]", "test_strong_gates[kda]", "test_without_states",
      "test_bad_input_fails_before_tracing"})

TOL = {"float32": 1e-5, "bfloat16": 1e-2}


def rel_rms(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))


def make(gate, *, B=1, T=37, H=1, HV=2, K=16, V=8, n=1, cu=None, h0=True, dtype="float32",
         gate_scale=1.0, chunk_size=16, seed=0):
  """(Problem, args (q, k, v, beta, g, h0), docs) on the raw contract of deltajax.core."""
  N = B if cu is None else len(cu) - 1
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, n, H, K))
  v = jax.random.normal(ks[2], (B, T, n, HV, V))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, n, HV)))
  g = None
  if gate is not None:
    shape = (B, T, HV) if gate == "head" else (B, T, HV, K)
    g = -gate_scale * jax.nn.softplus(jax.random.normal(ks[4], shape))
  s = jax.random.normal(ks[5], (N, HV, K, V)) if h0 else None
  cast = lambda x: None if x is None else x.astype(dtype)
  args = (*map(cast, (q, k, v, beta, g)), s)
  docs = None if cu is None else from_cu_seqlens(jnp.asarray(cu), B, T)
  p = Problem(gate=gate, B=B, T=T, H=H, HV=HV, K=K, V=V, n=n, N=N, packed=cu is not None,
              scale=K ** -0.5, use_qk_l2norm=True, chunk_size=chunk_size, has_initial_state=h0,
              output_final_state=True, dtype=dtype)
  return p, args, docs


def _with_empty_passthrough(fn, docs):
  """The op layer passes empty documents' initial states through; so do the tests."""
  def wrapped(*a):
    o, f = fn(*a)
    if docs is not None and a[-1] is not None:
      f = jnp.where(docs.empty[:, None, None, None], a[-1].astype(f.dtype), f)
    return o, f
  return wrapped


def _values_and_grads(fn, args, seed=1):
  live = [i for i, a in enumerate(args) if a is not None]

  def f(*xs):
    a = list(args)
    for i, x in zip(live, xs):
      a[i] = x
    return fn(*a)

  (o, s), vjp = jax.vjp(f, *(args[i] for i in live))
  ko, ks = jax.random.split(jax.random.PRNGKey(seed))
  cto = jax.random.normal(ko, o.shape, jnp.float32).astype(o.dtype)
  cts = jax.random.normal(ks, s.shape, jnp.float32).astype(s.dtype)
  return o, s, vjp((cto, cts))


@contextlib.contextmanager
def no_races():
  """Fails if the TPU interpreter found a race in any kernel run inside.

  The interpreter only prints a race and sets `races_found` on its race-detection state, a
  module global it replaces per kernel run (jax 0.10.2, private module): keep every state.
  """
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # pylint: disable=g-import-not-at-top
  states = []

  class Recording(ipc.RaceDetectionState):
    def __init__(self, *a, **kw):
      super().__init__(*a, **kw)
      states.append(self)

  with mock.patch.object(ipc, "RaceDetectionState", Recording):
    yield
  assert states, "the interpreter created no race-detection state: is race detection on?"
  assert not any(s.races_found for s in states), "the TPU interpreter detected a race"


def check_against_token_loop(p, args, docs, options):
  kernel = _with_empty_passthrough(
      lambda *a: run(p, *a, docs, options=options, interpret=True), docs)
  with no_races():
    got = jax.jit(lambda *a: _values_and_grads(kernel, a))(*args)
    jax.block_until_ready(got)
  with jax.enable_x64(True):
    up = [None if a is None else jnp.asarray(a, jnp.float64) for a in args]
    want = _values_and_grads(lambda *a: reference.token_loop(p, *a, docs), up)
  names = ["o", "final"] + [f"d{n}" for n, a in zip(("q", "k", "v", "beta", "g", "h0"), args)
                            if a is not None]
  flat_got = [got[0], got[1], *got[2]]
  flat_want = [want[0], want[1], *want[2]]
  for name, x, y in zip(names, flat_got, flat_want):
    assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{name}: non-finite"
    err = rel_rms(x, y)
    assert err < TOL[p.dtype], f"{name}: relative RMS error {err:.3g} >= {TOL[p.dtype]}"


# --- the kernels in the TPU interpreter, beyond the shared base --------------------------------

def test_grid_steps_split_heads_and_chunks():
  # One of 2 value heads per grid step, so dq, dk sum over grid steps; row blocks of 2 chunks
  # over 3, so one chunk past the end runs as a no-op. KDA with packed documents that start
  # and end inside chunks (the last one in the last, partial chunk), an empty one, and initial
  # states: the S_add / o_add glue, the segment masks and the per-document finals.
  p, args, docs = make("channel", T=44, H=1, HV=2, cu=(0, 5, 5, 40, 44))
  check_against_token_loop(p, args, docs, TpuOptions(chunks_per_step=2, heads_per_step=1))


def test_kda_gates_down_to_minus_infinity_packed_without_initial_states():
  # g = -inf wipes the state; strong finite gates (~ -20 per token) must stay finite too.
  p, (q, k, v, beta, g, h0), docs = make("channel", T=16, gate_scale=20.0, cu=(0, 7, 16),
                                         h0=False)
  g = g.at[0, 5, 0, :3].set(-jnp.inf).at[0, 9, 1].set(-jnp.inf)
  check_against_token_loop(p, (q, k, v, beta, g, h0), docs, TpuOptions())


# --- the maths, without Pallas ----------------------------------------------------------------

@pytest.mark.parametrize("gate, n, cu", [("channel", 1, (0, 16, 20, 40))])
def test_chunk_maths_match_token_loop(gate, n, cu):
  """`reference.chunked` (the kernels' per-chunk maths under lax.scan) against the token loop,
  in float32 and in the 16-bit mode (bfloat16 operands, split-exact gate sums, x3 inverse)."""
  p, args, docs = make(gate, T=40, n=n, B=1 if cu else 2, H=1, HV=2, cu=cu, h0=cu is None)
  with jax.enable_x64(True):
    want, _ = reference.token_loop(p, *(None if a is None else jnp.asarray(a, jnp.float64)
                                        for a in args), docs)
  for operand, tol in (("float32", 1e-6), ("bfloat16", 1e-2)):
    got, _ = reference.chunked(p, *args, docs, numerics=maths.Numerics(operand))
    assert rel_rms(got, want) < tol, (operand, rel_rms(got, want))


def test_unit_lower_inverse_on_nearly_parallel_keys():
  # Repeated keys with beta near 2 make I + A ill-conditioned; the powers of A in a Neumann
  # product overflow here, the block-doubling inverse does not.
  C = 64
  k = jnp.ones((C, 8)) / np.sqrt(8.0) + 1e-3 * jax.random.normal(jax.random.PRNGKey(0), (C, 8))
  A = jnp.tril(1.9 * (k @ k.T), -1)
  for operand, tol in (("float32", 1e-5), ("bfloat16", 1e-3)):
    P = maths.unit_lower_inverse(A, maths.Numerics(operand))
    with jax.enable_x64(True):
      want = np.linalg.inv(np.eye(C) + np.asarray(A, np.float64))
    assert rel_rms(P, want) < tol, (operand, rel_rms(P, want))


def test_split3_is_exact():
  x = jnp.asarray([-8192.0, -1e-3, -3.14159265, -123.456789, 0.0], jnp.float32)
  hi, mid, lo = maths._split3(x)
  np.testing.assert_array_equal(
      np.asarray(hi, np.float32) + np.asarray(mid, np.float32) + np.asarray(lo, np.float32),
      np.asarray(x))


# --- options, tiles and bad input ---------------------------------------------------------------

def test_plan_fits_the_budget_and_heads_divide():
  p = Problem(gate="head", B=1, T=4096, H=2, HV=8, K=128, V=128, chunk_size=64)
  kw = dict(q_dtype=jnp.bfloat16, k_dtype=jnp.bfloat16, v_dtype=jnp.bfloat16,
            g_dtype=jnp.float32, has_sadd=False, interpret=False)
  pl_ = api.plan(p, TpuOptions(generation="v5e"), **kw)
  assert pl_.cb * pl_.C == 256 and pl_.G % pl_.hb == 0 and pl_.Kp == 128
  assert api.vmem_bytes(p, 128, 128, pl_.hb, pl_.cb, jnp.bfloat16) <= 48 << 20
  small = api.plan(p, TpuOptions(vmem_limit_bytes=4 << 20), **kw)
  assert small.cb < pl_.cb
  with pytest.raises(ValueError, match="heads_per_step must divide"):
    api.plan(p, TpuOptions(heads_per_step=3), **kw)


@pytest.mark.parametrize("field, value", [
    ("chunks_per_step", 0), ("heads_per_step", -1), ("rows_per_step", 0),
    ("generation", "v9"), ("precision", "fp8"), ("vmem_limit_bytes", 1.5),
    ("inverse_precision", "f16")])
def test_bad_options(field, value):
  with pytest.raises(ValueError, match=f"TpuOptions.{field}"):
    TpuOptions(**{field: value})


@pytest.mark.parametrize("change, match", [
    (dict(K=320), "key dim K up to 256; got 320"),
    (dict(V=512), "value dim V up to 256; got 512"),
    (dict(n=3), "power of two"),
    (dict(n=4, chunk_size=16), "chunk_size // n >= 8"),
    (dict(dtype="float64"), "dtype float32, bfloat16 or float16; got float64"),
])
def test_bad_input_names_the_argument_and_the_alternative(change, match):
  kw = dict(B=1, T=8, H=1, HV=1, K=16, V=16, n=1, dtype="float32", chunk_size=16)
  kw.update(change)
  B, T, H, HV, K, V, n, dtype = (kw[x] for x in ("B", "T", "H", "HV", "K", "V", "n", "dtype"))
  p = Problem(gate="head", B=B, T=T, H=H, HV=HV, K=K, V=V, n=n, N=B, scale=1.0,
              chunk_size=kw["chunk_size"], dtype=dtype)
  with jax.enable_x64(dtype == "float64"):
    z = lambda *shape: jnp.zeros(shape, dtype)
    args = (z(B, T, H, K), z(B, T, n, H, K), z(B, T, n, HV, V), z(B, T, n, HV), z(B, T, HV), None)
    with pytest.raises(ValueError, match=match) as err:
      run(p, *args, None, interpret=True)
  assert "impl='chunk'" in str(err.value)


def test_bench_says_when_there_is_no_tpu(capsys):
  from deltajax.kernels.tpu import bench  # pylint: disable=g-import-not-at-top
  assert bench.main(["--ops", "kda"]) == 2
  assert "no TPU here" in capsys.readouterr().err
