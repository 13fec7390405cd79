"""Sparse attention and the Spark FFN: top-k attention (exact, approx, statistical, Spark's
predictor), temporal-delta attention (DeltaLLM), each against a plain float64 loop written
from the maths; cached decoding against the full forward; metrics under jit; bad input."""
from __future__ import annotations

import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from deltajax import layers
from deltajax.layers import attention
from deltajax.models import DeltaLM, LMConfig
from deltajax.sparsity import DeltaAttentionConfig, TopKConfig, statistical_threshold

D, H, B, T = 32, 2, 2, 24
DH = D // H


pytestmark = pytest.mark.usefixtures("fast_compile")


def _x(T=T, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, T, D))


def _params(T=T):
  return layers.Attention(D, H).init(jax.random.PRNGKey(1), _x(T))


# ----------------------------------------------------------------------------- references


def _qkv(params, x):
  """Rotated q, k and v [B, T, H, Dh] in float64, from the layer's own weights."""
  p = nn.unbox(params)["params"]
  proj = lambda name: (x @ p[name]["kernel"]).reshape(B, x.shape[1], H, DH)
  pos = jnp.broadcast_to(jnp.arange(x.shape[1]), (B, x.shape[1]))
  q, k = layers.rope(proj("q_proj"), pos), layers.rope(proj("k_proj"), pos)
  return (np.asarray(a, np.float64) for a in (q, k, proj("v_proj")))


def _out(params, o):
  """o [B, T, H, Dh] -> the output projection."""
  return o.reshape(B, o.shape[1], D) @ np.asarray(nn.unbox(params)["params"]["o_proj"]["kernel"])


def _softmax(s):
  e = np.exp(s - s.max())
  return e / e.sum()


def _kept(sel, cfg: TopKConfig):
  """Indices the row of selection scores `sel` keeps (its causal keys only)."""
  n, k = len(sel), cfg.k
  if n <= k:
    return np.arange(n)
  if cfg.method == "statistical":
    z = statistics.NormalDist().inv_cdf(1 - k / n)
    kept = np.flatnonzero(sel > sel.mean() + sel.std() * z)
    return kept if len(kept) else np.flatnonzero(sel == sel.max())
  return np.argsort(-sel, kind="stable")[:k]


def topk_reference(params, x, cfg: TopKConfig, r=None):
  """Each query: keep keys by the (first r dims') scores, softmax of the full scores."""
  q, k, v = _qkv(params, x)
  o = np.zeros_like(q)
  kept_counts = []
  for b in range(B):
    for h in range(H):
      for t in range(x.shape[1]):
        s = k[b, :t + 1, h] @ q[b, t, h] / np.sqrt(DH)
        sel = s if r is None else k[b, :t + 1, h, :r] @ q[b, t, h, :r] / np.sqrt(DH)
        kept = _kept(sel, cfg)
        o[b, t, h] = _softmax(s[kept]) @ v[b, kept, h]
        kept_counts.append(len(kept))
  return _out(params, o), np.asarray(kept_counts)


def delta_reference(params, x, cfg: DeltaAttentionConfig):
  """DeltaLLM-style rows with a DeltaRNN memory; the output accumulated from the sent deltas
  only, o_t = o_{t-1} + sum_{j sent} (A_t[j] - M[j]) v_j (the multiply-adds a kernel spends).
  Returns (y, entries not sent, attended entries)."""
  q, k, v = _qkv(params, x)
  o = np.zeros_like(q)
  skipped = attended = 0
  for b in range(B):
    for h in range(H):
      mem, acc = np.zeros(x.shape[1]), np.zeros(DH)
      for t in range(x.shape[1]):
        a = _softmax(k[b, :t + 1, h] @ q[b, t, h] / np.sqrt(DH))
        for j in range(t + 1):
          if t - j < cfg.window or abs(a[j] - mem[j]) > cfg.threshold:
            acc += (a[j] - mem[j]) * v[b, j, h]
            mem[j] = a[j]
          else:
            skipped += 1
        attended += t + 1
        o[b, t, h] = acc
  return _out(params, o), skipped, attended


# ----------------------------------------------------------------------------- top-k

TOPK = {
    "exact": (TopKConfig(k=5), None),
    "approx": (TopKConfig(k=5, method="approx", recall_target=1.0), None),
    "statistical": (TopKConfig(k=5, method="statistical"), None),
    "spark_predictor": (TopKConfig(k=5), 6),
    "spark_statistical": (TopKConfig(k=5, method="statistical", soft=True), 6),
}


