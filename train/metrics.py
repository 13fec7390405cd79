"""Where metrics go: console, metrics.jsonl, TensorBoard event files, and curves.png.

Records are flat dicts {"step": int, "<name>": float, ...}; train records use names like
"loss", eval records "eval/accuracy@64". Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import sys
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
  """Writes records to JSONL and TensorBoard and prints progress lines."""

  def __init__(self, workdir: str, total_steps: int, tensorboard: bool = True,
               quiet: bool = False):
    self.enabled = jax.process_index() == 0
    self.total = total_steps
    self.quiet = quiet
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._t0 = time.time()
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

  def progress(self, record: dict[str, Any]) -> None:
    """One console line: a bar, the step, and the record's main numbers."""
    if not self.enabled or self.quiet:
      return
    step = record["step"]
    width = 20
    done = int(width * step / max(self.total, 1))
    parts = [f"[{'#' * done}{'.' * (width - done)}] {step}/{self.total}"]
    for k, v in record.items():
      if k == "step" or not isinstance(v, (int, float)):
        continue
      if k == "tokens_per_s":
        parts.append(f"{v / 1e3:.1f}k tok/s")
      elif k == "lr":
        parts.append(f"lr {v:.1e}")
      elif k.startswith("metrics/") and len(parts) > 6:
        continue
      else:
        parts.append(f"{k} {v:.4g}")
    parts.append(f"{time.time() - self._t0:.0f}s")
    print(" | ".join(parts), file=sys.stdout, flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


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
