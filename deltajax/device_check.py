"""`deltajax-bench --device-check`: the first run of the Mosaic GPU kernels on a GPU.

One command, under a time budget (default 450 s, inside the 8 minutes an H100/H200 session
allows), in order of what matters most, writing its JSON after every step:

1. correctness: every op (plain, packed documents with initial states, grouped heads, q/k L2
   norm), bfloat16 and float32, the Mosaic GPU kernels (`impl="pallas"`,
   `KernelConfig(backend="gpu")`) against the float64 token loop (`impl="recurrent"` on
   float64 copies of the inputs): outputs, final states and the gradient of every input for
   random cotangents, at DESIGN.md's tolerances (float32 with two bf16 pieces, K or V > 64:
   5e-5, kernels/gpu/run.py). This compiles every kernel.
2. speed: forward and forward+backward in bfloat16 for deltajax pallas, deltajax chunk (XLA)
   and fla's Triton kernels (if fla-core is installed), at B=1 T=8192 H=16 K=V=128 and
   B=4 T=2048 H=16 K=V=128: milliseconds, model TFLOP/s (deltajax.core.flops, the same count
   for every implementation) and the fraction of the device's bf16 peak.

Everything that fails is recorded with its error and the run goes on. Nothing is downloaded:
it needs jax (with CUDA), and torch + triton + fla-core only for the fla column.
"""
from __future__ import annotations

import dataclasses
import json
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

OPS = ("delta_rule", "gated_delta_rule", "kda", "delta_product")
TOL = {"bfloat16": 1e-2, "float32": 1e-5}
FLOAT32_TWO_PIECES_TOL = 5e-5
SPEED_SHAPES = (dict(B=1, T=8192, H=16, K=128, V=128), dict(B=4, T=2048, H=16, K=128, V=128))


@dataclasses.dataclass
class Budget:
  seconds: float
  start: float = dataclasses.field(default_factory=time.perf_counter)

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.start)


def _rel(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))


def _inputs(op: str, *, B, T, H, HV, K, V, n=2, dtype, seed=0, N=None):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  steps = (n,) if op == "delta_product" else ()
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, *steps, H, K))
  v = jax.random.normal(ks[2], (B, T, *steps, HV, V))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, *steps, HV)))
  g = -jax.nn.softplus(jax.random.normal(ks[4], (B, T, HV, K) if op == "kda" else (B, T, HV)))
  h0 = jax.random.normal(ks[5], (N or B, HV, K, V))
  cast = lambda x: x.astype(dtype)
  if op == "delta_rule":
    args = (q, k, v, beta)
  elif op == "delta_product":
    args = (q, k, v, beta, g)
  else:
    args = (q, k, v, g, beta)
  return tuple(map(cast, args)), h0


def _op_grads(op: str, args, h0, kw, cot_seed=1):
  """o, final and the gradients of (args, h0) for fixed random cotangents."""
  from deltajax import ops  # pylint: disable=g-import-not-at-top
  fn = getattr(ops, op)
  run = jax.jit(lambda a, h: fn(*a, initial_state=h, output_final_state=True, **kw))
  (o, s), vjp = jax.vjp(run, args, h0)
  ko, ks = jax.random.split(jax.random.PRNGKey(cot_seed))
  cto = jax.random.normal(ko, o.shape, jnp.float32).astype(o.dtype)
  cts = jax.random.normal(ks, s.shape, jnp.float32).astype(s.dtype)
  d_args, d_h0 = vjp((cto, cts))
  return [o, s, *d_args, d_h0]


CASES = {
    # name: (shape, op keyword arguments)
    "plain": (dict(B=2, T=200, H=2, HV=4, K=64, V=64), dict(use_qk_l2norm=True)),
    "packed": (dict(B=1, T=200, H=1, HV=2, K=64, V=64, N=3), dict(cu_seqlens=(0, 37, 150, 200))),
    "dims_128": (dict(B=1, T=130, H=2, HV=2, K=128, V=128), dict()),
}


