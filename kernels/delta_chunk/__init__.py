"""Chunkwise delta rule (all four ops share it): maths, pallas_calls, custom_vjp, reference."""
from .api import pallas_chunk  # noqa: F401
