"""The implementations of the ops, what each supports, and what `impl="auto"` picks.

Every implementation runs `run(problem, q, k, v, beta, g, h0, docs, kernel_config)` on the raw
arrays described in deltajax.core.problem and returns (o, final). The list below is the one
place that names them; the ops, the bench and the tests read it.

`impl="auto"` picks, per platform, the first implementation in `AUTO_ORDER` that the platform
is cleared for (`auto_on`) and that supports the call. An implementation is cleared for a
platform only once a run there has shown it correct and faster than the next one; the reason is
written beside it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from jax import lax

from deltajax.core.problem import Problem

PLATFORMS = ("cpu", "gpu", "tpu")
FEATURES = ("packed", "initial_state", "final_state", "grouped_heads", "householder_steps",
            "qk_l2norm", "gradients")
# Below this many Householder steps per sequence the token loop beats the chunk form's fixed
# cost on every platform measured (docs/benchmarks.md); it is also the decode path (T = 1).
RECURRENT_MAX_STEPS = 16


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to run the ops.

  Attributes:
    name: what `impl=` names it.
    run: (problem, q, k, v, beta, g, h0, docs, kernel_config) -> (o, final).
    platforms: where it runs compiled.
    dtypes: input dtypes it takes.
    gates: gate kinds it takes (None, "head", "channel").
    max_head_dim: largest K and V (None: any).
    features: subset of FEATURES.
    auto_on: platforms where `impl="auto"` may pick it.
    why: the evidence for `auto_on` (or why it is empty).
  """
  name: str
  run: Callable
  platforms: tuple[str, ...] = PLATFORMS
  dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
  gates: tuple[str | None, ...] = (None, "head", "channel")
  max_head_dim: int | None = None
  features: frozenset[str] = frozenset(FEATURES)
  auto_on: tuple[str, ...] = ()
  why: str = ""

  def unsupported(self, p: Problem) -> str | None:
    """Why this implementation cannot run `p` (None if it can), independent of platform."""
    if p.dtype not in self.dtypes:
      return f"inputs of dtype {p.dtype} (it takes {', '.join(self.dtypes)})"
    if p.gate not in self.gates:
      return f"gate kind {p.gate!r}"
    if self.max_head_dim is not None and max(p.K, p.V) > self.max_head_dim:
      return f"K={p.K}, V={p.V} (it takes K and V up to {self.max_head_dim})"
    needs = {"packed": p.packed, "initial_state": p.has_initial_state,
             "final_state": p.output_final_state, "grouped_heads": p.HV > p.H,
             "householder_steps": p.n > 1, "qk_l2norm": p.use_qk_l2norm}
    missing = [f for f, needed in needs.items() if needed and f not in self.features]
    if missing:
      return f"{', '.join(missing)}"
    return None


def _run_recurrent(p, q, k, v, beta, g, h0, docs, kernel_config):
  del kernel_config
  from deltajax.ops.recurrent import recurrent  # pylint: disable=g-import-not-at-top
  return recurrent(p, q, k, v, beta, g, h0, docs)


def _run_chunk(p, q, k, v, beta, g, h0, docs, kernel_config):
  del kernel_config
  from deltajax.ops.chunk import chunk  # pylint: disable=g-import-not-at-top
  # Float32 inputs get float32 products; bfloat16 ones take the MXU/tensor-core default.
  precision = lax.Precision.HIGHEST if p.dtype in ("float32", "float64") else None
  return chunk(p, q, k, v, beta, g, h0, docs, precision)


def _run_pallas(p, q, k, v, beta, g, h0, docs, kernel_config):
  from deltajax.kernels import pallas  # pylint: disable=g-import-not-at-top
  return pallas(p, q, k, v, beta, g, h0, docs, kernel_config)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "recurrent": Implementation(
        "recurrent", _run_recurrent, auto_on=PLATFORMS,
        why=f"the decode path: picked for at most {RECURRENT_MAX_STEPS} steps per sequence"),
    "chunk": Implementation(
        "chunk", _run_chunk, auto_on=PLATFORMS,
        why="3.8-5.5x faster than the recurrent path's forward+backward at T=4096 on CPU "
            "(docs/benchmarks.md); the XLA path on GPU and TPU until the kernels are measured"),
    "pallas": Implementation(
        "pallas", _run_pallas, platforms=("gpu", "tpu"),
        dtypes=("float32", "bfloat16", "float16"), max_head_dim=256,
        why="TPU (kernels/tpu): compiled for v5e/v6e by libtpu without a device and checked "
            "in the TPU interpreter (the shared test base), never run on a TPU; auto keeps "
            "'chunk' on TPU until `python -m deltajax.kernels.tpu.bench` on a TPU shows them "
            "correct and faster. GPU: not compiled or timed on a GPU (none was lent); auto "
            "keeps 'chunk' until the device check does the same there"),
}
AUTO_ORDER = ("pallas", "chunk")


def choose(p: Problem, platform: str) -> str:
  """What `impl="auto"` runs for `p` on `platform` ("cpu", "gpu" or "tpu")."""
  if p.T * p.n <= RECURRENT_MAX_STEPS:
    return "recurrent"
  for name in AUTO_ORDER:
    impl = IMPLEMENTATIONS[name]
    if platform in impl.auto_on and impl.unsupported(p) is None:
      return name
  return "recurrent"