@pytest.mark.parametrize("name", list(TOPK))
def test_topk_attention_matches_reference(name):
  cfg, r = TOPK[name]
  m = layers.Attention(D, H, sparsity=cfg, predictor_dim=r)
  params, x = _params(), _x()
  (y, _), state = jax.jit(lambda p, x: m.apply(p, x, mutable=["metrics"]))(params, x)
  want, kept = topk_reference(params, x, cfg, r)
  assert_close(y, want, 1e-5, name)
  metrics = {k: float(v[0]) for k, v in state["metrics"].items()}
  assert metrics["kept_keys"] == pytest.approx(kept.mean(), rel=1e-6)
  assert metrics["kept_keys_max"] == kept.max()
  assert metrics["density"] == pytest.approx(kept.sum() / (B * H * T * (T + 1) / 2), rel=1e-6)
  if cfg.method != "statistical":  # at most k keys, and exactly min(k, t + 1)
    assert kept.max() == cfg.k
    np.testing.assert_array_equal(kept, np.tile(np.minimum(np.arange(1, T + 1), cfg.k), B * H))


def test_soft_statistical_equals_hard_and_k_at_length_is_dense():
  params, x = _params(), _x()
  run = lambda **kw: jax.jit(layers.Attention(D, H, **kw).apply)(params, x)[0]
  hard = run(sparsity=TopKConfig(k=5, method="statistical"))
  np.testing.assert_array_equal(run(sparsity=TopKConfig(k=5, method="statistical", soft=True)),
                                hard)
  assert_close(run(sparsity=TopKConfig(k=T)), run(), 1e-6, "k = T")
  assert float(jnp.max(jnp.abs(hard - run()))) > 1e-2  # k = 5 does change the output


def test_statistical_topk_keeps_a_key_in_a_constant_row():
  """Equal scores (repeated tokens) put nothing above the mean: the best key is kept anyway."""
  s = jnp.zeros((1, 1, 6, 6))
  valid = jnp.tril(jnp.ones((6, 6), bool))[None]

  @jax.jit
  def keep_and_weights(s, valid):
    keep = attention.topk_keys(s, valid, TopKConfig(k=2, method="statistical"))
    return keep, attention.masked_softmax(s, keep)

  keep, w = keep_and_weights(s, valid)
  assert np.all(np.asarray(keep).sum(-1) >= 1)
  assert np.all(np.isfinite(np.asarray(w)))


def test_statistical_threshold_where_equals_the_compacted_row():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 12))
  where = jnp.arange(12)[None, :] < jnp.array([[12], [7], [3], [1]])
  thr = np.asarray(jax.jit(lambda x, w: statistical_threshold(x, 2, where=w))(x, where))
  xs = np.asarray(x, np.float64)
  for i, n in enumerate((12, 7, 3, 1)):
    row = xs[i, :n]  # mean + std * Phi^-1(1 - k / n) over the n entries that count
    if n > 2:
      want = row.mean() + row.std() * statistics.NormalDist().inv_cdf(1 - 2 / n)
    else:
      want = -np.inf  # at most k entries: all kept
    np.testing.assert_allclose(thr[i, 0], want, rtol=1e-5)


@pytest.mark.parametrize("gradient", ["kept", "straight_through"])
def test_topk_attention_gradient(gradient):
  """"kept": keys that no query keeps get no gradient in their key or value; straight-through:
  they do, as in dense attention."""
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, T, 1, DH)) for i in range(3))
  valid = jnp.tril(jnp.ones((T, T), bool))[None]
  cfg = TopKConfig(k=1, gradient=gradient)

  def out(q, k, v):
    s = attention.scores(q, k, DH ** -0.5)
    w, _ = attention.topk_attention(s, valid, cfg)
    return jnp.sum(attention.weighted_values(w, v) ** 2), attention.topk_keys(s, valid, cfg)

  (_, keep), (dk, dv) = jax.jit(jax.value_and_grad(out, argnums=(1, 2), has_aux=True))(q, k, v)
  never = ~np.asarray(keep).any(axis=(0, 1, 2))  # keys no query keeps
  assert never.sum() >= 3
  dk, dv = np.abs(np.asarray(dk))[0, :, 0].sum(-1), np.abs(np.asarray(dv))[0, :, 0].sum(-1)
  if gradient == "kept":
    assert np.all(dk[never] == 0) and np.all(dv[never] == 0)
    assert np.all(dv[~never] > 0)
  else:
    assert np.all(dk[never][:-1] > 0)  # the last key has only its own query, which keeps it


# ----------------------------------------------------------------------------- delta


