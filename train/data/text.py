"""Text: documents from local files or tensorflow-datasets, byte-level tokens, packed rows.

Documents are concatenated into one byte stream and cut into rows of seq_len + 1 tokens.
Each row carries segment ids (1, 2, ... per document piece; the model resets its state where
they change) and the loss only counts predictions inside one document.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from deltajax.train.data.tasks import Batch

VOCAB_SIZE = 256  # bytes


def read_local(source: str, max_bytes: int) -> list[bytes]:
  """Documents (one per file) from a file, a directory (recursively) or a glob pattern."""
  if os.path.isdir(source):
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs)
  elif os.path.isfile(source):
    paths = [source]
  else:
    paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
  if not paths:
    raise ValueError(f"data.text_source: got {source!r}, need an existing text file, a "
                     "directory of text files, a glob that matches files, or tfds:<name>")
  docs, total = [], 0
  for path in paths:
    with open(path, "rb") as f:
      doc = f.read(max_bytes - total)
    if doc:
      docs.append(doc)
      total += len(doc)
    if total >= max_bytes:
      break
  return docs


def read_tfds(spec: str, max_bytes: int) -> list[bytes]:
  """Documents from "tfds:<name>[:<split>]" (the first string feature of each example)."""
  parts = spec.split(":")
  name, split = parts[1], (parts[2] if len(parts) > 2 else "train")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"data.text_source={spec!r} needs tensorflow-datasets: "
                     "pip install 'deltajax[data]'") from None
  docs, total = [], 0
  for example in tfds.as_numpy(tfds.load(name, split=split)):
    text = example if isinstance(example, bytes) else next(
        (v for v in example.values() if isinstance(v, bytes)), None)
    if text is None:
      raise ValueError(f"data.text_source={spec!r}: examples have no string feature")
    docs.append(text[:max_bytes - total])
    total += len(docs[-1])
    if total >= max_bytes:
      break
  return docs


def pack(docs: list[bytes], row_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates documents and cuts the stream into rows of `row_len`.

  Returns tokens [R, row_len] int32 and segment ids [R, row_len] int32, numbered 1.. within
  each row in order of appearance (the tail that does not fill a row is dropped).
  """
  tokens = np.frombuffer(b"".join(docs), np.uint8).astype(np.int32)
  doc_id = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
  rows = len(tokens) // row_len
  tokens = tokens[:rows * row_len].reshape(rows, row_len)
  doc_id = doc_id[:rows * row_len].reshape(rows, row_len)
  segments = doc_id - doc_id[:, :1] + 1
  # Renumber densely: a document piece that starts mid-row gets the next id, whatever its
  # global index, so ids stay small and consecutive.
  changes = np.concatenate([np.zeros((rows, 1), np.int32),
                            (np.diff(segments, axis=1) != 0).astype(np.int32)], axis=1)
  return tokens, (np.cumsum(changes, axis=1) + 1).astype(np.int32)


class TextSource:
  """Packed byte-level text with a held-out tail (the last 5% of rows, at least one)."""

  vocab_size = VOCAB_SIZE

  def __init__(self, cfg):
    src = cfg.text_source
    if not src:
      raise ValueError("data.text_source: empty; need a text file, directory, glob, or "
                       "tfds:<name> (e.g. --data.text_source=README.md)")
    self._docs = (read_tfds(src, cfg.text_max_bytes) if src.startswith("tfds:")
                  else read_local(src, cfg.text_max_bytes))
    self._seed = cfg.seed
    self._packed: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    self._rows(cfg.seq_len)  # fail early if the text is too short

  def _rows(self, seq_len: int):
    if seq_len not in self._packed:
      tokens, segments = pack(self._docs, seq_len + 1)
      if len(tokens) < 2:
        raise ValueError(f"data.text_source: {sum(map(len, self._docs))} bytes of text give "
                         f"{len(tokens)} rows of {seq_len + 1}; need at least 2 (one held out)")
      n_eval = max(1, len(tokens) // 20)
      self._packed[seq_len] = (tokens, segments, len(tokens) - n_eval)
    return self._packed[seq_len]

  def batch(self, split: str, index: int, batch_size: int, seq_len: int) -> Batch:
    tokens, segments, n_train = self._rows(seq_len)
    if split == "train":
      rows = np.random.default_rng([self._seed, 0, index]).integers(0, n_train, batch_size)
    else:  # held-out rows, in order, wrapping around
      rows = n_train + (index * batch_size + np.arange(batch_size)) % (len(tokens) - n_train)
    tok, seg = tokens[rows], segments[rows]
    same_doc = seg[:, 1:] == seg[:, :-1]
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:],
            "weights": same_doc.astype(np.float32), "segment_ids": seg[:, :-1]}
