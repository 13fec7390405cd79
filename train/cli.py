"""`deltajax-train [PRESET] [--section.field=value ...]` (also `python -m deltajax.train`).

With no arguments it trains the default preset (a small DeltaNet on MQAR, a couple of minutes
on a 2-core CPU), then prints held-out accuracy and where the checkpoint and plot went.
Re-running the same command in the same workdir resumes from the last checkpoint.
"""
from __future__ import annotations

import sys
import textwrap
from typing import Sequence

from deltajax.train import config as config_lib
from deltajax.train import presets


def description(preset: str) -> str:
  """The --help text above the options: what the command does, the presets, examples."""
  lines = [__doc__.strip(), "", "presets (the first argument):"]
  for name, p in presets.PRESETS.items():
    mark = " (default)" if name == presets.DEFAULT_PRESET else ""
    lines.append(f"  {name}{mark}: {p.doc}")
  lines += ["", f"Defaults shown below are the {preset!r} preset's "
            f"(`deltajax-train PRESET --help` shows another's). Examples:",
            "  deltajax-train mqar --model.mixer=kda --run.steps=2000",
            "  deltajax-train parity --model.allow_neg_eigval=false",
            "  deltajax-train text --data.text_source=README.md --run.steps=200"]
  return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> config_lib.Config:
  """argv -> Config. A bad preset, option or value prints an error naming it to stderr and
  raises SystemExit(2); --help prints every option and raises SystemExit(0)."""
  argv = list(argv)
  prog, name = "deltajax-train", presets.DEFAULT_PRESET
  if argv and not argv[0].startswith("-"):
    name = argv.pop(0)
    prog += f" {name}"
  if name not in presets.PRESETS:
    print(f"deltajax-train: error: preset: got {name!r}, need one of "
          f"{', '.join(presets.PRESETS)} (see --help)", file=sys.stderr)
    raise SystemExit(2)
  return config_lib.parse(presets.default_config(name), argv, prog=prog,
                          description=description(name))


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    config = parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)

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
          f"{len(jax.devices())} {jax.devices()[0].platform} device(s) in "
          f"{jax.process_count()} process(es) | workdir {workdir}", flush=True)
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
