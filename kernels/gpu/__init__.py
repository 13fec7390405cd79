"""Mosaic GPU (Hopper) kernels for every delta-rule op: `run` on deltajax.core.problem's
contract, `unsupported(p)` for what they cannot take. See docs/kernels.md."""
from .run import check_supported, run, unsupported

__all__ = ["check_supported", "run", "unsupported"]
