"""deltajax.train data and config: generated tasks are correct, every record is a pure function
of (seed, split, length, index), processes read disjoint shards of the same global batches, the
grain iterator resumes from its state, text packs documents with boundaries, bad sources and
bad options are errors naming them. No model is trained here."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import types

import grain
import numpy as np
import pytest

from deltajax.train.config import DataConfig
from deltajax.train.data import Source, read_options, tasks
from deltajax.train.data import text as text_lib
from deltajax.train.presets import build_config

GENERATED = {
    "mqar": DataConfig(task="mqar", seq_len=32, vocab_size=32, num_kv_pairs=4),
    "parity": DataConfig(task="parity", seq_len=16),
    "modadd": DataConfig(task="modadd", seq_len=16, modulus=7),
    "s3": DataConfig(task="s3", seq_len=12),
    "s5": DataConfig(task="s5", seq_len=12),
    "selective_copy": DataConfig(task="selective_copy", seq_len=24, vocab_size=10,
                                 num_tokens_to_copy=4),
}


def _rows(batch) -> set[bytes]:
  return {r.tobytes() for r in batch["inputs"]}


@pytest.fixture
def text_dir(tmp_path):
  """Two documents, letters then digits, no two 16-byte windows alike: 350 bytes."""
  (tmp_path / "a.txt").write_text("".join(chr(97 + i % 26) for i in range(50)))
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.txt").write_text("".join(f"{i:03d}," for i in range(75)))
  return tmp_path


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_records_are_a_pure_function_of_seed_split_and_index(name):
  cfg = GENERATED[name]
  a, b = Source(cfg).records("train", cfg.seq_len), Source(cfg).records("train", cfg.seq_len)
  x = a[3]
  for k in x:
    np.testing.assert_array_equal(x[k], b[3][k])
  held = Source(cfg).records("eval", cfg.seq_len)[3]
  assert not np.array_equal(x["inputs"], a[4]["inputs"])
  assert not np.array_equal(x["inputs"], held["inputs"])
  assert {k: (v.dtype, v.shape) for k, v in x.items()} == {
      "inputs": (np.int32, (cfg.seq_len,)), "targets": (np.int32, (cfg.seq_len,)),
      "weights": (np.float32, (cfg.seq_len,))}
  vocab = Source(cfg).vocab_size
  assert x["targets"].max() < vocab and x["inputs"].max() < vocab


@pytest.mark.parametrize("task", ["mqar", "text"])
def test_processes_read_disjoint_shards_of_the_same_global_batches(task, text_dir):
  """Process p of n gets records j*B + p + k*n of batch j: disjoint, and together exactly the
  single-process batch, so the data do not depend on the number of processes."""
  cfg = (GENERATED["mqar"] if task == "mqar" else
         DataConfig(task="text", text_source=str(text_dir), seq_len=7))
  src = Source(cfg)
  for j in (0, 5):
    whole = src.batches("train", cfg.seq_len, 12)[j]
    parts = [src.batches("train", cfg.seq_len, 12, p, 3)[j] for p in range(3)]
    assert [len(p["inputs"]) for p in parts] == [4, 4, 4]
    assert [np.array_equal(p["inputs"], whole["inputs"][i::3]) for i, p in enumerate(parts)] \
        == [True] * 3
    if task == "mqar":  # random rows: equal rows would mean a record read twice
      assert len(set.union(*map(_rows, parts))) == 12


def test_batch_size_must_split_over_processes():
  with pytest.raises(ValueError, match="data.batch_size: got 10.*3 processes"):
    Source(GENERATED["parity"]).batches("train", 16, 10, 0, 3)


def test_the_grain_iterator_resumes_from_its_state():
  batches = Source(GENERATED["s3"]).batches("train", 12, 4)
  it = iter(batches.to_iter_dataset(read_options()))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  fresh = iter(batches.to_iter_dataset(read_options()))
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)["inputs"], expected["inputs"])
  np.testing.assert_array_equal(expected["inputs"], batches[3]["inputs"])
  assert isinstance(it, grain.DatasetIterator)


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
    Source(DataConfig(task="mqar", seq_len=10, vocab_size=64, num_kv_pairs=8))
  with pytest.raises(ValueError, match="data.vocab_size"):
    Source(DataConfig(task="mqar", seq_len=64, vocab_size=10, num_kv_pairs=8))


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
  src = Source(DataConfig(task="s3", seq_len=8, eval_seq_lens=(8, 32)))
  assert src.batch("eval", 0, 2, 32)["inputs"].shape == (2, 32)


def test_packing_marks_document_boundaries():
  tokens, seg = text_lib.pack([b"abc", b"defgh", b"ij"], row_len=4)
  np.testing.assert_array_equal(tokens, [[97, 98, 99, 100], [101, 102, 103, 104]])
  np.testing.assert_array_equal(seg, [[1, 1, 1, 2], [1, 1, 1, 1]])


def test_text_gives_packed_rows_shuffled_per_epoch_and_no_loss_across_documents(text_dir):
  src = Source(DataConfig(task="text", text_source=str(text_dir), seq_len=15))
  records = src.records("train", 15)
  n_train = 350 // 16 - 1  # 21 rows of 16 bytes, one held out
  epoch = [records[i]["inputs"].tobytes() + records[i]["segment_ids"].tobytes()
           for i in range(n_train)]
  assert len(set(epoch)) == n_train  # every row once per epoch
  b = src.batch("train", 0, 4, 15)
  assert b["inputs"].shape == b["segment_ids"].shape == b["weights"].shape == (4, 15)
  many = src.batch("train", 0, 2 * n_train, 15)
  cross = (many["inputs"] >= ord("a")) & (many["targets"] <= ord("9"))
  assert cross.any() and not many["weights"][cross].any()
  assert many["weights"].mean() > 0.9
  np.testing.assert_array_equal(many["targets"][:, :-1], many["inputs"][:, 1:])


@pytest.mark.parametrize("source,match", [
    ("{tmp}/no/such/file.txt", r"data.text_source: '{tmp}/no/such/file.txt' does not exist"),
    ("{tmp}/*.md", r"data.text_source: the glob '{tmp}/\*.md' matches no files"),
    ("{tmp}/empty", r"data.text_source: the directory '{tmp}/empty' has no files"),
    ("{tmp}/model.bin", r"data.text_source: '{tmp}/model.bin' is not a text file"),
    ("{tmp}", r"'{tmp}/latin1.txt' is not a text file"),  # the first non-text file of a dir
    ("{tmp}/latin1.txt", r"'{tmp}/latin1.txt' is not a text file \(byte 3"),
    ("", "data.text_source: empty"),
])
def test_bad_text_sources_name_the_path_or_pattern(source, match, tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "ok.txt").write_text("fine text " * 10)
  (tmp_path / "model.bin").write_bytes(np.arange(256, dtype=np.uint8).tobytes())
  (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
  with pytest.raises(ValueError, match=match.format(tmp=tmp_path)):
    Source(DataConfig(task="text", text_source=source.format(tmp=tmp_path)))


def test_utf8_text_cut_inside_a_character_at_the_sniffed_block_is_text(tmp_path):
  (tmp_path / "t.txt").write_bytes(b"a" * (8192 - 1) + "é".encode() * 100)
  assert len(Source(DataConfig(task="text", text_source=str(tmp_path / "t.txt"))).records(
      "train", 64)) > 0


def test_text_too_short_for_two_rows_is_rejected(tmp_path):
  (tmp_path / "t.txt").write_bytes(b"tiny")
  with pytest.raises(ValueError, match="need at least 2"):
    Source(DataConfig(task="text", text_source=str(tmp_path / "t.txt"), seq_len=64))


def test_tfds_without_the_data_extra_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ValueError, match=r"deltajax\[data\]"):
    Source(DataConfig(task="text", text_source="tfds:tiny_shakespeare"))


def test_tfds_dataset_not_prepared_is_refused_without_a_download(monkeypatch):
  """The branch taken for a dataset that is not on disk, with a stand-in for tfds (the real
  library is checked below when the `data` extra is installed)."""
  class Builder:
    data_dir = "/data/tfds/tiny_shakespeare/1.0.0"
    is_prepared = staticmethod(lambda: False)
    download_and_prepare = as_data_source = None  # never called
  fake = types.SimpleNamespace(
      builder=lambda name: Builder(),
      core=types.SimpleNamespace(registered=types.SimpleNamespace(
          DatasetNotFoundError=LookupError)))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  with pytest.raises(ValueError, match=r"'tiny_shakespeare' is not available offline \(not "
                     r"prepared in /data/tfds/tiny_shakespeare/1.0.0\)"):
    Source(DataConfig(task="text", text_source="tfds:tiny_shakespeare"))


def test_tfds_dataset_not_on_disk_says_it_is_not_available_offline(tmp_path):
  """With tensorflow-datasets installed (the `data` extra), a dataset that is not prepared is
  an error at once, not a download that hangs without network."""
  pytest.importorskip("tensorflow_datasets")
  code = textwrap.dedent("""
      from deltajax.train.data import text
      try:
        text.read("tfds:tiny_shakespeare", 1000)
      except ValueError as e:
        print(e)
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "TFDS_DATA_DIR": str(tmp_path)})
  assert "'tiny_shakespeare' is not available offline" in proc.stdout, proc.stderr[-2000:]
  assert str(tmp_path) in proc.stdout


