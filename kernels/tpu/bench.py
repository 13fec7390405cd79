"""The TPU device check: `python -m deltajax.kernels.tpu.bench` on any TPU VM.

1. Correctness on the device: every op, bfloat16 and float32, values, final states and every
   gradient of impl="pallas" (these kernels, compiled) against impl="chunk" (XLA), at a shape
   with a partial chunk, grouped value heads, initial states and packed documents.
2. Speed: forward and forward+backward, bfloat16, impl="pallas" against impl="chunk", at
   B=1 T=8192 H=16 K=V=128 and B=4 T=2048 H=16 K=V=128 (chunk 64): median wall time, model
   TFLOP/s (deltajax.core.flops, the same count for both) and the fraction of the chip's peak.
3. A table on stdout and, with --json, the same as JSON.

It needs nothing downloaded: the package installed (`pip install -e .`, or `--no-deps` where
jax[tpu] is already there). On a machine without a TPU it says so and exits with status 2.
It takes a few minutes (each op compiles twice per shape and implementation).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

OPS = ("delta_rule", "gated_delta_rule", "kda", "delta_product")
SHAPES = (dict(B=1, T=8192, H=16, K=128, V=128), dict(B=4, T=2048, H=16, K=128, V=128))
TOL = {"float32": 1e-4, "bfloat16": 2e-2}  # between two float32/bfloat16 paths, not vs float64


def make_args(op, *, B, T, H, K, V, HV=None, n=2, dtype="bfloat16", seed=0):
  """Inputs of the public op in its argument order; unit-norm keys, beta in (0, 1)."""
  HV = HV or H
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  steps = (n,) if op == "delta_product" else ()
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, *steps, H, K))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (B, T, *steps, HV, V))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, *steps, HV)))
  g = -jax.nn.softplus(jax.random.normal(ks[4], (B, T, HV, K) if op == "kda" else (B, T, HV)))
  cast = lambda x: x.astype(dtype)
  if op == "delta_rule":
    return tuple(map(cast, (q, k, v, beta)))
  if op == "delta_product":
    return tuple(map(cast, (q, k, v, beta, g)))
  return tuple(map(cast, (q, k, v, g, beta)))


CHECK_SHAPE = dict(B=1, T=333, H=2, HV=4, K=128, V=128, chunk_size=64)
KERNEL_CONFIG = dict(backend="tpu")  # the tests run this module's functions interpreted


def _fn(op, impl, **kw):
  from deltajax import ops  # pylint: disable=g-import-not-at-top
  from deltajax.kernels import KernelConfig  # pylint: disable=g-import-not-at-top
  extra = dict(kernel_config=KernelConfig(**KERNEL_CONFIG)) if impl == "pallas" else {}
  return lambda *a, h0=None: getattr(ops, op)(*a, initial_state=h0, impl=impl, **kw, **extra)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))


def check(op, dtype) -> float:
  """Worst relative RMS error of pallas against chunk over o, final and every gradient."""
  B, T, H, HV, K, V = (CHECK_SHAPE[x] for x in ("B", "T", "H", "HV", "K", "V"))
  args = make_args(op, B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=dtype)
  cu = jnp.asarray([0, T // 7, T // 7, T // 2, T], jnp.int32)
  h0 = jax.random.normal(jax.random.PRNGKey(7), (4, HV, K, V))

  def run(impl):
    fn = _fn(op, impl, output_final_state=True, cu_seqlens=cu, use_qk_l2norm=True,
             chunk_size=CHECK_SHAPE["chunk_size"])

    def vjp(a, h):
      (o, s), back = jax.vjp(lambda a, h: fn(*a, h0=h), a, h)
      cto = jax.random.normal(jax.random.PRNGKey(1), o.shape, jnp.float32).astype(o.dtype)
      cts = jax.random.normal(jax.random.PRNGKey(2), s.shape, jnp.float32)
      return o, s, back((cto, cts))
    return jax.tree.leaves(jax.jit(vjp)(args, h0))

  return max(_rel(x, y) for x, y in zip(run("pallas"), run("chunk")))


def _time(f, *args, reps=10):
  jax.block_until_ready(f(*args))                      # compile and warm up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench(op, impl, shape, reps):
  args = make_args(op, **shape)
  fn = _fn(op, impl)
  fwd = jax.jit(lambda *a: fn(*a)[0])
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32)),
                          argnums=tuple(range(len(args)))))
  return _time(fwd, *args, reps=reps), _time(grad, *args, reps=reps)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--json", help="also write the results here")
  parser.add_argument("--skip-check", action="store_true")
  args = parser.parse_args(argv)
  if jax.default_backend() != "tpu":
    print(f"no TPU here (jax.default_backend() is {jax.default_backend()!r}); run this on a "
          f"TPU VM", file=sys.stderr)
    return 2
  from deltajax.core.flops import op_flops, peak_flops  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  peak = peak_flops(dev)
  print(f"device: {dev.device_kind}, jax {jax.__version__}, peak {peak and peak / 1e12} TFLOP/s")
  out = dict(device=dev.device_kind, jax=jax.__version__, checks=[], timings=[])
  ok = True
  if not args.skip_check:
    for op in args.ops:
      for dtype in ("bfloat16", "float32"):
        err = check(op, dtype)
        passed = err < TOL[dtype]
        ok &= passed
        out["checks"].append(dict(op=op, dtype=dtype, max_rel_rms=err, passed=passed))
        print(f"check {op:17s} {dtype:9s} max rel RMS vs chunk {err:.2e} "
              f"{'ok' if passed else 'FAIL'}", flush=True)
  print(f"{'op':17s} {'shape':16s} {'impl':7s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} "
        f"{'TFLOP/s':>8s} {'of peak':>8s}")
  for op in args.ops:
    for shape in SHAPES:
      n = 2 if op == "delta_product" else 1
      flops = op_flops(B=shape["B"], T=shape["T"], HV=shape["H"], K=shape["K"],
                       V=shape["V"], n=n) * 3                          # forward + backward
      for impl in ("pallas", "chunk"):
        fwd, fb = bench(op, impl, shape, args.reps)
        tflops = flops / fb / 1e12
        frac = None if peak is None else flops / fb / peak
        row = dict(op=op, impl=impl, **shape, fwd_ms=fwd * 1e3, fwd_bwd_ms=fb * 1e3,
                   tflops=tflops, peak_fraction=frac)
        out["timings"].append(row)
        tag = f"B{shape['B']}T{shape['T']}H{shape['H']}"
        print(f"{op:17s} {tag:16s} {impl:7s} {fwd * 1e3:8.2f} {fb * 1e3:11.2f} {tflops:8.2f} "
              f"{'' if frac is None else f'{frac:8.1%}'}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
