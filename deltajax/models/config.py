"""LMConfig: the frozen, validated description of a DeltaLM."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from deltajax.kernels import KernelConfig
from deltajax.ops import checks

from deltajax.layers.common import head_sizes
from deltajax.layers.mlp import MLP_ACTIVATIONS

MIXERS = ("deltanet", "gated_deltanet", "delta_product", "kda", "linear_attn", "attn")


def _dtype_ok(name: str, value) -> None:
  try:
    dt = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a float dtype name like 'float32' or 'bfloat16'; "
                     f"got {value!r}.") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{name} must be a floating-point dtype; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """A language model: embedding, num_layers pre-norm blocks (mixer + MLP), final norm, head.

  Mixers: "deltanet", "gated_deltanet", "delta_product", "kda", "linear_attn", "attn".
  `pattern` (e.g. ("kda", "kda", "kda", "attn")) overrides `mixer` and is repeated to
  num_layers. head_dim defaults to d_model // num_heads (attention layers use the same heads).
  mlp_sparsity: None, a deltajax.sparsity config (TopKConfig / DeltaConfig) or a linen module
  / callable applied to the MLP hidden activations.
  mlp_predictor_dim: Spark FFN: this many input dimensions predict (through mlp_sparsity)
  which neurons to compute (layers.MLP; needs a non-gated mlp_activation).
  attn_sparsity: "attn" layers' sparsity: None, a TopKConfig (k keys per query), a
  DeltaAttentionConfig (inference only), or their deltajax.sparsity.parse_spec string.
  attn_predictor_dim: Spark attention: this many head dimensions select the top-k keys.
  impl, kernel_config: the delta-rule ops' implementation and Pallas kernel config
  (deltajax.ops, deltajax.kernels.KernelConfig).
  remat: recompute each block's activations in the backward pass (jax.checkpoint) to save
  memory.
  cp_axis: context parallelism: the mesh axis the time axis is split over (the model runs
  under `jax.set_mesh`). The delta-rule mixers and their short convolutions run
  sequence-sharded; attention layers run on the sharded sequence through XLA's partitioner
  (which gathers their keys and values); "linear_attn" layers cannot. Training only: no
  decoding with a cache.
  """
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int | None = None
  mixer: str = "deltanet"
  pattern: tuple[str, ...] | None = None
  mlp_hidden: int | None = None
  mlp_activation: str = "swiglu"
  allow_neg_eigval: bool = False
  num_householder: int = 2
  use_forget_gate: bool = True
  num_v_heads: int | None = None
  expand_v: float = 1.0
  conv_size: int = 4
  use_short_conv: bool = True
  window: int | None = None
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  mlp_sparsity: Any = None
  mlp_predictor_dim: int | None = None
  attn_sparsity: Any = None
  attn_predictor_dim: int | None = None
  kda_lower_bound: float | None = None
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"
  kernel_config: KernelConfig = KernelConfig()
  embed_init_std: float = 0.02
  remat: bool = False
  cp_axis: str | None = None

  def __post_init__(self):
    if self.pattern is not None and not isinstance(self.pattern, tuple):
      object.__setattr__(self, "pattern", tuple(self.pattern))  # lists are not hashable
    for name in ("vocab_size", "d_model", "num_layers", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    if self.mixer not in MIXERS:
      raise ValueError(f"mixer must be one of {MIXERS}; got {self.mixer!r}.")
    if self.pattern is not None:
      if not self.pattern:
        raise ValueError("pattern must be a non-empty tuple of mixer names or None; got ().")
      bad = [m for m in self.pattern if m not in MIXERS]
      if bad:
        raise ValueError(f"pattern has unknown mixer names {bad}; each must be one of {MIXERS}.")
    head_sizes(self.d_model, self.num_heads, self.head_dim, self.num_v_heads, self.expand_v)
    if "linear_attn" in self.layer_mixers and self.num_v_heads not in (None, self.num_heads):
      raise ValueError(f"num_v_heads={self.num_v_heads} must equal num_heads for "
                       f"'linear_attn' layers.")
    if self.cp_axis is not None and "linear_attn" in self.layer_mixers:
      raise ValueError(f"cp_axis={self.cp_axis!r} cannot be combined with 'linear_attn' layers "
                       f"(they run on the whole sequence); use a delta-rule mixer.")
    if "attn" in self.layer_mixers and (self.head_dim or self.d_model // self.num_heads) % 2:
      raise ValueError("head_dim must be even for 'attn' layers (RoPE).")
    if self.conv_size < 1:
      raise ValueError(f"conv_size must be >= 1; got {self.conv_size}.")
    if self.num_householder < 1:
      raise ValueError(f"num_householder must be >= 1; got {self.num_householder}.")
    if self.mlp_hidden is not None and self.mlp_hidden < 1:
      raise ValueError(f"mlp_hidden must be >= 1 or None; got {self.mlp_hidden}.")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp_activation must be one of {MLP_ACTIVATIONS}; "
                       f"got {self.mlp_activation!r}.")
    if self.window is not None and self.window < 1:
      raise ValueError(f"window must be >= 1 or None; got {self.window}.")
    if self.kda_lower_bound is not None and self.kda_lower_bound >= 0:
      raise ValueError(f"kda_lower_bound must be negative or None; got {self.kda_lower_bound}.")
    if (self.chunk_size < 16 or self.chunk_size & (self.chunk_size - 1)):
      raise ValueError(f"chunk_size must be a power of two >= 16; got {self.chunk_size}.")
    checks.check_impl(self.impl)
    _dtype_ok("dtype", self.dtype)
    _dtype_ok("param_dtype", self.param_dtype)

  @property
  def layer_mixers(self) -> tuple[str, ...]:
    """The mixer name of every layer (pattern repeated / cut to num_layers)."""
    pattern = self.pattern or (self.mixer,)
    return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def resolved_mlp_hidden(self) -> int:
    return self.mlp_hidden or 4 * self.d_model
