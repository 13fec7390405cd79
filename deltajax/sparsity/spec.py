"""Sparsity configs from short strings, for command lines and presets.

  "topk"                                 TopKConfig()
  "topk:k=0.1,method=statistical,soft=true"
  "delta:mode=threshold,threshold=0.05"  DeltaConfig(...)
  "delta_attn:threshold=0.01,window=16"  DeltaAttentionConfig(...) (attention only)
  "none" or ""                           None
Values are parsed by the field's default type (int/float fields accept both, as k does).
"""
from __future__ import annotations

import dataclasses

from deltajax.sparsity.delta_activation import DeltaConfig
from deltajax.sparsity.delta_attention import DeltaAttentionConfig
from deltajax.sparsity.topk import TopKConfig

KINDS = {"topk": TopKConfig, "delta": DeltaConfig, "delta_attn": DeltaAttentionConfig}


def _value(text: str):
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text.strip()


def parse_spec(spec: str | None):
  """TopKConfig / DeltaConfig / DeltaAttentionConfig / None from a string (module doc)."""
  if spec is None or spec.strip().lower() in ("", "none"):
    return None
  kind, _, rest = spec.partition(":")
  kind = kind.strip().lower()
  if kind not in KINDS:
    raise ValueError(f"spec must start with one of {tuple(KINDS)} (or be 'none'); got {spec!r}.")
  cls = KINDS[kind]
  fields = {f.name for f in dataclasses.fields(cls)}
  kw = {}
  for item in filter(None, (s.strip() for s in rest.split(","))):
    name, eq, value = item.partition("=")
    if not eq or name.strip() not in fields:
      raise ValueError(f"spec items must be name=value with name in {sorted(fields)}; got "
                       f"{item!r} in {spec!r}.")
    kw[name.strip()] = _value(value)
  return cls(**kw)
