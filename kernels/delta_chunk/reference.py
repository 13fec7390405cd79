"""The pure-JAX reference the kernels are checked against: the op layer's chunk form.

`prepare` (per-chunk preparation with a triangular solve; any leading axes) lives in
deltajax.ops.chunk, and the kernels' per-chunk quantities must agree with it to float32
rounding. Whole ops are compared through `deltajax.ops` (impl="pallas" against impl="chunk"
and the recurrence), since `chunk_core` there is chunk-major and the kernels stream-major.
"""
from deltajax.ops.chunk import Prepared, prepare  # noqa: F401
