"""Microbenchmarks of the delta-rule ops under `jax.jit`: `python -m deltajax.bench`.

For every op x implementation x sequence length it prints the compile time, the median forward
and forward+backward time (after a warm-up, with `block_until_ready`), the peak memory of the
forward+backward program from XLA's memory analysis, and the throughput in model TFLOP/s (the
FLOPs of the chunkwise algorithm, the same count for every implementation so the column compares
speed). Where the device's peak is known it also prints the fraction of it. A JSON file and a
log-log plot are written on request.

Numbers are measurements of this machine; docs/benchmarks.md records them with the command.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import ops
from deltajax.core import flops as flops_lib
from deltajax.core.problem import Problem
from deltajax.ops import registry

OPS = ("delta_rule", "gated_delta_rule", "kda", "delta_product")
IMPLS = tuple(registry.IMPLEMENTATIONS)


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark shape. n is the number of Householder steps (delta_product only);
  gate_scale multiplies the log-gates (at 1, -softplus of a standard normal: ~0.8 per token)."""
  B: int = 2
  T: int = 4096
  H: int = 4
  K: int = 64
  V: int = 64
  n: int = 2
  chunk_size: int = 64
  gate_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class Result:
  op: str
  impl: str
  T: int
  compile_s: float
  fwd_ms: float
  fwd_bwd_ms: float
  peak_mib: float
  tflops: float
  peak_fraction: float | None


def make_args(op: str, s: Shape, dtype) -> tuple[jax.Array, ...]:
  """Random inputs in the argument order of the op, unit-norm keys, beta in (0, 1)."""
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  steps = (s.n,) if op == "delta_product" else ()
  q = jax.random.normal(ks[0], (s.B, s.T, s.H, s.K))
  k = jax.random.normal(ks[1], (s.B, s.T, *steps, s.H, s.K))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (s.B, s.T, *steps, s.H, s.V))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (s.B, s.T, *steps, s.H)))
  g_shape = (s.B, s.T, s.H, s.K) if op == "kda" else (s.B, s.T, s.H)
  g = -s.gate_scale * jax.nn.softplus(jax.random.normal(ks[4], g_shape))
  cast = lambda x: x.astype(dtype)
  if op == "delta_rule":
    return tuple(map(cast, (q, k, v, beta)))
  if op == "delta_product":
    return tuple(map(cast, (q, k, v, beta, g)))
  return tuple(map(cast, (q, k, v, g, beta)))


