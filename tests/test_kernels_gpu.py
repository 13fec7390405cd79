"""The Mosaic GPU kernels (kernels/gpu) in the Mosaic GPU interpreter on CPU.

* `TestMosaicGPU`: the shared test base (values, final states and every gradient against the
  float64 oracle; identities; packed documents; bad input) on impl="pallas" with
  `KernelConfig(backend="gpu", interpret=True)`.
* Each kernel against its float64 reference (kernels/gpu/reference.py), on one or two blocks.

The interpreter simulates TMA, barriers, SMEM and wgmma through host callbacks, about a
millisecond each, so a forward+backward through the seven kernels costs tens of seconds. CI
runs the representative subset in DEFAULT; `DELTAJAX_SLOW_TESTS=1` runs every test (what was
run before each commit of kernels/gpu).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from op_test_base import OpTestBase

from conftest import rel_rms
from deltajax.kernels import GpuOptions, KernelConfig
from deltajax.kernels.gpu import gates, output, prepare, prepare_backward, reference, state
from deltajax.kernels.gpu.spec import Spec

SLOW = os.environ.get("DELTAJAX_SLOW_TESTS") == "1"
DEFAULT = {
    "test_matches_oracle[gated_delta_rule]",      # float32, grouped heads, a partial chunk
    "test_packed_documents[kda]",                 # documents inside chunks, per-channel gates
    "test_bfloat16_inputs[delta_product]",        # bf16, Householder steps
    "test_bad_input_fails_before_tracing",
    "test_prepare[channel-float32-packed]",
    "test_gpu_options_are_checked",
    "test_unsupported_sizes_name_the_way_out",
}


@pytest.fixture(autouse=True)
def _subset(request):
  if not SLOW and request.node.name not in DEFAULT:
    pytest.skip("Mosaic GPU interpreter: set DELTAJAX_SLOW_TESTS=1 to run every test")


class TestMosaicGPU(OpTestBase):
  impl = "pallas"
  kernel_config = KernelConfig(backend="gpu", interpret=True)


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


@pytest.mark.parametrize("gate, dtype, packed", [
    ("channel", "float32", "packed"), ("head", "bfloat16", "plain"), (None, "float32", "plain")])
def test_prepare(gate, dtype, packed):
  spec, x = _spec_and_inputs(gate, packed == "packed", dtype, gate_scale=8.0)
  W, U, Kd = prepare.prepare(spec, x["k"], x["v"], x["beta"], x["gates"], x["masks"],
                             interpret=True)
  with jax.enable_x64(True):
    ref = reference.prepare(spec, x["k"], x["v"], x["beta"], x["G"], x["masks"])
  for name, got, want in zip("W U Kd".split(), (W, U, Kd), ref):
    assert rel_rms(_total(got, 2), want) < TOL[dtype], name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_passes(dtype):
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
  for name, a, b in zip(("dk", "dv", "dbeta", "dD", "dG"), got, want):
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
