"""Context-parallel checks on 8 fake CPU devices, run as a script in its own process
(`python tests/cp_checks.py GROUP`) so the rest of the suite keeps one device.

Each case runs an op inside `jax.shard_map` with the time axis split over D devices and
compares it with the same op on the whole sequence: outputs, final states and the gradient of
every input (`jax.vjp` with random cotangents), relative RMS error below 1e-5. Prints one JSON
line per case: {"case": ..., "errors": {name: error}}.
"""
from __future__ import annotations

import json
import os
import sys

# 8 devices; 4 a process in the 2-process run ("process").
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                           + ("4" if sys.argv[1:2] == ["process"] else "8"))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.extend  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # noqa: E402  pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_inputs, rel_rms  # noqa: E402  pylint: disable=g-import-not-at-top
from op_test_base import _names  # noqa: E402  pylint: disable=g-import-not-at-top

from deltajax import ops  # noqa: E402  pylint: disable=g-import-not-at-top


def mesh_of(D: int):
  return jax.make_mesh((D,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:D])


def run_case(op, D, *, impl="chunk", h0=True, final=True, cu=None, B=1, T=32, H=1, HV=2,
             check_vma=True, **shape):
  """Errors of the op sharded over D devices against the whole sequence."""
  N = None if cu is None else len(cu) - 1 if np.ndim(cu) == 1 else B * (len(cu[0]) - 1)
  args, state = make_inputs(op, B=B, T=T, H=H, HV=HV, N=N, **shape)
  state = state if h0 else None
  cu = None if cu is None else jnp.asarray(cu, jnp.int32)
  fn = getattr(ops, op)

  def call(cp_axis):
    return lambda args, state, cu: fn(*args, initial_state=state, output_final_state=final,
                                      cu_seqlens=cu, chunk_size=16, impl=impl, cp_axis=cp_axis)

  def vjp(f):
    def go(args, state, cu):
      out, back = jax.vjp(lambda a, s: f(a, s, cu), args, state)
      cts = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape),
                         out)
      return out, back(cts)
    return jax.jit(go)

  time = jax.tree.map(lambda _: P(None, "seq"), args)
  sharded = jax.shard_map(call("seq"), mesh=mesh_of(D), in_specs=(time, P(), P()),
                          out_specs=(P(None, "seq"), P()), check_vma=check_vma)
  got = vjp(sharded)(args, state, cu)
  want = vjp(call(None))(args, state, cu)
  names = ("o", "final") + tuple(f"d{n}" for n in _names(op))
  flat = lambda x: [a for a in jax.tree.leaves(x, is_leaf=lambda a: a is None)]
  return {n: rel_rms(a, b) for n, a, b in zip(names, flat(got), flat(want))
          if a is not None}


# Documents across shard boundaries at T = 32: with D = 8 (4 tokens a shard) the second
# spans shards 1-3 and starts and ends inside shards; an empty one; the last starts on a
# shard boundary. With D = 2 the fourth crosses the middle.
CU = (0, 5, 14, 14, 24, 32)
# (op, D, options), grouped value heads (HV = 2 H) throughout: each op once; D = 8 and 2;
# initial and final states per stream and per document; packed documents with the states as
# rows (h0 or final asked for) and as two rows a stream (neither); chunk as the local
# implementation, and recurrent (the local run is any implementation's; the token loop
# compiles in half the time).
OP_CASES = [
    ("delta_rule", 8, dict(impl="recurrent")),
    ("gated_delta_rule", 8, dict(cu=CU)),
    ("kda", 2, dict(cu=CU, h0=False, final=False)),
    ("delta_product", 8, dict(cu=((0, 3, 17, 32), (0, 0, 30, 32)), B=2, impl="recurrent",
                              h0=False, final=False)),
]


def ops_group() -> None:
  for op, D, kw in OP_CASES:
    errors = run_case(op, D, **kw)
    print(json.dumps({"case": f"{op} D={D} {kw}", "errors": errors}), flush=True)


