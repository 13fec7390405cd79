"""Flax (linen) layers: the delta-rule mixers, attention, and their building blocks.

Every mixer is called as `(y, new_cache) = mixer(x [B, T, D], segment_ids=None, cache=None)`
and has `init_cache(batch_size, max_len)`; see deltajax/layers/delta_rule.py for the three modes.
"""
from deltajax.layers.attention import Attention
from deltajax.layers.attention import rope
from deltajax.layers.conv import ShortConv
from deltajax.layers.delta_rule import DeltaMixerBase
from deltajax.layers.delta_rule import DeltaNet
from deltajax.layers.delta_rule import GatedDeltaNet
from deltajax.layers.delta_rule import GatedDeltaProduct
from deltajax.layers.delta_rule import KimiDeltaAttention
from deltajax.layers.delta_rule import LinearAttention
from deltajax.layers.linear_attention import linear_attention
from deltajax.layers.mlp import MLP
from deltajax.layers.mlp import MLP_ACTIVATIONS
from deltajax.layers.norms import GatedRMSNorm
from deltajax.layers.norms import RMSNorm

__all__ = [
    "Attention", "DeltaMixerBase", "DeltaNet", "GatedDeltaNet", "GatedDeltaProduct",
    "KimiDeltaAttention", "LinearAttention", "ShortConv", "RMSNorm", "GatedRMSNorm", "MLP",
    "MLP_ACTIVATIONS", "linear_attention", "rope",
]
