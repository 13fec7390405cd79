"""The training loop: `train_and_evaluate(config, workdir)`.

A pure `train_step(state, batch) -> (state, metrics)` is jitted with the state donated and
sharded; gradient accumulation is a `lax.scan` over micro-batches inside the step, so one step
is one optimiser update whatever the accumulation. The host loop takes this process's rows of
each batch from a grain iterator (which prefetches in background threads), logs, evaluates
and checkpoints the state together with the iterator's position.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deltajax.core import flops as flops_lib
from deltajax.train import checkpoint as ckpt_lib
from deltajax.train import metrics as metrics_lib
from deltajax.train import sharding as shard_lib
from deltajax.train.config import Config, to_dict
from deltajax.train.data import Source, read_options


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; the run stopped and its last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass
class Result:
  """What a finished (or stopped) run returns."""
  step: int
  workdir: str
  eval: dict[str, float]
  losses: list[float]
  plot: str | None
  checkpoint_dir: str


def make_model(model_config):
  from deltajax.models import DeltaLM  # pylint: disable=g-import-not-at-top
  return DeltaLM(model_config)


def learning_rate(optim, total_steps: int) -> optax.Schedule:
  """Linear warmup to optim.lr, cosine decay to final_lr_fraction * lr at total_steps."""
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      0.0, optim.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=optim.lr * optim.final_lr_fraction)


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; weight decay only on matrices (not norms, biases)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(learning_rate(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask))


def _sown_metrics(collection: dict) -> dict[str, jax.Array]:
  """The model's "metrics" collection ({path: tuple of sown values}) -> {"metrics/path": mean}."""
  flat = flax.traverse_util.flatten_dict(collection, sep="/")
  out = {}
  for k, vals in flat.items():
    vals = vals if isinstance(vals, (tuple, list)) else (vals,)
    out["metrics/" + k] = jnp.mean(jnp.stack([jnp.mean(jnp.asarray(v, jnp.float32))
                                              for v in vals]))
  return out


def forward_stats(model, params, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sums over one batch [B, T]: weighted cross-entropy, weight, correct predictions, plus
  per-row "all weighted positions correct" and "last position correct" counts."""
  logits, state = model.apply({"params": params}, batch["inputs"],
                              segment_ids=batch.get("segment_ids"), mutable=["metrics"])
  logits = logits.astype(jnp.float32)
  w = batch["weights"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  right = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(ce * w), "weight": jnp.sum(w), "correct": jnp.sum(right * w),
          "rows": jnp.asarray(w.shape[0], jnp.float32),
          "rows_correct": jnp.sum(jnp.all((right > 0) | (w == 0), axis=-1)),
          "last_correct": jnp.sum(right[:, -1])}
  return sums["loss_sum"], {**sums, **_sown_metrics(state.get("metrics", {}))}


def make_train_step(model, tx) -> Callable:
  """train_step(state, batch) with batch arrays [A, B/A, T] (A micro-batches)."""

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def micro(grads, mb):
      def loss_fn(params):
        loss_sum, aux = forward_stats(model, params, mb)
        return loss_sum / total_weight, aux
      (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      return jax.tree.map(jnp.add, grads, g), aux

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, aux = jax.lax.scan(micro, zeros, batch)
    aux = jax.tree.map(jnp.sum, aux)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    loss = aux["loss_sum"] / total_weight
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     opt_state=opt_state)
    # A non-finite step leaves the state untouched, so whatever is saved stays good.
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
    n_micro = batch["weights"].shape[0]
    metrics = {"loss": loss, "accuracy": aux["correct"] / total_weight, "grad_norm": grad_norm,
               **{k: v / n_micro for k, v in aux.items() if k.startswith("metrics/")}}
    return new, metrics

  return train_step


def make_eval_step(model) -> Callable:
  def eval_step(params, batch):
    return forward_stats(model, params, batch)[1]
  return eval_step


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled pieces of a run: model, optimiser, shardings and jitted functions."""
  model: Any
  tx: Any
  state_sharding: Any
  abstract_state: Any
  init: Callable
  train_step: Callable
  eval_step: Callable


def build_steps(model_config, optim, total_steps: int, seq_len: int, mesh) -> Steps:
  """Model, optimiser, sharded state layout and the jitted init / train / eval steps."""
  model = make_model(model_config)
  tx = make_optimizer(optim, total_steps)
  dummy = jnp.zeros((1, seq_len), jnp.int32)

  def init_boxed(rng):
    # Parameters carry logical axis names (nn.Partitioned); the optimiser moments built from
    # them carry the same names, so both are sharded alike.
    params = model.init(rng, dummy)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
  abstract = nn.unbox(boxed)
  state_sh = shard_lib.state_shardings(abstract, mesh, nn.get_partition_spec(boxed))
  micro_sh = shard_lib.batch_sharding(mesh, micro=True)
  return Steps(
      model=model, tx=tx, state_sharding=state_sh,
      abstract_state=ckpt_lib.abstract_like(abstract, state_sh),
      init=jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=state_sh),
      train_step=jax.jit(make_train_step(model, tx), in_shardings=(state_sh, micro_sh),
                         out_shardings=(state_sh, None), donate_argnums=0),
      eval_step=jax.jit(make_eval_step(model),
                        in_shardings=(state_sh.params, shard_lib.batch_sharding(mesh))))


