"""Parameter count and training FLOPs per token (for MFU)."""
from __future__ import annotations

import jax
import numpy as np

from deltajax.core.flops import chunk_flops_per_step
from deltajax.models.config import LMConfig


def num_params(params) -> int:
  """Total number of parameters in a pytree (boxed logical-partitioning leaves included)."""
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def _mixer_flops(config: LMConfig, mixer: str, seq_len: int) -> float:
  """Forward FLOPs per token of a mixer's sequence part (the projections are in 2 * params).

  Delta mixers: deltajax.core.flops.chunk_flops_per_step per value head and Householder
  step. Linear attention: 2 C (K + V) + 4 K V. Attention: 4 * context * head_dim per head, context = the causal average
  (seq_len / 2, or the window when it is shorter).
  """
  K = config.resolved_head_dim
  V = int(K * config.expand_v)
  H = config.num_heads
  HV = config.num_v_heads or H
  C = min(config.chunk_size, seq_len)
  if mixer == "attn":
    ctx = seq_len / 2 if config.window is None else min(config.window, seq_len / 2)
    return 4.0 * ctx * K * H
  if mixer == "linear_attn":
    return HV * (2.0 * C * (K + V) + 4.0 * K * V)
  n = config.num_householder if mixer == "delta_product" else 1
  return n * HV * chunk_flops_per_step(C, K, V)


def flops_per_token(config: LMConfig, seq_len: int, params=None) -> float:
  """Training FLOPs per token: 6 * (non-embedding parameters + head) + 3 * mixer terms.

  Without `params` the count is derived from the config (matmul weights only).
  """
  D, L = config.d_model, config.num_layers
  if params is not None:
    p = params.get("params", params)
    n = num_params(p) - num_params(p["embed"])
    matmul = n + (config.vocab_size * D if config.tie_embeddings else 0)
  else:
    K = config.resolved_head_dim
    H = config.num_heads
    HV = config.num_v_heads or H
    V = int(K * config.expand_v)
    glu = config.mlp_activation in ("swiglu", "geglu", "reglu")
    mlp = (3 if glu else 2) * D * config.resolved_mlp_hidden
    matmul = config.vocab_size * D
    for m in config.layer_mixers:
      if m == "attn":
        mixer = 4 * D * H * K
      else:
        nh = config.num_householder if m == "delta_product" else 1
        mixer = D * H * K + nh * D * (H * K + HV * V + HV) + 2 * D * HV * V
      matmul += mixer + mlp
  return 6.0 * matmul + 3.0 * sum(_mixer_flops(config, m, seq_len) for m in config.layer_mixers)
