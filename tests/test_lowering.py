"""The Pallas kernels lower for platforms this machine does not have (no accelerator needed).

`jax.jit(f).trace(...).lower(lowering_platforms=(...,))` runs the Pallas-to-Mosaic lowering; it
does not run Mosaic's own compiler passes (those run when a TPU compiles the custom call:
`python -m deltajax.kernels.tpu.compile_check` does that on a CPU with libtpu installed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from deltajax.core.problem import Problem
from deltajax.kernels import KernelConfig, pallas

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