def check_values(kernel_config, budget: Budget, log: Callable[[str], None],
                 which=None) -> list[dict]:
  """The kernels against the float64 token loop; one record per (case, dtype, op) in `which`
  (default: all)."""
  from deltajax.kernels.gpu.run import MAX_HEAD_DIM_FLOAT32  # pylint: disable=g-import-not-at-top
  if which is None:
    which = [(c, d, o) for c in CASES for d in ("bfloat16", "float32") for o in OPS]
  out = []
  for case, dtype, op in which:
    shape, kw = CASES[case]
    rec = dict(op=op, dtype=dtype, case=case)
    if budget.left() < 30:
      rec.update(ok=False, error="skipped: out of time")
      out.append(rec)
      continue
    t0 = time.perf_counter()
    try:
      args, h0 = _inputs(op, dtype=jnp.dtype(dtype), **shape)
      got = _op_grads(op, args, h0, dict(kw, impl="pallas", kernel_config=kernel_config))
      with jax.enable_x64(True):
        args64 = tuple(jnp.asarray(a, jnp.float64) for a in args)
        want = _op_grads(op, args64, jnp.asarray(h0, jnp.float64), dict(kw, impl="recurrent"))
      tol = TOL[dtype]
      if dtype == "float32" and max(shape["K"], shape["V"]) > MAX_HEAD_DIM_FLOAT32[3]:
        tol = FLOAT32_TWO_PIECES_TOL
      errs = [_rel(a, b) for a, b in zip(got, want)]
      finite = all(bool(np.all(np.isfinite(np.asarray(a, np.float32)))) for a in got)
      rec.update(errors=errs, max_error=max(errs), tolerance=tol,
                 ok=finite and max(errs) < tol, finite=finite)
    except Exception as e:  # pylint: disable=broad-except
      rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000],
                 trace=traceback.format_exc()[-4000:])
    rec["seconds"] = time.perf_counter() - t0
    out.append(rec)
    log(f"check {op:17s} {dtype:9s} {case:9s} "
        + ("ok  " if rec["ok"] else "FAIL")
        + (f" max rel err {rec['max_error']:.2e} (tol {rec['tolerance']:.0e})"
           if "max_error" in rec else f" {rec.get('error', '')[:200]}"))
  return out


def _median_ms(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def time_jax(op: str, impl: str, shape: dict, kernel_config, repeats: int) -> dict:
  """Forward and forward+backward times of one deltajax implementation, bfloat16."""
  from deltajax import bench, ops  # pylint: disable=g-import-not-at-top
  s = bench.Shape(B=shape["B"], T=shape["T"], H=shape["H"], K=shape["K"], V=shape["V"])
  args = bench.make_args(op, s, jnp.bfloat16)
  fn = getattr(ops, op)
  kw = dict(impl=impl, kernel_config=kernel_config) if impl == "pallas" else dict(impl=impl)
  forward = jax.jit(lambda *a: fn(*a, **kw)[0])

  def loss(*a):
    return jnp.sum(jnp.square(fn(*a, **kw)[0].astype(jnp.float32)))
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
  t0 = time.perf_counter()
  jax.block_until_ready(forward(*args))
  jax.block_until_ready(fwd_bwd(*args))
  compile_s = time.perf_counter() - t0
  fwd = _median_ms(lambda: forward(*args), repeats)
  both = _median_ms(lambda: fwd_bwd(*args), repeats)
  return dict(compile_s=compile_s, fwd_ms=fwd, fwd_bwd_ms=both)


def time_fla(op: str, shape: dict, repeats: int) -> dict:
  from deltajax import bench  # pylint: disable=g-import-not-at-top
  s = bench.Shape(B=shape["B"], T=shape["T"], H=shape["H"], K=shape["K"], V=shape["V"])
  r = bench.bench_fla(op, s, jnp.bfloat16, repeats)
  return dict(compile_s=r.compile_s, fwd_ms=r.fwd_ms, fwd_bwd_ms=r.fwd_bwd_ms)


def time_all(kernel_config, budget: Budget, log, repeats: int = 5,
             impls=("pallas", "chunk", "fla"), shapes=SPEED_SHAPES, ops=OPS) -> list[dict]:
  from deltajax import bench  # pylint: disable=g-import-not-at-top
  peak = bench.device_peak_tflops()
  out = []
  for shape in shapes:
    for op in ops:
      for impl in impls:
        rec = dict(op=op, impl=impl, **shape)
        if budget.left() < 45:
          rec.update(error="skipped: out of time")
          out.append(rec)
          continue
        try:
          if impl == "fla":
            rec.update(time_fla(op, shape, repeats))
          else:
            rec.update(time_jax(op, impl, shape, kernel_config, repeats))
          s = bench.Shape(B=shape["B"], T=shape["T"], H=shape["H"], K=shape["K"],
                          V=shape["V"])
          flops = bench.model_flops(op, s)
          rec["fwd_tflops"] = flops / (rec["fwd_ms"] * 1e-3) / 1e12
          rec["fwd_bwd_tflops"] = 3 * flops / (rec["fwd_bwd_ms"] * 1e-3) / 1e12
          if peak:
            rec["fwd_bwd_peak_fraction"] = rec["fwd_bwd_tflops"] / peak
        except Exception as e:  # pylint: disable=broad-except
          rec.update(error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-4000:])
        out.append(rec)
        log(format_row(rec))
  return out


