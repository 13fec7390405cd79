"""deltajax.train end to end: presets, the CLI, checkpoint/kill/resume reproducing the same
losses (grain iterator state in the checkpoint), NaN handling, the console, an 8-device sharded
run and a 2-process run (jax.distributed on localhost) matching the single-device run."""
from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from deltajax.train import cli, loop, metrics
from deltajax.train.data import Source
from deltajax.train.presets import PRESETS, build_config

# A model and task small enough that a step compiles and runs in well under a second.
TINY = {"model.d_model": "16", "model.num_layers": "1", "model.num_heads": "2",
        "data.seq_len": "16", "data.vocab_size": "16", "data.num_kv_pairs": "2",
        "data.batch_size": "8", "run.eval_batches": "1", "run.log_every": "1",
        "run.eval_every": "0", "run.tensorboard": "false", "run.plot": "false",
        "optim.warmup_steps": "2"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(over: dict[str, str]) -> list[str]:
  return [f"--{k}={v}" for k, v in over.items()]


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
  cfg = build_config(name)
  assert cfg.preset == name and cfg.model.vocab_size >= 2


@pytest.mark.parametrize("argv,match", [
    (["--model.mixr=kda"], r"Unrecognized options: --model.mixr=kda(.|\n)*--model.mixer"),
    (["--run.steps=ten"], r"--run.steps: invalid literal.*'ten'"),
    (["--run.steps=0"], "run.steps: got 0, need >= 1"),
    (["nopreset"], "preset: got 'nopreset'"),
    (["--steps=3"], "--steps=3"),
    (["text", "--data.text_source=/no/such/file.txt"], "'/no/such/file.txt' does not exist"),
])
def test_bad_command_lines_exit_2_naming_the_problem(argv, match, capsys, tmp_path):
  assert cli.main(argv + [f"--run.workdir={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert re.search(match, err), err


def test_help_lists_presets_and_every_option_with_type_and_default(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(f"  {name}" in out for name in PRESETS)
  for option in ("--model.mixer STR", "--model.allow_neg_eigval {true,false}",
                 "--data.eval_seq_lens INT,...", "--run.steps INT", "--optim.lr FLOAT",
                 "--data.text_source STR", "--model.mlp_sparsity {None}|STR"):
    assert option in out, option
  words = " ".join(out.split())  # the help wraps at the terminal's width
  assert "(default: deltanet)" in words and "(default: 600)" in words
  assert cli.main(["parity", "--help"]) == 0
  assert "(default: 1000)" in " ".join(capsys.readouterr().out.split())  # parity's run.steps


# Every in-process run below shares this schedule, model and mesh, so they reuse one compile.
RUN8 = {**TINY, "run.steps": "8", "run.checkpoint_every": "2"}


def test_killed_run_resumes_from_last_complete_checkpoint_with_the_same_losses(tmp_path):
  """The real entry point runs 5 steps and exits without a final save (as if killed after the
  checkpoint of step 4); a save of step 6 interrupted half-way is left on disk. The restarted
  command resumes at step 4, and its losses equal those of an uninterrupted run bit for bit;
  it ends by printing held-out accuracy and where the checkpoint, metrics and plot went."""
  over = {**RUN8, "run.tensorboard": "true", "run.plot": "true"}
  killed, straight = tmp_path / "killed", tmp_path / "straight"
  # Every run in a fresh process: bit-for-bit equality holds between runs of the same kind of
  # process (an in-process run beside other tests differed in the last bits, untraced).
  def train(workdir, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", "deltajax.train", "mqar", *_args(over), *extra,
         f"--run.workdir={workdir}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc

  proc = train(killed, "--run.stop_at=5")
  # Not a terminal: one plain line per record, no progress-bar redraws.
  assert "step 5/8 | " in proc.stdout and "run.stop_at" in proc.stdout
  assert "\r" not in proc.stdout and "\x1b" not in proc.stdout
  ckpts = killed / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2", "4"]
  # The grain iterator's position is saved with the model: 4 batches read.
  data_state = json.loads((ckpts / "4" / "data" / "process_0-of-1.json").read_text())
  assert data_state["next_index"] == 4
  (ckpts / "6.orbax-checkpoint-tmp-1234567").mkdir()  # what a save killed mid-way leaves
  (ckpts / "6.orbax-checkpoint-tmp-1234567" / "partial").write_text("x")

  out = train(killed).stdout
  ref = train(straight).stdout
  assert "resumed from step 4" in out
  assert _losses(killed) == _losses(straight)
  assert list(_losses(killed)) == list(range(1, 9))
  acc = next(line for line in ref.splitlines() if line.startswith("held-out accuracy: "))
  assert acc.endswith("at length 16") and acc in out, out
  assert f"checkpoint: {ckpts}" in out and f"plot: {killed}/curves.png" in out
  assert (killed / "curves.png").stat().st_size > 1000
  assert any(p.name.startswith("events") for p in (killed / "tb").iterdir())
  assert sorted(p.name for p in ckpts.iterdir()) == ["6", "8"]  # keep 2; partial save gone


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                          monkeypatch):
  real, calls = loop.Trainer.put_train_batch, []

  def poisoned(self, local):
    calls.append(1)
    if len(calls) == 3:  # the third update sees a NaN weight, so its loss is NaN
      local = {**local, "weights": local["weights"] * np.nan}
    return real(self, local)

  monkeypatch.setattr(loop.Trainer, "put_train_batch", poisoned)
  with pytest.raises(loop.NonFiniteLossError, match="step 3.*checkpoint is step 2"):
    loop.train_and_evaluate(build_config("mqar", RUN8), str(tmp_path), quiet=True)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  over = {**RUN8, "run.stop_at": "3"}
  full = loop.train_and_evaluate(build_config("mqar", over), str(tmp_path / "a"), quiet=True)
  accum = loop.train_and_evaluate(build_config("mqar", {**over, "optim.grad_accum_steps": "2"}),
                                  str(tmp_path / "b"), quiet=True)
  assert len(full.losses) == 3
  np.testing.assert_allclose(accum.losses, full.losses, rtol=2e-5)


_SHARDED = textwrap.dedent("""
    import os, json, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    from deltajax.train import loop, sharding
    from deltajax.train.presets import build_config
    over = json.loads(sys.argv[1])
    cfg = build_config("mqar", over)
    one = loop.train_and_evaluate(cfg, sys.argv[2] + "/one", quiet=True,
                                  mesh=sharding.make_mesh(1, 1, jax.devices()[:1]))
    trainer = loop.Trainer(cfg, sharding.make_mesh(2, 4))
    specs = {str(s.spec) for s in jax.tree.leaves(trainer.state_sharding.params)}
    eight = loop.train_and_evaluate(cfg, sys.argv[2] + "/eight", quiet=True,
                                    mesh=sharding.make_mesh(2, 4))
    print(json.dumps({"devices": len(jax.devices()), "one": one.losses,
                      "eight": eight.losses, "specs": sorted(specs)}))
""")


def test_sharded_run_on_8_devices_matches_one_device(tmp_path):
  over = {**TINY, "run.steps": "4", "model.d_model": "32", "run.checkpoint_every": "2"}
  proc = subprocess.run([sys.executable, "-c", _SHARDED, json.dumps(over), str(tmp_path)],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  assert any("fsdp" in s for s in out["specs"]), out["specs"]  # parameters really are split
  np.testing.assert_allclose(out["eight"], out["one"], rtol=1e-5)


def test_progress_bar_updates_in_place_on_a_terminal_and_prints_plain_lines_otherwise(capsys):
  tty = io.StringIO()
  from rich.console import Console  # pylint: disable=g-import-not-at-top
  bar = metrics.Progress(total=4, console=Console(file=tty, force_terminal=True, width=120))
  assert bar.live
  for step in range(1, 5):
    bar.advance(step)
    bar.record({"step": step, "loss": 1.0 / step})
  bar.record({"step": 4, "eval/accuracy@8": 0.5})
  bar.close()
  screen = tty.getvalue()
  assert "\x1b[" in screen and "4/4" in screen and "loss 0.25" in screen  # redrawn in place
  assert "step 4/4 | eval/accuracy@8 0.5" in screen  # held-out results stay on screen

  plain = metrics.Progress(total=4, console=Console(file=io.StringIO()))
  assert not plain.live
  plain.advance(1)
  plain.record({"step": 2, "loss": 0.5, "tokens_per_s": 2000.0})
  out = capsys.readouterr().out
  assert out.startswith("step 2/4 | loss 0.5 | 2.0k tok/s | ") and out.count("\n") == 1


_TWO_PROCESSES = textwrap.dedent("""
    import json, sys
    import jax
    pid, port, workdir, over = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    from deltajax.train import loop, sharding
    from deltajax.train.presets import build_config
    rows, put = [], sharding.put_batch
    def spy(local, sharding_, rows_axis=0):  # what this process feeds to the devices
      if rows_axis == 1:
        rows.append(local["inputs"].reshape(-1, local["inputs"].shape[-1]).tolist())
      return put(local, sharding_, rows_axis)
    sharding.put_batch = spy
    result = loop.train_and_evaluate(build_config("mqar", over), workdir, quiet=True)
    print(json.dumps({"devices": len(jax.devices()), "rows": rows, "losses": result.losses}))
""")


def test_two_processes_read_disjoint_data_and_train_like_one(tmp_path):
  """Two processes on localhost (jax.distributed, one CPU device each) each read their own
  half of every batch; together they read exactly the single-process batches and get its
  losses. Each saves its own grain iterator state in the shared checkpoint, and a resume with
  another process count is refused by name."""
  over = RUN8  # the compiled steps of the single-process run are shared with other tests
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(pid), str(port),
                             str(tmp_path / "two"), json.dumps(over)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in (0, 1)]
  outs = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  assert [o["devices"] for o in outs] == [2, 2]

  cfg = build_config("mqar", over)
  source, b = Source(cfg.data), cfg.data.batch_size
  for step in range(8):
    mine = [{tuple(r) for r in o["rows"][step]} for o in outs]
    assert len(mine[0]) == len(mine[1]) == b // 2 and not mine[0] & mine[1]
    whole = {tuple(r) for r in source.batch("train", step, b, cfg.data.seq_len)["inputs"]}
    assert mine[0] | mine[1] == whole

  one = loop.train_and_evaluate(cfg, str(tmp_path / "one"), quiet=True)
  np.testing.assert_allclose(outs[0]["losses"], one.losses, rtol=1e-5)
  np.testing.assert_allclose(outs[1]["losses"], one.losses, rtol=1e-5)
  data = tmp_path / "two" / "checkpoints" / "8" / "data"
  states = {p.name: json.loads(p.read_text()) for p in data.glob("*.json")}
  assert states == {"process_0-of-2.json": {"next_index": 8},
                    "process_1-of-2.json": {"next_index": 8}}
  with pytest.raises(ValueError, match="process_0-of-1.json.*another number of processes"):
    loop.train_and_evaluate(build_config("mqar", {**over, "run.steps": "10"}),
                            str(tmp_path / "two"), quiet=True)
