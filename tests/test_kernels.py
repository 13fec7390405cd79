"""impl="pallas" (deltajax.kernels) against the recurrent reference, in Pallas interpret mode.

Every op goes through `check_against_reference` (outputs, final states and the gradient of every
input). Shapes straddle the chunk (chunk_size 16 or 32 keeps the interpreter cheap); the
kernel-level tests compare with the pure-JAX chunk form on the same chunked inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TOL, assert_close, make_inputs, rel_rms
from oracle import check_against_reference
from deltajax.kernels import KernelConfig, config_for, pallas_chunk
from deltajax.kernels.delta_chunk import calls, maths, reference
from deltajax.ops.chunk import chunk
from deltajax.ops.layout import make_layout

_HI = jax.lax.Precision.HIGHEST


@pytest.mark.parametrize("op, shape, kw", [
    ("delta_rule", dict(T=37), dict(chunk_size=16)),
    ("delta_rule", dict(T=1, B=1), dict(chunk_size=16)),
    ("gated_delta_rule", dict(T=130, H=1, HV=2), dict(chunk_size=16, use_qk_l2norm=True)),
    ("kda", dict(T=64, B=1), dict(chunk_size=32)),
    ("delta_product", dict(T=37, B=1), dict(chunk_size=16)),
])
def test_matches_reference(op, shape, kw):
  check_against_reference(op, "pallas", kw=kw, **shape)


@pytest.mark.parametrize("op", ["gated_delta_rule", "kda"])
def test_packed_sequences(op):
  # Four documents, one of them empty, packed in one row of 70 tokens.
  cu = (0, 5, 5, 40, 70)
  check_against_reference(op, "pallas", kw=dict(chunk_size=16, cu_seqlens=cu),
                          B=1, T=70, N=4, H=1, HV=2)


def test_bfloat16_inputs():
  check_against_reference("kda", "pallas", jnp.bfloat16, kw=dict(chunk_size=16), T=37, B=1)


@pytest.mark.parametrize("op", ["gated_delta_rule", "kda"])
def test_strong_gates_stay_finite(op):
  # g around -20 per token: exp(+G) would overflow float32 within a few tokens.
  check_against_reference(op, "pallas", kw=dict(chunk_size=32), T=64, B=1, gate_scale=20.0)


def _chunked_inputs(gate, *, B=1, T=50, HV=2, K=16, V=8, seed=3):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = jax.random.normal(ks[0], (B, T, HV, K)) * K ** -0.5
  k = jax.random.normal(ks[1], (B, T, HV, K))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (B, T, HV, V))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, HV)))
  g = {None: None,
       "head": -jax.nn.softplus(jax.random.normal(ks[4], (B, T, HV))),
       "channel": -jax.nn.softplus(jax.random.normal(ks[5], (B, T, HV, K)))}[gate]
  return q, k, v, beta, g


def _tpu_interpreter():
  from jax.experimental.pallas import tpu as pltpu
  # Simulated TPU memory spaces: the VMEM scratch starts as NaN, out-of-bounds reads raise.
  return pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")


@pytest.mark.parametrize("mode", ["loop", "tpu_interpreter"])
def test_kernel_modes_match_chunk_form(mode):
  """Packed sequences, per-channel gates, values and vjp, against the pure-JAX chunk form.

  "loop" is the GPU structure (chunk loop inside the program; sub_block=8 also takes the
  cross-tile path of the KDA scores on chunks of 16); "tpu_interpreter" runs the TPU
  structure (chunk grid axis, state in a VMEM scratch) in the TPU interpreter.
  """
  cfg = (KernelConfig(sequential="loop", sub_block=8) if mode == "loop"
         else KernelConfig(interpret=_tpu_interpreter()))
  q, k, v, beta, g = _chunked_inputs("channel")
  cu = jnp.array([0, 20, 50], jnp.int32)
  layout = make_layout(1, 50, 16, cu)
  h0 = jax.random.normal(jax.random.PRNGKey(9), (2, 2, 16, 8))
  ours = jax.jit(lambda *a: pallas_chunk(*a, layout, cfg))
  ref = jax.jit(lambda *a: chunk(*a, layout, _HI))
  args = (q, k, v, beta, g, h0)
  out, vjp = jax.vjp(ours, *args)
  out_r, vjp_r = jax.vjp(ref, *args)
  cts = tuple(jax.random.normal(jax.random.PRNGKey(i), x.shape) for i, x in enumerate(out))
  for name, a, b in zip(("o", "final", "dq", "dk", "dv", "dbeta", "dg", "dh0"),
                        (*out, *vjp(cts)), (*out_r, *vjp_r(cts))):
    assert_close(a, b, TOL[jnp.float32], f"{mode} {name}")


def _neumann_inverse(A):
  """(I + A)^-1 as (I - A)(I + A^2)(I + A^4)...: the product the kernels must not use."""
  C = A.shape[-1]
  P, N = jnp.eye(C) - A, A @ A
  for _ in range(int(np.log2(C)) - 1):
    P, N = P @ (jnp.eye(C) + N), N @ N
  return P


def test_inverse_on_repeated_tokens():
  """Nearly parallel keys (one token repeated, beta up to 2): the kernels' W and U stay exact."""
  B, HV, nc, C, K, V = 1, 1, 2, 64, 16, 8
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  base = jax.random.normal(ks[0], (K,))
  k = base + 1e-3 * jax.random.normal(ks[1], (B, HV, nc, C, K))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jnp.stack([jnp.full((C,), 1.0), jnp.full((C,), 1.9)])[None, None]  # [1, 1, 2, C]
  v = jax.random.normal(ks[2], (B, HV, nc, C, V))
  q = jax.random.normal(ks[3], (B, HV, nc, C, K))
  cfg = KernelConfig()
  Qg, Kd, W, U, D, Attn = jax.jit(lambda *a: calls.prepare(cfg, *a, None, ()))(
      q, k, v, beta[..., None])
  # Against float64: on inputs this ill-conditioned two float32 forms differ by their own
  # rounding (~1e-5), so the reference is computed in float64 instead.
  with jax.enable_x64(True):
    p = reference.prepare(*(np.asarray(x, np.float64) for x in (q, k, v, beta)), None,
                          precision=_HI)
    p = jax.tree.map(np.asarray, p)
  for name, a, b in (("W", W, p.W), ("U", U, p.U), ("Attn", Attn, p.Attn)):
    assert_close(a, b, 1e-5, f"repeated tokens {name}")
  # The same inputs break the Neumann product (so this test can tell the two apart).
  A = beta[..., None] * jnp.tril(jnp.einsum("...ik,...jk->...ij", k, k, precision=_HI), -1)
  neumann_U = jnp.einsum("...ij,...jv->...iv", _neumann_inverse(A), beta[..., None] * v,
                         precision=_HI)
  bad = np.asarray(neumann_U)
  assert not np.all(np.isfinite(bad)) or rel_rms(bad, p.U) > 1e-2


