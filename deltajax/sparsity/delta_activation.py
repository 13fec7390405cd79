"""Delta Activation Layer (temporal sparsity; Yousefzadeh & Sifalakis 2021, DeltaRNN).

Activations x [B, T, *features] (time on axis 1) are quantised with a learned step q,
y = q * round(x / q) (straight-through rounding), and the layer passes on the change from the
previous frame, Delta_t = y_t - y_{t-1} with Delta_0 = y_0. A bias-free linear layer W after it
can run on the deltas: cumsum_t(W Delta_t) = W y_t, so delta inference reproduces the dense
quantised network while only the non-zero deltas cost MACs.

Modes:
  "quantized"  output y; the deltas are only penalised and counted (training with the penalty).
  "delta"      output Delta (the next layer must accumulate over time, see `accumulate`).
  "threshold"  DeltaRNN: send x_t - m only when |x_t - m| > threshold, where m is the last
               *sent* value (kept per neuron); output the receiver's view m_t. Threshold 0 gives
               m_t = y_t exactly.

Sown into "metrics": activation_density (non-zeros of the layer's value), delta_density
(non-zero deltas, first frame excluded), effective_macs / dense_macs (the next layer's MACs on
deltas vs on dense values, first frame excluded) and delta_l1 (the fan-out-weighted L1 penalty
times `l1_coef`; add `schedule(step) * delta_l1` to the loss).

Limits: time is the whole axis 1 of one call, so decoding one step at a time (a model cache)
has no previous frame — use "quantized" mode there, whose output does not depend on it; packed
rows (segment_ids) take deltas across document boundaries.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deltajax.sparsity import checks
from deltajax.sparsity import metrics

MODES = ("quantized", "delta", "threshold")
STEPS = ("channel", "neuron", "layer")


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
  """Delta Activation Layer settings.

  mode: one of MODES. step: granularity of the learned quantisation step — "channel" (one per
  last-axis channel), "neuron" (one per feature entry) or "layer" (a scalar).
  step_init: initial step (> 0). quantize: False skips the quantiser (a probe of the raw deltas).
  threshold: "threshold" mode only (>= 0). fan_out: MACs per non-zero in the next layer (>= 1).
  l1_coef: multiplies the sown penalty (>= 0).
  """
  mode: str = "quantized"
  step: str = "channel"
  step_init: float = 1.0 / 16
  quantize: bool = True
  threshold: float = 0.0
  fan_out: int = 1
  l1_coef: float = 1.0

  def __post_init__(self):
    checks.check_choice("mode", self.mode, MODES)
    checks.check_choice("step", self.step, STEPS)
    checks.check_positive("step_init", self.step_init)
    if not isinstance(self.quantize, bool):
      raise ValueError(f"quantize must be a bool; got {self.quantize!r}.")
    checks.check_nonneg("threshold", self.threshold)
    checks.check_positive_int("fan_out", self.fan_out)
    checks.check_nonneg("l1_coef", self.l1_coef)


def _check_video(x) -> tuple[int, ...]:
  shape = tuple(jnp.shape(x))
  checks.check_rank("x", shape, 3, "[B, T, *features]")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"x must be a floating-point array; got dtype {jnp.result_type(x)}.")
  return shape


def ste_round(x):
  """round(x) forward, identity backward."""
  return x + lax.stop_gradient(jnp.round(x) - x)


def quantize(x, step):
  """step * round(x / step) in float32, returned in x's dtype; step broadcasts against x.

  Straight-through rounding: d/dx = 1, d/dstep = round(x/step) - x/step.
  """
  xf = x.astype(jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return (step * ste_round(xf / step)).astype(x.dtype)


def temporal_delta(y, time_axis: int = 1):
  """Delta_t = y_t - y_{t-1}, Delta_0 = y_0; same shape as y [B, T, ...]."""
  prev = jnp.concatenate([jnp.zeros_like(lax.slice_in_dim(y, 0, 1, axis=time_axis)),
                          lax.slice_in_dim(y, 0, y.shape[time_axis] - 1, axis=time_axis)],
                         axis=time_axis)
  return y - prev


def accumulate(delta, time_axis: int = 1):
  """Inverse of `temporal_delta` (a running sum over time), accumulated in float32."""
  return jnp.cumsum(delta.astype(jnp.float32), axis=time_axis).astype(delta.dtype)


def threshold_delta(x, threshold: float = 0.0):
  """DeltaRNN thresholded deltas of x [B, T, ...] (time on axis 1): (held, sent).

  m starts at 0; at each t, sent_t = x_t - m where |x_t - m| > threshold (else 0), and m becomes
  x_t where sent (else stays). held_t is m after step t, i.e. what a receiver reconstructs.
  Threshold 0 gives held == x exactly (m takes x_t itself, not m + sent_t).
  """
  _check_video(x)
  checks.check_nonneg("threshold", threshold)
  xs = jnp.moveaxis(x, 1, 0)

  def step(m, xt):
    diff = xt - m
    send = jnp.abs(diff) > threshold
    m = jnp.where(send, xt, m)
    return m, (m, jnp.where(send, diff, jnp.zeros((), x.dtype)))

  _, (held, sent) = lax.scan(step, jnp.zeros_like(xs[0]), xs)
  return jnp.moveaxis(held, 0, 1), jnp.moveaxis(sent, 0, 1)


def step_shape(x_shape: tuple[int, ...], step: str) -> tuple[int, ...]:
  """Shape of the learned step for activations of shape [B, T, *features]."""
  if step == "channel":
    return (x_shape[-1],)
  if step == "neuron":
    return tuple(x_shape[2:])
  return ()


def delta_metrics(value, delta, fan_out: int = 1) -> dict[str, jnp.ndarray]:
  """The layer's metrics from its value and deltas [B, T, ...] (deltas' first frame excluded)."""
  rest = delta[:, 1:]
  return {
      "activation_density": metrics.density(value),
      "delta_density": metrics.delta_density(delta),
      "effective_macs": metrics.effective_macs(rest, fan_out),
      "dense_macs": metrics.dense_macs(rest, fan_out),
  }


def delta_l1(delta, fan_out: int = 1):
  """fan_out * sum|Delta_t| per frame averaged over frames t >= 1 (float32 scalar)."""
  return metrics.l1_penalty(delta[:, 1:], fan_out, batch_dims=2)


class DeltaActivation(nn.Module):
  """Delta Activation Layer on x [B, T, *features]; output the same shape, see the module doc.

  Parameter "log_step" (shape by `config.step`) holds log q, so q stays positive.
  """
  config: DeltaConfig = DeltaConfig()

  @nn.compact
  def __call__(self, x):
    shape = _check_video(x)
    cfg = self.config
    log_step = self.param("log_step", nn.initializers.constant(math.log(cfg.step_init)),
                          step_shape(shape, cfg.step), jnp.float32)
    y = quantize(x, jnp.exp(log_step)) if cfg.quantize else x
    if cfg.mode == "threshold":
      value, delta = threshold_delta(y, cfg.threshold)
      out = value
    else:
      value, delta = y, temporal_delta(y)
      out = y if cfg.mode == "quantized" else delta
    if self.is_initializing():  # init would store the metrics and apply would append to them
      return out
    for name, v in delta_metrics(value, delta, cfg.fan_out).items():
      self.sow("metrics", name, v)
    self.sow("metrics", "delta_l1", jnp.float32(cfg.l1_coef) * delta_l1(delta, cfg.fan_out))
    return out
