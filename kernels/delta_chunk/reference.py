"""The pure-JAX reference the kernels are checked against: the op layer's chunk form.

`chunk_core` (all chunks, with its own custom_vjp) and `prepare` (per-chunk preparation with a
triangular solve) live in deltajax.ops.chunk; the kernels must agree with them to float32
rounding on the same chunked inputs.
"""
from deltajax.ops.chunk import Prepared, chunk_core, prepare  # noqa: F401
