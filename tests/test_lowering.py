"""The Pallas kernels lower for platforms this machine does not have (no accelerator needed).

`jax.jit(f).trace(...).lower(lowering_platforms=(...,))` runs the Pallas-to-Mosaic lowering; it
does not run Mosaic's own compiler passes (those run when the accelerator compiles the custom
call: `python -m deltajax.kernels.tpu.compile_check` does that for TPU on a CPU with libtpu
installed; for GPU, `deltajax-bench --device-check` on a GPU).

* TPU: every op, forward and forward+backward, lowers to Mosaic TPU custom calls.
* CUDA: every op, forward and forward+backward, lowers to the Mosaic GPU kernels
  (`mosaic_gpu_v2` custom calls) and to no Triton call; at the largest sizes the kernels take
  (K = V = 256 in bfloat16, and float32 at its limits) every kernel fits a Hopper SM's shared
  memory, which the Mosaic GPU lowering checks.
* The public op with impl="pallas" and the default KernelConfig (backend "auto") picks the
  kernels by the platform lowered for, Mosaic GPU for "cuda" and Mosaic TPU for "tpu", with no
  interpreter callback, where an accelerator is the default backend (kernels/api.py says why
  a CPU cross-lowers with the backend named).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import deltajax
from deltajax.core.documents import from_cu_seqlens
from deltajax.core.problem import Problem
from deltajax.kernels import GpuOptions, KernelConfig, pallas

# --- Mosaic GPU ---------------------------------------------------------------------------

GATE = {"delta_rule": None, "gated_delta_rule": "head", "kda": "channel",
        "delta_product": "head"}


def _inputs(op, *, B=1, T=80, H=1, HV=2, K=64, V=64, dtype=jnp.bfloat16, packed=False):
  n = 2 if op == "delta_product" else 1
  N = 3 if packed else B
  p = Problem(gate=GATE[op], B=B, T=T, H=H, HV=HV, K=K, V=V, n=n, N=N, packed=packed,
              scale=K ** -0.5, use_qk_l2norm=True, chunk_size=64, has_initial_state=True,
              output_final_state=True, dtype=jnp.dtype(dtype).name)
  s = jax.ShapeDtypeStruct
  g = {None: None, "head": s((B, T, HV), jnp.float32),
       "channel": s((B, T, HV, K), jnp.float32)}[GATE[op]]
  args = (s((B, T, H, K), dtype), s((B, T, n, H, K), dtype), s((B, T, n, HV, V), dtype),
          s((B, T, n, HV), dtype), g, s((N, HV, K, V), jnp.float32))
  docs = from_cu_seqlens((0, 30, 31, T), B, T) if packed else None
  return p, args, docs


def _lowered(p, args, docs, *, backward: bool, options=GpuOptions()) -> str:
  config = KernelConfig(backend="gpu", gpu=options)

  def fwd(*a):
    return pallas(p, *a, docs, config)

  def fwd_bwd(*a):
    out, vjp = jax.vjp(fwd, *a)
    return vjp(jax.tree.map(jnp.ones_like, out))

  fn = fwd_bwd if backward else fwd
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _kernels(text: str) -> int:
  assert "triton" not in text.lower()
  return text.count("stablehlo.custom_call @mosaic_gpu")


KERNELS = ("deltajax_prepare", "deltajax_state_forward", "deltajax_output",
           "deltajax_output_backward", "deltajax_state_reverse", "deltajax_prepare_backward")


def _seven_kernels(text: str) -> None:
  # The forward's prepare, state pass and outputs, then prepare again, the outputs' backward,
  # the reverse pass and the preparation's backward (the forward alone is the first three:
  # test_auto_backend_picks_the_platforms_kernels lowers one).
  assert _kernels(text) == 3 + 4
  assert all(name in text for name in KERNELS)


# kda: forward+backward in each case of test_largest_sizes_fit_shared_memory.
@pytest.mark.parametrize("op", ["delta_rule", "gated_delta_rule", "delta_product"])
def test_every_op_lowers_to_mosaic_gpu(op):
  p, args, docs = _inputs(op)
  _seven_kernels(_lowered(p, args, docs, backward=True))


# KDA's kernels allocate what the head-gate ones do (but two 64-float gate vectors) and a
# [64, K] float32 gate tile and per-channel operand buffers besides: the largest at each size.
@pytest.mark.parametrize("dtype, dim", [
    (jnp.bfloat16, 256),
    (jnp.float32, 128),                                               # 2 pieces
    (jnp.float32, 64),                                                # 3 pieces
])
def test_largest_sizes_fit_shared_memory(dtype, dim):
  # Documents with initial and final states take every optional input of the state passes.
  p, args, docs = _inputs("kda", K=dim, V=dim, dtype=dtype, packed=True)
  _seven_kernels(_lowered(p, args, docs, backward=True))


# --- Mosaic TPU ---------------------------------------------------------------------------

_TPU_OPS = {  # op: (gate, n)
    "delta_rule": (None, 1), "gated_delta_rule": ("head", 1), "kda": ("channel", 1),
    "delta_product": ("head", 2)}


@pytest.mark.parametrize("op", list(_TPU_OPS))
def test_tpu_forward_and_backward_lower_to_mosaic(op):
  gate, n = _TPU_OPS[op]
  B, T, H, HV, K, V = 1, 48, 1, 2, 64, 64
  p = Problem(gate=gate, B=B, T=T, H=H, HV=HV, K=K, V=V, n=n, N=B, scale=K ** -0.5,
              use_qk_l2norm=True, chunk_size=16, has_initial_state=True,
              output_final_state=True, dtype="bfloat16")
  sds = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  args = (sds((B, T, H, K), bf), sds((B, T, n, H, K), bf), sds((B, T, n, HV, V), bf),
          sds((B, T, n, HV), bf),
          None if gate is None else sds((B, T, HV) if gate == "head" else (B, T, HV, K), bf),
          sds((B, HV, K, V), jnp.float32))
  cfg = KernelConfig(backend="tpu")

  def loss(*a):
    o, s = pallas(p, *a, None, cfg)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  live = tuple(i for i, a in enumerate(args) if a is not None)
  for fn, name in ((lambda *a: pallas(p, *a, None, cfg), "forward"),
                   (jax.grad(loss, argnums=live), "forward+backward")):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    calls = text.count("tpu_custom_call")
    assert calls == (1 if name == "forward" else 2), f"{op} {name}: {calls} Mosaic calls"


# --- the platform picks the kernels ---------------------------------------------------------

@pytest.mark.parametrize("platform, call", [("cuda", "stablehlo.custom_call @mosaic_gpu"),
                                            ("tpu", "tpu_custom_call")])
def test_auto_backend_picks_the_platforms_kernels(monkeypatch, platform, call):
  # The public op with impl="pallas" and the default KernelConfig, as traced where an
  # accelerator is the default backend (faked: this machine has none), lowered for each.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  B, T, H, K = 1, 64, 1, 64
  s = jax.ShapeDtypeStruct
  args = (s((B, T, H, K), jnp.bfloat16), s((B, T, H, K), jnp.bfloat16),
          s((B, T, H, K), jnp.bfloat16), s((B, T, H), jnp.float32), s((B, T, H), jnp.bfloat16))
  fn = lambda *a: deltajax.ops.gated_delta_rule(*a, impl="pallas")
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert call in text
  assert "triton" not in text.lower() and "callback" not in text.lower()
