"""Pallas kernels for the chunkwise delta rule (TPU via Mosaic, GPU via the Triton lowering).

`pallas_chunk(q, k, v, beta, g, h0, layout)` is what `impl="pallas"` runs for every op; see
docs/kernels.md for the maths and which parts are Pallas.
"""
from .config import KernelConfig, config_for, default_config
from .delta_chunk.api import pallas_chunk

__all__ = ["KernelConfig", "config_for", "default_config", "pallas_chunk"]
