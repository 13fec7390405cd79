"""Input pipelines on grain: generated tasks and packed text as random-access datasets.

`Source(data_config).records(split, seq_len)` is a `grain.MapDataset` of examples
  inputs [T] int32, targets [T] int32, weights [T] float32 (+ segment_ids [T] int32 for text)
in which record i is a pure function of (seed, split, seq_len, i): generated tasks draw it from
a Philox stream keyed by i (`random_map`), text indexes packed rows (shuffled per epoch by
seed for training). `batches(...)` gives one process its shard of every global batch, and
training iterates it through `grain` with prefetching; the iterator's state (the next batch
index) goes into the orbax checkpoint next to the model (checkpoint.py).
"""
from __future__ import annotations

import os

import grain
import numpy as np

from deltajax.train.data import tasks, text
from deltajax.train.data.tasks import Batch, task_vocab_size

_SPLITS = {"train": 0, "eval": 1}
_GENERATED_RECORDS = 2**62  # generated tasks never run out


def _seed(seed: int, split: str, seq_len: int) -> int:
  """A grain seed (uint32) per (data seed, split, length), so held-out rows and other lengths
  never reuse the training stream."""
  return int(np.random.SeedSequence([seed, _SPLITS[split], seq_len]).generate_state(1)[0])


def read_options() -> grain.ReadOptions:
  """Threads that assemble batches ahead of the training step (numpy work that overlaps the
  step's XLA work, which releases the GIL), and how many batches they may run ahead."""
  return grain.ReadOptions(num_threads=min(4, os.cpu_count() or 1), prefetch_buffer_size=4)


class Source:
  """The grain datasets of a DataConfig. Reads (and packs) text once, on construction; bad
  shapes or sources fail here, before any compilation."""

  def __init__(self, cfg):
    self.cfg = cfg
    self.vocab_size = task_vocab_size(cfg)
    if cfg.task == "text":
      self._docs = text.read(cfg.text_source, cfg.text_max_bytes)
      self._rows: dict[int, dict[str, text.PackedRows]] = {}
    else:
      self._gen = tasks.generator(cfg)
    for n in dict.fromkeys((cfg.seq_len, *cfg.eval_lengths)):
      self.records("eval", n)[0]  # noqa: B018  (fail early)

  def records(self, split: str, seq_len: int) -> grain.MapDataset:
    """Examples of `split` ("train" or "eval") at length `seq_len`; an endless dataset."""
    seed = _seed(self.cfg.seed, split, seq_len)
    if self.cfg.task == "text":
      if seq_len not in self._rows:
        self._rows[seq_len] = text.split_rows(self._docs, seq_len)
      ds = grain.MapDataset.source(self._rows[seq_len][split])
      # Training rows in a new order every epoch; held-out rows in order.
      return (ds.shuffle(seed=seed) if split == "train" else ds).repeat()
    gen = self._gen

    def example(_, rng: np.random.Generator) -> Batch:
      return {k: v[0] for k, v in gen(rng, 1, seq_len).items()}
    return grain.MapDataset.range(_GENERATED_RECORDS).random_map(example, seed=seed)

  def batches(self, split: str, seq_len: int, batch_size: int, process_index: int = 0,
              process_count: int = 1) -> grain.MapDataset:
    """Process `process_index`'s rows of each global batch of `batch_size`: [batch_size /
    process_count, seq_len] arrays. Global batch j is records j*B .. j*B + B - 1 however many
    processes share it; process p reads records j*B + p + k*process_count, so processes read
    disjoint records."""
    if batch_size % process_count:
      raise ValueError(f"data.batch_size: got {batch_size}, need a multiple of the "
                       f"{process_count} processes")
    shard = self.records(split, seq_len)[process_index::process_count]
    return shard.batch(batch_size // process_count, drop_remainder=True)

  def batch(self, split: str, index: int, batch_size: int, seq_len: int) -> Batch:
    """Global batch `index` of `split`, all of it in this process (notebooks, tests)."""
    return self.batches(split, seq_len, batch_size)[index]


__all__ = ["Batch", "Source", "read_options", "task_vocab_size"]
