"""deltajax.layers: every mixer's three modes (full, packed, cached) agree; blocks; nnx bridge."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close, rel_rms
from deltajax import layers
from deltajax.layers import segments

D, H, B = 32, 2, 2
DECODE_TOL = 1e-4  # the issue: cached decoding reproduces the full forward to 1e-4 float32

# Every mixer and the options that change its code path; chunk_size 16 so T > 16 runs the
# chunk form while decode (T <= 16) runs the recurrent one.
MIXERS = {
    "deltanet": functools.partial(layers.DeltaNet, D, H, chunk_size=16),
    "deltanet_neg_nogate": functools.partial(layers.DeltaNet, D, H, chunk_size=16,
                                             allow_neg_eigval=True, use_output_gate=False),
    "gated_deltanet_gva": functools.partial(layers.GatedDeltaNet, D, H, chunk_size=16,
                                            num_v_heads=4, expand_v=2.0),
    "delta_product": functools.partial(layers.GatedDeltaProduct, D, H, chunk_size=16,
                                       num_householder=2, allow_neg_eigval=True),
    "delta_product_nogate": functools.partial(layers.GatedDeltaProduct, D, H, chunk_size=16,
                                              num_householder=3, use_forget_gate=False),
    "kda_lower_bound": functools.partial(layers.KimiDeltaAttention, D, H, chunk_size=16,
                                         lower_bound=-5.0),
    "linear_attn": functools.partial(layers.LinearAttention, D, H, chunk_size=16),
    "attn_window": functools.partial(layers.Attention, D, H, window=7),
}


pytestmark = pytest.mark.usefixtures("fast_compile")


def _x(T, seed=0, b=B):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, T, D))


def _init(m, T=24):
  return m.init(jax.random.PRNGKey(1), _x(T))


@pytest.mark.parametrize("name", list(MIXERS))
def test_cached_decode_matches_full_forward(name):
  """Prefill 17 tokens (chunk path) with the cache, then 7 single-token steps in a scan."""
  T, T0 = 24, 17
  m = MIXERS[name]()
  params = _init(m, T)
  x = _x(T)

  @jax.jit
  def run(params, x):
    full, none = m.apply(params, x)
    pre, cache = m.apply(params, x[:, :T0], cache=m.init_cache(B, T))

    def step(cache, xt):
      y, cache = m.apply(params, xt[:, None], cache=cache)
      return cache, y[:, 0]

    _, ys = jax.lax.scan(step, cache, jnp.moveaxis(x[:, T0:], 1, 0))
    return full, jnp.concatenate([pre, jnp.moveaxis(ys, 0, 1)], axis=1), none

  full, cached, none = run(params, x)
  assert none is None
  assert full.shape == (B, T, D)
  assert_close(cached[:, :T0], full[:, :T0], DECODE_TOL, f"{name} prefill")
  assert_close(cached[:, T0:], full[:, T0:], DECODE_TOL, f"{name} decode")


# Row 0: documents of 9 and 11 tokens, then 4 padding; row 1: 5 and 16 tokens, 3 padding.
_DOCS = [(0, 0, 9), (0, 9, 20), (1, 0, 5), (1, 5, 21)]
_SEG = np.array([[1] * 9 + [2] * 11 + [0] * 4, [3] * 5 + [3 + 1] * 16 + [0] * 3], np.int32)


@pytest.mark.parametrize("name", list(MIXERS))
def test_packed_equals_separate_and_padding_is_inert(name):
  T = _SEG.shape[1]
  m = MIXERS[name]()
  params = _init(m, T)
  x = _x(T, seed=2)
  apply = jax.jit(lambda p, x, s: m.apply(p, x, segment_ids=s)[0])
  packed = apply(params, x, jnp.asarray(_SEG))
  # Reference: every document alone, left-aligned in its own row (causal: the zeros after it
  # cannot matter), all in one unpacked call.
  alone = jnp.zeros((len(_DOCS), T, D))
  for i, (b, s, e) in enumerate(_DOCS):
    alone = alone.at[i, :e - s].set(x[b, s:e])
  ref = jax.jit(m.apply)(params, alone)[0]
  for i, (b, s, e) in enumerate(_DOCS):
    assert_close(packed[b, s:e], ref[i, :e - s], 1e-5, f"{name} document {i}")
  # Different padding contents (and a different padding id run) leave real tokens alone. Not
  # bit for bit: padding shares chunks with real tokens, so it can move the per-channel gate
  # factoring's reference point (kda), which changes the rounding, not the maths.
  pad = jnp.asarray(_SEG == 0)[..., None]
  x2 = jnp.where(pad, 100.0 * _x(T, seed=3), x)
  packed2 = apply(params, x2, jnp.asarray(_SEG))
  real = _SEG != 0
  assert_close(np.asarray(packed2)[real], np.asarray(packed)[real], 1e-6, "real tokens")


def test_cu_seqlens_rows_and_positions():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [5, 5, 5, 5, 5, 5]], jnp.int32)
  np.testing.assert_array_equal(segments.cu_seqlens_rows(seg),
                                [[0, 2, 5, 6, 6, 6, 6], [0, 6, 6, 6, 6, 6, 6]])
  np.testing.assert_array_equal(segments.positions(seg), [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("bad, match", [
    (dict(segment_ids=jnp.ones((B, 5), jnp.int32)), "segment_ids"),
    (dict(segment_ids=jnp.ones((B, 6), jnp.float32)), "segment_ids"),
])
def test_bad_segment_ids(bad, match):
  m = MIXERS["deltanet"]()
  params = _init(m, 6)
  with pytest.raises(ValueError, match=match):
    m.apply(params, _x(6), **bad)


def test_segment_ids_with_cache_rejected():
  m = MIXERS["kda_lower_bound"]()
  params = _init(m, 6)
  with pytest.raises(ValueError, match="segment_ids"):
    m.apply(params, _x(6), segment_ids=jnp.ones((B, 6), jnp.int32), cache=m.init_cache(B))


@pytest.mark.parametrize("make, match", [
    (lambda: layers.DeltaNet(30, 4), "num_heads"),
    (lambda: layers.GatedDeltaNet(D, H, num_v_heads=3), "num_v_heads"),
    (lambda: layers.DeltaNet(D, H, conv_size=0), "conv_size"),
    (lambda: layers.GatedDeltaProduct(D, H, num_householder=0), "num_householder"),
    (lambda: layers.Attention(D, H, window=0), "window"),
])
def test_bad_layer_config(make, match):
  with pytest.raises(ValueError, match=match):
    make().init(jax.random.PRNGKey(0), _x(4))


def test_linear_attention_chunked_matches_token_loop():
  """The chunked form with resets against the plain recurrence S = r S + k v^T, o = S^T q."""
  ks = jax.random.split(jax.random.PRNGKey(4), 4)
  T, K, V = 21, 4, 3
  q, k = jax.random.normal(ks[0], (B, T, H, K)), jax.random.normal(ks[1], (B, T, H, K))
  v = jax.random.normal(ks[2], (B, T, H, V))
  h0 = jax.random.normal(ks[3], (B, H, K, V))
  resets = jnp.zeros((B, T), bool).at[0, 7].set(True).at[0, 8].set(True).at[1, 16].set(True)

  def step(S, x):
    q, k, v, r = x
    S = jnp.where(r[:, None, None, None], 0.0, S) + jnp.einsum("bhk,bhv->bhkv", k, v)
    return S, jnp.einsum("bhkv,bhk->bhv", S, q)

  mv = lambda a: jnp.moveaxis(a, 1, 0)
  final_ref, o_ref = jax.lax.scan(step, h0, (mv(q), mv(k), mv(v), mv(resets)))
  for C in (4, 16, 64):
    o, final = jax.jit(functools.partial(layers.linear_attention, chunk_size=C))(
        q, k, v, resets=resets, initial_state=h0)
    assert_close(o, mv(o_ref), 1e-5, f"o, C={C}")
    assert_close(final, final_ref, 1e-5, f"state, C={C}")


def test_short_conv_against_numpy():
  W, C, T = 3, 5, 7
  conv = layers.ShortConv(C, W, activation=None)
  x = jax.random.normal(jax.random.PRNGKey(5), (1, T, C))
  params = conv.init(jax.random.PRNGKey(6), x)
  w = np.asarray(params["params"]["kernel"].value)
  y, _ = conv.apply(params, x)
  xp = np.pad(np.asarray(x[0]), ((W - 1, 0), (0, 0)))
  ref = np.stack([sum(w[i] * xp[t + i] for i in range(W)) for t in range(T)])
  np.testing.assert_allclose(np.asarray(y[0]), ref, rtol=1e-5, atol=1e-6)


def test_norms():
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 4, 8))
  gate = jax.random.normal(jax.random.PRNGKey(8), (2, 3, 4, 8))
  y = layers.RMSNorm().apply({"params": {"scale": jnp.full((8,), 2.0)}}, x)
  ref = 2.0 * x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5)
  for act, f in (("silu", jax.nn.silu), ("sigmoid", jax.nn.sigmoid)):
    yg = layers.GatedRMSNorm(activation=act).apply({"params": {"scale": jnp.full((8,), 2.0)}},
                                                   x, gate)
    np.testing.assert_allclose(np.asarray(yg), ref * f(gate), rtol=1e-5)


@pytest.mark.parametrize("activation", layers.MLP_ACTIVATIONS)
def test_mlp_activations_and_sparsity_hook(activation):
  x = _x(3)
  mlp = layers.MLP(16, activation)
  params = mlp.init(jax.random.PRNGKey(9), x)
  y = mlp.apply(params, x)
  assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
  seen = []

  def zero(h):  # the hook sees the hidden activations and its result feeds `down`
    seen.append(h.shape)
    return jnp.zeros_like(h)

  y0 = layers.MLP(16, activation, sparsity=zero).apply(params, x)
  assert seen == [(B, 3, 16)]
  np.testing.assert_array_equal(np.asarray(y0), 0.0)


def test_params_carry_logical_axes():
  m = MIXERS["kda_lower_bound"]()
  boxed = m.init(jax.random.PRNGKey(0), _x(4))["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda l: isinstance(l, nn.Partitioned))
  assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves)
  names = {a for l in leaves for a in l.names}
  assert {"embed", "heads", "kv"} <= names


def test_gate_initialisation_ranges():
  m = MIXERS["gated_deltanet_gva"]()
  p = nn.unbox(m.init(jax.random.PRNGKey(0), _x(4))["params"])
  A = np.exp(np.asarray(p["A_log"]))
  dt = np.asarray(jax.nn.softplus(p["dt_bias"]))
  assert np.all((A >= 1) & (A <= 16)) and np.all((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7))


def test_nnx_bridge():
  """A linen mixer inside NNX. The logical axis names stay as variable metadata; without a mesh
  in scope NNX's eager sharding must be off (with a mesh + axis rules it shards at creation)."""
  m = MIXERS["gated_deltanet_gva"]()
  x = _x(20)
  with nnx.use_eager_sharding(False):
    model = nnx.bridge.ToNNX(m, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x)
    y_nnx, _ = model(x)
  params = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
  y_linen, _ = m.apply(params, x)
  assert_close(y_nnx, y_linen, 1e-6, "nnx bridge")
