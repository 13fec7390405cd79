"""Context parallelism: per-device memory, time and communication against the number of shards.

    python -m deltajax.bench_cp                 # D = 1, 2, 4, 8 on 8 fake CPU devices
    python -m deltajax.bench_cp --no-time       # compile only (memory and bytes)

One op's forward+backward (gated_delta_rule, B=1, T=16384, H=HV=4, K=V=128, bfloat16 inputs,
chunk as the local implementation) with the time axis split over D devices by `jax.shard_map`
and `cp_axis=`; D=1 is the op on one device without cp_axis. From the compiled program (one
device's, SPMD): XLA's memory analysis (arguments, outputs, temporaries) and the bytes of every
collective it runs; the median wall and CPU time of a step. On fake CPU devices the D programs
share this machine's cores: the time is the whole job's, not one device's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import numpy as np

_COLLECTIVE = re.compile(
    r"= (\(?[^=]*?\)?) (collective-permute|all-reduce|all-gather|all-to-all)"
    r"(?:-start)?\(")
_SHAPE = re.compile(r"(bf16|f16|f32|f64|s32|u32|pred|s8|u8)\[([0-9,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "pred": 1, "s8": 1,
          "u8": 1}


def collective_bytes(hlo: str) -> dict[str, int]:
  """Bytes each device sends per collective kind (the result shapes, summed), from HLO text.
  Async pairs are counted once (at their -start)."""
  out: dict[str, int] = {}
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if m is None or "-done" in line.split("=", 1)[1].split("(", 1)[0]:
      continue
    shapes = _SHAPE.findall(m.group(1))
    if "-start" in line and len(shapes) > 1:  # (operand, result, ...): count the result once
      shapes = shapes[1:2]
    size = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for t, dims in shapes)
    out[m.group(2)] = out.get(m.group(2), 0) + size
  return out


def _median_s(fn, repeats: int) -> tuple[float, float]:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu)


def measure(D: int, *, B=1, T=16384, H=4, K=128, V=128, dtype="bfloat16", time_it=True,
            repeats=2) -> dict:
  """Memory (MiB, one device), collective bytes and time of one forward+backward over D."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from deltajax import ops  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(dtype)
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  q = jax.random.normal(ks[0], (B, T, H, K), dtype)
  k = jax.random.normal(ks[1], (B, T, H, K), dtype)
  v = jax.random.normal(ks[2], (B, T, H, V), dtype)
  g = (-jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))).astype(dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))).astype(dtype)
  args = (q, k, v, g, beta)

  def op(cp_axis):
    return lambda a: ops.gated_delta_rule(*a, use_qk_l2norm=True, impl="chunk",
                                          cp_axis=cp_axis)[0]

  if D == 1:
    fwd = op(None)
  else:
    mesh = jax.make_mesh((D,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:D])
    time_spec = jax.tree.map(lambda _: P(None, "seq"), args)
    fwd = jax.shard_map(op("seq"), mesh=mesh, in_specs=(time_spec,), out_specs=P(None, "seq"))
    args = jax.device_put(args, NamedSharding(mesh, P(None, "seq")))

  def step(a):
    o, back = jax.vjp(fwd, a)
    return back(jnp.ones_like(o))

  compiled = jax.jit(step).lower(args).compile()
  mem = compiled.memory_analysis()
  mib = lambda b: b / 2**20
  row = dict(D=D, T_per_device=T // D, arguments_mib=mib(mem.argument_size_in_bytes),
             outputs_mib=mib(mem.output_size_in_bytes), temp_mib=mib(mem.temp_size_in_bytes),
             total_mib=mib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                           + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
             collective_bytes=collective_bytes(compiled.as_text()))
  if time_it:
    row["step_s"], row["step_cpu_s"] = _median_s(lambda: compiled(args), repeats)
  return row


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shards", default="1,2,4,8")
  parser.add_argument("--T", type=int, default=16384)
  parser.add_argument("--no-time", dest="time_it", action="store_false")
  args = parser.parse_args(argv)
  shards = [int(d) for d in args.shards.split(",")]
  # Fake CPU devices; read when the backend starts, so before anything touches a device.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(shards)}"
  rows = [measure(D, T=args.T, time_it=args.time_it) for D in shards]
  base = next((r["total_mib"] for r in rows if r["D"] == 1), None)
  for r in rows:
    if base:
      r["total_vs_D1"] = r["total_mib"] / base
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  main()