def model_flops(op: str, s: Shape) -> float:
  """Forward FLOPs of the chunkwise algorithm (deltajax.core.flops), the same count for every
  implementation so the TFLOP/s column compares speed."""
  n = s.n if op == "delta_product" else 1
  return flops_lib.op_flops(B=s.B, T=s.T, HV=s.H, K=s.K, V=s.V, n=n, chunk_size=s.chunk_size)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of fn() in ms over `repeats` runs after one warm-up, results awaited."""
  jax.block_until_ready(fn())  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def _peak_mib(compiled) -> float:
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2**20


def device_peak_tflops() -> float | None:
  peak = flops_lib.peak_flops(jax.devices()[0])
  return None if peak is None else peak / 1e12


def bench_one(op: str, impl: str, s: Shape, dtype, repeats: int) -> Result:
  """Times one op x impl x shape."""
  args = make_args(op, s, dtype)
  fn = getattr(ops, op)
  forward = jax.jit(lambda *a: fn(*a, impl=impl, chunk_size=s.chunk_size)[0])

  def loss(*a):
    o = fn(*a, impl=impl, chunk_size=s.chunk_size)[0]
    return jnp.sum(jnp.square(o.astype(jnp.float32)))
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))

  t0 = time.perf_counter()
  compiled = fwd_bwd.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  fwd_ms = median_ms(lambda: forward(*args), repeats)
  fwd_bwd_ms = median_ms(lambda: compiled(*args), repeats)
  flops = 3 * model_flops(op, s)  # backward ~ 2x forward
  tflops = flops / (fwd_bwd_ms * 1e-3) / 1e12
  peak = device_peak_tflops()
  return Result(op=op, impl=impl, T=s.T, compile_s=compile_s, fwd_ms=fwd_ms,
                fwd_bwd_ms=fwd_bwd_ms, peak_mib=_peak_mib(compiled), tflops=tflops,
                peak_fraction=None if peak is None else tflops / peak)


# fla's Triton chunk kernels, for `--compare fla`: (module, function) per op.
FLA_KERNELS = {
    "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule"),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    "kda": ("fla.ops.kda", "chunk_kda"),
    "delta_product": ("fla.ops.gated_delta_product", "chunk_gated_delta_product"),
}


def bench_fla(op: str, s: Shape, dtype, repeats: int) -> Result:
  """Times fla's Triton kernel for `op` on the same inputs (needs torch, CUDA and fla-core).

  fla's conventions are ours, except that delta_product takes time interleaved with the
  Householder steps (k [B, T * n, H, K]) and the step count as an argument.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  module, name = FLA_KERNELS[op]
  kernel = getattr(importlib.import_module(module), name)
  to_torch = lambda x: torch.from_dlpack(np.asarray(x.astype(jnp.float32))).cuda().to(
      getattr(torch, jnp.dtype(dtype).name)).requires_grad_()
  args = [to_torch(x) for x in make_args(op, s, dtype)]
  if op == "delta_product":
    q, k, v, beta, g = args
    flat = lambda x: x.detach().flatten(1, 2).requires_grad_()
    args, extra = [q, flat(k), flat(v), g, flat(beta)], dict(num_householder=s.n)
  else:
    extra = {}

  def forward():
    return kernel(*args, **extra)[0]

  def fwd_bwd():
    o = kernel(*args, **extra)[0]
    o.float().square().sum().backward()
    return o

  def median_ms(fn):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)

  t0 = time.perf_counter()
  fwd_bwd()  # Triton compiles on first call
  torch.cuda.synchronize()
  compile_s = time.perf_counter() - t0
  torch.cuda.reset_peak_memory_stats()
  fwd_ms, fwd_bwd_ms = median_ms(forward), median_ms(fwd_bwd)
  tflops = 3 * model_flops(op, s) / (fwd_bwd_ms * 1e-3) / 1e12
  peak = device_peak_tflops()
  return Result(op=op, impl="fla", T=s.T, compile_s=compile_s, fwd_ms=fwd_ms,
                fwd_bwd_ms=fwd_bwd_ms, peak_mib=torch.cuda.max_memory_allocated() / 2**20,
                tflops=tflops, peak_fraction=None if peak is None else tflops / peak)


def format_table(results: Sequence[Result]) -> str:
  head = (f"{'op':<17} {'impl':<9} {'T':>6} {'compile s':>9} {'fwd ms':>9} {'fwd+bwd ms':>10} "
          f"{'peak MiB':>9} {'TFLOP/s':>8} {'of peak':>7}")
  rows = [head, "-" * len(head)]
  for r in results:
    frac = "-" if r.peak_fraction is None else f"{100 * r.peak_fraction:.1f}%"
    rows.append(f"{r.op:<17} {r.impl:<9} {r.T:>6} {r.compile_s:>9.2f} {r.fwd_ms:>9.2f} "
                f"{r.fwd_bwd_ms:>10.2f} {r.peak_mib:>9.1f} {r.tflops:>8.4f} {frac:>7}")
  return "\n".join(rows)


def summarize(results: Sequence[Result]) -> str:
  """Chunk vs recurrent, whether impl="auto" picks the faster path, and throughput against fla."""
  by = {(r.op, r.impl, r.T): r for r in results}
  lines = []
  for (op, impl, T), r in sorted(by.items()):
    rec, fla = by.get((op, "recurrent", T)), by.get((op, "fla", T))
    if impl == "chunk" and rec is not None:
      n = 2 if op == "delta_product" else 1
      auto = ops.resolve_impl("auto", Problem(gate="head", B=1, T=T, H=1, HV=1, K=64, V=64,
                                              n=n, N=1))
      faster = "chunk" if r.fwd_bwd_ms < rec.fwd_bwd_ms else "recurrent"
      lines.append(f"{op:<17} T={T:<6} chunk fwd+bwd {rec.fwd_bwd_ms / r.fwd_bwd_ms:6.2f}x the "
                   f"speed of recurrent, peak memory {r.peak_mib / rec.peak_mib:6.3f}x; auto -> "
                   f"{auto} ({'faster' if auto == faster else 'NOT the faster path'})")
    if impl not in ("fla", "recurrent") and fla is not None:
      lines.append(f"{op:<17} T={T:<6} {impl} / fla throughput: forward "
                   f"{fla.fwd_ms / r.fwd_ms:5.2f}, forward+backward "
                   f"{fla.fwd_bwd_ms / r.fwd_bwd_ms:5.2f}")
  return "\n".join(lines)


