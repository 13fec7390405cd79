"""Delta-rule ops: `delta_rule`, `gated_delta_rule`, `kda`, `delta_product`.

Each takes `impl=` "recurrent" (the token-by-token path), "chunk" (the chunkwise WY form in
plain JAX), "pallas" (deltajax.kernels) or "auto"; `deltajax.ops.registry` lists what each
supports and what "auto" picks on each platform.
"""
from deltajax.ops.api import delta_product
from deltajax.ops.api import delta_rule
from deltajax.ops.api import gated_delta_rule
from deltajax.ops.api import kda
from deltajax.ops.api import l2norm
from deltajax.ops.api import resolve_impl

__all__ = ["delta_rule", "gated_delta_rule", "kda", "delta_product", "l2norm", "resolve_impl"]