def format_row(r: dict) -> str:
  head = f"{r['op']:17s} {r['impl']:7s} B={r['B']} T={r['T']:<5d}"
  if "error" in r:
    return f"{head} {r['error'][:160]}"
  frac = r.get("fwd_bwd_peak_fraction")
  return (f"{head} fwd {r['fwd_ms']:8.3f} ms {r['fwd_tflops']:7.1f} TFLOP/s | fwd+bwd "
          f"{r['fwd_bwd_ms']:8.3f} ms {r['fwd_bwd_tflops']:7.1f} TFLOP/s"
          + (f" {100 * frac:5.1f}% of peak" if frac is not None else "")
          + f" | compile {r['compile_s']:.0f} s")


def verdict(checks: list[dict], timings: list[dict]) -> dict:
  """Whether the kernels are correct everywhere checked and faster than the XLA chunk path
  (what `impl="auto"` on GPU waits for), and the issue's targets against fla."""
  correct = bool(checks) and all(c.get("ok") for c in checks)
  by = {(t["op"], t["impl"], t["B"], t["T"]): t for t in timings if "error" not in t}
  speedups, vs_fla = {}, {}
  for (op, impl, B, T), t in by.items():
    if impl != "pallas":
      continue
    chunk = by.get((op, "chunk", B, T))
    fla = by.get((op, "fla", B, T))
    if chunk:
      speedups[f"{op} B={B} T={T}"] = chunk["fwd_bwd_ms"] / t["fwd_bwd_ms"]
    if fla:
      vs_fla[f"{op} B={B} T={T}"] = fla["fwd_bwd_ms"] / t["fwd_bwd_ms"]
  faster = bool(speedups) and all(x > 1 for x in speedups.values())
  return dict(correct=correct, faster_than_chunk=faster, speedup_vs_chunk=speedups,
              speedup_vs_fla=vs_fla, auto_may_pick_pallas=correct and faster)


def run(json_path: str | None = None, budget_s: float = 450.0, kernel_config=None,
        log: Callable[[str], None] = print, repeats: int = 5, impls=("pallas", "chunk", "fla"),
        shapes=SPEED_SHAPES, cases=tuple(CASES), ops=OPS) -> dict:
  """Runs the device check; returns (and writes to `json_path` after every stage) everything
  it measured. Stages in order of importance, so a short budget still answers the main
  questions: bf16 correctness, then the T=8192 timings, then the remaining checks and shape.
  """
  from deltajax.kernels import KernelConfig  # pylint: disable=g-import-not-at-top
  budget = Budget(budget_s)
  kernel_config = kernel_config or KernelConfig(backend="gpu")
  dev = jax.devices()[0]
  report = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                kernel_config=repr(kernel_config), checks=[], timings=[])
  log(f"deltajax device check: jax {jax.__version__}, {dev.platform} ({dev.device_kind}), "
      f"budget {budget_s:.0f} s")

  def save():
    report["seconds"] = budget.seconds - budget.left()
    if json_path:
      with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str)

  cases = tuple(cases)
  first = [(c, "bfloat16", o) for c in cases[:1] for o in ops]
  rest = [(c, d, o) for c in cases for d in ("bfloat16", "float32") for o in ops
          if (c, d, o) not in first]
  stages = [
      ("checks", lambda: check_values(kernel_config, budget, log, first)),
      ("timings", lambda: time_all(kernel_config, budget, log, repeats, impls, shapes[:1], ops)),
      ("checks", lambda: check_values(kernel_config, budget, log, rest)),
      ("timings", lambda: time_all(kernel_config, budget, log, repeats, impls, shapes[1:], ops)),
  ]
  for key, stage in stages:
    report[key] += stage()
    save()
  report["verdict"] = verdict(report["checks"], report["timings"])
  save()
  log("")
  for r in report["timings"]:
    log(format_row(r))
  log(f"verdict: {json.dumps(report['verdict'], indent=1)}")
  return report


def main(json_path: str | None, budget_s: float) -> None:
  import os  # pylint: disable=g-import-not-at-top
  # JAX must not take 75% of the GPU before torch/fla run beside it (read when the backend
  # starts, so before the first jax.devices()).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    raise SystemExit(f"--device-check runs the Mosaic GPU kernels compiled: it needs a CUDA "
                     f"GPU (Hopper); this machine's first device is {dev.platform} "
                     f"({dev.device_kind}). On CPU, tests/test_kernels_gpu.py runs them in "
                     f"the Mosaic GPU interpreter.")
  run(json_path or "device_check.json", budget_s)
