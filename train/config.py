"""Run configuration: frozen dataclasses for data, optimiser and run, plus the model's LMConfig.

A `Config` is a preset (presets.py) with `--section.field=value` overrides applied by tyro
(`parse`): every field is an option, typed by its annotation and documented by the docstring
under it, so `--help` lists them all with their types and defaults.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import typing
from typing import Annotated, Any, Optional, Sequence

import tyro
from tyro.constructors import (MISSING_NONPROP, ConstructorRegistry, PrimitiveConstructorSpec,
                               PrimitiveTypeInfo, StructConstructorSpec, StructFieldSpec,
                               StructTypeInfo)

from deltajax.models import LMConfig

TASKS = ("mqar", "parity", "modadd", "s3", "s5", "selective_copy", "text")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train on."""
  task: str = "mqar"
  """One of mqar, parity, modadd, s3, s5, selective_copy (generated, no download) or text."""
  seq_len: int = 64
  """Training sequence length (tokens per row)."""
  eval_seq_lens: tuple[int, ...] = ()
  """Held-out lengths, e.g. 64,128,256; empty means seq_len. State tracking tests longer."""
  batch_size: int = 32
  """Rows per optimiser step, global: over all processes, devices and micro-batches."""
  vocab_size: int = 64
  """Vocabulary of mqar (keys + values) and selective_copy; fixed by the other tasks."""
  num_kv_pairs: int = 4
  """MQAR key-value pairs per row."""
  modulus: int = 5
  """Modular addition modulus."""
  num_tokens_to_copy: int = 8
  """Selective copying: tokens to copy."""
  text_source: str = ""
  """Text for task=text: a file, a directory, a glob (quote it) or tfds:NAME[:SPLIT]."""
  text_max_bytes: int = 50_000_000
  """Read at most this many bytes of text (the packed rows are held in memory)."""
  seed: int = 0
  """Data seed: record i of a split is a pure function of (seed, split, length, i)."""

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"data.task: got {self.task!r}, need one of {', '.join(TASKS)}")
    for name in ("seq_len", "batch_size", "vocab_size", "num_kv_pairs", "modulus",
                 "num_tokens_to_copy", "text_max_bytes"):
      if getattr(self, name) < 1:
        raise ValueError(f"data.{name}: got {getattr(self, name)}, need >= 1")
    if any(n < 1 for n in self.eval_seq_lens):
      raise ValueError(f"data.eval_seq_lens: got {self.eval_seq_lens}, need lengths >= 1")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"data.seed: got {self.seed}, need 0 <= seed < 2**32")

  @property
  def eval_lengths(self) -> tuple[int, ...]:
    return self.eval_seq_lens or (self.seq_len,)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup, cosine decay to `final_lr_fraction * lr`, global-norm clipping."""
  lr: float = 3e-3
  """Peak learning rate."""
  warmup_steps: int = 100
  """Linear warmup from 0 to lr."""
  final_lr_fraction: float = 0.1
  """The cosine decay ends at this fraction of lr."""
  weight_decay: float = 0.1
  """AdamW weight decay, on matrices only."""
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  """Global gradient-norm clipping."""
  grad_accum_steps: int = 1
  """Micro-batches per step (a lax.scan inside the jitted step)."""

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
  """How long, how often, and where."""
  steps: int = 600
  """Total optimiser steps (a resumed run continues to this count)."""
  eval_every: int = 200
  """Steps between held-out evaluations; 0 = only at the end."""
  log_every: int = 20
  """Steps between metrics records (JSONL, TensorBoard, a console line)."""
  checkpoint_every: int = 200
  """Steps between checkpoints; 0 = only at the end."""
  keep_checkpoints: int = 2
  """Checkpoints orbax keeps."""
  eval_batches: int = 4
  """Held-out batches per eval length."""
  mesh_data: int = -1
  """Data-parallel mesh axis; -1 = all devices left. mesh_data x mesh_fsdp = devices."""
  mesh_fsdp: int = 1
  """Parameter-sharding (FSDP) mesh axis; -1 = all devices left."""
  stop_at: int = 0
  """Stop after this step without a final checkpoint, as if killed (demos of resume); 0 = never."""
  workdir: str = ""
  """Checkpoints, metrics.jsonl, tb/ and curves.png go here; empty = runs/<preset>."""
  seed: int = 0
  """Parameter-initialisation seed."""
  tensorboard: bool = True
  """Write TensorBoard event files under workdir/tb."""
  plot: bool = True
  """Plot the learning curves to workdir/curves.png at the end."""

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
  """Everything a run needs."""
  model: LMConfig
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  run: RunConfig = RunConfig()
  preset: Annotated[str, tyro.conf.Suppress] = "custom"


# --- the command line (tyro) -------------------------------------------------------------------

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_REGISTRY = ConstructorRegistry()


@_REGISTRY.primitive_rule
def _bool_rule(info: PrimitiveTypeInfo):
  """--run.plot=false as well as False: the spelling users type and JSON writes."""
  if info.type is not bool:
    return None
  def parse(args: list[str]) -> bool:
    if args[0].lower() not in _TRUE + _FALSE:
      raise ValueError(f"got {args[0]!r}, need true or false")
    return args[0].lower() in _TRUE
  return PrimitiveConstructorSpec(
      nargs=1, metavar="{true,false}", instance_from_str=parse,
      is_instance=lambda x: isinstance(x, bool), str_from_instance=lambda x: [str(x).lower()])


@_REGISTRY.primitive_rule
def _tuple_rule(info: PrimitiveTypeInfo):
  """tuple[X, ...] from "a,b,c" (one argument) or "a b c"; "" is the empty tuple."""
  args = typing.get_args(info.type)
  if info.type_origin is not tuple or len(args) != 2 or args[1] is not Ellipsis:
    return None
  item = ConstructorRegistry.get_primitive_spec(PrimitiveTypeInfo.make(args[0], info.markers))
  if not isinstance(item, PrimitiveConstructorSpec) or item.nargs != 1:
    return None
  def parse(argv: list[str]) -> tuple:
    return tuple(item.instance_from_str([p.strip()])
                 for a in argv for p in a.split(",") if p.strip())
  return PrimitiveConstructorSpec(
      nargs="*", metavar=f"{item.metavar},...", instance_from_str=parse,
      is_instance=lambda x: isinstance(x, tuple),
      str_from_instance=lambda x: [",".join(str(item.str_from_instance(v)[0]) for v in x)])


@_REGISTRY.struct_rule
def _untyped_fields_rule(info: StructTypeInfo):
  """Dataclass fields typed Any (LMConfig.mlp_sparsity: a spec string or a config object) are
  a string or none on the command line; tyro would otherwise fix their type from the default,
  so a field that defaults to None could never be set."""
  if not dataclasses.is_dataclass(info.type):
    return None
  hints = typing.get_type_hints(info.type)
  if all(h is not Any for h in hints.values()):
    return None
  fields = []
  for f in dataclasses.fields(info.type):
    if hasattr(info.default, f.name):
      default = getattr(info.default, f.name)
    else:
      default = f.default if f.default is not dataclasses.MISSING else MISSING_NONPROP
    fields.append(StructFieldSpec(f.name, Optional[str] if hints[f.name] is Any
                                  else hints[f.name], default))
  return StructConstructorSpec(instantiate=info.type, fields=tuple(fields))


def _gave(args: Sequence[str], option: str) -> bool:
  """Whether `args` set --option (tyro accepts "-" and "_" alike)."""
  norm = lambda a: a.split("=", 1)[0].lstrip("-").replace("-", "_")
  return any(a.startswith("--") and norm(a) == option for a in args)


def parse(default: Config, args: Sequence[str], *, prog: str = "deltajax-train",
          description: str | None = None) -> Config:
  """`default` with the command-line options `args` applied (and validated).

  Errors (an unknown option, a bad value, a failed check) are printed by tyro and raise
  SystemExit(2); `--help` prints every option with its type and default and exits 0.
  A model.vocab_size that neither `default` (a preset) nor `args` set follows the data task's
  vocabulary, so --data.task=s5 gets a model with 120 tokens.
  """
  from deltajax.train.data.tasks import task_vocab_size  # pylint: disable=g-import-not-at-top
  follows = default.model.vocab_size == task_vocab_size(default.data)
  cfg = tyro.cli(Config, default=default, args=list(args), prog=prog, description=description,
                 use_underscores=True, registry=_REGISTRY,
                 config=(tyro.conf.FlagConversionOff,))
  if follows and not _gave(args, "model.vocab_size"):
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vocab_size=task_vocab_size(cfg.data)))
  return cfg


def parse_or_raise(default: Config, args: Sequence[str]) -> Config:
  """`parse` for library callers: a bad option is a ValueError carrying tyro's message."""
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      return parse(default, args)
  except SystemExit:
    text = re.sub(r"[╭╮╰╯│─]+", " ", err.getvalue())  # tyro draws a box around the message
    text = re.sub(r"For full helptext, (run|see) .*--help", "", text)
    raise ValueError(re.sub(r"\s+", " ", text).strip()) from None


def to_dict(cfg: Config) -> dict[str, Any]:
  """JSON-friendly view of a config (for the run's config.json)."""
  def conv(x):
    if dataclasses.is_dataclass(x):
      return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (tuple, list)):
      return [conv(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
      return x
    return repr(x)
  return conv(cfg)
