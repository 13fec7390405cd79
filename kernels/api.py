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
  if backend == "gpu":
    from .gpu import run  # pylint: disable=g-import-not-at-top
    return run
  raise ValueError(f"no Pallas kernels for backend {backend!r}; have 'tpu' and 'gpu'.")


def pallas(p: Problem, q, k, v, beta, g, h0, docs, config: KernelConfig | None = None):
  """The op on Pallas kernels. Inputs and outputs as deltajax.core.problem describes."""
  config = config or KernelConfig()

  def on(backend: str, interpret: bool):
    cfg = KernelConfig(backend=backend, interpret=interpret, tpu=config.tpu, gpu=config.gpu)
    return functools.partial(_backend_run(backend), p, options=getattr(cfg, backend),
                             interpret=cfg.interpreter())

  args = (q, k, v, beta, g, h0, docs)
  if config.backend == "auto":
    compiled = dict(tpu=on("tpu", False), cuda=on("gpu", False))
    if jax.default_backend() != "cpu":
      # No interpreter branch where an accelerator runs the program: the interpreters' host
      # callbacks are ordered effects, and a cond keeps the effects of every branch, so they
      # would tie the compiled kernels to a token too (jax 0.10.2 then fails to lower the
      # pruned cond: "returns incorrect set of output tokens"; multi-device programs reject
      # ordered effects).
      return jax.lax.platform_dependent(*args, **compiled)
    # On a CPU the TPU kernels run in the TPU interpreter. The same effects make lowering this
    # for "tpu" or "cuda" from a CPU fail (see above): name the backend to cross-lower.
    return jax.lax.platform_dependent(*args, **compiled, default=on("tpu", True))
  return on(config.backend, config.interpret)(*args)
