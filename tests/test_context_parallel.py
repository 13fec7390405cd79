"""Context parallelism (`cp_axis=`): the sharded ops, layers and model equal the whole
sequence's, the backward mirrors the forward's exchanges, and bad input says what is wrong.

The sharded runs need 8 (fake CPU) devices, so they run tests/cp_checks.py in a subprocess and
the rest of the suite keeps one device.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import SLOW_TESTS
from deltajax import layers, ops
from deltajax.models import LMConfig

TESTS = os.path.dirname(os.path.abspath(__file__))


def _checks(group: str) -> list[dict]:
  """Every JSON line `python tests/cp_checks.py group` prints (8 fake devices)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  run = subprocess.run([sys.executable, os.path.join(TESTS, "cp_checks.py"), group], env=env,
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stdout + run.stderr[-3000:]
  return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_sharded_ops_equal_the_whole_sequence():
  """All four ops over D = 8 and 2 devices: outputs, final states and every gradient within
  1e-5 of the unsharded op (initial states, grouped value heads, packed documents that start,
  end and span shards, chunk and recurrent as the local implementation)."""
  from cp_checks import OP_CASES  # pylint: disable=g-import-not-at-top
  results = _checks("ops")
  assert len(results) == len(OP_CASES)
  for r in results:
    assert r["errors"] and max(r["errors"].values()) < 1e-5, r
  ops_seen = {r["case"].split()[0] for r in results}
  assert ops_seen == {"delta_rule", "gated_delta_rule", "kda", "delta_product"}


def test_backward_mirrors_the_forward_exchanges():
  """ceil(log2 8) = 3 scan steps (maps at steps 1 and 2, states only at 4) and one shift, each
  a ppermute to a later shard; the backward sends the same ones back, in reverse order. No
  all-gather anywhere; the final state is one psum."""
  (r,) = _checks("mirror")
  forward = [tuple(map(tuple, perm)) for name, perm in r["forward"] if name == "ppermute"]
  both = [tuple(map(tuple, perm)) for name, perm in r["forward_backward"]
          if name == "ppermute"]
  shifts = [{j - i for i, j in perm} for perm in forward]
  assert shifts == [{1}, {1}, {2}, {2}, {4}, {1}], shifts
  assert both[:len(forward)] == forward
  backward = both[len(forward):]
  assert backward == [tuple((j, i) for i, j in perm) for perm in reversed(forward)]
  assert not any(name == "all_gather" for name, _ in r["forward_backward"])


def test_sequence_sharded_model_equals_the_whole_sequence():
  """A KDA DeltaLM (its short convolutions exchange halos) on packed rows over a (data 2,
  seq 4) mesh, documents crossing shards and starting inside a halo: loss and every parameter
  gradient."""
  (r,) = _checks("model")
  assert r["errors"]["loss"] < 1e-6, r
  assert max(r["errors"].values()) < 1e-5, r


def _run_checks(*argvs):
  """cp_checks.py once per argv, concurrently; the last JSON line each printed."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  script = os.path.join(TESTS, "cp_checks.py")
  procs = [subprocess.Popen([sys.executable, script, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for argv in argvs]
  outs = []
  for proc in procs:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out + err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  return outs


def _same_training(r, losses, metrics):
  np.testing.assert_allclose(losses, r["one"], rtol=1e-5)
  for k, v in r["eval_one"].items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-5, err_msg=k)


def test_training_with_the_sequence_split_composes_with_data_and_fsdp():
  """The training loop of a gated DeltaNet + attention model with --run.mesh_data=2
  --run.mesh_fsdp=2 --run.mesh_seq=2: the losses and held-out metrics of one device."""
  (r,) = _run_checks(["train"])
  assert r["mesh"] == {"data": 2, "fsdp": 2, "seq": 2}, r
  _same_training(r, r["eight"], r["eval_eight"])


@pytest.mark.skipif(not SLOW_TESTS,
                    reason="2 training processes (~1 min of CPU); set DELTAJAX_SLOW_TESTS=1")
def test_two_processes_with_the_sequence_split_across_them_train_like_one(tmp_path):
  """2 processes (jax.distributed on localhost, 4 CPU devices each) train with
  --run.mesh_seq=8, each sequence split across the processes: the losses and held-out
  metrics of one device (the "train" check, run beside them)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  r, *two = _run_checks(["train"], *(["process", str(pid), str(port), str(tmp_path)]
                                     for pid in (0, 1)))
  assert [(o["devices"], o["local"]) for o in two] == [(8, 4), (8, 4)]
  for o in two:
    _same_training(r, o["losses"], o["eval"])


# --- bad input (one device: a one-device mesh still binds the axis) --------------------------


def _inputs(op, T=8, K=16, V=8):
  """Abstract inputs (bad input is refused while tracing, before any compile)."""
  steps = (2,) if op == "delta_product" else ()
  shapes = {"q": (1, T, 1, K), "k": (1, T, *steps, 1, K), "v": (1, T, *steps, 1, V),
            "beta": (1, T, *steps, 1), "g": (1, T, 1)}
  names = {"delta_rule": "q k v beta", "gated_delta_rule": "q k v g beta"}[op].split()
  return tuple(jax.ShapeDtypeStruct(shapes[n], jnp.float32) for n in names)


def _on_one_device(fn, *args):
  """fn traced inside a shard_map over a one-device mesh (it binds the axis)."""
  mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
  time = jax.tree.map(lambda _: P(None, "seq"), args)
  return jax.eval_shape(jax.shard_map(fn, mesh=mesh, in_specs=time, out_specs=P(None, "seq")),
                        *args)


def test_ops_say_what_cp_axis_cannot_serve():
  """Unbound axis, not a name, an implementation that cannot take the widened values, and
  boundaries that are not the whole sequence's."""
  args = _inputs("delta_rule")
  with pytest.raises(ValueError, match="cp_axis='seq' is not a bound mesh axis"):
    jax.eval_shape(lambda *a: ops.delta_rule(*a, cp_axis="seq"), *args)
  with pytest.raises(ValueError, match="cp_axis must be a mesh axis name"):
    jax.eval_shape(lambda *a: ops.delta_rule(*a, cp_axis=3), *args)
  run = lambda *a: ops.delta_rule(*a, cu_seqlens=np.asarray([0, 3, 9]), cp_axis="seq")[0]
  with pytest.raises(ValueError, match="cu_seqlens must end at T=8; got 9"):
    _on_one_device(run, *args)
  wide = _inputs("gated_delta_rule", T=16, K=160, V=160)
  with pytest.raises(ValueError, match=r"cp_axis .* V \+ K = 320.*impl='pallas'"):
    _on_one_device(lambda *a: ops.gated_delta_rule(*a, impl="pallas", cp_axis="seq")[0], *wide)


def test_layers_say_what_sequence_sharding_cannot_serve():
  x = jax.ShapeDtypeStruct((1, 8, 16), jnp.float32)
  mixer = layers.GatedDeltaNet(16, 2, cp_axis="seq")
  params = jax.eval_shape(layers.GatedDeltaNet(16, 2).init, jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="cp_axis and cache cannot be combined"):
    jax.eval_shape(lambda p, x: mixer.apply(p, x, cache=mixer.init_cache(1)), params, x)
  with pytest.raises(ValueError, match="not an axis of the current mesh"):
    jax.eval_shape(mixer.apply, params, x)
  attn = layers.Attention(16, 2, cp_axis="seq")
  attn_params = jax.eval_shape(layers.Attention(16, 2).init, jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="Attention needs the whole sequence"):
    _on_one_device(lambda x: attn.apply(attn_params, x)[0], x)
  with pytest.raises(ValueError, match="'linear_attn' layers"):
    LMConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, mixer="linear_attn",
             cp_axis="seq")


