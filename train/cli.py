"""`deltajax-train [PRESET] [--section.field=value ...]` (also `python -m deltajax.train`).

With no arguments it trains the default preset (a small DeltaNet on MQAR, a couple of minutes
on a 2-core CPU), then prints held-out accuracy and where the checkpoint and plot went.
Re-running the same command in the same workdir resumes from the last checkpoint.
"""
from __future__ import annotations

import dataclasses
import sys
import textwrap
from typing import Sequence

from deltajax.train.config import SECTIONS, DataConfig, OptimConfig, RunConfig, field_hints

USAGE = "usage: deltajax-train [PRESET] [--section.field=value ...] [--help]"


def _fields_help(section: str, obj) -> list[str]:
  hints = field_hints(type(obj))
  lines = []
  for f in dataclasses.fields(obj):
    hint = hints.get(f.name, f.type)
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    lines.append(f"  --{section}.{f.name}={getattr(obj, f.name)!r}  ({name})")
  return lines


def help_text() -> str:
  from deltajax.train.presets import DEFAULT_PRESET, PRESETS  # pylint: disable=g-import-not-at-top
  out = [USAGE, "", __doc__.strip(), "", "presets:"]
  for name, p in PRESETS.items():
    mark = " (default)" if name == DEFAULT_PRESET else ""
    out.append(f"  {name}{mark}: {p.doc}")
  out += ["", "options (defaults shown are the default preset's):"]
  try:
    from deltajax.train.presets import build_config  # pylint: disable=g-import-not-at-top
    cfg = build_config(DEFAULT_PRESET)
    for section in SECTIONS:
      out += _fields_help(section, getattr(cfg, section))
  except ImportError:  # the model package is missing: show what does not need it
    for section, obj in (("data", DataConfig()), ("optim", OptimConfig()), ("run", RunConfig())):
      out += _fields_help(section, obj)
  out += ["", "examples:",
          "  deltajax-train",
          "  deltajax-train mqar --model.mixer=kda --run.steps=2000",
          "  deltajax-train parity --model.allow_neg_eigval=false",
          "  deltajax-train text --data.text_source=README.md --run.steps=200"]
  return "\n".join(out)


def parse_args(argv: Sequence[str]):
  """argv -> (preset name, overrides dict). Raises ValueError on a bad argument."""
  from deltajax.train.config import parse_overrides  # pylint: disable=g-import-not-at-top
  from deltajax.train.presets import DEFAULT_PRESET  # pylint: disable=g-import-not-at-top
  argv = list(argv)
  preset = DEFAULT_PRESET
  if argv and not argv[0].startswith("-"):
    preset = argv.pop(0)
  if argv and argv[0].startswith("--preset"):
    key, eq, val = argv.pop(0).partition("=")
    preset = val if eq else (argv.pop(0) if argv else "")
  return preset, parse_overrides(argv)


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if any(a in ("-h", "--help", "help") for a in argv):
    print(help_text())
    return 0
  try:
    from deltajax.train.presets import build_config  # pylint: disable=g-import-not-at-top
    preset, overrides = parse_args(argv)
    config = build_config(preset, overrides)
  except ValueError as e:
    print(f"deltajax-train: error: {e}\n{USAGE}", file=sys.stderr)
    return 2

  from deltajax.train import loop  # pylint: disable=g-import-not-at-top
  from deltajax.train import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  workdir = config.run.workdir or f"runs/{config.preset}"
  m = config.model
  if jax.process_index() == 0:
    print(f"deltajax-train: preset {config.preset} | {m.mixer} x {m.num_layers} layers, "
          f"d_model {m.d_model} | task {config.data.task}, seq_len {config.data.seq_len}, "
          f"batch {config.data.batch_size} | {config.run.steps} steps on "
          f"{len(jax.devices())} {jax.devices()[0].platform} device(s) | workdir {workdir}")
  try:
    result = loop.train_and_evaluate(config, workdir)
  except loop.NonFiniteLossError as e:
    print(f"deltajax-train: error: {e}", file=sys.stderr)
    return 3
  except ValueError as e:
    print(f"deltajax-train: error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(summary(result, tensorboard=config.run.tensorboard))
  return 0


def summary(result, tensorboard: bool = True) -> str:
  acc = {k.split("@")[1]: v for k, v in result.eval.items() if k.startswith("eval/accuracy@")}
  lines = [f"done: step {result.step}",
           "held-out accuracy: " + ", ".join(f"{v:.2%} at length {n}" for n, v in acc.items())]
  last = {k.split("@")[1]: v for k, v in result.eval.items() if k.startswith("eval/last_acc")}
  if last:
    lines.append("held-out final-position accuracy: "
                 + ", ".join(f"{v:.2%} at length {n}" for n, v in last.items()))
  lines.append(f"checkpoint: {result.checkpoint_dir}")
  tb = f" (TensorBoard: {result.workdir}/tb)" if tensorboard else ""
  lines.append(f"metrics: {result.workdir}/metrics.jsonl{tb}")
  if result.plot:
    lines.append(f"plot: {result.plot}")
  return textwrap.dedent("\n".join(lines))


if __name__ == "__main__":
  sys.exit(main())
