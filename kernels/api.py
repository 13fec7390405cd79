"""`pallas`: what `impl="pallas"` runs, the kernels chosen by `KernelConfig.backend`.

Each backend module provides `run(p, q, k, v, beta, g, h0, docs, *, options, interpret)` on
the raw inputs of deltajax.core.problem and returns (o, final).
"""
from __future__ import annotations

import functools

import jax

from deltajax.core.problem import Problem
from .config import KernelConfig


def _backend_run(backend: str):
  if backend == "tpu":
    from .tpu import run  # pylint: disable=g-import-not-at-top
    return run
  from .generic import run  # pylint: disable=g-import-not-at-top
  return functools.partial(run.run, backend=backend, sequential="loop")


def pallas(p: Problem, q, k, v, beta, g, h0, docs, config: KernelConfig | None = None):
  """The op on Pallas kernels. Inputs and outputs as deltajax.core.problem describes."""
  config = config or KernelConfig()

  def on(backend: str, interpret: bool):
    cfg = KernelConfig(backend=backend, interpret=interpret, tpu=config.tpu, gpu=config.gpu)
    return functools.partial(_backend_run(backend), p, options=getattr(cfg, backend),
                             interpret=cfg.interpreter())

  args = (q, k, v, beta, g, h0, docs)
  if config.backend == "auto":
    return jax.lax.platform_dependent(*args, tpu=on("tpu", False), cuda=on("gpu", False),
                                      default=on("tpu", True))
  return on(config.backend, config.interpret)(*args)
