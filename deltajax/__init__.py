"""deltajax: delta-rule linear recurrences in JAX, Flax and Pallas."""
from deltajax.ops import delta_product
from deltajax.ops import delta_rule
from deltajax.ops import gated_delta_rule
from deltajax.ops import kda

__version__ = "0.1.0"
__all__ = ["delta_rule", "gated_delta_rule", "kda", "delta_product"]