@pytest.mark.parametrize("threshold,window", [(0.02, 4), (0.005, 1)])
def test_delta_attention_matches_reference(threshold, window):
  cfg = DeltaAttentionConfig(threshold, window)
  m = layers.Attention(D, H, sparsity=cfg)
  params, x = _params(), _x()
  (y, _), state = jax.jit(lambda p, x: m.apply(p, x, mutable=["metrics"]))(params, x)
  want, skipped, attended = delta_reference(params, x, cfg)
  assert_close(y, want, 1e-5, f"delta {threshold} {window}")
  metrics = {k: float(v[0]) for k, v in state["metrics"].items()}
  assert skipped > 0.05 * attended  # the thresholds above do skip entries
  assert metrics["sparsity"] == pytest.approx(skipped / attended, rel=1e-6)
  assert metrics["macs_skipped"] == skipped * DH
  assert metrics["macs_dense"] == 2 * attended * DH


def test_delta_attention_threshold_zero_is_dense_exactly():
  params, x = _params(), _x()
  dense = layers.Attention(D, H)
  delta = layers.Attention(D, H, sparsity=DeltaAttentionConfig(0.0, window=1))
  np.testing.assert_array_equal(np.asarray(jax.jit(delta.apply)(params, x)[0]),
                                np.asarray(jax.jit(dense.apply)(params, x)[0]))
  cached = lambda m: m.apply(params, x, cache=m.init_cache(B, T + 3))[0]
  np.testing.assert_array_equal(np.asarray(jax.jit(cached, static_argnums=0)(delta)),
                                np.asarray(jax.jit(cached, static_argnums=0)(dense)))


def test_delta_attention_cannot_be_trained():
  m = layers.Attention(D, H, sparsity=DeltaAttentionConfig(0.01))
  params, x = _params(), _x()
  with pytest.raises(ValueError, match="delta attention .* cannot be differentiated"):
    jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, x)[0])))(params)  # raised while tracing


# ----------------------------------------------------------------------------- cache, packing

CACHED = {
    "topk_exact": dict(sparsity=TopKConfig(k=5)),
    "topk_statistical": dict(sparsity=TopKConfig(k=5, method="statistical")),
    "spark_predictor": dict(sparsity=TopKConfig(k=5), predictor_dim=4),
    "delta": dict(sparsity=DeltaAttentionConfig(0.02, window=3)),
    "delta_sliding_window": dict(sparsity=DeltaAttentionConfig(0.02, window=3), window=9),
}


@pytest.mark.parametrize("name", list(CACHED))
def test_cached_decode_matches_full_forward(name):
  """Prefill 17 tokens with the cache, then 7 single-token steps in a scan."""
  T0 = 17
  m = layers.Attention(D, H, **CACHED[name])
  params, x = _params(), _x()

  @jax.jit
  def run(params, x):
    full, _ = m.apply(params, x)
    pre, cache = m.apply(params, x[:, :T0], cache=m.init_cache(B, T))

    def step(cache, xt):
      y, cache = m.apply(params, xt[:, None], cache=cache)
      return cache, y[:, 0]

    _, ys = jax.lax.scan(step, cache, jnp.moveaxis(x[:, T0:], 1, 0))
    return full, jnp.concatenate([pre, jnp.moveaxis(ys, 0, 1)], axis=1)

  full, cached = run(params, x)
  assert_close(cached[:, :T0], full[:, :T0], 1e-5, f"{name} prefill")
  assert_close(cached[:, T0:], full[:, T0:], 1e-5, f"{name} decode")


@pytest.mark.parametrize("name", ["topk_statistical", "delta"])
def test_packed_documents_equal_separate_ones(name):
  """Row 0 holds documents of 9 and 15 tokens; each equals the document run alone."""
  m = layers.Attention(D, H, **CACHED[name])
  params, x = _params(), _x()
  seg = jnp.asarray([[1] * 9 + [2] * 15] * B, jnp.int32)
  packed = jax.jit(lambda p, x, s: m.apply(p, x, segment_ids=s)[0])(params, x, seg)
  for s, e in ((0, 9), (9, T)):
    alone = jax.jit(m.apply)(params, x[:, s:e])[0]
    assert_close(packed[:, s:e], alone, 1e-5, f"{name} document {s}:{e}")


# ----------------------------------------------------------------------------- Spark FFN


