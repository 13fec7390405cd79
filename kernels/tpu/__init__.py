"""Mosaic TPU kernels for the chunkwise delta rule: every op, forward and backward.

`run(problem, q, k, v, beta, g, h0, docs, options=TpuOptions(), interpret=False)` is the entry
point (deltajax.kernels' dispatch calls it for backend "tpu"); docs/kernels.md, section
"Mosaic TPU kernels", describes the kernels and their roofline.
"""
from .api import check, interpret_params, plan, run

__all__ = ["check", "interpret_params", "plan", "run"]