def _collectives(jaxpr, found):
  """Every ppermute (its pairs), psum and all_gather in `jaxpr` and the jaxprs inside it."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("ppermute", "psum", "all_gather", "psum_invariant"):
      found.append((eqn.primitive.name, tuple(eqn.params.get("perm", ()))))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _collectives(sub.jaxpr, found)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _collectives(sub, found)
  return found


def mirror_group() -> None:
  """The collectives of the forward, and of the forward+backward, of one sharded op."""
  D = 8
  args, state = make_inputs("gated_delta_rule", B=1, T=32, H=1, HV=2)
  fn = lambda a, s: ops.gated_delta_rule(*a, initial_state=s, output_final_state=True,
                                         chunk_size=16, cp_axis="seq")
  time = jax.tree.map(lambda _: P(None, "seq"), args)
  sharded = jax.shard_map(fn, mesh=mesh_of(D), in_specs=(time, P()),
                          out_specs=(P(None, "seq"), P()))
  loss = lambda a, s: sum(jnp.sum(x * x) for x in sharded(a, s))
  forward = _collectives(jax.make_jaxpr(sharded)(args, state).jaxpr, [])
  both = _collectives(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(args, state).jaxpr, [])
  print(json.dumps({"forward": forward, "forward_backward": both}), flush=True)


def errors_group() -> None:
  """The ValueErrors of bad input that only a mesh of several devices shows (traced, not
  compiled)."""
  from deltajax import layers  # pylint: disable=g-import-not-at-top
  from deltajax.train import loop  # pylint: disable=g-import-not-at-top
  from deltajax.train.presets import build_config  # pylint: disable=g-import-not-at-top
  mesh = mesh_of(4)
  args = tuple(jax.ShapeDtypeStruct(s, jnp.float32)
               for s in [(1, 32, 1, 16), (1, 32, 1, 16), (1, 32, 1, 8), (1, 32, 1)])
  op = lambda *a: ops.delta_rule(*a, cu_seqlens=np.asarray([0, 3, 8]), cp_axis="seq")[0]
  time = jax.tree.map(lambda _: P(None, "seq"), args)
  mixer = layers.GatedDeltaNet(16, 2, cp_axis="seq")
  x = jax.ShapeDtypeStruct((1, 30, 16), jnp.float32)
  params = jax.eval_shape(layers.GatedDeltaNet(16, 2).init, jax.random.PRNGKey(0), x)
  cfg = build_config("mqar", {"data.seq_len": "30", "run.mesh_seq": "4", "data.batch_size": "8",
                              "data.vocab_size": "16", "data.num_kv_pairs": "2"})
  tries = {"cu_seqlens": lambda: jax.eval_shape(jax.shard_map(
               op, mesh=mesh, in_specs=time, out_specs=P(None, "seq")), *args),
           "T": lambda: jax.eval_shape(mixer.apply, params, x),
           "seq_len": lambda: loop.Trainer(cfg)}
  for name, fn in tries.items():
    try:
      with jax.set_mesh(mesh):
        fn()
      message = None
    except ValueError as e:
      message = str(e)
    print(json.dumps({"bad": name, "error": message}), flush=True)


def model_group() -> None:
  """A KDA DeltaLM (short convolutions) with packed rows on a (data 2, seq 4) mesh: the loss
  and every parameter's gradient against the unsharded model. (Attention: the train check.)"""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from deltajax.models import DeltaLM, LMConfig  # pylint: disable=g-import-not-at-top
  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=auto)
  cfg = LMConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, mixer="kda",
                 impl="recurrent")
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, 32)
  # Documents cross shard boundaries (8 tokens a shard) and start inside the conv's halo.
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 10 + [4] * 13, [7] * 3 + [8] * 29], jnp.int32)

  def loss(model):
    def f(params, tokens, seg):
      logits = model.apply(params, tokens, segment_ids=seg)
      gold = jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
      return jnp.mean(jax.nn.logsumexp(logits, -1) - gold)
    return jax.jit(jax.value_and_grad(f))

  whole = DeltaLM(cfg)
  params = whole.init(jax.random.PRNGKey(1), tokens)
  want = loss(whole)(params, tokens, seg)
  rows = NamedSharding(mesh, P("data", "seq"))
  with jax.set_mesh(mesh):
    got = loss(DeltaLM(dataclasses.replace(cfg, cp_axis="seq")))(
        params, jax.device_put(tokens, rows), jax.device_put(seg, rows))
  names = ["loss"] + [jax.tree_util.keystr(k) for k, _ in
                      jax.tree_util.tree_flatten_with_path(want[1])[0]]
  errors = {n: rel_rms(a, b) for n, a, b in
            zip(names, jax.tree.leaves(got), jax.tree.leaves(want))}
  print(json.dumps({"case": "DeltaLM kda, data 2 x seq 4", "errors": errors}), flush=True)


def _train_overrides(**mesh) -> dict[str, str]:
  return {"model.d_model": "16", "model.num_layers": "2", "model.num_heads": "2",
          "model.pattern": "gated_deltanet,attn", "model.impl": "recurrent",
          "data.seq_len": "32", "data.vocab_size": "16", "data.num_kv_pairs": "2",
          "data.batch_size": "8", "run.eval_batches": "1", "run.log_every": "1",
          "run.eval_every": "0", "run.tensorboard": "false", "run.plot": "false",
          "optim.warmup_steps": "2", "run.steps": "3", "run.checkpoint_every": "0",
          **{f"run.mesh_{k}": str(v) for k, v in mesh.items()}}


def train_group() -> None:
  """The training entry point on a (data 2, fsdp 2, seq 2) mesh from --run.mesh_* options,
  and on one device: the losses of 3 steps and the held-out metrics."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from deltajax.train import loop, sharding  # pylint: disable=g-import-not-at-top
  from deltajax.train.presets import build_config  # pylint: disable=g-import-not-at-top
  cfg = build_config("mqar", _train_overrides(data=2, fsdp=2, seq=2))
  with tempfile.TemporaryDirectory() as tmp:
    one = loop.train_and_evaluate(cfg, tmp + "/one", quiet=True,
                                  mesh=sharding.make_mesh(1, 1, jax.devices()[:1]))
    trainer = loop.Trainer(cfg)
    eight = loop.train_and_evaluate(cfg, tmp + "/eight", quiet=True)
  print(json.dumps({"mesh": dict(trainer.mesh.shape), "one": one.losses,
                    "eight": eight.losses, "eval_one": one.eval, "eval_eight": eight.eval}),
        flush=True)


def process_group() -> None:
  """One of 2 processes (jax.distributed on localhost, 4 CPU devices each) training with the
  sequence split over all 8 devices, across the processes: argv process id, port, workdir."""
  pid, port, workdir = int(sys.argv[2]), sys.argv[3], sys.argv[4]
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                             initialization_timeout=120)
  from deltajax.train import loop  # pylint: disable=g-import-not-at-top
  from deltajax.train.presets import build_config  # pylint: disable=g-import-not-at-top
  cfg = build_config("mqar", _train_overrides(data=1, fsdp=1, seq=8))
  result = loop.train_and_evaluate(cfg, workdir, quiet=True)
  print(json.dumps({"devices": len(jax.devices()), "local": jax.local_device_count(),
                    "losses": result.losses, "eval": result.eval}), flush=True)


GROUPS = {"ops": ops_group, "mirror": mirror_group, "errors": errors_group,
          "model": model_group, "train": train_group, "process": process_group}

if __name__ == "__main__":
  GROUPS[sys.argv[1]]()
