"""Activation sparsity: top-k masking (spatial) and Delta Activation Layers (temporal).

Pure functions work on arrays under jit/vmap/scan; the linen modules `TopK` and
`DeltaActivation` wrap them and sow their metrics into the "metrics" collection.
"""
from deltajax.sparsity.delta_activation import DeltaActivation
from deltajax.sparsity.delta_activation import DeltaConfig
from deltajax.sparsity.delta_activation import accumulate
from deltajax.sparsity.delta_activation import delta_l1
from deltajax.sparsity.delta_activation import delta_metrics
from deltajax.sparsity.delta_activation import quantize
from deltajax.sparsity.delta_activation import temporal_delta
from deltajax.sparsity.delta_activation import threshold_delta
from deltajax.sparsity.delta_attention import DeltaAttentionConfig
from deltajax.sparsity.metrics import delta_density
from deltajax.sparsity.metrics import dense_macs
from deltajax.sparsity.metrics import density
from deltajax.sparsity.metrics import effective_macs
from deltajax.sparsity.metrics import l1_penalty
from deltajax.sparsity.metrics import nonzero_count
from deltajax.sparsity.schedules import prosparse_l1_schedule
from deltajax.sparsity.spec import parse_spec
from deltajax.sparsity.topk import TopK
from deltajax.sparsity.topk import TopKConfig
from deltajax.sparsity.topk import fatrelu
from deltajax.sparsity.topk import statistical_threshold
from deltajax.sparsity.topk import topk
from deltajax.sparsity.topk import topk_mask


def as_module(spec):
  """None -> None; a TopKConfig/DeltaConfig (or a `parse_spec` string) -> its linen module;
  anything else as is.

  Lets a model config hold a plain sparsity config (hashable, frozen) for `MLP(sparsity=...)`.
  """
  if isinstance(spec, str):
    spec = parse_spec(spec)
  if isinstance(spec, TopKConfig):
    return TopK(spec)
  if isinstance(spec, DeltaConfig):
    return DeltaActivation(spec)
  return spec


__all__ = [
    "DeltaActivation", "DeltaAttentionConfig", "DeltaConfig", "TopK", "TopKConfig",
    "accumulate", "as_module", "delta_density", "delta_l1", "delta_metrics", "dense_macs",
    "density", "effective_macs", "fatrelu", "l1_penalty", "nonzero_count", "parse_spec",
    "prosparse_l1_schedule", "quantize", "statistical_threshold", "temporal_delta",
    "threshold_delta", "topk", "topk_mask",
]
