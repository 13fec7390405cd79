"""The roofline on paper of the Mosaic TPU kernels: `python -m deltajax.kernels.tpu.roofline`.

From the `pl.CostEstimate` each pallas_call declares (kernels.cost_estimate): FLOPs and HBM
bytes per kernel, the time each implies on TPU v5e and v6e (the larger of FLOPs / peak and
bytes / bandwidth), the share of the FLOPs spent in the inverse, and the sum of bytes against
the op's minimal traffic (q, k, v, g, beta read once, o written once, in bfloat16). Prints the
markdown table docs/kernels.md carries.
"""
from __future__ import annotations

import jax.numpy as jnp

from deltajax.core.problem import Problem
from deltajax.kernels.config import TpuOptions
from deltajax.kernels.tpu import api, kernels

CHIPS = {"v5e": (197e12, 819e9), "v6e": (918e12, 1.64e12)}   # bf16 FLOP/s, HBM bytes/s
OPS = {"delta_rule": (None, 1), "gated_delta_rule": ("head", 1), "kda": ("channel", 1),
       "delta_product": ("head", 2)}


def problem(op, B=1, T=8192, H=16, K=128, V=128, chunk_size=64):
  gate, n = OPS[op]
  return Problem(gate=gate, B=B, T=T, H=H, HV=H, K=K, V=V, n=n, N=B, scale=K ** -0.5,
                 chunk_size=chunk_size, output_final_state=True, dtype="bfloat16")


def minimal_bytes(p: Problem) -> int:
  """q, k, v, beta, g in and o out, bfloat16, each once."""
  per_token = p.H * p.K + p.n * (p.H * p.K + p.HV * p.V + p.HV) + p.HV * p.V
  if p.gate == "head":
    per_token += p.HV
  elif p.gate == "channel":
    per_token += p.HV * p.K
  return 2 * p.B * p.T * per_token


def rows(op, **shape):
  p = problem(op, **shape)
  pl_ = api.plan(p, TpuOptions(generation="v5e"), q_dtype=jnp.bfloat16, k_dtype=jnp.bfloat16,
                 v_dtype=jnp.bfloat16, g_dtype=jnp.bfloat16, has_sadd=False, interpret=False)
  parts = kernels.chunk_flops(pl_)
  inverse_share = parts["inverse"] / sum(parts.values())
  out = []
  for name, bwd in (("forward", False), ("backward", True)):
    ce = kernels.cost_estimate(pl_, backward=bwd)
    times = {chip: max(ce.flops / f, ce.bytes_accessed / bw) for chip, (f, bw) in CHIPS.items()}
    bound = {chip: "MXU" if ce.flops / f > ce.bytes_accessed / bw else "HBM"
             for chip, (f, bw) in CHIPS.items()}
    out.append(dict(op=op, kernel=name, gflop=ce.flops / 1e9, mbytes=ce.bytes_accessed / 1e6,
                    times=times, bound=bound, inverse_share=inverse_share,
                    minimal_mb=minimal_bytes(p) / 1e6))
  return out


def table(**shape) -> str:
  lines = ["| op | kernel | GFLOP | HBM MB | v5e ms (bound) | v6e ms (bound) | inverse FLOPs "
           "| minimal MB |", "|---|---|---|---|---|---|---|---|"]
  for op in OPS:
    for r in rows(op, **shape):
      t = lambda c: f"{r['times'][c] * 1e3:.2f} ({r['bound'][c]})"
      lines.append(f"| {op} | {r['kernel']} | {r['gflop']:.0f} | {r['mbytes']:.0f} | {t('v5e')} "
                   f"| {t('v6e')} | {r['inverse_share']:.0%} | {r['minimal_mb']:.0f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  for shape in (dict(B=1, T=8192, H=16), dict(B=4, T=2048, H=16)):
    print(f"B={shape['B']} T={shape['T']} H=HV={shape['H']} K=V=128, chunk 64, bfloat16\n")
    print(table(**shape) + "\n")