# Runs of the same model, optimiser and mesh in one process (a resume, a comparison) reuse
# the compiled steps instead of compiling again.
_cached_steps = functools.lru_cache(maxsize=4)(build_steps)


class Trainer:
  """The data pipeline and compiled steps for a Config, on `mesh` (default: run.mesh_*)."""

  def __init__(self, config: Config, mesh=None):
    self.config = config
    self.source = Source(config.data)
    if config.model.vocab_size < self.source.vocab_size:
      raise ValueError(f"model.vocab_size: got {config.model.vocab_size}, need >= "
                       f"{self.source.vocab_size} for data.task={config.data.task!r}")
    self.mesh = mesh or shard_lib.make_mesh(config.run.mesh_data, config.run.mesh_fsdp)
    n_dev = self.mesh.size
    b, accum = config.data.batch_size, config.optim.grad_accum_steps
    if b % accum or (b // accum) % n_dev:
      raise ValueError(f"data.batch_size: got {b}, need a multiple of optim.grad_accum_steps "
                       f"({accum}) x devices ({n_dev})")
    key = (config.model, config.optim, config.run.steps, config.data.seq_len, self.mesh)
    try:
      steps = _cached_steps(*key)
    except TypeError:  # an unhashable model config (e.g. a module as mlp_sparsity)
      steps = build_steps(*key)
    self.steps = steps
    self.model, self.tx = steps.model, steps.tx
    self.state_sharding, self.abstract_state = steps.state_sharding, steps.abstract_state
    self.train_step, self.eval_step, self._init = steps.train_step, steps.eval_step, steps.init
    self.micro_sharding = shard_lib.batch_sharding(self.mesh, micro=True)
    self.eval_sharding = shard_lib.batch_sharding(self.mesh)
    self._shard = (jax.process_index(), jax.process_count())
    # This process's rows of every training batch, by random access (grain MapDataset).
    self.train_batches = self.source.batches("train", config.data.seq_len, b, *self._shard)

  def fresh_state(self) -> TrainState:
    """Parameters and optimiser state created directly in their shards."""
    return self._init(jax.random.PRNGKey(self.config.run.seed))

  def train_iterator(self) -> grain.DatasetIterator:
    """An iterator over this process's training batches from the first; its state (the next
    batch index) is what checkpoints save."""
    return iter(self.train_batches.to_iter_dataset(read_options()))

  def put_train_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows [B / processes, T] -> global micro-batches [A, B / A, T], sharded."""
    accum = self.config.optim.grad_accum_steps
    local = {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in local.items()}
    return shard_lib.put_batch(local, self.micro_sharding, rows_axis=1)

  def train_batch(self, step: int) -> dict[str, jax.Array]:
    """Training batch `step` (what the iterator yields at that position), on the devices."""
    return self.put_train_batch(self.train_batches[step])

  def evaluate(self, params) -> dict[str, float]:
    """Held-out accuracy and loss at every eval length."""
    d, out = self.config.data, {}
    for length in d.eval_lengths:
      tot: dict[str, float] = {}
      batches = self.source.batches("eval", length, d.batch_size, *self._shard)
      for i in range(self.config.run.eval_batches):
        batch = shard_lib.put_batch(batches[i], self.eval_sharding)
        for k, v in jax.device_get(self.eval_step(params, batch)).items():
          tot[k] = tot.get(k, 0.0) + float(v)
      w = max(tot["weight"], 1.0)
      out[f"eval/loss@{length}"] = tot["loss_sum"] / w
      out[f"eval/accuracy@{length}"] = tot["correct"] / w
      out[f"eval/seq_accuracy@{length}"] = tot["rows_correct"] / tot["rows"]
      if d.task not in ("mqar", "selective_copy", "text"):
        out[f"eval/last_accuracy@{length}"] = tot["last_correct"] / tot["rows"]
    return out


def _tokens_flops(config: Config) -> float | None:
  try:
    from deltajax.models import flops_per_token  # pylint: disable=g-import-not-at-top
    return float(flops_per_token(config.model, config.data.seq_len))
  except (ImportError, TypeError, ValueError):
    return None


def train_and_evaluate(config: Config, workdir: str, *, mesh=None, quiet: bool = False) -> Result:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Raises NonFiniteLossError (after keeping the last good checkpoint) if the loss becomes
  NaN/Inf.
  """
  run = config.run
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, mesh)
  with contextlib.ExitStack() as cleanup:  # closed in reverse order, on every way out
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), run.keep_checkpoints)
    cleanup.callback(ckpt.close)  # waits for the last save
    data = trainer.train_iterator()
    cleanup.callback(data.close)
    start = ckpt.latest_step() or 0
    state = (ckpt.restore(start, trainer.abstract_state, data) if start
             else trainer.fresh_state())
    console = metrics_lib.Progress(run.steps, start, enabled=not quiet)
    cleanup.callback(console.close)
    if start:
      console.print(f"resumed from step {start} ({ckpt.directory})")
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(to_dict(config), f, indent=1)
    jsonl = os.path.join(workdir, "metrics.jsonl")
    metrics_lib.truncate_jsonl(jsonl, start)
    writer = metrics_lib.Writer(workdir, run.tensorboard)
    cleanup.callback(writer.close)

    def log(record):
      writer.write(record)
      console.record(record)

    peak = flops_lib.peak_flops(jax.devices()[0])
    flops_tok = _tokens_flops(config) if peak else None
    tokens_per_step = config.data.batch_size * config.data.seq_len
    schedule = learning_rate(config.optim, run.steps)
    losses: list[float] = []
    window: dict[str, float] = {}
    # Throughput counts steps after the first one of this process (which includes compiling).
    n_window, n_timed, t_window = 0, 0, time.time()
    last_eval: dict[str, float] = {}
    for step in range(start + 1, run.steps + 1):
      state, m = trainer.train_step(state, trainer.put_train_batch(next(data)))
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      if not math.isfinite(m["loss"]):
        kept = ckpt.latest_step()
        raise NonFiniteLossError(
            f"loss is {m['loss']} at step {step}: stopping. The update was not applied; the "
            f"last good checkpoint is step {kept} in {ckpt.directory}. Try a lower "
            "--optim.lr or --optim.clip_norm, or --model.dtype=float32.")
      losses.append(m["loss"])
      console.advance(step)
      for k, v in m.items():
        window[k] = window.get(k, 0.0) + v
      n_window += 1
      n_timed += 1
      if step == start + 1:
        n_timed, t_window = 0, time.time()
      if step % run.log_every == 0 or step == run.steps:
        dt = time.time() - t_window
        rec = {"step": step, **{k: v / n_window for k, v in window.items()},
               "lr": float(schedule(step - 1))}
        if n_timed:
          rec["tokens_per_s"] = n_timed * tokens_per_step / dt
        if flops_tok and peak and n_timed:
          rec["mfu"] = rec["tokens_per_s"] * flops_tok / (peak * trainer.mesh.size)
        log(rec)
        window, n_window, n_timed, t_window = {}, 0, 0, time.time()
      if run.eval_every and step % run.eval_every == 0 and step != run.steps:
        last_eval = trainer.evaluate(state.params)
        log({"step": step, **last_eval})
        n_timed, t_window = 0, time.time()
      if run.stop_at and step == run.stop_at:
        console.print(f"stopping at step {step} (run.stop_at) without a final checkpoint")
        return Result(step, workdir, last_eval, losses, None, ckpt.directory)
      if run.checkpoint_every and step % run.checkpoint_every == 0 and step != run.steps:
        ckpt.save(step, state, data)
    step = run.steps
    if start < run.steps or not last_eval:
      last_eval = trainer.evaluate(state.params)
      log({"step": step, **last_eval})
    if ckpt.latest_step() != step:
      ckpt.save(step, state, data)
  plot = None
  if run.plot and jax.process_index() == 0:
    plot = metrics_lib.plot_curves(jsonl, os.path.join(workdir, "curves.png"),
                                   f"{config.preset}: {config.model.mixer} on {config.data.task}")
  return Result(step, workdir, last_eval, losses, plot, ckpt.directory)
