"""Data for training: generated tasks and packed text, each a deterministic `Source`.

`make_source(data_config).batch(split, index, batch_size, seq_len)` is a pure function of
(seed, split, index), so the data iterator's state is just the next index (`DataState`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from deltajax.train.data import tasks
from deltajax.train.data.tasks import Batch, task_vocab_size

_SPLITS = {"train": 0, "eval": 1}


class TaskSource:
  """A generated task; batch `index` of `split` at length T is seeded by (seed, split, T,
  index), so held-out batches never reuse a training stream."""

  def __init__(self, cfg):
    self._gen = tasks.generator(cfg)
    self._seed = cfg.seed
    self.vocab_size = task_vocab_size(cfg)
    self._gen(np.random.default_rng(0), 1, cfg.seq_len)  # fail early on bad shapes
    for n in cfg.eval_lengths:
      self._gen(np.random.default_rng(0), 1, n)

  def batch(self, split: str, index: int, batch_size: int, seq_len: int) -> Batch:
    rng = np.random.default_rng([self._seed, _SPLITS[split], seq_len, index])
    return self._gen(rng, batch_size, seq_len)


def make_source(cfg):
  """The Source for a DataConfig."""
  if cfg.task == "text":
    from deltajax.train.data.text import TextSource  # pylint: disable=g-import-not-at-top
    return TextSource(cfg)
  return TaskSource(cfg)


@dataclasses.dataclass(frozen=True)
class DataState:
  """The training data iterator's state: the next batch index, for this seed."""
  seed: int
  step: int

  def to_json(self) -> dict:
    return {"seed": self.seed, "step": self.step}

  @classmethod
  def from_json(cls, d: dict) -> "DataState":
    return cls(seed=int(d["seed"]), step=int(d["step"]))


__all__ = ["Batch", "DataState", "TaskSource", "make_source", "task_vocab_size"]
