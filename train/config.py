"""Run configuration: frozen dataclasses for data, optimiser and run, plus the model's LMConfig.

A `Config` is built from a preset (presets.py) and `--section.field=value` overrides. Overrides
are parsed with the field's type annotation, so `--run.steps=2000` is an int and
`--model.pattern=kda,kda,attn` a tuple; an unknown section or field is a ValueError naming it.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Sequence

TASKS = ("mqar", "parity", "modadd", "s3", "s5", "selective_copy", "text")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train on.

  task: one of TASKS. Generated tasks need no download; "text" reads `text_source`.
  seq_len: training sequence length (tokens per row).
  eval_seq_lens: lengths evaluated on held-out data; () means (seq_len,). State-tracking
    presets test longer than they train.
  batch_size: rows per optimiser step (global, over all devices and micro-batches).
  vocab_size: task vocabulary (MQAR keys + values; selective-copy data tokens). Ignored where
    the task fixes it (parity 2, modadd `modulus`, s3 6, s5 120, text 256 bytes) — see tasks.py.
  num_kv_pairs: MQAR key-value pairs per sequence.
  modulus: modular addition modulus.
  num_tokens_to_copy: selective copying tokens to copy.
  text_source: "tfds:<name>[:<split>]" (needs the `data` extra) or a file, directory or glob of
    local text files.
  text_max_bytes: read at most this many bytes of text (the packed rows are held in memory).
  seed: data seed; batch i of a split is a pure function of (seed, split, i).
  """
  task: str = "mqar"
  seq_len: int = 64
  eval_seq_lens: tuple[int, ...] = ()
  batch_size: int = 32
  vocab_size: int = 64
  num_kv_pairs: int = 4
  modulus: int = 5
  num_tokens_to_copy: int = 8
  text_source: str = ""
  text_max_bytes: int = 50_000_000
  seed: int = 0

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"data.task: got {self.task!r}, need one of {', '.join(TASKS)}")
    for name in ("seq_len", "batch_size", "vocab_size", "num_kv_pairs", "modulus",
                 "num_tokens_to_copy", "text_max_bytes"):
      if getattr(self, name) < 1:
        raise ValueError(f"data.{name}: got {getattr(self, name)}, need >= 1")
    if any(n < 1 for n in self.eval_seq_lens):
      raise ValueError(f"data.eval_seq_lens: got {self.eval_seq_lens}, need lengths >= 1")

  @property
  def eval_lengths(self) -> tuple[int, ...]:
    return self.eval_seq_lens or (self.seq_len,)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup, cosine decay to `final_lr_fraction * lr`, global-norm clipping."""
  lr: float = 3e-3
  warmup_steps: int = 100
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  grad_accum_steps: int = 1

  def __post_init__(self):
    if self.lr <= 0:
      raise ValueError(f"optim.lr: got {self.lr}, need > 0")
    if self.warmup_steps < 0:
      raise ValueError(f"optim.warmup_steps: got {self.warmup_steps}, need >= 0")
    if self.grad_accum_steps < 1:
      raise ValueError(f"optim.grad_accum_steps: got {self.grad_accum_steps}, need >= 1")
    if not 0 <= self.final_lr_fraction <= 1:
      raise ValueError(f"optim.final_lr_fraction: got {self.final_lr_fraction}, need [0, 1]")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How long, how often, and where.

  steps: total optimiser steps (a resumed run continues to this count).
  eval_every / log_every / checkpoint_every: in steps; 0 turns periodic eval / checkpoints off
    (a final eval and checkpoint still happen).
  keep_checkpoints: how many checkpoints orbax keeps.
  eval_batches: held-out batches per eval length.
  mesh_data / mesh_fsdp: device mesh shape; -1 means "all remaining devices". Their product
    must equal the number of devices used.
  stop_at: stop after this step without a final checkpoint, as if the process were killed
    (for tests and demos of resume); 0 = never.
  workdir: where checkpoints, metrics.jsonl, tb/ and curves.png go; "" = runs/<preset>.
  seed: parameter-initialisation seed.
  """
  steps: int = 600
  eval_every: int = 200
  log_every: int = 20
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  eval_batches: int = 4
  mesh_data: int = -1
  mesh_fsdp: int = 1
  stop_at: int = 0
  workdir: str = ""
  seed: int = 0
  tensorboard: bool = True
  plot: bool = True

  def __post_init__(self):
    for name in ("steps", "log_every", "eval_batches", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"run.{name}: got {getattr(self, name)}, need >= 1")
    for name in ("eval_every", "checkpoint_every", "stop_at"):
      if getattr(self, name) < 0:
        raise ValueError(f"run.{name}: got {getattr(self, name)}, need >= 0")
    for name in ("mesh_data", "mesh_fsdp"):
      if getattr(self, name) == 0 or getattr(self, name) < -1:
        raise ValueError(f"run.{name}: got {getattr(self, name)}, need >= 1 or -1 (all)")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs. `model` is a deltajax.models.LMConfig."""
  model: Any
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  run: RunConfig = RunConfig()
  preset: str = "custom"


SECTIONS = ("model", "data", "optim", "run")


def _is_optional(hint) -> tuple[bool, Any]:
  args = typing.get_args(hint)
  if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
      and type(None) in args:
    rest = [a for a in args if a is not type(None)]
    return True, rest[0] if len(rest) == 1 else Any
  return False, hint


def parse_value(text: str, hint, where: str):
  """Converts the command-line text `text` to the type `hint` (from a dataclass annotation)."""
  optional, hint = _is_optional(hint)
  if optional and text.lower() in ("none", "null", ""):
    return None
  origin = typing.get_origin(hint)
  try:
    if hint is bool:
      low = text.lower()
      if low in ("1", "true", "yes", "on"):
        return True
      if low in ("0", "false", "no", "off"):
        return False
      raise ValueError
    if hint is int:
      return int(text)
    if hint is float:
      return float(text)
    if hint is str:
      return text
    if origin is tuple:
      args = typing.get_args(hint)
      item = args[0] if args else str
      parts = [p.strip() for p in text.strip("()[] ").split(",") if p.strip()]
      return tuple(parse_value(p, item, where) for p in parts)
  except ValueError:
    raise ValueError(f"--{where}: got {text!r}, need a value of type "
                     f"{getattr(hint, '__name__', hint)}") from None
  # Anything else (Any, nested configs given as literals): Python literal, else the string.
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def field_hints(cls) -> dict[str, Any]:
  """Resolved type annotations of a dataclass's fields (string annotations evaluated)."""
  try:
    return typing.get_type_hints(cls)
  except Exception:  # pylint: disable=broad-except
    return {f.name: f.type for f in dataclasses.fields(cls)}


