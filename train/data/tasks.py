"""Generated tasks (no download): recall, state tracking, selective copying.

Every generator is a pure function of a numpy Generator, a batch size and a length, and
returns a batch dict of numpy arrays:
  inputs  [B, T] int32   tokens fed to the model
  targets [B, T] int32   what position t must predict
  weights [B, T] float32 1 where the loss (and accuracy) counts, else 0
The input pipeline (data/__init__.py) calls them for one row at a time with a Philox stream
keyed by the record's index, so any record can be regenerated from (seed, split, length, index).
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable

import numpy as np

Batch = dict[str, np.ndarray]


def _batch(inputs, targets, weights) -> Batch:
  return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
          "weights": weights.astype(np.float32)}


def _distinct(rng: np.random.Generator, batch: int, n: int, k: int) -> np.ndarray:
  """[batch, k] distinct integers from range(n) per row, in random order."""
  return np.argsort(rng.random((batch, n)), axis=1)[:, :k]


def mqar(rng: np.random.Generator, batch: int, seq_len: int, *, vocab_size: int,
         num_kv_pairs: int) -> Batch:
  """Multi-query associative recall (Zoology; DeltaNet paper section 5).

  A row is `k1 v1 k2 v2 ... kN vN` followed by filler 0s in which every key appears once
  more, at a random even offset, followed by its value. Keys are distinct, drawn from
  [1, vocab/2); values from [vocab/2, vocab). Only the positions holding a queried key count:
  there the model must predict that key's value. (Zoology draws query gaps from a power law;
  here they are uniform.)
  """
  n, half = num_kv_pairs, vocab_size // 2
  if half - 1 < n:
    raise ValueError(f"data.vocab_size: got {vocab_size}, need >= {2 * (n + 1)} for "
                     f"{n} distinct keys (data.num_kv_pairs)")
  slots = (seq_len + 1 - 2 * n) // 2
  if slots < n:
    raise ValueError(f"data.seq_len: got {seq_len}, need >= {4 * n - 1} to hold {n} key-value "
                     f"pairs and {n} queries (data.num_kv_pairs)")
  rows = np.arange(batch)[:, None]
  keys = _distinct(rng, batch, half - 1, n) + 1
  values = rng.integers(half, vocab_size, (batch, n))
  seq = np.zeros((batch, seq_len + 1), np.int64)
  seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = keys, values
  which = _distinct(rng, batch, n, n)                     # query order
  pos = 2 * n + 2 * np.sort(_distinct(rng, batch, slots, n), axis=1)
  seq[rows, pos] = keys[rows, which]
  seq[rows, pos + 1] = values[rows, which]
  weights = np.zeros((batch, seq_len))
  weights[rows, pos] = 1.0
  return _batch(seq[:, :-1], seq[:, 1:], weights)


def _prefix_fold(x: np.ndarray, step: Callable[[np.ndarray, np.ndarray], np.ndarray]):
  """[B, T] -> [B, T] with out[:, t] = step(out[:, t-1], x[:, t]), out[:, 0] = x[:, 0]."""
  out = np.empty_like(x)
  acc = x[:, 0]
  out[:, 0] = acc
  for t in range(1, x.shape[1]):
    acc = step(acc, x[:, t])
    out[:, t] = acc
  return out


def modadd(rng: np.random.Generator, batch: int, seq_len: int, *, modulus: int) -> Batch:
  """Running sum modulo `modulus`: position t predicts (x_1 + ... + x_t) mod m. Every
  position counts. modulus 2 is parity."""
  x = rng.integers(0, modulus, (batch, seq_len))
  return _batch(x, np.cumsum(x, axis=1) % modulus, np.ones((batch, seq_len)))


@functools.lru_cache(maxsize=None)
def permutation_table(n: int) -> np.ndarray:
  """[n!, n!] table: table[a, b] = index of the permutation "apply a, then b" in S_n, with
  permutations indexed in lexicographic order (index 0 is the identity)."""
  perms = list(itertools.permutations(range(n)))
  index = {p: i for i, p in enumerate(perms)}
  arr = np.array(perms)
  # (a then b)(i) = b[a[i]]: composed[a, b] = arr[b][arr[a]].
  shape = (len(perms), len(perms), n)
  composed = np.take_along_axis(np.broadcast_to(arr[None], shape),
                                np.broadcast_to(arr[:, None], shape), axis=2)
  return np.array([[index[tuple(p)] for p in row] for row in composed], np.int64)


def symmetric_group(rng: np.random.Generator, batch: int, seq_len: int, *, n: int) -> Batch:
  """S_n word problem (Merrill et al.; DeltaProduct section 5): inputs are permutations of n
  elements (as indices), position t predicts the index of their composition x_1 ... x_t.
  S3 (6 elements) is solvable but non-abelian; S5 (120) is not solvable (NC1-complete)."""
  table = permutation_table(n)
  x = rng.integers(0, table.shape[0], (batch, seq_len))
  return _batch(x, _prefix_fold(x, lambda a, b: table[a, b]), np.ones((batch, seq_len)))


def selective_copy(rng: np.random.Generator, batch: int, seq_len: int, *, vocab_size: int,
                   num_tokens_to_copy: int) -> Batch:
  """Selective copying (Mamba section 4.1.1): `M` data tokens from [2, vocab) at random
  positions among noise 0s, then M marker tokens 1; at the j-th marker the model must output
  the j-th data token. Only the marker positions count."""
  m = num_tokens_to_copy
  ctx = seq_len - m
  if ctx < m:
    raise ValueError(f"data.seq_len: got {seq_len}, need >= {2 * m} for "
                     f"data.num_tokens_to_copy={m}")
  if vocab_size < 3:
    raise ValueError(f"data.vocab_size: got {vocab_size}, need >= 3 (0 noise, 1 marker, data)")
  rows = np.arange(batch)[:, None]
  tokens = rng.integers(2, vocab_size, (batch, m))
  pos = np.sort(_distinct(rng, batch, ctx, m), axis=1)
  inputs = np.zeros((batch, seq_len), np.int64)
  inputs[rows, pos] = tokens
  inputs[:, ctx:] = 1
  targets = np.zeros((batch, seq_len), np.int64)
  targets[:, ctx:] = tokens
  weights = np.zeros((batch, seq_len))
  weights[:, ctx:] = 1.0
  return _batch(inputs, targets, weights)


def task_vocab_size(cfg) -> int:
  """Token ids a task uses (the model's vocabulary must be at least this)."""
  return {"mqar": cfg.vocab_size, "selective_copy": cfg.vocab_size, "parity": 2,
          "modadd": cfg.modulus, "s3": 6, "s5": 120, "text": 256}[cfg.task]


def generator(cfg) -> Callable[[np.random.Generator, int, int], Batch]:
  """The generator for a DataConfig's (generated) task, as f(rng, batch, seq_len)."""
  if cfg.task == "mqar":
    return functools.partial(mqar, vocab_size=cfg.vocab_size, num_kv_pairs=cfg.num_kv_pairs)
  if cfg.task == "parity":
    return functools.partial(modadd, modulus=2)
  if cfg.task == "modadd":
    return functools.partial(modadd, modulus=cfg.modulus)
  if cfg.task in ("s3", "s5"):
    return functools.partial(symmetric_group, n=int(cfg.task[1]))
  if cfg.task == "selective_copy":
    return functools.partial(selective_copy, vocab_size=cfg.vocab_size,
                             num_tokens_to_copy=cfg.num_tokens_to_copy)
  raise ValueError(f"data.task: {cfg.task!r} is not a generated task")
