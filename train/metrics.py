"""Where metrics go: metrics.jsonl, TensorBoard event files, curves.png, and the console.

Records are flat dicts {"step": int, "<name>": float, ...}; train records use names like
"loss", eval records "eval/accuracy@64". Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax


def truncate_jsonl(path: str, max_step: int) -> None:
  """Drops records after `max_step` (a resumed run rewrites them)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= max_step]
  with open(path, "w") as f:
    f.writelines(keep)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Writer:
  """Writes records to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, record["step"])

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def format_record(record: dict[str, Any], max_items: int = 6) -> str:
  """A record's main numbers on one line: "loss 2.31 | accuracy 0.4 | lr 3.0e-03 | ..."."""
  parts = []
  for k, v in record.items():
    if k == "step" or not isinstance(v, (int, float)):
      continue
    if k.startswith("metrics/") and len(parts) >= max_items:
      continue
    parts.append(f"{v / 1e3:.1f}k tok/s" if k == "tokens_per_s" else
                 f"lr {v:.1e}" if k == "lr" else f"{k} {v:.4g}")
  return " | ".join(parts)


class Progress:
  """The console of a run (process 0 only).

  On a terminal or in a notebook: a rich progress bar updated in place every step, with the
  latest training numbers beside it; held-out results and messages print above it. Anywhere
  else (stdout redirected to a log file, a pipe, CI): one plain line per record and per
  message, no carriage returns and no escape codes.
  """

  def __init__(self, total: int, start: int = 0, enabled: bool = True, console=None):
    from rich import console as rich_console  # pylint: disable=g-import-not-at-top
    from rich import progress  # pylint: disable=g-import-not-at-top
    self.enabled = enabled and jax.process_index() == 0
    self.total = total
    self._console = console or rich_console.Console()
    self._t0 = time.time()
    self.live = self.enabled and (self._console.is_terminal or self._console.is_jupyter)
    if self.live:
      self._bar = progress.Progress(
          progress.TextColumn("[bold]step"), progress.MofNCompleteColumn(),
          progress.BarColumn(), progress.TimeElapsedColumn(), progress.TextColumn("<"),
          progress.TimeRemainingColumn(), progress.TextColumn("{task.fields[info]}"),
          console=self._console)
      self._task = self._bar.add_task("train", total=total, completed=start, info="")
      self._bar.start()

  def advance(self, step: int) -> None:
    if self.live:
      self._bar.update(self._task, completed=step)

  def record(self, record: dict[str, Any]) -> None:
    """Shows a metrics record: training numbers beside the bar, held-out ones as a line."""
    if not self.enabled:
      return
    text = format_record(record)
    if self.live and not any(k.startswith("eval/") for k in record):
      self._bar.update(self._task, info=text)
    else:
      self.print(f"step {record['step']}/{self.total} | {text} | {time.time() - self._t0:.0f}s")

  def print(self, text: str) -> None:
    if not self.enabled:
      return
    if self.live:
      self._bar.console.print(text, highlight=False, markup=False)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self.live:
      self._bar.stop()
      self.live = False


def plot_curves(jsonl_path: str, png_path: str, title: str = "") -> str | None:
  """Train loss and accuracy, and every held-out accuracy, against step -> PNG. Returns the
  path, or None when matplotlib is missing or there is nothing to plot."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  records = read_jsonl(jsonl_path) if os.path.exists(jsonl_path) else []
  if not records:
    return None
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  def series(key):
    pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
    return zip(*pts) if pts else ((), ())
  for key in sorted({k for r in records for k in r}):
    if key == "loss" or key.startswith("eval/loss"):
      ax_loss.plot(*series(key), label=key, marker="." if key != "loss" else None)
    elif key == "accuracy" or key.startswith("eval/accuracy"):
      ax_acc.plot(*series(key), label=key, marker="." if key != "accuracy" else None)
  ax_loss.set_yscale("log")
  for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
  return png_path
