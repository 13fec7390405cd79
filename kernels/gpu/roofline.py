"""The roofline of the Mosaic GPU kernels on paper, from the `pl.CostEstimate` each declares.

    python -m deltajax.kernels.gpu.roofline            # the table in docs/kernels.md

For each op at a shape: every kernel's FLOPs (2 per multiply-add, every bf16 piece product
counted) and HBM bytes, the time each implies on an H100 (989 TFLOP/s dense bf16, 3.35 TB/s),
and the sums against the op's minimal traffic (q, k, v, g, beta read once, o written once;
forward+backward adds dO read and dq, dk, dv, dg, dbeta written). Paper only: no GPU has run
the kernels yet (`deltajax-bench --device-check` measures them).
"""
from __future__ import annotations

import argparse

from . import output, prepare, prepare_backward, state
from .spec import CHUNK, Spec

PEAK_FLOPS = 989e12    # H100 SXM dense bf16
PEAK_BYTES = 3.35e12   # H100 SXM HBM3
GATE = {"delta_rule": None, "gated_delta_rule": "head", "kda": "channel",
        "delta_product": "head"}


def spec_for(op: str, *, B: int, T: int, H: int, K: int, V: int, n: int = 2,
             dtype: str = "bfloat16") -> Spec:
  steps = T * (n if op == "delta_product" else 1)
  parts = 1 if dtype != "float32" else 3
  return Spec(B=B, T=-(-steps // CHUNK) * CHUNK, H=H, HV=H, K=K, V=V, gate=GATE[op],
              packed=False, l2norm=False, scale=K ** -0.5, dtype=dtype, parts=parts,
              inverse_parts=max(parts, 2), block_v=64)


def kernels(spec: Spec) -> dict[str, list]:
  """{"forward": [(name, CostEstimate)], "backward": [...]} (backward: what fwd+bwd adds)."""
  fwd = [("prepare", prepare.cost(spec)), ("state forward", state.forward_cost(spec)),
         ("output", output.forward_cost(spec))]
  bwd = [("prepare (again)", prepare.cost(spec)),
         ("output backward", output.backward_cost(spec)),
         ("state reverse", state.reverse_cost(spec)),
         ("prepare backward", prepare_backward.cost(spec))]
  return dict(forward=fwd, backward=bwd)


def minimal_bytes(op: str, *, B: int, T: int, H: int, K: int, V: int, n: int = 2,
                  itemsize: int = 2) -> tuple[float, float]:
  """(forward, forward+backward) minimal HBM bytes: inputs read once, outputs written once."""
  steps = n if op == "delta_product" else 1
  g = {None: 0, "head": H, "channel": H * K}[GATE[op]]
  per_token = (H * K + steps * (H * K + H * V + H) + g) * itemsize
  out = H * V * itemsize
  fwd = B * T * (per_token + out)
  return fwd, fwd + B * T * (out + per_token)        # + dO read, + every input's gradient


def table(ops=tuple(GATE), **shape) -> str:
  lines = [f"shape: {shape}, H100 {PEAK_FLOPS / 1e12:.0f} TFLOP/s, {PEAK_BYTES / 1e12:.2f} TB/s",
           "| op | kernel | GFLOP | MB | compute us | memory us | bound |",
           "|---|---|---:|---:|---:|---:|---|"]
  for op in ops:
    spec = spec_for(op, **shape)
    ks = kernels(spec)
    totals = {}
    for part in ("forward", "backward"):
      t_sum = f_sum = b_sum = 0.0
      for name, c in ks[part]:
        tc, tm = c.flops / PEAK_FLOPS * 1e6, c.bytes_accessed / PEAK_BYTES * 1e6
        lines.append(f"| {op} | {name} | {c.flops / 1e9:.1f} | {c.bytes_accessed / 1e6:.1f} | "
                     f"{tc:.1f} | {tm:.1f} | {'compute' if tc > tm else 'memory'} |")
        t_sum += max(tc, tm)
        f_sum += c.flops
        b_sum += c.bytes_accessed
      totals[part] = (f_sum, b_sum, t_sum)
    mf, mfb = minimal_bytes(op, **shape)
    f, b, t = totals["forward"]
    fb, bb, tb = (totals["forward"][i] + totals["backward"][i] for i in range(3))
    lines.append(f"| {op} | **forward** | {f / 1e9:.1f} | {b / 1e6:.1f} | | | "
                 f"{t:.0f} us (roofline sum); minimal traffic {mf / 1e6:.1f} MB = "
                 f"{mf / PEAK_BYTES * 1e6:.0f} us, kernels move {b / mf:.1f}x it |")
    lines.append(f"| {op} | **fwd+bwd** | {fb / 1e9:.1f} | {bb / 1e6:.1f} | | | "
                 f"{tb:.0f} us; minimal {mfb / 1e6:.1f} MB = {mfb / PEAK_BYTES * 1e6:.0f} us, "
                 f"{bb / mfb:.1f}x |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in dict(B=1, T=8192, H=16, K=128, V=128).items():
    p.add_argument(f"--{name}", type=int, default=default)
  a = p.parse_args(argv)
  print(table(B=a.B, T=a.T, H=a.H, K=a.K, V=a.V))


if __name__ == "__main__":
  main()
