"""Compiles the Mosaic TPU kernels for a TPU that is not attached: `python -m
deltajax.kernels.tpu.compile_check`.

Lowering (tests/test_lowering.py) stops at the Mosaic dialect; Mosaic's own passes (layouts,
relayouts, what a vector op may do) run when XLA compiles the custom call for a TPU. With libtpu
installed, jax compiles for a TPU topology on a CPU-only machine (deviceless AOT,
`jax.experimental.topologies`), which runs those passes: every op, forward and
forward+backward, for each generation asked. It needs no TPU, only `pip install libtpu` (seen
working: libtpu 0.0.42.1 with jax 0.10.2, in a virtual environment of its own, because with
libtpu installed jax looks for a TPU at start-up).

Exit status 0 when every case compiled.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import jax
import jax.numpy as jnp

from deltajax.core.documents import from_cu_seqlens
from deltajax.core.problem import Problem
from deltajax.kernels.config import TpuOptions
from deltajax.kernels.tpu import run

OPS = {"delta_rule": (None, 1), "gated_delta_rule": ("head", 1), "kda": ("channel", 1),
       "delta_product": ("head", 2)}
GENERATION = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v5p": "v5p:2x2x1", "v4": "v4:2x2x1"}


def cases(quick: bool):
  """(op, dtype, K, V, packed) to compile."""
  if quick:
    return [(op, "bfloat16", 128, 128, False) for op in OPS]
  out = [(op, dt, 128, 128, False) for op, dt in itertools.product(OPS, ("bfloat16", "float32"))]
  out += [(op, "bfloat16", 128, 128, True) for op in OPS]
  out += [("gated_delta_rule", "bfloat16", 64, 32, False), ("kda", "bfloat16", 256, 256, False)]
  return out


def compile_one(device, generation, op, dtype, K, V, packed, grad=True, B=1, T=512, H=2, HV=4):
  gate, n = OPS[op]
  cu = (0, 100, 100, 300, T) if packed else None
  N = B if cu is None else len(cu) - 1
  p = Problem(gate=gate, B=B, T=T, H=H, HV=HV, K=K, V=V, n=n, N=N, packed=packed,
              scale=K ** -0.5, use_qk_l2norm=True, chunk_size=64, has_initial_state=True,
              output_final_state=True, dtype=dtype)
  sh = jax.sharding.SingleDeviceSharding(device)
  S = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  args = (S((B, T, H, K)), S((B, T, n, H, K)), S((B, T, n, HV, V)), S((B, T, n, HV)),
          None if gate is None else S((B, T, HV) if gate == "head" else (B, T, HV, K)),
          S((N, HV, K, V), "float32"))
  options = TpuOptions(generation=generation)

  def fwd(*a):
    docs = None if cu is None else from_cu_seqlens(jnp.asarray(cu), B, T)
    return run(p, *a, docs, options=options)

  def loss(*a):
    o, s = fwd(*a)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  live = tuple(i for i, a in enumerate(args) if a is not None)
  fn = jax.grad(loss, argnums=live) if grad else fwd
  jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--generation", nargs="+", default=["v5e", "v6e"], choices=list(GENERATION))
  parser.add_argument("--quick", action="store_true", help="one bfloat16 case per op")
  args = parser.parse_args(argv)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  failed = 0
  for gen in args.generation:
    try:
      topo = topologies.get_topology_desc(topology_name=GENERATION[gen], platform="tpu")
    except Exception as e:  # pylint: disable=broad-except
      print(f"{gen}: no TPU compiler here ({type(e).__name__}: {str(e)[:200]}); "
            f"pip install libtpu", flush=True)
      return 2
    device = topo.devices[0]
    for case in cases(args.quick):
      for grad in (False, True):
        t = time.time()
        what = f"{gen} ({device.device_kind}) {case[0]} {case[1]} K={case[2]} V={case[3]}" \
               f"{' packed' if case[4] else ''} {'fwd+bwd' if grad else 'fwd'}"
        try:
          compile_one(device, gen, *case, grad=grad)
          print(f"OK    {what}  {time.time() - t:.0f}s", flush=True)
        except Exception as e:  # pylint: disable=broad-except
          failed += 1
          print(f"FAIL  {what}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
  print(f"{failed} failed", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
