"""deltajax.train end to end: presets, the CLI, checkpoint/kill/resume reproducing the same
losses, NaN handling, and an 8-device sharded run matching the single-device run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from deltajax.train import cli, loop
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


def test_model_vocabulary_follows_the_task_unless_given():
  assert build_config("mqar", {"data.vocab_size": "128"}).model.vocab_size == 128
  assert build_config("s5").model.vocab_size == 120
  assert build_config("mqar", {"model.vocab_size": "200"}).model.vocab_size == 200
  assert build_config("mqar", {"model.mixer": "kda"}).model.mixer == "kda"


@pytest.mark.parametrize("argv,match", [
    (["--model.mixr=kda"], "model.mixr"),
    (["--run.steps=ten"], "run.steps"),
    (["nopreset"], "preset.*'nopreset'"),
    (["--steps=3"], "--steps=3"),
    (["text", "--data.text_source=/no/such/file.txt"], "data.text_source"),
])
def test_bad_command_lines_exit_2_naming_the_problem(argv, match, capsys, tmp_path):
  assert cli.main(argv + [f"--run.workdir={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert "error" in err and __import__("re").search(match, err), err


def test_help_lists_presets_and_options(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(name in out for name in PRESETS)
  assert "--model.mixer=" in out and "--run.steps=" in out and "--data.task=" in out


# Every in-process run below shares this schedule, model and mesh, so they reuse one compile.
RUN8 = {**TINY, "run.steps": "8", "run.checkpoint_every": "2"}


def test_killed_run_resumes_from_last_complete_checkpoint_with_the_same_losses(tmp_path,
                                                                                capsys):
  """The real entry point runs 5 steps and exits without a final save (as if killed after the
  checkpoint of step 4); a save of step 6 interrupted half-way is left on disk. The restarted
  command resumes at step 4, and its losses equal those of an uninterrupted run bit for bit;
  it ends by printing held-out accuracy and where the checkpoint, metrics and plot went."""
  over = {**RUN8, "run.tensorboard": "true", "run.plot": "true"}
  killed, straight = tmp_path / "killed", tmp_path / "straight"
  proc = subprocess.run(
      [sys.executable, "-m", "deltajax.train", "mqar", *_args(over), "--run.stop_at=5",
       f"--run.workdir={killed}"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "5/8" in proc.stdout and "run.stop_at" in proc.stdout
  ckpts = killed / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2", "4"]
  (ckpts / "6.orbax-checkpoint-tmp-1234567").mkdir()  # what a save killed mid-way leaves
  (ckpts / "6.orbax-checkpoint-tmp-1234567" / "partial").write_text("x")

  assert cli.main(["mqar", *_args(over), f"--run.workdir={killed}"]) == 0
  out = capsys.readouterr().out
  ref = loop.train_and_evaluate(build_config("mqar", RUN8), str(straight), quiet=True)
  assert "resumed from step 4" in out
  assert _losses(killed) == _losses(straight)
  assert list(_losses(killed)) == list(range(1, 9))
  acc = f"{ref.eval['eval/accuracy@16']:.2%} at length 16"
  assert f"held-out accuracy: {acc}" in out, out
  assert f"checkpoint: {ckpts}" in out and f"plot: {killed}/curves.png" in out
  assert (killed / "curves.png").stat().st_size > 1000
  assert any(p.name.startswith("events") for p in (killed / "tb").iterdir())
  assert sorted(p.name for p in ckpts.iterdir()) == ["6", "8"]  # keep 2; partial save gone


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                          monkeypatch):
  real = loop.Trainer.train_batch

  def poisoned(self, step):
    batch = real(self, step)
    if step == 2:  # the third update sees a NaN weight, so its loss is NaN
      batch["weights"] = batch["weights"] * np.nan
    return batch

  monkeypatch.setattr(loop.Trainer, "train_batch", poisoned)
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
