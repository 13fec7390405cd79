"""Memory and traffic of the ops and of a training step, from XLA's own analyses.

    python -m deltajax.bench_memory packed   # a DeltaLM step, packed rows vs unpacked
    python -m deltajax.bench_memory hbm      # HBM bytes of each op's bf16 forward+backward

`packed`: a 2-layer DeltaLM (d_model 256, 4 heads, B=4, T=2048) per mixer, one training step
(loss and gradients) with rows unpacked, packed with 1 document per row and with 64 documents
per row: XLA's temporary memory of the compiled step, and its median wall and CPU time.
`hbm`: "bytes accessed" from XLA's cost analysis of each op's forward+backward with bfloat16
inputs (B=2, T=2048, H=4, HV=8 value heads, K=V=64, q/k L2 norm) — the traffic the compiled
program moves, on the machine's backend.
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

MIXERS = ("deltanet", "gated_deltanet", "kda", "delta_product")
OPS = ("delta_rule", "gated_delta_rule", "kda", "delta_product")


def _interleaved_medians(fns: list, repeats: int) -> list[tuple[float, float]]:
  """Median wall seconds and median CPU seconds (all of this process's threads) of each fn().

  The functions take turns, one call each per round, so that a slow spell of a shared machine
  falls on all of them alike. The CPU time is the steadier measure of the work a step does: it
  does not count the time other processes hold the cores.
  """
  for fn in fns:
    jax.block_until_ready(fn())
  wall, cpu = [[] for _ in fns], [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      wall[i].append(time.perf_counter() - t0)
      cpu[i].append(time.process_time() - c0)
  return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def packed_step(mixer: str, docs_per_row: int, *, B=4, T=2048, d_model=256):
  """One compiled training step; docs_per_row 0 means unpacked.

  Returns (temp MiB of the compiled step, a function that runs it once).
  """
  from deltajax.models import DeltaLM, LMConfig  # pylint: disable=g-import-not-at-top
  cfg = LMConfig(vocab_size=256, d_model=d_model, num_layers=2, num_heads=4, mixer=mixer)
  model = DeltaLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (B, T), 0, 256)
  params = model.init(jax.random.PRNGKey(1), tokens[:, :16])["params"]
  seg = None
  if docs_per_row:
    ids = np.repeat(np.arange(1, docs_per_row + 1), -(-T // docs_per_row))[:T]
    seg = jnp.asarray(np.broadcast_to(ids, (B, T)), jnp.int32)

  def loss(p, tokens, seg):
    kw = {} if seg is None else dict(segment_ids=seg)
    logits = model.apply({"params": p}, tokens, **kw).astype(jnp.float32)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens, seg).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  return temp, lambda: compiled(params, tokens, seg)


def packed_rows(mixer: str, docs: list[int], *, repeats: int, time_it: bool) -> list[dict]:
  """packed_step for each documents-per-row count, timed in turns."""
  steps = [packed_step(mixer, d) for d in docs]
  times = (_interleaved_medians([run for _, run in steps], repeats) if time_it
           else [(None, None)] * len(docs))
  return [dict(mixer=mixer, docs_per_row=d, temp_mib=temp, step_s=wall, step_cpu_s=cpu)
          for d, (temp, _), (wall, cpu) in zip(docs, steps, times)]


def _op_args(op: str, *, B=2, T=2048, H=4, HV=8, K=64, V=64, n=2, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  steps = (n,) if op == "delta_product" else ()
  q = jax.random.normal(ks[0], (B, T, H, K), dtype)
  k = jax.random.normal(ks[1], (B, T, *steps, H, K), dtype)
  v = jax.random.normal(ks[2], (B, T, *steps, HV, V), dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, *steps, HV))).astype(dtype)
  g = -jax.nn.softplus(jax.random.normal(ks[4], (B, T, HV, K) if op == "kda" else (B, T, HV)))
  g = g.astype(dtype)
  return {"delta_rule": (q, k, v, beta), "delta_product": (q, k, v, beta, g)}.get(
      op, (q, k, v, g, beta))


def hbm_bytes(op: str, impl: str = "chunk", tpu: str | None = None) -> dict:
  """XLA's bytes accessed and FLOPs of `op`'s bf16 forward+backward (q/k L2 norm on).

  tpu: a topology such as "v5e:2x2" compiles for that TPU instead of this machine's backend
  (deviceless, needs libtpu installed), so the bytes are those of the TPU compiler's fusions.
  """
  from deltajax import ops  # pylint: disable=g-import-not-at-top
  fn = getattr(ops, op)
  args = _op_args(op)
  platforms = None
  if tpu:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    device = topologies.get_topology_desc(topology_name=tpu, platform="tpu").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args)
    platforms = ("tpu",)

  def loss(*a):
    o = fn(*a, use_qk_l2norm=True, impl=impl)[0]
    return jnp.sum(o.astype(jnp.float32) ** 2)

  traced = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).trace(*args)
  lowered = traced.lower(lowering_platforms=platforms) if platforms else traced.lower()
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(op=op, impl=impl, platform=tpu or jax.devices()[0].platform,
              bytes_accessed=cost.get("bytes accessed"), flops=cost.get("flops"))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m deltajax.bench_memory",
                              description=__doc__.splitlines()[0])
  p.add_argument("what", choices=("packed", "hbm"))
  p.add_argument("--mixers", default=",".join(MIXERS))
  p.add_argument("--docs", default="0,1,64", help="documents per row; 0 = unpacked")
  p.add_argument("--no-time", action="store_true", help="memory only (compile, do not run)")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--json", help="also write the rows here")
  p.add_argument("--tpu", help="hbm: compile for this TPU topology (e.g. v5e:2x2; needs libtpu)")
  a = p.parse_args(argv)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, {dev.platform} ({dev.device_kind})", flush=True)
  rows = []
  if a.what == "packed":
    print(f"{'mixer':<16} {'docs/row':>8} {'temp MiB':>9} {'step s':>8} {'CPU s':>8} "
          f"{'vs unpacked':>12}")
    for mixer in a.mixers.split(","):
      mixer_rows = packed_rows(mixer, [int(x) for x in a.docs.split(",")],
                               repeats=a.repeats, time_it=not a.no_time)
      rows += mixer_rows
      base = next((r for r in mixer_rows if r["docs_per_row"] == 0), None)
      for r in mixer_rows:
        ratio = "" if base is None or base is r else (
            f"mem {r['temp_mib'] / base['temp_mib']:.2f}x" +
            ("" if r["step_s"] is None else
             f" time {r['step_s'] / base['step_s']:.2f}x"
             f" CPU {r['step_cpu_s'] / base['step_cpu_s']:.2f}x"))
        secs = "-" if r["step_s"] is None else f"{r['step_s']:.3f}"
        cpu = "-" if r["step_cpu_s"] is None else f"{r['step_cpu_s']:.3f}"
        print(f"{mixer:<16} {r['docs_per_row']:>8} {r['temp_mib']:>9.0f} {secs:>8} {cpu:>8} "
              f"{ratio:>12}", flush=True)
  else:
    print(f"{'op':<17} {'impl':<6} {'MiB accessed':>12} {'GFLOP':>8}"
          f"{'  (compiled for TPU ' + a.tpu + ')' if a.tpu else ''}")
    for op in OPS:
      r = hbm_bytes(op, tpu=a.tpu)
      rows.append(r)
      print(f"{op:<17} {r['impl']:<6} {r['bytes_accessed'] / 2**20:>12.1f} "
            f"{r['flops'] / 1e9:>8.2f}", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(jax=jax.__version__, device=dev.device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
