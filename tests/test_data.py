"""deltajax.train data: generated tasks are correct and deterministic, text packs documents
with boundaries, config overrides are typed and strict. No model needed."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from deltajax.train import config as cfg_lib
from deltajax.train.config import DataConfig
from deltajax.train.data import DataState, make_source, tasks
from deltajax.train.data import text as text_lib

GENERATED = {
    "mqar": DataConfig(task="mqar", seq_len=32, vocab_size=32, num_kv_pairs=4),
    "parity": DataConfig(task="parity", seq_len=16),
    "modadd": DataConfig(task="modadd", seq_len=16, modulus=7),
    "s3": DataConfig(task="s3", seq_len=12),
    "s5": DataConfig(task="s5", seq_len=12),
    "selective_copy": DataConfig(task="selective_copy", seq_len=24, vocab_size=10,
                                 num_tokens_to_copy=4),
}


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_batches_are_a_pure_function_of_seed_split_and_index(name):
  a, b = make_source(GENERATED[name]), make_source(GENERATED[name])
  x = a.batch("train", 3, 8, GENERATED[name].seq_len)
  y = b.batch("train", 3, 8, GENERATED[name].seq_len)
  for k in x:
    np.testing.assert_array_equal(x[k], y[k])
  other = a.batch("train", 4, 8, GENERATED[name].seq_len)
  held = a.batch("eval", 3, 8, GENERATED[name].seq_len)
  assert not np.array_equal(x["inputs"], other["inputs"])
  assert not np.array_equal(x["inputs"], held["inputs"])
  assert {k: v.dtype for k, v in x.items()} == {
      "inputs": np.int32, "targets": np.int32, "weights": np.float32}
  assert x["inputs"].shape == x["targets"].shape == x["weights"].shape == (8, x["inputs"].shape[1])
  assert x["targets"].max() < a.vocab_size and x["inputs"].max() < a.vocab_size


def test_mqar_queries_ask_for_the_value_stored_with_their_key():
  n = 4
  b = tasks.mqar(np.random.default_rng(0), 16, 32, vocab_size=32, num_kv_pairs=n)
  for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
    store = dict(zip(inp[0:2 * n:2], inp[1:2 * n:2]))
    assert len(store) == n and all(1 <= k < 16 for k in store) and all(
        16 <= v < 32 for v in store.values())
    queried = np.flatnonzero(w)
    assert len(queried) == n and queried.min() >= 2 * n
    assert sorted(inp[queried]) == sorted(store)
    assert all(tgt[p] == store[inp[p]] for p in queried)


def test_mqar_shapes_that_cannot_hold_the_pairs_are_rejected():
  with pytest.raises(ValueError, match="data.seq_len"):
    make_source(DataConfig(task="mqar", seq_len=10, vocab_size=64, num_kv_pairs=8))
  with pytest.raises(ValueError, match="data.vocab_size"):
    make_source(DataConfig(task="mqar", seq_len=64, vocab_size=10, num_kv_pairs=8))


@pytest.mark.parametrize("modulus", [2, 5])
def test_running_sum_targets(modulus):
  b = tasks.modadd(np.random.default_rng(1), 4, 20, modulus=modulus)
  np.testing.assert_array_equal(b["targets"], np.cumsum(b["inputs"], 1) % modulus)
  assert b["weights"].min() == 1


@pytest.mark.parametrize("n", [3, 5])
def test_permutation_word_problem_composes_prefixes(n):
  perms = list(itertools.permutations(range(n)))
  b = tasks.symmetric_group(np.random.default_rng(2), 3, 10, n=n)
  for inp, tgt in zip(b["inputs"], b["targets"]):
    acc = np.arange(n)
    for x, y in zip(inp, tgt):
      acc = np.asarray(perms[x])[acc]  # apply the prefix, then x
      assert perms[y] == tuple(acc)
  assert perms[0] == tuple(range(n))


def test_selective_copy_targets_are_the_data_tokens_in_order():
  b = tasks.selective_copy(np.random.default_rng(3), 5, 24, vocab_size=10, num_tokens_to_copy=4)
  for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
    data = inp[:20][inp[:20] >= 2]
    assert len(data) == 4 and (inp[20:] == 1).all()
    np.testing.assert_array_equal(tgt[20:], data)
    np.testing.assert_array_equal(w, np.r_[np.zeros(20), np.ones(4)])


def test_state_tracking_eval_lengths_can_exceed_the_training_length():
  src = make_source(DataConfig(task="s3", seq_len=8, eval_seq_lens=(8, 32)))
  assert src.batch("eval", 0, 2, 32)["inputs"].shape == (2, 32)


def test_data_state_round_trips_through_json():
  s = DataState(seed=3, step=17)
  assert DataState.from_json(s.to_json()) == s


def test_packing_marks_document_boundaries():
  tokens, seg = text_lib.pack([b"abc", b"defgh", b"ij"], row_len=4)
  np.testing.assert_array_equal(tokens, [[97, 98, 99, 100], [101, 102, 103, 104]])
  np.testing.assert_array_equal(seg, [[1, 1, 1, 2], [1, 1, 1, 1]])


def test_text_from_a_directory_gives_packed_rows_and_no_loss_across_documents(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"x" * 50)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.txt").write_bytes(b"y" * 300)
  src = make_source(DataConfig(task="text", text_source=str(tmp_path), seq_len=15))
  b = src.batch("train", 0, 4, 15)
  assert b["inputs"].shape == b["segment_ids"].shape == (4, 15)
  many = src.batch("train", 1, 64, 15)  # 64 draws of 20 training rows: includes byte 50
  cross = (many["inputs"] == ord("x")) & (many["targets"] == ord("y"))
  assert cross.any() and not many["weights"][cross].any()
  assert many["weights"].mean() > 0.9
  same = src.batch("train", 0, 4, 15)
  np.testing.assert_array_equal(b["inputs"], same["inputs"])


@pytest.mark.parametrize("source,match", [
    ("/nonexistent/dir/*.txt", "data.text_source"),
    ("", "data.text_source"),
])
def test_bad_text_sources_name_the_option(source, match):
  with pytest.raises(ValueError, match=match):
    make_source(DataConfig(task="text", text_source=source))


def test_text_too_short_for_two_rows_is_rejected(tmp_path):
  (tmp_path / "t.txt").write_bytes(b"tiny")
  with pytest.raises(ValueError, match="need at least 2"):
    make_source(DataConfig(task="text", text_source=str(tmp_path / "t.txt"), seq_len=64))


def test_tfds_without_the_data_extra_says_how_to_install(monkeypatch):
  monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", None)
  with pytest.raises(ValueError, match=r"deltajax\[data\]"):
    make_source(DataConfig(task="text", text_source="tfds:tiny_shakespeare"))


def test_overrides_are_typed():
  c = cfg_lib.Config(model=None)
  c = cfg_lib.apply_overrides(c, {"run.steps": "7", "optim.lr": "1e-4", "run.plot": "false",
                                  "data.eval_seq_lens": "8,16", "data.task": "parity"})
  assert (c.run.steps, c.optim.lr, c.run.plot, c.data.eval_seq_lens, c.data.task) == (
      7, 1e-4, False, (8, 16), "parity")


@pytest.mark.parametrize("overrides,match", [
    ({"run.stepz": "1"}, "run.stepz.*steps"),
    ({"runn.steps": "1"}, "--runn.steps"),
    ({"run.steps": "many"}, "run.steps.*'many'"),
    ({"run.steps": "0"}, "run.steps"),
    ({"data.task": "sort"}, "data.task.*'sort'"),
    ({"optim.lr": "-1"}, "optim.lr"),
])
def test_bad_overrides_name_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    cfg_lib.apply_overrides(cfg_lib.Config(model=None), overrides)


def test_command_line_override_syntax():
  assert cfg_lib.parse_overrides(["--a.b=1", "--c.d", "x"]) == {"a.b": "1", "c.d": "x"}
  for bad in (["steps=3"], ["--steps=3"], ["--a.b"]):
    with pytest.raises(ValueError):
      cfg_lib.parse_overrides(bad)