def test_unit_lower_inverse_is_exact_inverse():
  C = 32
  A = jnp.tril(jax.random.normal(jax.random.PRNGKey(1), (C, C)), -1) * 0.5
  P = maths.unit_lower_inverse(A)
  assert_close(P @ (jnp.eye(C) + A), jnp.eye(C), 1e-5, "P (I + A)")


def test_config_defaults_per_platform():
  assert config_for("tpu") == KernelConfig(backend="tpu", interpret=False, sequential="grid")
  assert config_for("gpu").sequential == "loop" and not config_for("gpu").interpret
  assert config_for("cpu").interpret
  tpu = config_for("tpu").compiler_params(("parallel", "parallel", "arbitrary"))
  assert tuple(tpu.dimension_semantics) == ("parallel", "parallel", "arbitrary")
  assert config_for("gpu").compiler_params(("parallel",)).num_warps == 4
  assert config_for("cpu").compiler_params(("parallel",)) is None


@pytest.mark.parametrize("field, value", [("backend", "npu"), ("sequential", "scan"),
                                          ("sub_block", 12)])
def test_config_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=f"KernelConfig.{field}"):
    KernelConfig(**{field: value})


def test_gpu_needs_power_of_two_dims():
  q, k, v, beta, g = _chunked_inputs(None, K=24)
  layout = make_layout(1, 50, 16)
  h0 = jnp.zeros((1, 2, 24, 8))
  cfg = KernelConfig(backend="gpu", interpret=False, sequential="loop")
  with pytest.raises(ValueError, match="power of two; got 24. Use impl='chunk'"):
    pallas_chunk(q, k, v, beta, g, h0, layout, cfg)


_SHARD_MAP_SCRIPT = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
from conftest import make_inputs, rel_rms
from deltajax import ops
shard_map = getattr(jax, "shard_map", None)
if shard_map is None:  # jax < 0.6
  from jax.experimental.shard_map import shard_map
mesh = jax.make_mesh((2,), ("h",))
(q, k, v, g, beta), h0 = make_inputs("gated_delta_rule", B=1, T=20, H=2)
plain = (q, k, v, g, beta, h0)
def op(impl):
  return lambda q, k, v, g, beta, h0: ops.gated_delta_rule(
      q, k, v, g, beta, initial_state=h0, output_final_state=True, impl=impl, chunk_size=16)
heads, state = P(None, None, "h"), P(None, "h")
# check_vma=False: the Pallas interpreter (jax 0.10.2) cannot evaluate kernels on varying values.
sharded = shard_map(op("pallas"), mesh=mesh, in_specs=(heads,) * 5 + (state,),
                    out_specs=(heads, state), check_vma=False)
args = tuple(jax.device_put(x, NamedSharding(mesh, heads)) for x in plain[:5])
args += (jax.device_put(h0, NamedSharding(mesh, state)),)
loss = lambda fn: lambda *a: sum(jnp.sum(x * jnp.sin(x)) for x in fn(*a))
grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=tuple(range(6))))
ours = (*jax.jit(sharded)(*args), *grad(sharded)(*args))
ref = (*jax.jit(op("chunk"))(*plain), *grad(op("chunk"))(*plain))
errs = [rel_rms(a, b) for a, b in zip(ours, ref)]
assert max(errs) < 1e-5, errs
print("OK", errs)
'''


def test_runs_under_shard_map_over_heads():
  """impl="pallas" inside shard_map over 2 (fake CPU) devices, heads split, values and grads."""
  import os
  import subprocess
  import sys
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT, tests], env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr[-3000:]
