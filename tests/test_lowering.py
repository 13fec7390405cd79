"""The Pallas kernels lower for their accelerators on a machine without one.

CUDA: every op, forward and forward+backward, lowers to Mosaic GPU custom calls
(`mosaic_gpu_v2`) and to no Triton call; at the largest sizes the kernels take (K = V = 256 in
bfloat16, and float32 at its limits) every kernel fits a Hopper SM's shared memory, which the
Mosaic GPU lowering checks. Lowering is what a CPU can verify: compiling the lowered modules
needs a GPU (`deltajax-bench --device-check`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from deltajax.core.documents import from_cu_seqlens
from deltajax.core.problem import Problem
from deltajax.kernels import KernelConfig, GpuOptions, pallas

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


@pytest.mark.parametrize("op", list(GATE))
def test_every_op_lowers_to_mosaic_gpu(op):
  # Forward+backward: the forward's prepare, state pass and outputs, then prepare again, the
  # outputs' backward, the reverse pass and the preparation's backward.
  p, args, docs = _inputs(op)
  text = _lowered(p, args, docs, backward=True)
  assert _kernels(text) == 3 + 4
  assert all(name in text for name in KERNELS)


@pytest.mark.parametrize("op, dtype, dim, options", [
    ("kda", jnp.bfloat16, 256, GpuOptions()),
    ("gated_delta_rule", jnp.bfloat16, 256, GpuOptions()),
    ("kda", jnp.float32, 128, GpuOptions()),                          # 2 pieces
    ("kda", jnp.float32, 64, GpuOptions()),                           # 3 pieces
])
def test_largest_sizes_fit_shared_memory(op, dtype, dim, options):
  # Documents with initial and final states take every optional input of the state passes.
  p, args, docs = _inputs(op, K=dim, V=dim, dtype=dtype, packed=True)
  assert _kernels(_lowered(p, args, docs, backward=True, options=options)) == 7