def apply_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
  """Returns `cfg` with "section.field" -> text overrides applied (and re-validated).

  A model.vocab_size the user did not set follows the data task's vocabulary (see
  `resolve_vocab`).
  """
  per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
  for key, text in overrides.items():
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
      raise ValueError(f"unknown option --{key}: options are --<section>.<field>=<value> with "
                       f"section one of {', '.join(SECTIONS)}")
    obj = getattr(cfg, section)
    hints = field_hints(type(obj))
    if name not in hints:
      known = ", ".join(f.name for f in dataclasses.fields(obj))
      raise ValueError(f"unknown option --{key}: {section} has no field {name!r}; "
                       f"its fields are {known}")
    per_section[section][name] = parse_value(text, hints[name], key)
  changes = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in per_section.items() if kv}
  return dataclasses.replace(cfg, **changes)


def parse_overrides(argv: Sequence[str]) -> dict[str, str]:
  """["--a.b=1", "--c.d", "2"] -> {"a.b": "1", "c.d": "2"}; anything else is a ValueError."""
  out: dict[str, str] = {}
  i = 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
      raise ValueError(f"unrecognised argument {arg!r}: options look like --run.steps=100 "
                       "(see --help)")
    key, eq, value = arg[2:].partition("=")
    if not eq:
      if i + 1 >= len(argv):
        raise ValueError(f"option --{key} needs a value: --{key}=<value>")
      i += 1
      value = argv[i]
    out[key] = value
    i += 1
  return out


def to_dict(cfg: Config) -> dict[str, Any]:
  """JSON-friendly view of a config (for the run's config.json and the console)."""
  def conv(x):
    if dataclasses.is_dataclass(x):
      return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (tuple, list)):
      return [conv(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
      return x
    return repr(x)
  return conv(cfg)