def test_overrides_are_typed_and_accept_command_line_spellings():
  c = build_config("mqar", {"run.steps": "7", "optim.lr": "1e-4", "run.plot": "false",
                            "data.eval_seq_lens": "8,16", "model.allow_neg_eigval": "True",
                            "model.pattern": "kda,attn", "model.head_dim": "None",
                            "model.mlp_sparsity": "topk:k=0.2"})
  assert (c.run.steps, c.optim.lr, c.run.plot, c.data.eval_seq_lens) == (7, 1e-4, False, (8, 16))
  assert (c.model.allow_neg_eigval, c.model.pattern, c.model.head_dim) == (
      True, ("kda", "attn"), None)
  assert c.model.mlp_sparsity == "topk:k=0.2"
  assert build_config("mqar", {"data.eval_seq_lens": ""}).data.eval_seq_lens == ()


def test_model_vocabulary_follows_the_task_unless_given():
  assert build_config("mqar", {"data.vocab_size": "128"}).model.vocab_size == 128
  assert build_config("mqar", {"data.task": "s5"}).model.vocab_size == 120
  assert build_config("s5").model.vocab_size == 120
  assert build_config("mqar", {"model.vocab_size": "200"}).model.vocab_size == 200


@pytest.mark.parametrize("overrides,match", [
    ({"run.stepz": "1"}, "--run.stepz=1.*--run.steps"),
    ({"runn.steps": "1"}, "--runn.steps"),
    ({"run.steps": "many"}, "--run.steps.*'many'"),
    ({"run.steps": "0"}, "run.steps: got 0"),
    ({"data.task": "sort"}, "data.task: got 'sort'"),
    ({"optim.lr": "-1"}, "optim.lr"),
    ({"run.plot": "maybe"}, "--run.plot: got 'maybe', need true or false"),
    ({"preset": "s3"}, "--preset"),
])
def test_bad_overrides_name_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    build_config("mqar", overrides)


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="preset: got 'nope'"):
    build_config("nope")


def test_the_pipeline_benchmark_measures_tokens_per_second():
  from deltajax.train import bench  # pylint: disable=g-import-not-at-top
  cfg = build_config("parity", {"data.seq_len": "16", "data.batch_size": "8"})
  assert bench.pipeline_tokens_per_s(cfg, seconds=0.05) > 0
  with pytest.raises(SystemExit):
    bench.main(["nopreset"])
