"""Tests for deltajax.sparsity: top-k masking, Delta Activation Layers, metrics, schedules."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from deltajax import sparsity as S
from tests.conftest import TOL
from tests.conftest import assert_close


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape).astype(dtype)


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("k,d,want", [(5, 40, 5), (1, 7, 1), (7, 7, 7), (0.1, 64, 6),
                                      (0.1, 256, 25), (0.29, 100, 29), (0.25, 40, 10),
                                      (1.0, 9, 9), (0.001, 50, 1)])
@pytest.mark.parametrize("method", ["exact", "approx"])
def test_topk_keeps_exactly_k_largest(k, d, want, method):
  x = _normal(0, (3, 5, d))
  mask = np.asarray(S.topk_mask(x, k, method=method))
  assert (mask.sum(-1) == want).all()
  # The kept entries are the largest: the smallest kept >= the largest dropped, per token.
  xs = np.asarray(x)
  kept_min = np.where(mask, xs, np.inf).min(-1)
  dropped_max = np.where(mask, -np.inf, xs).max(-1)
  assert (kept_min >= dropped_max).all()


def test_topk_count_is_exact_with_ties():
  # Post-ReLU rows are mostly tied zeros; the index mask still keeps exactly k.
  x = jax.nn.relu(_normal(1, (4, 32)) - 1.5)
  mask = S.topk_mask(x, 8)
  assert (np.asarray(mask).sum(-1) == 8).all()
  y = S.topk(x, S.TopKConfig(k=8))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.where(mask, x, 0)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_topk_output_dtype_and_values(dtype):
  x = _normal(2, (2, 3, 16), dtype)
  y = S.topk(x, S.TopKConfig(k=4))
  assert y.dtype == dtype and y.shape == x.shape
  mask = np.asarray(y) != 0
  np.testing.assert_array_equal(np.asarray(y, np.float32)[mask], np.asarray(x, np.float32)[mask])


def test_statistical_topk_lands_near_target_on_gaussian_rows():
  """Tolerance: the mean kept count per token within 5% of k, and 95% of tokens within 30% of k
  (per token the count is roughly binomial, std ~ sqrt(d p (1-p)) ~ 10 here, plus the noise of
  the estimated mean/std)."""
  d, k = 1024, 0.1
  x = _normal(3, (256, d)) * 2.0 + 0.7  # the threshold uses each row's own mean and std
  target = round(k * d)
  counts = np.asarray(S.topk_mask(x, k, method="statistical")).sum(-1)
  assert abs(counts.mean() - target) / target < 0.05, counts.mean()
  assert np.mean(np.abs(counts - target) / target < 0.3) >= 0.95


def test_statistical_soft_subtracts_threshold():
  x = _normal(4, (6, 128))
  thr = np.asarray(S.statistical_threshold(x, 0.2))
  y = S.topk(x, S.TopKConfig(k=0.2, method="statistical", soft=True))
  np.testing.assert_allclose(np.asarray(y), np.maximum(np.asarray(x) - thr, 0), rtol=1e-6)
  hard = S.topk_mask(x, 0.2, method="statistical")
  np.testing.assert_array_equal(np.asarray(y) > 0, np.asarray(hard))


@pytest.mark.parametrize("soft", [False, True])
def test_statistical_keeps_all_when_k_is_width(soft):
  x = _normal(5, (3, 10))
  cfg = S.TopKConfig(k=10, method="statistical", soft=soft)
  np.testing.assert_array_equal(np.asarray(S.topk(x, cfg)), np.asarray(x))


def test_fatrelu():
  x = _normal(6, (4, 33))
  np.testing.assert_array_equal(np.asarray(S.fatrelu(x)), np.asarray(jax.nn.relu(x)))
  y = S.topk(x, S.TopKConfig(method="fatrelu", threshold=0.5))
  np.testing.assert_array_equal(np.asarray(y), np.where(np.asarray(x) > 0.5, np.asarray(x), 0))


CONFIGS = [S.TopKConfig(k=5), S.TopKConfig(k=0.2, method="approx"),
           S.TopKConfig(k=0.2, method="statistical"),
           S.TopKConfig(k=0.2, method="statistical", soft=True),
           S.TopKConfig(method="fatrelu", threshold=0.3)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.method + ("-soft" if c.soft else ""))
@pytest.mark.parametrize("gradient", ["kept", "straight_through"])
def test_topk_gradient_flows_only_where_it_should(cfg, gradient):
  import dataclasses
  cfg = dataclasses.replace(cfg, gradient=gradient)
  x = _normal(7, (3, 2, 24))
  w = _normal(8, x.shape)
  g = jax.grad(lambda x: jnp.sum(w * S.topk(x, cfg)))(x)
  if gradient == "kept":
    kept = np.asarray(S.topk(x, cfg)) != 0
    want = np.where(kept, np.asarray(w), 0)
  else:
    want = np.asarray(w)
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=0)


def test_config_is_a_pure_callable_and_module_sows_metrics():
  cfg = S.TopKConfig(k=3)
  x = _normal(9, (2, 4, 12))
  mod = S.TopK(cfg)
  variables = mod.init(jax.random.PRNGKey(0), x)
  assert "metrics" not in variables  # init does not store metrics
  y, state = jax.jit(lambda x: mod.apply(variables, x, mutable=["metrics"]))(x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(cfg(x)))
  hand = np.count_nonzero(np.asarray(y)) / y.size
  assert float(state["metrics"]["density"][0]) == pytest.approx(hand)
  assert hand == pytest.approx(3 / 12)
  hand_l1 = np.abs(np.asarray(y)).sum() / 8
  assert float(state["metrics"]["l1"][0]) == pytest.approx(hand_l1, rel=1e-6)
  assert isinstance(S.as_module(cfg), S.TopK) and S.as_module(None) is None


def test_topk_inside_scanned_layers_sows_per_layer():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      h = nn.Dense(16)(h)
      return S.TopK(S.TopKConfig(k=4))(h), None

  Stack = nn.scan(Layer, variable_axes={"params": 0, "metrics": 0},
                  split_rngs={"params": True}, length=3)
  x = _normal(10, (2, 16))
  variables = Stack().init(jax.random.PRNGKey(0), x, None)
  _, state = Stack().apply(variables, x, None, mutable=["metrics"])
  np.testing.assert_allclose(np.asarray(state["metrics"]["TopK_0"]["density"][0]), [0.25] * 3)


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_a_hand_count():
  # [B=1, T=3, C=4]
  delta = jnp.array([[[1.0, 0, 2, 0], [0, 0, -1, 0], [0.5, 0, 0, 0]]])
  assert float(S.nonzero_count(delta)) == 4
  assert float(S.density(delta)) == pytest.approx(4 / 12)
  assert float(S.delta_density(delta)) == pytest.approx(2 / 8)  # first frame excluded
  assert float(S.effective_macs(delta[:, 1:], 10)) == 20
  assert float(S.dense_macs(delta[:, 1:], 10)) == 80
  assert float(S.l1_penalty(delta[:, 1:], 10)) == pytest.approx(10 * 1.5 / 2)


def test_metrics_work_under_scan_and_jit():
  xs = jnp.stack([jnp.array([0.0, 1, 0, 0]), jnp.array([1.0, 1, 1, 0])])
  _, ds = jax.jit(lambda xs: lax.scan(lambda c, x: (c, S.density(x)), 0, xs))(xs)
  np.testing.assert_allclose(np.asarray(ds), [0.25, 0.75])


# ----------------------------------------------------------------------------- delta layer


def test_quantize_grid_and_straight_through():
  x = _normal(11, (2, 3, 8))
  step = 0.125
  y = S.quantize(x, step)
  n = np.asarray(y) / step
  np.testing.assert_array_equal(n, np.round(n))
  assert np.abs(np.asarray(y - x)).max() <= step / 2 + 1e-7
  gx = jax.grad(lambda x: jnp.sum(S.quantize(x, step) * 3.0))(x)
  np.testing.assert_allclose(np.asarray(gx), 3.0)
  gq = jax.grad(lambda q: jnp.sum(S.quantize(x, q)))(step)
  assert float(gq) == pytest.approx(float(jnp.sum(jnp.round(x / step) - x / step)), rel=1e-4)


def test_accumulated_deltas_through_a_bias_free_linear_layer_are_exact():
  # Power-of-two step and integer weights: every sum is exact in float32 -> bit equality.
  x = _normal(12, (2, 50, 16)) * 3
  y = S.quantize(x, 0.25)
  delta = S.temporal_delta(y)
  w = jnp.round(_normal(13, (16, 8)) * 4)
  np.testing.assert_array_equal(np.asarray(jnp.cumsum(delta @ w, axis=1)), np.asarray(y @ w))
  np.testing.assert_array_equal(np.asarray(S.accumulate(delta)), np.asarray(y))
  # Real weights and a learned-looking step: equal to float32 rounding, no drift over T=200.
  x = _normal(14, (2, 200, 16))
  y = S.quantize(x, 0.0731)
  w = _normal(15, (16, 8))
  assert_close(jnp.cumsum(S.temporal_delta(y) @ w, axis=1), y @ w, TOL[jnp.float32], "cumsum W d")


def test_threshold_zero_equals_the_dense_layer():
  x = jax.nn.relu(_normal(16, (2, 9, 3, 5)))
  held, sent = S.threshold_delta(x, 0.0)
  np.testing.assert_array_equal(np.asarray(held), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(sent != 0), np.asarray(S.temporal_delta(x) != 0))
  # The module: threshold mode at 0 == quantized mode (== x itself without the quantiser).
  for quantize in (True, False):
    cfgs = [S.DeltaConfig(mode=m, quantize=quantize) for m in ("threshold", "quantized")]
    outs = []
    for cfg in cfgs:
      mod = S.DeltaActivation(cfg)
      outs.append(mod.apply(mod.init(jax.random.PRNGKey(0), x), x))
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    if not quantize:
      np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(x))


def test_threshold_keeps_memory_of_last_sent_value():
  # One neuron, threshold 0.5: slow drift is not sent until it exceeds 0.5 from the last send.
  x = jnp.array([1.0, 1.2, 1.4, 1.6, 1.7, 0.0]).reshape(1, 6, 1)
  held, sent = S.threshold_delta(x, 0.5)
  np.testing.assert_allclose(np.asarray(held).ravel(), [1.0, 1.0, 1.0, 1.6, 1.6, 0.0])
  np.testing.assert_allclose(np.asarray(sent).ravel(), [1.0, 0, 0, 0.6, 0, -1.6], atol=1e-6)
  x = _normal(17, (2, 30, 7))
  held, sent = S.threshold_delta(x, 0.3)
  assert np.abs(np.asarray(held - x)).max() <= 0.3  # the receiver is never further than thr
  np.testing.assert_allclose(np.asarray(S.accumulate(sent)), np.asarray(held), atol=1e-5)


@pytest.mark.parametrize("step,shape", [("channel", (5,)), ("neuron", (3, 5)), ("layer", ())])
def test_delta_module_step_shapes_and_modes(step, shape):
  x = _normal(18, (2, 4, 3, 5))
  mod = S.DeltaActivation(S.DeltaConfig(mode="delta", step=step, step_init=0.25))
  variables = mod.init(jax.random.PRNGKey(0), x)
  assert variables["params"]["log_step"].shape == shape
  out = mod.apply(variables, x)
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(S.temporal_delta(S.quantize(x, 0.25))))


def test_delta_module_metrics_match_a_hand_count():
  # B=1, T=3, C=2, step 1 (exact grid), fan-out 4.
  x = jnp.array([[[0.0, 2.0], [1.0, 2.2], [1.1, 2.9]]])
  mod = S.DeltaActivation(S.DeltaConfig(step_init=1.0, fan_out=4, l1_coef=0.5))
  variables = mod.init(jax.random.PRNGKey(0), x)
  y, state = mod.apply(variables, x, mutable=["metrics"])
  np.testing.assert_array_equal(np.asarray(y), [[[0, 2], [1, 2], [1, 3]]])
  m = {k: float(v[0]) for k, v in state["metrics"].items()}
  assert m["activation_density"] == pytest.approx(5 / 6)
  assert m["delta_density"] == pytest.approx(2 / 4)  # deltas [1, 0], [0, 1]
  assert m["effective_macs"] == 2 * 4 and m["dense_macs"] == 4 * 4
  assert m["delta_l1"] == pytest.approx(0.5 * 4 * (1 + 1) / 2)
  # The penalty is differentiable (straight-through) and pushes the deltas down.
  g = jax.grad(lambda x: mod.apply(variables, x, mutable=["metrics"])[1]["metrics"]
               ["delta_l1"][0])(x)
  assert np.abs(np.asarray(g)).sum() > 0


# ----------------------------------------------------------------------------- schedules


def test_prosparse_schedule_shape():
  sched = S.prosparse_l1_schedule([0.1, 0.3], [10, 20], init_value=0.01, warmup_steps=5,
                                  rise_fraction=0.5)
  v = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(60)))
  np.testing.assert_allclose(v[:6], 0.01)  # constant warm-up
  assert np.all(np.diff(v) >= -1e-7)  # never falls
  assert v[10] == pytest.approx(0.1) and v[14] == pytest.approx(0.1)  # rise, then hold
  assert v[15 + 5] == pytest.approx(0.1 + 0.2 * np.sin(np.pi / 4), rel=1e-5)  # sine rise
  assert v[25] == pytest.approx(0.3) and v[59] == pytest.approx(0.3)


# ----------------------------------------------------------------------------- bad input


_BAD_CONFIGS = [
    (S.TopKConfig, dict(k=0), ["k", "0"]),
    (S.TopKConfig, dict(k=1.5), ["k", "1.5", "(0, 1]"]),
    (S.TopKConfig, dict(k=0.0), ["k", "0.0"]),
    (S.TopKConfig, dict(k=-0.2), ["k", "-0.2"]),
    (S.TopKConfig, dict(k="10"), ["k", "'10'"]),
    (S.TopKConfig, dict(k=True), ["k"]),
    (S.TopKConfig, dict(method="sort"), ["method", "'sort'", "exact"]),
    (S.TopKConfig, dict(gradient="none"), ["gradient", "'none'", "kept"]),
    (S.TopKConfig, dict(soft=True), ["soft", "statistical"]),
    (S.DeltaConfig, dict(mode="sparse"), ["mode", "'sparse'", "quantized"]),
    (S.DeltaConfig, dict(step="row"), ["step", "'row'", "channel"]),
    (S.DeltaConfig, dict(step_init=0.0), ["step_init", "0.0"]),
    (S.DeltaConfig, dict(threshold=-1.0), ["threshold", "-1.0"]),
    (S.DeltaConfig, dict(fan_out=0), ["fan_out", "0"]),
    (S.DeltaConfig, dict(l1_coef=-1), ["l1_coef", "-1"]),
]


@pytest.mark.parametrize("cls,kw,words", _BAD_CONFIGS)
def test_bad_config_names_the_argument(cls, kw, words):
  with pytest.raises(ValueError) as e:
    cls(**kw)
  for w in words:
    assert w in str(e.value)


def test_bad_topk_width_and_input():
  with pytest.raises(ValueError, match=r"k must be <= the width of the last axis \(8\); got k=9"):
    S.topk(jnp.ones((2, 8)), S.TopKConfig(k=9))
  with pytest.raises(ValueError, match="k must be an int count"):
    S.topk_mask(jnp.ones((2, 8)), 0)
  with pytest.raises(ValueError, match="method must be one of"):
    S.topk_mask(jnp.ones((2, 8)), 2, method="heap")
  with pytest.raises(ValueError, match="x must be a floating-point array; got dtype int32"):
    S.topk(jnp.ones((2, 8), jnp.int32), S.TopKConfig(k=2))


def test_bad_delta_input_and_schedule():
  with pytest.raises(ValueError, match=r"x must have rank >= 3 \[B, T, \*features\]; got shape"):
    S.DeltaActivation().init(jax.random.PRNGKey(0), jnp.ones((4, 8)))
  with pytest.raises(ValueError, match="threshold must be a real number >= 0; got -0.1"):
    S.threshold_delta(jnp.ones((1, 2, 3)), -0.1)
  with pytest.raises(ValueError, match="equal length; got 2 values and 1 steps"):
    S.prosparse_l1_schedule([0.1, 0.2], [10])
  with pytest.raises(ValueError, match="stage_steps must be an int >= 1; got 0"):
    S.prosparse_l1_schedule([0.1], [0])


# ----------------------------------------------------------------------------- video demo


def test_video_demo_data_and_delta_inference():
  from deltajax.sparsity import video
  a, la = video.make_videos(6, seed=3)
  b, lb = video.make_videos(6, seed=3)
  assert a.shape == (6, 8, 16, 16, 1) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert set(la.tolist()) <= set(range(len(video.SHAPES)))
  net = video.VideoNet(video.NetConfig(delta=S.DeltaConfig(step_init=0.25)))
  params = jax.jit(net.init)(jax.random.PRNGKey(0), a[:1])["params"]
  assert video.delta_inference_error(net, params, a[:2]) < 1e-5


def test_parse_spec():
  assert S.parse_spec("none") is None and S.parse_spec("") is None
  assert S.parse_spec("topk") == S.TopKConfig()
  assert S.parse_spec("topk:k=0.05,method=statistical,soft=true") == S.TopKConfig(
      k=0.05, method="statistical", soft=True)
  assert S.parse_spec("topk:k=32") == S.TopKConfig(k=32)
  assert S.parse_spec("delta:mode=threshold,threshold=0.05") == S.DeltaConfig(
      mode="threshold", threshold=0.05)
  assert isinstance(S.as_module("topk:k=4"), S.TopK)
  with pytest.raises(ValueError, match="spec must start with one of"):
    S.parse_spec("sparse:k=1")
  with pytest.raises(ValueError, match="got 'kk=3'"):
    S.parse_spec("topk:kk=3")
  with pytest.raises(ValueError, match="k must be an int count >= 1"):
    S.parse_spec("topk:k=0")
