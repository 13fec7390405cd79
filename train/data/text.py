"""Text: documents from local files or tensorflow-datasets, byte-level tokens, packed rows.

Documents are concatenated into one byte stream and cut into rows of seq_len + 1 tokens
(concatenate-then-split packing, nothing padded). Each row carries segment ids (1, 2, ... per
document piece; the model resets its state where they change) and the loss only counts
predictions inside one document. The rows are a grain random-access source (`PackedRows`).
"""
from __future__ import annotations

import codecs
import glob
import os

import numpy as np

VOCAB_SIZE = 256  # bytes
_SNIFF = 8192  # bytes read to tell text from binary, as git and grep do


def _check_text(path: str) -> None:
  """Raises ValueError unless the file starts like UTF-8 text: no NUL byte, and it decodes."""
  with open(path, "rb") as f:
    head = f.read(_SNIFF)
  bad = head.find(b"\0")
  if bad < 0:
    try:  # a multi-byte character cut at the end of the sniffed block is fine
      codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF)
    except UnicodeDecodeError as e:
      bad = e.start
  if bad >= 0:
    raise ValueError(f"data.text_source: {path!r} is not a text file (byte {bad} is "
                     f"{head[bad:bad + 1]!r}); need UTF-8 text files")


def local_paths(source: str) -> list[str]:
  """The files a file, a directory (recursively) or a glob pattern names, sorted."""
  if os.path.isdir(source):
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs)
    if not paths:
      raise ValueError(f"data.text_source: the directory {source!r} has no files")
  elif os.path.isfile(source):
    paths = [source]
  elif glob.has_magic(source):
    paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    if not paths:
      raise ValueError(f"data.text_source: the glob {source!r} matches no files")
  else:
    raise ValueError(f"data.text_source: {source!r} does not exist; need a text file, a "
                     "directory of text files, a glob that matches files, or tfds:NAME")
  return paths


def read_local(source: str, max_bytes: int) -> list[bytes]:
  """Documents (one per file, at most `max_bytes` in all) from a file, directory or glob."""
  docs, total = [], 0
  for path in local_paths(source):
    _check_text(path)
    with open(path, "rb") as f:
      doc = f.read(max_bytes - total)
    if doc:
      docs.append(doc)
      total += len(doc)
    if total >= max_bytes:
      break
  return docs


def read_tfds(spec: str, max_bytes: int) -> list[bytes]:
  """Documents from "tfds:NAME[:SPLIT]" (the first string feature of each example).

  Only a dataset already prepared on disk (TFDS_DATA_DIR, default ~/tensorflow_datasets) is
  read: training never starts a download, which would hang or fail on a machine without
  network access.
  """
  parts = spec.split(":")
  name, split = parts[1], (parts[2] if len(parts) > 2 else "train")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"data.text_source={spec!r} needs tensorflow-datasets: "
                     "pip install 'deltajax[data]'") from None
  try:
    builder = tfds.builder(name)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"data.text_source={spec!r}: {str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    raise ValueError(
        f"data.text_source={spec!r}: the tfds dataset {name!r} is not available offline (not "
        f"prepared in {builder.data_dir}) and training does not download. Prepare it on a "
        f"machine with network access (`tfds build {name}`) and copy it there, or set "
        "TFDS_DATA_DIR to where it is.")
  try:  # array_record / parquet: random access without TensorFlow
    examples = builder.as_data_source(split=split)
  except NotImplementedError:  # tfrecord: needs TensorFlow
    examples = tfds.as_numpy(builder.as_dataset(split=split))
  docs, total = [], 0
  for example in examples:
    text = example if isinstance(example, bytes) else next(
        (v for v in example.values() if isinstance(v, bytes)), None)
    if text is None:
      raise ValueError(f"data.text_source={spec!r}: examples have no string feature")
    docs.append(text[:max_bytes - total])
    total += len(docs[-1])
    if total >= max_bytes:
      break
  return docs


def read(source: str, max_bytes: int) -> list[bytes]:
  """Documents from `source` (see DataConfig.text_source)."""
  if not source:
    raise ValueError("data.text_source: empty; need a text file, directory, glob, or "
                     "tfds:NAME (e.g. --data.text_source=README.md)")
  return read_tfds(source, max_bytes) if source.startswith("tfds:") else read_local(
      source, max_bytes)


def pack(docs: list[bytes], row_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates documents and cuts the stream into rows of `row_len`.

  Returns tokens [R, row_len] uint8 and segment ids [R, row_len] int32, numbered 1.. within
  each row in order of appearance (the tail that does not fill a row is dropped).
  """
  tokens = np.frombuffer(b"".join(docs), np.uint8)
  doc_id = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
  rows = len(tokens) // row_len
  tokens = tokens[:rows * row_len].reshape(rows, row_len)
  doc_id = doc_id[:rows * row_len].reshape(rows, row_len)
  # Renumber densely: a document piece that starts mid-row gets the next id, whatever its
  # global index, so ids stay small and consecutive.
  changes = np.concatenate([np.zeros((rows, 1), np.int32),
                            (np.diff(doc_id, axis=1) != 0).astype(np.int32)], axis=1)
  return tokens, (np.cumsum(changes, axis=1) + 1).astype(np.int32)


class PackedRows:
  """A grain random-access source over packed rows: record i is one training example.

    inputs [T] int32, targets [T] int32 (the next byte), weights [T] float32 (1 where input
    and target are in the same document), segment_ids [T] int32.
  """

  def __init__(self, tokens: np.ndarray, segments: np.ndarray):
    self._tokens, self._segments = tokens, segments  # [R, T + 1]

  def __len__(self) -> int:
    return len(self._tokens)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    tok, seg = self._tokens[i].astype(np.int32), self._segments[i]
    return {"inputs": tok[:-1], "targets": tok[1:],
            "weights": (seg[1:] == seg[:-1]).astype(np.float32), "segment_ids": seg[:-1]}


def split_rows(docs: list[bytes], seq_len: int) -> dict[str, PackedRows]:
  """{"train": ..., "eval": ...}: the packed rows, the last 5% (at least one) held out."""
  tokens, segments = pack(docs, seq_len + 1)
  if len(tokens) < 2:
    raise ValueError(f"data.text_source: {sum(map(len, docs))} bytes of text give "
                     f"{len(tokens)} rows of {seq_len + 1}; need at least 2 (one held out)")
  n_train = len(tokens) - max(1, len(tokens) // 20)
  return {"train": PackedRows(tokens[:n_train], segments[:n_train]),
          "eval": PackedRows(tokens[n_train:], segments[n_train:])}