def test_a_mesh_of_several_devices_checks_the_whole_sequence():
  bad = {r["bad"]: r["error"] for r in _checks("errors")}
  assert "must end at the whole sequence's T=32 (4 shards of 8 tokens" in bad["cu_seqlens"]
  assert "T=30 must be divisible by the size 4 of mesh axis cp_axis='seq'" in bad["T"]
  assert "data.seq_len: got 30, need a multiple of run.mesh_seq (4)" in bad["seq_len"]


def test_the_sequence_mesh_axis_says_what_it_needs():
  from deltajax.train import sharding  # pylint: disable=g-import-not-at-top
  from deltajax.train.config import RunConfig  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="run.mesh_seq: got 0, need >= 1"):
    RunConfig(mesh_seq=0)
  with pytest.raises(ValueError, match="run.mesh_seq: got 2, need a divisor of the 1 devices"):
    sharding.make_mesh(1, 1, jax.devices()[:1], seq=2)
  mesh = sharding.make_mesh(-1, 1, jax.devices()[:1], seq=1)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "seq": 1}


def test_the_benchmark_counts_collective_bytes_from_hlo():
  from deltajax.bench_cp import collective_bytes  # pylint: disable=g-import-not-at-top
  hlo = """
  %cp = f32[1,4,128,128]{3,2,1,0} collective-permute(f32[1,4,128,128]{3,2,1,0} %x), channel_id=1
  %cps = (f32[2,8]{1,0}, f32[2,8]{1,0}) collective-permute-start(f32[2,8]{1,0} %y)
  %cpd = f32[2,8]{1,0} collective-permute-done((f32[2,8]{1,0}, f32[2,8]{1,0}) %cps)
  %ar = bf16[16]{0} all-reduce(bf16[16]{0} %z), to_apply=%sum
  """
  assert collective_bytes(hlo) == {"collective-permute": 4 * 4 * 128 * 128 + 4 * 16,
                                   "all-reduce": 32}
