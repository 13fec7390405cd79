"""Temporal-sparsity demo: a per-frame ConvNet on generated videos of moving shapes.

The network is trained dense, then fine-tuned with Delta Activation Layers after every ReLU
(learned per-channel quantisation step, fan-out-weighted L1 on the deltas under a ProSparse-style
schedule). It reports the non-zeros of the dense ReLU activations against the non-zero deltas of
the fine-tuned network, the MACs a delta-based next layer would spend, and the accuracy.

Run: `python -m deltajax.sparsity.video` (about a minute or two on two CPU cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deltajax.sparsity import delta_activation as delta_lib
from deltajax.sparsity import metrics as M
from deltajax.sparsity.schedules import prosparse_l1_schedule

SHAPES = ("square", "disk", "cross", "ring")

# ----------------------------------------------------------------------------- data


def _shape_mask(kind: int, r: int, size: int, cy: int, cx: int) -> np.ndarray:
  """Boolean [size, size] footprint of shape `kind` with half-size r centred at (cy, cx)."""
  yy, xx = np.mgrid[:size, :size]
  dy, dx = yy - cy, xx - cx
  if kind == 0:
    return (np.abs(dy) <= r) & (np.abs(dx) <= r)
  if kind == 1:
    return dy * dy + dx * dx <= r * r + 0.5
  if kind == 2:
    return ((np.abs(dy) <= r) & (np.abs(dx) <= 0)) | ((np.abs(dx) <= r) & (np.abs(dy) <= 0))
  return ((np.abs(dy) <= r) & (np.abs(dx) <= r)) & ~((np.abs(dy) < r) & (np.abs(dx) < r))


def make_videos(n: int, *, seed: int, frames: int = 8, size: int = 16, noise: float = 0.02,
                background: float = 0.3):
  """(videos [n, frames, size, size, 1] float32, labels [n] int32: the shape class).

  One shape (square, disk, cross, ring; half-size 2 or 3, brightness 0.5 to 1) moves with a
  constant integer velocity in {-1, 0, 1}^2 (not both 0) over a static smooth background
  texture; small per-frame sensor noise. Deterministic by seed.
  """
  rng = np.random.default_rng(seed)
  videos = np.zeros((n, frames, size, size, 1), np.float32)
  labels = rng.integers(0, len(SHAPES), n).astype(np.int32)
  coarse = rng.uniform(-1, 1, (n, size // 4, size // 4))
  textures = np.kron(coarse, np.ones((4, 4))) * background  # static per video
  for i in range(n):
    r = int(rng.integers(2, 4))
    while True:
      v = rng.integers(-1, 2, 2)
      if v.any():
        break
    span = (frames - 1) * np.abs(v)
    lo = r + np.where(v < 0, span, 0)
    hi = size - 1 - r - np.where(v > 0, span, 0)
    c0 = np.array([rng.integers(lo[j], hi[j] + 1) for j in range(2)])
    amp = rng.uniform(0.5, 1.0)
    for t in range(frames):
      cy, cx = c0 + t * v
      frame = textures[i].copy()
      frame[_shape_mask(int(labels[i]), r, size, cy, cx)] = amp
      videos[i, t, :, :, 0] = frame
  videos += rng.normal(0, noise, videos.shape).astype(np.float32)
  return videos, labels


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class NetConfig:
  """Channels of the three convolutions, hidden width, classes; `delta` configures the Delta
  layers after every ReLU (`quantize=False` makes them pure probes: the dense network)."""
  channels: tuple[int, int, int] = (8, 16, 16)
  hidden: int = 64
  classes: int = len(SHAPES)
  delta: delta_lib.DeltaConfig = delta_lib.DeltaConfig(quantize=False)


class VideoNet(nn.Module):
  """Per-frame ConvNet; logits averaged over time. videos [B, T, H, W, 1] -> logits [B, C]."""
  config: NetConfig = NetConfig()

  @nn.compact
  def __call__(self, videos):
    cfg = self.config
    B, T = videos.shape[:2]
    c1, c2, c3 = cfg.channels

    def per_frame(layer, h):  # [B, T, ...] -> layer on [B*T, ...] -> [B, T, ...]
      out = layer(h.reshape(B * T, *h.shape[2:]))
      return out.reshape(B, T, *out.shape[1:])

    def delta(h, fan_out):
      return delta_lib.DeltaActivation(dataclasses.replace(cfg.delta, fan_out=fan_out))(h)

    h = nn.relu(per_frame(nn.Conv(c1, (3, 3)), videos))
    h = delta(h, 9 * c2)
    h = nn.relu(per_frame(nn.Conv(c2, (3, 3), strides=2), h))
    h = delta(h, 9 * c3)
    h = nn.relu(per_frame(nn.Conv(c3, (3, 3), strides=2), h))
    h = h.reshape(B, T, -1)
    h = delta(h, cfg.hidden)
    h = nn.relu(nn.Dense(cfg.hidden)(h))
    h = delta(h, cfg.classes)
    return jnp.mean(nn.Dense(cfg.classes)(h), axis=1)


def _delta_layers(metrics) -> list[dict]:
  """The sown metrics of each Delta layer, in order, as dicts of scalars."""
  names = sorted(metrics, key=lambda n: int(n.rsplit("_", 1)[1]))
  return [{k: v[0] for k, v in metrics[n].items()} for n in names]


# ----------------------------------------------------------------------------- training


def _loss_fn(model, frames):
  """Cross-entropy + coef * (sum of the layers' delta_l1) / (dense MACs per frame)."""

  def loss(params, videos, labels, coef):
    logits, state = model.apply({"params": params}, videos, mutable=["metrics"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    layers = _delta_layers(state["metrics"])
    per_frame_macs = sum(m["dense_macs"] for m in layers) / (videos.shape[0] * (frames - 1))
    l1 = sum(m["delta_l1"] for m in layers) / jax.lax.stop_gradient(per_frame_macs)
    return ce + coef * l1, (ce, l1)

  return loss


def train(model, params, videos, labels, *, steps: int, lr: float, batch: int, seed: int,
          coef_schedule=lambda step: 0.0):
  """Adam with cosine decay; returns the trained params."""
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
  opt = tx.init(params)
  loss = _loss_fn(model, videos.shape[1])

  @jax.jit
  def step_fn(params, opt, step, xb, yb):
    (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, xb, yb, coef_schedule(step))
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, aux

  rng = np.random.default_rng(seed)
  for step in range(steps):
    idx = rng.integers(0, len(videos), batch)
    params, opt, _ = step_fn(params, opt, step, videos[idx], labels[idx])
  return params


def evaluate(model, params, videos, labels, batch: int = 256) -> dict:
  """Accuracy and exact non-zero counts over all Delta layers (host floats).

  Counts use each Delta layer's value y (captured): nonzero(y) over all frames ("act"), the
  deltas of frames 1..T-1 ("delta"), frame 0 sent dense ("first"); MACs weight each layer by
  its fan-out (from the sown metrics): on deltas, on non-zero activations, and fully dense.
  """
  def is_delta(mdl, _):
    return isinstance(mdl, delta_lib.DeltaActivation)

  @jax.jit
  def run(xb, yb):
    logits, state = model.apply({"params": params}, xb, mutable=["metrics", "intermediates"],
                                capture_intermediates=is_delta)
    names = sorted(state["intermediates"], key=lambda n: int(n.rsplit("_", 1)[1]))
    out = {k: 0.0 for k in ("act_nz", "act_n", "delta_nz", "rest_n", "first_nz", "eff_macs",
                            "act_macs", "dense_macs")}
    out["layers"] = []
    for name, m in zip(names, _delta_layers(state["metrics"])):
      y = state["intermediates"][name]["__call__"][0]
      fan = m["dense_macs"] / y[:, 1:].size
      d = delta_lib.temporal_delta(y)[:, 1:]
      out["act_nz"] += M.nonzero_count(y)
      out["act_n"] += y.size
      out["delta_nz"] += M.nonzero_count(d)
      out["rest_n"] += d.size
      out["first_nz"] += M.nonzero_count(y[:, 0])
      out["eff_macs"] += fan * M.nonzero_count(d)
      out["act_macs"] += fan * M.nonzero_count(y[:, 1:])
      out["dense_macs"] += m["dense_macs"]
      out["layers"].append(jnp.stack([M.nonzero_count(y) / y.size, M.nonzero_count(d) / d.size]))
    return jnp.sum(jnp.argmax(logits, -1) == yb), out

  tot, correct = {}, 0
  for i in range(0, len(videos), batch):
    xb, yb = videos[i:i + batch], labels[i:i + batch]
    c, out = run(xb, yb)
    correct += int(c)
    layers = np.asarray(out.pop("layers"))
    tot["layers"] = tot.get("layers", 0.0) + layers * len(xb) / len(videos)  # densities
    for k, v in out.items():
      tot[k] = tot.get(k, 0.0) + float(v)
  tot["accuracy"] = correct / len(videos)
  return tot


def reset_steps(params, step_init: float):
  """The params with every Delta layer's learned step set to `step_init` (the dense model's
  probes carry an unused one)."""
  return {k: ({"log_step": jnp.full_like(v["log_step"], np.log(step_init))}
              if k.startswith("DeltaActivation") else v) for k, v in params.items()}


def delta_inference_error(model, params, videos) -> float:
  """Relative max error of running the second convolution on the first Delta layer's deltas
  (bias-free, accumulated over time, bias added once) against running it on the values."""
  return float(_delta_inference_error(model, params, videos))


@functools.partial(jax.jit, static_argnums=0)
def _delta_inference_error(model, params, videos):
  _, state = model.apply({"params": params}, videos, mutable=["intermediates"],
                         capture_intermediates=lambda m, _: isinstance(
                             m, delta_lib.DeltaActivation))
  y = state["intermediates"]["DeltaActivation_0"]["__call__"][0]  # [B, T, H, W, C]
  B, T = y.shape[:2]
  conv = params["Conv_1"]
  c2 = conv["kernel"].shape[-1]
  frames = lambda a: a.reshape(B * T, *a.shape[2:])
  apply = lambda a, bias: nn.Conv(c2, (3, 3), strides=2, use_bias=bias).apply(
      {"params": conv if bias else {"kernel": conv["kernel"]}}, frames(a))
  dense = apply(y, True)
  from_deltas = jnp.cumsum(apply(delta_lib.temporal_delta(y), False).reshape(
      B, T, *dense.shape[1:]), axis=1).reshape(dense.shape) + conv["bias"]
  return jnp.max(jnp.abs(from_deltas - dense)) / jnp.max(jnp.abs(dense))


def _row(name: str, r: dict) -> str:
  return (f"{name:<24} acc {100 * r['accuracy']:5.1f}%  act density {r['act_nz'] / r['act_n']:.3f}"
          f"  delta density {r['delta_nz'] / r['rest_n']:.3f}"
          f"  MACs on deltas {r['eff_macs'] / r['dense_macs']:.3f} of dense")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--train", type=int, default=4096)
  p.add_argument("--test", type=int, default=1024)
  p.add_argument("--dense-steps", type=int, default=600)
  p.add_argument("--finetune-steps", type=int, default=400)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--l1", type=float, default=50.0, help="final L1 coefficient")
  p.add_argument("--step-init", type=float, default=0.3, help="initial quantisation step")
  args = p.parse_args(argv)
  t0 = time.time()
  xtr, ytr = make_videos(args.train, seed=args.seed)
  xte, yte = make_videos(args.test, seed=args.seed + 1)

  dense = VideoNet(NetConfig())
  params = dense.init(jax.random.PRNGKey(args.seed), xtr[:2])["params"]
  params = train(dense, params, xtr, ytr, steps=args.dense_steps, lr=args.lr, batch=args.batch,
                 seed=args.seed)
  rd = evaluate(dense, params, xte, yte)
  t1 = time.time()

  cfg = delta_lib.DeltaConfig(mode="quantized", step="channel", step_init=args.step_init)
  sparse = VideoNet(NetConfig(delta=cfg))
  before = evaluate(sparse, reset_steps(params, args.step_init), xte, yte)
  n = args.finetune_steps
  coef = prosparse_l1_schedule([args.l1 / 4, args.l1 / 2, args.l1], [n // 4, n // 4, n // 4],
                               warmup_steps=n // 8, rise_fraction=0.5)
  params_d = train(sparse, reset_steps(params, args.step_init), xtr, ytr, steps=n, lr=args.lr / 3, batch=args.batch,
                   seed=args.seed + 1, coef_schedule=coef)
  rs = evaluate(sparse, params_d, xte, yte)
  t2 = time.time()

  print(f"moving shapes {SHAPES}: train {args.train}, test {args.test} videos of "
        f"{xtr.shape[1]} frames {xtr.shape[2]}x{xtr.shape[3]}; seed {args.seed}")
  print(_row("dense (ReLU)", rd))
  print(_row("quantised, no fine-tune", before))
  print(_row("delta fine-tuned", rs))
  ratio = rd["act_nz"] / rd["act_n"] / (rs["delta_nz"] / rs["rest_n"])
  sent = (rs["first_nz"] + rs["delta_nz"]) / (rd["act_nz"])
  print(f"non-zero dense ReLU activations / non-zero deltas (frames 1..T-1): {ratio:.2f}x")
  print(f"non-zeros sent incl. the dense first frame, relative to dense ReLU: {sent:.3f} "
        f"({1 / sent:.2f}x fewer)")
  print(f"next-layer MACs: dense {rd['dense_macs']:.3g}, zero-skipping ReLU {rd['act_macs']:.3g}, "
        f"deltas {rs['eff_macs']:.3g} ({rd['act_macs'] / max(rs['eff_macs'], 1):.2f}x fewer "
        f"than zero-skipping)")
  print(f"accuracy: dense {100 * rd['accuracy']:.1f}%, delta {100 * rs['accuracy']:.1f}% "
        f"({100 * (rs['accuracy'] - rd['accuracy']):+.1f} points)")
  print("per Delta layer (act density, delta density): dense "
        + ", ".join(f"({a:.3f}, {d:.3f})" for a, d in rd["layers"]) + "; fine-tuned "
        + ", ".join(f"({a:.3f}, {d:.3f})" for a, d in rs["layers"]))
  print(f"delta inference (2nd conv on accumulated deltas vs on values): relative max error "
        f"{delta_inference_error(sparse, params_d, xte[:16]):.1e}")
  print(f"time: dense {t1 - t0:.0f}s, fine-tune {t2 - t1:.0f}s")


if __name__ == "__main__":
  main()
