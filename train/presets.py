"""Shipped presets: one per task, sized to train on a 2-core CPU in minutes.

A preset is (model kwargs for deltajax.models.LMConfig, DataConfig, OptimConfig, RunConfig);
`build_config(name, overrides)` applies `--section.field=value` overrides on top. The model's
vocab_size follows the task unless the preset or --model.vocab_size sets it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from deltajax.models import LMConfig
from deltajax.train.config import (Config, DataConfig, OptimConfig, RunConfig,
                                   parse_or_raise)
from deltajax.train.data import task_vocab_size


@dataclasses.dataclass(frozen=True)
class Preset:
  doc: str
  model: dict[str, Any]
  data: DataConfig
  optim: OptimConfig = OptimConfig()
  run: RunConfig = RunConfig()


_SMALL = dict(d_model=64, num_layers=2, num_heads=2)
_STATE = dict(d_model=64, num_layers=2, num_heads=2, allow_neg_eigval=True)

PRESETS: dict[str, Preset] = {
    "mqar": Preset(
        "multi-query associative recall, small DeltaNet (the default; ~2 min on 2 CPU cores)",
        dict(_SMALL, mixer="deltanet"),
        DataConfig(task="mqar", seq_len=64, vocab_size=64, num_kv_pairs=8, batch_size=32),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=600, eval_every=200, log_every=20, checkpoint_every=200)),
    "parity": Preset(
        "parity of a bit string, DeltaNet with beta in [0, 2]; trained at 64, tested to 256",
        dict(_STATE, mixer="deltanet", num_layers=1),
        DataConfig(task="parity", seq_len=64, eval_seq_lens=(64, 128, 256), batch_size=32),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=1000, eval_every=250, log_every=25, checkpoint_every=250)),
    "modadd": Preset(
        "running sum modulo 5, DeltaNet with beta in [0, 2]; trained at 64, tested to 256",
        dict(_STATE, mixer="deltanet"),
        DataConfig(task="modadd", seq_len=64, eval_seq_lens=(64, 128, 256), modulus=5),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=1000, eval_every=250, log_every=25, checkpoint_every=250)),
    "s3": Preset(
        "S3 word problem, DeltaProduct (2 Householders, beta in [0, 2]); trained at 32, tested "
        "to 128",
        dict(_STATE, mixer="delta_product", num_householder=2),
        DataConfig(task="s3", seq_len=32, eval_seq_lens=(32, 64, 128)),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=1000, eval_every=250, log_every=25, checkpoint_every=250)),
    "s5": Preset(
        "S5 word problem, DeltaProduct (2 Householders, beta in [0, 2]); trained at 32, tested "
        "to 128",
        dict(_STATE, mixer="delta_product", num_householder=2, d_model=128, num_heads=4),
        DataConfig(task="s5", seq_len=32, eval_seq_lens=(32, 64, 128)),
        OptimConfig(lr=2e-3, warmup_steps=100),
        RunConfig(steps=1500, eval_every=500, log_every=25, checkpoint_every=500)),
    "selective_copy": Preset(
        "selective copying of 8 tokens scattered in 56 noise tokens, small DeltaNet",
        dict(_SMALL, mixer="deltanet"),
        DataConfig(task="selective_copy", seq_len=64, vocab_size=16, num_tokens_to_copy=8),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=1000, eval_every=250, log_every=25, checkpoint_every=250)),
    "mqar_topk": Preset(
        "MQAR with a spatially sparse MLP: ReLU, top-10% per token (deltajax.sparsity); the "
        "MLP density is logged as metrics/*density",
        dict(_SMALL, mixer="deltanet", mlp_activation="relu", mlp_sparsity="topk:k=0.1"),
        DataConfig(task="mqar", seq_len=64, vocab_size=64, num_kv_pairs=8, batch_size=32),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=600, eval_every=200, log_every=20, checkpoint_every=200)),
    "text": Preset(
        "byte-level language model on text (set --data.text_source=FILE|DIR|GLOB|tfds:NAME), "
        "packed rows with document boundaries",
        dict(d_model=128, num_layers=4, num_heads=4, mixer="gated_deltanet"),
        DataConfig(task="text", seq_len=256, batch_size=16),
        OptimConfig(lr=2e-3, warmup_steps=100),
        RunConfig(steps=2000, eval_every=500, log_every=50, checkpoint_every=500)),
    # Sparse attention and the Spark FFN (issue 15; results: `python -m
    # deltajax.sparsity.attention_demo`). A DeltaNet + softmax-attention hybrid with a plain
    # GELU MLP, so the Spark FFN has the dense MLP's parameter count.
    "mqar_hybrid": Preset(
        "MQAR, hybrid DeltaNet + softmax attention (GELU MLP): the dense baseline of the sparse "
        "attention presets; evaluate its checkpoint with temporal-delta attention "
        "(--model.attn_sparsity=delta_attn:threshold=0.01,window=8; inference only)",
        dict(d_model=64, num_layers=2, num_heads=2, pattern=("deltanet", "attn"),
             mlp_activation="gelu"),
        DataConfig(task="mqar", seq_len=64, vocab_size=64, num_kv_pairs=8, batch_size=32),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=600, eval_every=200, log_every=20, checkpoint_every=200)),
    "mqar_topk_attn": Preset(
        "mqar_hybrid with top-k attention: each query attends to its 16 highest-scoring keys "
        "(exact top-k); kept keys per query logged as metrics/*kept_keys",
        dict(d_model=64, num_layers=2, num_heads=2, pattern=("deltanet", "attn"),
             mlp_activation="gelu", attn_sparsity="topk:k=16"),
        DataConfig(task="mqar", seq_len=64, vocab_size=64, num_kv_pairs=8, batch_size=32),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=600, eval_every=200, log_every=20, checkpoint_every=200)),
    "mqar_spark": Preset(
        "mqar_hybrid with Spark Transformer's predictors: 16 of 32 head dims select 16 keys "
        "per query (statistical top-k), 32 of 64 input dims select 8% of the FFN neurons "
        "(statistical soft top-k); same parameter count as mqar_hybrid",
        dict(d_model=64, num_layers=2, num_heads=2, pattern=("deltanet", "attn"),
             mlp_activation="gelu", attn_sparsity="topk:k=16,method=statistical",
             attn_predictor_dim=16, mlp_sparsity="topk:k=0.08,method=statistical,soft=true",
             mlp_predictor_dim=32),
        DataConfig(task="mqar", seq_len=64, vocab_size=64, num_kv_pairs=8, batch_size=32),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=600, eval_every=200, log_every=20, checkpoint_every=200)),
    "text_hybrid": Preset(
        "byte-level text (set --data.text_source), small DeltaNet + softmax attention hybrid "
        "(GELU MLP), 128-byte rows: the dense baseline for sparse and delta attention",
        dict(d_model=64, num_layers=2, num_heads=2, pattern=("deltanet", "attn"),
             mlp_activation="gelu"),
        DataConfig(task="text", seq_len=128, batch_size=16),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=600, eval_every=200, log_every=20, checkpoint_every=200,
                  eval_batches=8)),
    "text_topk_attn": Preset(
        "text_hybrid with top-k attention, 16 keys per query (exact top-k)",
        dict(d_model=64, num_layers=2, num_heads=2, pattern=("deltanet", "attn"),
             mlp_activation="gelu", attn_sparsity="topk:k=16"),
        DataConfig(task="text", seq_len=128, batch_size=16),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=600, eval_every=200, log_every=20, checkpoint_every=200,
                  eval_batches=8)),
    "text_spark": Preset(
        "text_hybrid with Spark Transformer's predictors in attention (16 keys) and FFN (8% "
        "of neurons), statistical top-k; same parameter count as text_hybrid",
        dict(d_model=64, num_layers=2, num_heads=2, pattern=("deltanet", "attn"),
             mlp_activation="gelu", attn_sparsity="topk:k=16,method=statistical",
             attn_predictor_dim=16, mlp_sparsity="topk:k=0.08,method=statistical,soft=true",
             mlp_predictor_dim=32),
        DataConfig(task="text", seq_len=128, batch_size=16),
        OptimConfig(lr=3e-3, warmup_steps=50),
        RunConfig(steps=600, eval_every=200, log_every=20, checkpoint_every=200,
                  eval_batches=8)),
}
DEFAULT_PRESET = "mqar"


def default_config(name: str = DEFAULT_PRESET) -> Config:
  """The preset `name` as a Config."""
  if name not in PRESETS:
    raise ValueError(f"preset: got {name!r}, need one of {', '.join(PRESETS)}")
  p = PRESETS[name]
  model = LMConfig(**{"vocab_size": task_vocab_size(p.data), **p.model})
  return Config(model=model, data=p.data, optim=p.optim, run=p.run, preset=name)


def build_config(name: str = DEFAULT_PRESET, overrides: dict[str, str] | None = None) -> Config:
  """The preset `name` with `overrides` ({"section.field": text}, as on the command line)
  applied. A bad name, key or value is a ValueError naming it."""
  args = [f"--{k}={v}" for k, v in (overrides or {}).items()]
  return parse_or_raise(default_config(name), args)
