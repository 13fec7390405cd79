"""Input pipeline vs training step: `python -m deltajax.train.bench [PRESET ...]`.

For each preset (default: all) it measures, in tokens per second of training batches:
  pipeline: the preset's grain input pipeline alone, as training reads it (this process's
            batches, the same read options and prefetch threads), for --seconds;
  step:     the preset's jitted training step alone, on one batch already on the device,
            after compiling, for --steps steps;
and their ratio. The pipeline must never be the bottleneck: the ratio should be >= 10.
The text preset reads the Python standard library's *.py files unless --text-source is given.

Numbers are measurements of this machine; docs/benchmarks.md records them with the command.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Sequence

import jax

from deltajax.train import presets
from deltajax.train.data import Source, read_options


def pipeline_tokens_per_s(config, seconds: float) -> float:
  """Tokens/s of training batches that the grain pipeline delivers on its own."""
  d = config.data
  batches = Source(d).batches("train", d.seq_len, d.batch_size)
  it = iter(batches.to_iter_dataset(read_options()))
  next(it)  # threads started, first batch out
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  dt = time.perf_counter() - t0
  it.close()
  return n * d.batch_size * d.seq_len / dt


def step_tokens_per_s(config, steps: int) -> float:
  """Tokens/s of the jitted training step alone (one batch, already on the device)."""
  from deltajax.train.loop import Trainer  # pylint: disable=g-import-not-at-top
  trainer = Trainer(config)
  state, batch = trainer.fresh_state(), trainer.train_batch(0)
  state, m = trainer.train_step(state, batch)  # compiles
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = trainer.train_step(state, batch)
  jax.block_until_ready((state, m))
  return steps * config.data.batch_size * config.data.seq_len / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("presets", nargs="*", help=f"presets (default all: {', '.join(presets.PRESETS)})")
  p.add_argument("--seconds", type=float, default=3.0, help="pipeline timing per preset")
  p.add_argument("--steps", type=int, default=20, help="timed training steps per preset")
  p.add_argument("--text-source", default=os.path.join(os.path.dirname(os.__file__), "*.py"),
                 help="data.text_source for the text preset")
  args = p.parse_args(argv)
  for name in args.presets:
    if name not in presets.PRESETS:
      p.error(f"preset: got {name!r}, need one of {', '.join(presets.PRESETS)}")
  import grain  # pylint: disable=g-import-not-at-top
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{jax.devices()[0].device_kind}; jax {jax.__version__}, grain {grain.__version__}")
  print("| preset | task | batch x seq_len | pipeline tok/s | step tok/s | pipeline / step |")
  print("|---|---|---|---:|---:|---:|")
  for name in args.presets or presets.PRESETS:
    over = {"data.text_source": args.text_source} if presets.PRESETS[name].data.task == "text" \
        else {}
    cfg = presets.build_config(name, {"run.tensorboard": "false", **over})
    pipe = pipeline_tokens_per_s(cfg, args.seconds)
    step = step_tokens_per_s(cfg, args.steps)
    d = cfg.data
    print(f"| {name} | {d.task} | {d.batch_size} x {d.seq_len} | {pipe:,.0f} | {step:,.0f} | "
          f"{pipe / step:,.0f}x |", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
