"""Pallas kernels for the chunkwise delta rule, a folder per backend; `impl="pallas"`.

`pallas(problem, q, k, v, beta, g, h0, docs, config)` runs every op (deltajax.core.problem
describes the inputs); `KernelConfig` picks the backend and its tuning. See docs/kernels.md.
"""
from .api import pallas
from .config import GpuOptions, KernelConfig, TpuOptions

__all__ = ["GpuOptions", "KernelConfig", "TpuOptions", "pallas"]