def test_spark_ffn_matches_reference_with_the_dense_parameter_count():
  hidden, r, k = 64, 12, 6
  x = _x()
  spark = layers.MLP(hidden, "gelu", sparsity=TopKConfig(k=k), predictor_dim=r)
  params = jax.jit(spark.init)(jax.random.PRNGKey(2), x)
  dense_params = jax.eval_shape(layers.MLP(hidden, "gelu").init, jax.random.PRNGKey(2), x)
  count = lambda p: sum(a.size for a in jax.tree_util.tree_leaves(p))
  assert count(params) == count(dense_params) == 2 * D * hidden
  y = jax.jit(spark.apply)(params, x)
  p = {n: np.asarray(w["kernel"], np.float64) for n, w in nn.unbox(params)["params"].items()}
  xs = np.asarray(x, np.float64)
  pred = xs[..., :r] @ p["predictor"]
  cut = np.sort(pred, axis=-1)[..., -k][..., None]  # the k-th largest
  gelu = lambda a: np.asarray(jax.nn.gelu(a), np.float64)
  h = gelu(np.where(pred >= cut, pred, 0.0)) * (xs[..., r:] @ p["up"])
  assert_close(y, h @ p["down"], 1e-5, "spark ffn")
  assert np.all((np.asarray(h) != 0).sum(-1) <= k)


def test_spark_model_trains_and_sows_metrics_under_jit():
  """A DeltaLM with Spark attention and the Spark FFN (options passed through LMConfig):
  finite gradients into both predictors, kept keys and FFN density sown under jit."""
  cfg = LMConfig(vocab_size=16, d_model=D, num_layers=1, num_heads=H, mixer="attn",
                 mlp_hidden=64, mlp_activation="relu",
                 mlp_sparsity="topk:k=0.1,method=statistical,soft=true", mlp_predictor_dim=16,
                 attn_sparsity="topk:k=4,method=statistical", attn_predictor_dim=8)
  model = DeltaLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (B, T), 0, 16, jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)

  @jax.jit
  def metrics_and_grads(p, t):  # one compile for both
    _, state = model.apply(p, t, mutable=["metrics"])
    return state, jax.grad(lambda p: jnp.mean(model.apply(p, t) ** 2))(p)

  state, grads = metrics_and_grads(params, tokens)
  block = state["metrics"]["block_0"]
  assert 1.0 <= float(block["mixer"]["kept_keys"][0]) <= T
  assert 0.0 < float(block["mlp"]["sparsity"]["density"][0]) < 0.3
  g = nn.unbox(grads)["params"]
  for leaf in (g["block_0"]["mlp"]["predictor"]["kernel"],
               g["block_0"]["mixer"]["k_proj"]["kernel"]):
    assert np.all(np.isfinite(np.asarray(leaf))) and float(jnp.sum(jnp.abs(leaf))) > 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make,words", [
    (lambda: TopKConfig(k=0), ["k", "got k=0"]),
    (lambda: layers.Attention(D, H, sparsity=TopKConfig(k=T + 1)), ["k must be <=", "(24)",
                                                                   f"k={T + 1}"]),
    (lambda: layers.Attention(D, H, sparsity=TopKConfig(k=0.5)), ["k must be an int", "0.5"]),
    (lambda: layers.Attention(D, H, sparsity=TopKConfig(k=4, method="fatrelu")),
     ["method", "fatrelu"]),
    (lambda: DeltaAttentionConfig(threshold=-0.1), ["threshold", "-0.1"]),
    (lambda: DeltaAttentionConfig(window=0), ["window", "0"]),
    (lambda: layers.Attention(D, H, sparsity=TopKConfig(k=4), predictor_dim=DH + 1),
     ["predictor_dim", f"head_dim={DH}", f"got {DH + 1}"]),
    (lambda: layers.Attention(D, H, predictor_dim=4), ["predictor_dim needs top-k"]),
    (lambda: layers.Attention(D, H, sparsity="topk:k=0.1,method=fatrelu"),
     ["k must be an int"]),
    (lambda: layers.MLP(64, "gelu", sparsity=TopKConfig(k=4), predictor_dim=D),
     ["predictor_dim", f"d_model - 1 = {D - 1}", f"got {D}"]),
    (lambda: layers.MLP(64, "swiglu", sparsity=TopKConfig(k=4), predictor_dim=8),
     ["non-gated", "swiglu"]),
    (lambda: layers.MLP(64, "relu", predictor_dim=8), ["predictor_dim needs a sparsity"]),
])
def test_bad_input_names_it(make, words):
  with pytest.raises(ValueError) as e:
    module = make()
    module.init(jax.random.PRNGKey(0), _x())
  for w in words:
    assert w in str(e.value), (w, str(e.value))
