"""DeltaLM: token embedding, pre-norm blocks (mixer + MLP), final RMSNorm, tied or untied head."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deltajax import layers
from deltajax.layers.common import dense, partitioned
from deltajax.models.config import LMConfig

_DELTA_MIXERS = {
    "deltanet": layers.DeltaNet,
    "gated_deltanet": layers.GatedDeltaNet,
    "delta_product": layers.GatedDeltaProduct,
    "kda": layers.KimiDeltaAttention,
    "linear_attn": layers.LinearAttention,
}


def make_mixer(config: LMConfig, mixer: str, **module_kw) -> nn.Module:
  """The mixer module of one layer, configured from `config` (module_kw: name=, parent=)."""
  kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
            out_init_scale=out_init_scale(config), **module_kw)
  if mixer == "attn":
    return layers.Attention(config.d_model, config.num_heads, config.head_dim,
                            window=config.window, rope_theta=config.rope_theta,
                            cp_axis=config.cp_axis, sparsity=config.attn_sparsity,
                            predictor_dim=config.attn_predictor_dim, **kw)
  kw.update(head_dim=config.head_dim, num_v_heads=config.num_v_heads, expand_v=config.expand_v,
            conv_size=config.conv_size, use_short_conv=config.use_short_conv,
            allow_neg_eigval=config.allow_neg_eigval, norm_eps=config.norm_eps,
            chunk_size=config.chunk_size, impl=config.impl,
            kernel_config=config.kernel_config, cp_axis=config.cp_axis)
  if mixer == "delta_product":
    kw.update(num_householder=config.num_householder, use_forget_gate=config.use_forget_gate)
  if mixer == "kda":
    kw.update(lower_bound=config.kda_lower_bound)
  return _DELTA_MIXERS[mixer](config.d_model, config.num_heads, **kw)


def out_init_scale(config: LMConfig) -> float:
  """GPT-2's residual scaling: every block adds two projections to the residual stream."""
  return (2.0 * config.num_layers) ** -0.5


def _sparsity(spec) -> Any:
  """A fresh sparsity module per layer from the config's spec (see LMConfig.mlp_sparsity)."""
  if spec is None:
    return None
  from deltajax import sparsity  # pylint: disable=g-import-not-at-top
  module = sparsity.as_module(spec)
  return module.clone() if isinstance(module, nn.Module) else module


class Block(nn.Module):
  """x + mixer(norm(x)), then x + mlp(norm(x))."""
  config: LMConfig
  mixer: str

  @nn.compact
  def __call__(self, x, *, segment_ids=None, cache=None):
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    h = layers.RMSNorm(c.norm_eps, name="mixer_norm", **kw)(x)
    h, cache = make_mixer(c, self.mixer, name="mixer")(h, segment_ids=segment_ids, cache=cache)
    x = x + h
    h = layers.RMSNorm(c.norm_eps, name="mlp_norm", **kw)(x)
    h = layers.MLP(c.resolved_mlp_hidden, c.mlp_activation, sparsity=_sparsity(c.mlp_sparsity),
                   predictor_dim=c.mlp_predictor_dim, out_init_scale=out_init_scale(c),
                   name="mlp", **kw)(h)
    return x + h, cache


class DeltaLM(nn.Module):
  """The language model of `config`.

  `model.apply(variables, tokens [B, T] int32, segment_ids=None, cache=None)` returns
  logits [B, T, vocab] float32 — or `(logits, new_cache)` when a cache is given (from
  `model.init_cache(B, max_len)`; prefill with the whole prompt, then one token at a time).
  """
  config: LMConfig

  def init_cache(self, batch_size: int, max_len: int) -> tuple:
    """One cache per layer (recurrent + conv state, or a KV cache of max_len for "attn")."""
    return tuple(make_mixer(self.config, m, parent=None).init_cache(batch_size, max_len)
                 for m in self.config.layer_mixers)

  @nn.compact
  def __call__(self, tokens: jax.Array, *, segment_ids=None, cache=None):
    c = self.config
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array [B, T]; got shape {tokens.shape}, "
                       f"dtype {tokens.dtype}.")
    if cache is not None and len(cache) != c.num_layers:
      raise ValueError(f"cache must hold num_layers={c.num_layers} layer caches; "
                       f"got {len(cache)}.")
    dtype = jnp.dtype(c.dtype)
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=dtype, param_dtype=jnp.dtype(c.param_dtype),
                     embedding_init=partitioned(nn.initializers.normal(c.embed_init_std),
                                                ("vocab", "embed")), name="embed")
    x = embed(tokens)
    block = nn.remat(Block, static_argnums=()) if c.remat else Block
    new_cache = []
    for i, mixer in enumerate(c.layer_mixers):
      x, layer_cache = block(c, mixer, name=f"block_{i}")(
          x, segment_ids=segment_ids, cache=None if cache is None else cache[i])
      new_cache.append(layer_cache)
    x = layers.RMSNorm(c.norm_eps, name="final_norm", dtype=dtype,
                       param_dtype=jnp.dtype(c.param_dtype))(x)
    if c.tie_embeddings:
      logits = embed.attend(x.astype(jnp.float32))
    else:
      logits = dense(c.vocab_size, ("embed", "vocab"), name="lm_head", dtype=dtype,
                     param_dtype=jnp.dtype(c.param_dtype))(x)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, tuple(new_cache))