def plot(results: Sequence[Result], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for op in sorted({r.op for r in results}):
    for impl in sorted({r.impl for r in results}):
      pts = sorted((r.T, r.fwd_bwd_ms) for r in results if r.op == op and r.impl == impl)
      if pts:
        ax.loglog(*zip(*pts), marker="o", label=f"{op} {impl}")
  ax.set_xlabel("sequence length T")
  ax.set_ylabel("forward+backward (ms)")
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _csv(kind):
  return lambda text: tuple(kind(x) for x in text.split(",") if x)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="deltajax-bench", description=__doc__.splitlines()[0])
  p.add_argument("--ops", type=_csv(str), default=OPS, help="comma-separated; default all")
  p.add_argument("--impls", type=_csv(str), default=("recurrent", "chunk"),
                 help="comma-separated from recurrent,chunk,pallas (pallas runs interpreted "
                      "and slowly on CPU)")
  p.add_argument("--T", type=_csv(int), default=(1024, 4096, 16384))
  p.add_argument("--B", type=int, default=2)
  p.add_argument("--H", type=int, default=4)
  p.add_argument("--K", type=int, default=64)
  p.add_argument("--V", type=int, default=64)
  p.add_argument("--n", type=int, default=2, help="Householder steps for delta_product")
  p.add_argument("--chunk-size", type=int, default=64)
  p.add_argument("--gate-scale", type=float, default=1.0,
                 help="multiplies the log-gates; kda takes its exact sub-block path once a "
                      "channel decays by more than e^80 over a chunk (scale ~1.5 at C=64)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", help="write the results here")
  p.add_argument("--plot", help="write a log-log plot of time vs T here (needs matplotlib)")
  p.add_argument("--compare", choices=("fla",), action="append", default=[],
                 help="also time fla's Triton kernels in the same run (needs torch with CUDA "
                      "and fla-core)")
  a = p.parse_args(argv)
  for name in a.ops:
    if name not in OPS:
      p.error(f"--ops: unknown op {name!r}; choose from {OPS}")
  for name in a.impls:
    if name not in IMPLS:
      p.error(f"--impls: unknown implementation {name!r}; choose from {IMPLS}")
  if not a.gate_scale >= 0:
    p.error(f"--gate-scale: got {a.gate_scale}; log-gates must stay <= 0, so it must be >= 0")
  if a.compare:
    try:
      import fla  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      p.error(f"--compare fla needs torch and fla-core installed: {e}")
    if not torch.cuda.is_available():
      p.error("--compare fla needs a CUDA GPU (fla's kernels are Triton)")
  dev = jax.devices()[0]
  print(f"deltajax bench: jax {jax.__version__}, {dev.platform} ({dev.device_kind}), "
        f"B={a.B} H={a.H} K={a.K} V={a.V} n={a.n} C={a.chunk_size} {a.dtype} "
        f"gate scale {a.gate_scale:g}", flush=True)
  results = []
  for T in a.T:
    for op in a.ops:
      for impl in a.impls:
        s = Shape(B=a.B, T=T, H=a.H, K=a.K, V=a.V, n=a.n, chunk_size=a.chunk_size,
                  gate_scale=a.gate_scale)
        r = bench_one(op, impl, s, jnp.dtype(a.dtype), a.repeats)
        results.append(r)
        print(format_table([r]).splitlines()[-1], flush=True)
      if "fla" in a.compare:
        r = bench_fla(op, s, jnp.dtype(a.dtype), a.repeats)
        results.append(r)
        print(format_table([r]).splitlines()[-1], flush=True)
  print()
  print(format_table(results))
  print()
  print(summarize(results))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(device=dev.device_kind, jax=jax.__version__, args=vars(a),
                     results=[dataclasses.asdict(r) for r in results]), f, indent=1)
  if a.plot:
    plot(results, a.plot)


if __name__ == "__main__":
  main(sys.argv[1:])
