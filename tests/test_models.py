"""deltajax.models: config validation, cached decoding, generation, training signal, counts."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_close
from deltajax import sparsity
from deltajax.models import MIXERS, DeltaLM, LMConfig, flops_per_token, generate, num_params

VOCAB = 16
BASE = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=2, chunk_size=16,
            mlp_hidden=64)


pytestmark = pytest.mark.usefixtures("fast_compile")


def _tokens(B, T, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, VOCAB, jnp.int32)


def _model(**kw):
  cfg = LMConfig(**{**BASE, **kw})
  model = DeltaLM(cfg)
  return cfg, model, model.init(jax.random.PRNGKey(1), _tokens(2, 20))


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=30, num_heads=4), "num_heads"),
    (dict(mixer="mamba"), "mixer"),
    (dict(pattern=("kda", "transformer")), "pattern"),
    (dict(conv_size=0), "conv_size"),
    (dict(num_v_heads=3), "num_v_heads"),
    (dict(expand_v=0.3), "expand_v"),
    (dict(num_householder=0), "num_householder"),
    (dict(mlp_activation="tanh"), "mlp_activation"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dtype="int8"), "dtype"),
    (dict(chunk_size=24), "chunk_size"),
    (dict(window=0), "window"),
])
def test_bad_config_names_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    LMConfig(**{**BASE, **kw})


def test_pattern_repeats_to_num_layers():
  cfg = LMConfig(**{**BASE, "num_layers": 5, "pattern": ["kda", "kda", "attn"]})
  assert cfg.pattern == ("kda", "kda", "attn")
  assert cfg.layer_mixers == ("kda", "kda", "attn", "kda", "kda")


def test_hybrid_cached_decode_and_generate():
  """A hybrid stack: prefill + one-token steps reproduce the full forward's logits, greedy
  generation equals the argmax of the full forward, sampling runs, top_p -> 0 is greedy."""
  cfg, model, params = _model(num_layers=2, pattern=("gated_deltanet", "attn"),
                              allow_neg_eigval=True, tie_embeddings=False)
  prompt = _tokens(2, 17, seed=3)
  out = generate(model, params, prompt, max_new_tokens=5)
  assert out.shape == (2, 22) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :17], prompt)
  full = jax.jit(model.apply)(params, out)
  np.testing.assert_array_equal(out[:, 17:], jnp.argmax(full[:, 16:-1], -1))

  @jax.jit
  def cached(params, tokens):
    logits, cache = model.apply(params, tokens[:, :17], cache=model.init_cache(2, 22))

    def step(cache, tok):
      step_logits, cache = model.apply(params, tok[:, None], cache=cache)
      return cache, step_logits[:, 0]

    _, steps = jax.lax.scan(step, cache, tokens[:, 17:].T)
    return jnp.concatenate([logits, jnp.moveaxis(steps, 0, 1)], axis=1)

  assert_close(cached(params, out), full, 1e-4, "cached logits")
  sampled = generate(model, params, prompt, max_new_tokens=5, temperature=1.0, top_p=0.9,
                     rng=jax.random.PRNGKey(0))
  assert sampled.shape == (2, 22)
  assert np.all((np.asarray(sampled) >= 0) & (np.asarray(sampled) < VOCAB))
  nucleus_of_one = generate(model, params, prompt, max_new_tokens=5, temperature=1.0,
                            top_p=1e-6, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(nucleus_of_one, out)


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=1.0), "rng"),
    (dict(max_new_tokens=2, top_p=0.0), "top_p"),
])
def test_generate_bad_arguments(kw, match):
  _, model, params = _model()
  with pytest.raises(ValueError, match=match):
    generate(model, params, _tokens(1, 3), **kw)


def test_packed_model_matches_separate_rows():
  """segment_ids through the whole model (every layer type): documents do not interact."""
  _, model, params = _model(num_layers=2, pattern=("kda", "attn"))
  tokens = _tokens(1, 20, seed=4)
  seg = jnp.asarray([[1] * 8 + [2] * 10 + [0] * 2], jnp.int32)
  packed = jax.jit(lambda p, t, s: model.apply(p, t, segment_ids=s))(params, tokens, seg)
  alone = jnp.zeros((2, 20), jnp.int32).at[0, :8].set(tokens[0, :8]).at[1, :10].set(tokens[0, 8:18])
  ref = jax.jit(model.apply)(params, alone)
  assert_close(packed[0, :8], ref[0, :8], 1e-5, "document 0")
  assert_close(packed[0, 8:18], ref[1, :10], 1e-5, "document 1")


def _loss(model, params, tokens):
  logits = model.apply(params, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("mixer", MIXERS)
def test_two_layer_model_overfits_with_finite_gradients(mixer):
  _, model, params = _model(mixer=mixer)
  tokens = _tokens(2, 21, seed=5)
  opt = optax.adam(3e-2)

  @jax.jit
  def train(params):
    grads0 = jax.grad(lambda p: _loss(model, p, tokens))(params)

    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(lambda p: _loss(model, p, tokens))(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    _, losses = jax.lax.scan(step, (params, opt.init(params)), None, length=30)
    return grads0, losses

  grads0, losses = train(params)
  leaves = jax.tree_util.tree_leaves(grads0)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves), f"{mixer}: non-finite grads"
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.3 * losses[0], f"{mixer}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_sparsity_config_in_the_mlp_sows_metrics():
  cfg, model, params = _model(mixer="deltanet", mlp_activation="relu",
                              mlp_sparsity=sparsity.TopKConfig(k=8))
  logits, state = model.apply(params, _tokens(2, 5), mutable=["metrics"])
  assert logits.shape == (2, 5, VOCAB)
  density = jax.tree_util.tree_leaves(state["metrics"]["block_0"])
  assert density and all(np.all(np.isfinite(np.asarray(d))) for d in density)


def test_bfloat16_model_tracks_float32():
  """dtype/param_dtype reach every layer: bf16 params and compute, float32 logits close to
  the float32 model's on the same (upcast) weights.

  The tolerance is loose on purpose: at random init a delta-rule stack is ill-conditioned
  (a head whose read-out S^T q is near zero is blown up by the per-head RMSNorm), so even the
  float32 model moves by ~25% under a 0.4% weight perturbation at 6 layers (attention: 2%).
  Measured here: 6.7%. A broken cast would be off by ~100%."""
  kw = dict(num_layers=len(MIXERS), pattern=MIXERS)
  _, model16, params16 = _model(dtype="bfloat16", param_dtype="bfloat16", **kw)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params16)} <= {jnp.dtype(jnp.bfloat16),
                                                                     jnp.dtype(jnp.float32)}
  assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in jax.tree_util.tree_leaves(params16)}
  _, model32, _ = _model(**kw)
  params32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params16)
  tokens = _tokens(2, 20, seed=7)
  logits16 = jax.jit(model16.apply)(params16, tokens)
  assert logits16.dtype == jnp.float32
  assert_close(logits16, jax.jit(model32.apply)(params32, tokens), 0.15, "bf16 vs f32")


def test_remat_gives_the_same_gradients():
  tokens = _tokens(2, 21, seed=6)
  grads = []
  for remat in (False, True):
    _, model, params = _model(mixer="attn", num_layers=1, remat=remat)
    grads.append(jax.jit(jax.grad(lambda p: _loss(model, p, tokens)))(params))
  for a, b in zip(jax.tree_util.tree_leaves(grads[1]), jax.tree_util.tree_leaves(grads[0])):
    assert_close(a, b, 1e-4, "remat gradient")


def test_every_parameter_has_logical_axes():
  cfg = LMConfig(**{**BASE, "num_layers": len(MIXERS), "pattern": MIXERS,
                    "tie_embeddings": False, "num_v_heads": 2})
  shapes = jax.eval_shape(DeltaLM(cfg).init, jax.random.PRNGKey(0), _tokens(1, 4))["params"]
  leaves = jax.tree_util.tree_leaves(shapes, is_leaf=lambda l: isinstance(l, nn.Partitioned))
  bare = [l for l in leaves if not isinstance(l, nn.Partitioned)]
  assert not bare, f"{len(bare)} parameters without logical axis names"
  specs = nn.get_partition_spec(shapes)
  names = {a for spec in jax.tree_util.tree_leaves(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)) for a in spec}
  assert {"embed", "heads", "kv", "mlp", "vocab"} <= names


def test_num_params_and_flops():
  cfg, model, params = _model(pattern=("deltanet", "attn"))
  n = num_params(params)
  by_hand = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda p: p, params["params"])))
  assert n == by_hand > 0
  f_cfg, f_params = flops_per_token(cfg, 20), flops_per_token(cfg, 20, params)
  assert f_params > 6 * (n - VOCAB * 32)
  assert abs(f_cfg - f_params) < 0.1 * f_params  # the config estimate misses only norms/convs
  longer = flops_per_token(cfg, 200)
  assert longer > f_cfg  # attention's context term grows with length
