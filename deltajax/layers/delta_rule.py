"""The delta-rule mixers (and the linear-attention baseline) on one shared base.

Every mixer: x [B, T, D] -> q, k, v projections -> depthwise causal ShortConv (SiLU) on each ->
beta = sigmoid(W_b x) (2 * sigmoid with `allow_neg_eigval`) -> the mixer's gate -> the op
(q/k L2-normalised inside it) -> per-head RMSNorm with an output gate -> output projection.
Subclasses differ only in their gate and which op they call.

Three modes, one call `(y, new_cache) = mixer(x, segment_ids=None, cache=None)`:
* full sequence: neither given; new_cache is None.
* packed: segment_ids [B, T] int32 (0 = padding, any change of id starts a new document).
  They become per-stream cu_seqlens [B, T + 1] (padded with empty documents, so any number of
  documents fits under jit); the ops reset the state at each boundary inside their chunk grid,
  so a packed batch costs what an unpacked one does. ShortConv masks its taps at document
  boundaries. No state leaks between documents.
* cached (prefill and decode): cache = `init_cache(B)` or a previous new_cache; the recurrent
  state is the op's initial state and the conv cache holds the last conv_size - 1 inputs, so
  feeding tokens one at a time reproduces the full forward. (Not combined with segment_ids.)

Sizes: H = num_heads query/key heads of K = head_dim (default d_model // num_heads);
HV = num_v_heads (default H) value heads of V = head_dim * expand_v; n Householder steps.
out_init_scale scales the output projection's init (models pass 1 / sqrt(2 * num_layers)).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deltajax import ops
from deltajax.kernels import KernelConfig
from deltajax.layers import gates
from deltajax.layers import segments
from deltajax.layers.common import Dtype, dense, head_sizes, output_init, partitioned
from deltajax.layers.conv import ShortConv
from deltajax.layers.linear_attention import linear_attention
from deltajax.layers.norms import GatedRMSNorm, RMSNorm


@dataclasses.dataclass(frozen=True)
class MixerDims:
  H: int
  HV: int
  K: int
  V: int
  n: int


class DeltaMixerBase(nn.Module):
  """Shared body of the delta-rule mixers; see the module docstring. Not used directly."""
  d_model: int
  num_heads: int
  head_dim: int | None = None
  num_v_heads: int | None = None
  expand_v: float = 1.0
  conv_size: int = 4
  use_short_conv: bool = True
  allow_neg_eigval: bool = False
  use_output_gate: bool = True
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"
  kernel_config: KernelConfig | None = None
  out_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # Class constants (not fields), overridden by subclasses.
  output_gate_activation = "silu"
  uses_beta = True

  @property
  def num_steps(self) -> int:
    return 1

  def dims(self) -> MixerDims:
    H, HV, K, V = head_sizes(self.d_model, self.num_heads, self.head_dim, self.num_v_heads,
                             self.expand_v)
    if self.conv_size < 1:
      raise ValueError(f"conv_size must be >= 1; got {self.conv_size}.")
    return MixerDims(H=H, HV=HV, K=K, V=V, n=self.num_steps)

  def _features(self, d: MixerDims) -> dict[str, int]:
    return {"q": d.H * d.K, "k": d.n * d.H * d.K, "v": d.n * d.HV * d.V}

  def init_cache(self, batch_size: int, max_len: int | None = None) -> dict:
    """{"state": [B, HV, K, V] float32, "conv": {"q"|"k"|"v": [B, conv_size - 1, F]}}.

    max_len is accepted for a uniform interface and ignored (the state has a fixed size).
    """
    del max_len
    d = self.dims()
    conv = {}
    if self.use_short_conv:
      conv = {name: jnp.zeros((batch_size, self.conv_size - 1, f), self.dtype)
              for name, f in self._features(d).items()}
    return {"state": jnp.zeros((batch_size, d.HV, d.K, d.V), jnp.float32), "conv": conv}

  # --- hooks for the subclasses -------------------------------------------------------------
  def gate(self, x: jax.Array, d: MixerDims):
    """The log-decay g ([B, T, HV] or [B, T, HV, K], float32) or None."""
    del x, d
    return None

  def output_gate(self, x: jax.Array, d: MixerDims) -> jax.Array:
    """[B, T, HV * V] pre-activation of the output gate."""
    return self._dense(d.HV * d.V, ("embed", "heads"), "g_proj")(x)

  def recurrence(self, q, k, v, beta, g, *, initial_state, cu_seqlens):
    """q [B,T,H,K], k [B,T,n,H,K], v [B,T,n,HV,V], beta [B,T,n,HV] -> (o [B,T,HV,V], state)."""
    raise NotImplementedError

  # --- shared body --------------------------------------------------------------------------
  def _dense(self, features: int, axes, name: str, use_bias: bool = False, **kw):
    return dense(features, axes, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
                 use_bias=use_bias, **kw)

  def _op_kwargs(self, initial_state, cu_seqlens) -> dict:
    # The final state is only read when decoding, which passes the cache's state in.
    return dict(initial_state=initial_state, output_final_state=initial_state is not None,
                cu_seqlens=cu_seqlens, use_qk_l2norm=True, chunk_size=self.chunk_size,
                impl=self.impl, kernel_config=self.kernel_config)

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids=None, cache=None):
    d = self.dims()
    B, T, D = x.shape
    if D != self.d_model:
      raise ValueError(f"x must have shape [B, T, d_model={self.d_model}]; got {x.shape}.")
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids and cache cannot be combined: packed batches are for "
                       "training, the cache is for decoding one stream per row.")
    if segment_ids is not None:
      segments.check_segment_ids(segment_ids, B, T)
    x = x.astype(self.dtype)

    feats = self._features(d)
    h, conv_cache = {}, {}
    for name, f in feats.items():
      h[name] = self._dense(f, ("embed", "heads"), f"{name}_proj")(x)
      if self.use_short_conv:
        h[name], conv_cache[name] = ShortConv(
            f, self.conv_size, dtype=self.dtype, param_dtype=self.param_dtype,
            name=f"{name}_conv")(h[name], segment_ids=segment_ids,
                                 cache=None if cache is None else cache["conv"][name])
      else:
        h[name] = jax.nn.silu(h[name])
    q = h["q"].reshape(B, T, d.H, d.K)
    k = h["k"].reshape(B, T, d.n, d.H, d.K)
    v = h["v"].reshape(B, T, d.n, d.HV, d.V)
    beta = None
    if self.uses_beta:
      beta = jax.nn.sigmoid(
          self._dense(d.n * d.HV, ("embed", "heads"), "b_proj")(x).astype(jnp.float32))
      beta = (2.0 * beta if self.allow_neg_eigval else beta).reshape(B, T, d.n, d.HV)
    g = self.gate(x, d)

    if segment_ids is None:
      state = None if cache is None else cache["state"]
      o, final = self.recurrence(q, k, v, beta, g, initial_state=state, cu_seqlens=None)
    else:
      o, final = self.recurrence(q, k, v, beta, g, initial_state=None,
                                 cu_seqlens=segments.cu_seqlens_rows(segment_ids))

    if self.use_output_gate:
      gate = self.output_gate(x, d).reshape(B, T, d.HV, d.V)
      o = GatedRMSNorm(self.norm_eps, self.output_gate_activation, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="o_norm")(o, gate)
    else:
      o = RMSNorm(self.norm_eps, axis_name="kv", dtype=self.dtype,
                  param_dtype=self.param_dtype, name="o_norm")(o)
    y = self._dense(D, ("heads", "embed"), "o_proj",
                    kernel_init=output_init(self.out_init_scale))(o.reshape(B, T, d.HV * d.V))
    new_cache = None if cache is None else {"state": final, "conv": conv_cache}
    return y, new_cache


class DeltaNet(DeltaMixerBase):
  """DeltaNet (Yang et al. 2024): S <- S + k (beta (v - S^T k))^T, no decay."""

  def recurrence(self, q, k, v, beta, g, *, initial_state, cu_seqlens):
    del g
    return ops.delta_rule(q, k[:, :, 0], v[:, :, 0], beta[:, :, 0],
                          **self._op_kwargs(initial_state, cu_seqlens))


class _ScalarGateMixin:
  """The Gated DeltaNet gate g = -exp(A_log) * softplus(a + dt_bias), one per value head."""

  def scalar_gate(self, x, d: MixerDims):
    a = self._dense(d.HV, ("embed", "heads"), "a_proj")(x)
    A_log = self.param("A_log", partitioned(gates.a_log_init, ("heads",)), (d.HV,),
                       jnp.float32)
    dt_bias = self.param("dt_bias", partitioned(gates.dt_bias_init, ("heads",)), (d.HV,),
                         jnp.float32)
    return gates.softplus_gate(a, A_log, dt_bias)  # [B, T, HV]


class GatedDeltaNet(_ScalarGateMixin, DeltaMixerBase):
  """Gated DeltaNet (Yang et al. 2025): S <- exp(g) S, then the delta step."""

  def gate(self, x, d):
    return self.scalar_gate(x, d)

  def recurrence(self, q, k, v, beta, g, *, initial_state, cu_seqlens):
    return ops.gated_delta_rule(q, k[:, :, 0], v[:, :, 0], g, beta[:, :, 0],
                                **self._op_kwargs(initial_state, cu_seqlens))


class GatedDeltaProduct(_ScalarGateMixin, DeltaMixerBase):
  """Gated DeltaProduct (Siems et al. 2025): optional decay, then n = num_householder delta
  steps per token (k, v, beta projections produce n of each)."""
  num_householder: int = 2
  use_forget_gate: bool = True

  @property
  def num_steps(self) -> int:
    if self.num_householder < 1:
      raise ValueError(f"num_householder must be >= 1; got {self.num_householder}.")
    return self.num_householder

  def gate(self, x, d):
    return self.scalar_gate(x, d) if self.use_forget_gate else None

  def recurrence(self, q, k, v, beta, g, *, initial_state, cu_seqlens):
    return ops.delta_product(q, k, v, beta, g, **self._op_kwargs(initial_state, cu_seqlens))


class KimiDeltaAttention(DeltaMixerBase):
  """Kimi Delta Attention (Kimi Linear, 2025): S <- Diag(exp(g)) S, then the delta step.

  The per-channel gate comes from a low-rank projection D -> K -> HV * K, with A_log per value
  head and dt_bias per channel (as fla); `lower_bound` (e.g. -5.0) switches to the bounded
  gate. The output gate is low rank too (D -> V -> HV * V) and sigmoid-activated.
  """
  lower_bound: float | None = None

  output_gate_activation = "sigmoid"

  def gate(self, x, d):
    a = self._dense(d.K, ("embed", "kv"), "f_proj_a")(x)
    a = self._dense(d.HV * d.K, ("kv", "heads"), "f_proj_b")(a)
    A_log = self.param("A_log", partitioned(gates.a_log_init, ("heads",)), (d.HV,),
                       jnp.float32)
    dt_bias = self.param("dt_bias", partitioned(gates.dt_bias_init, ("heads",)),
                         (d.HV * d.K,), jnp.float32)
    a = a.reshape(*a.shape[:-1], d.HV, d.K)
    dt_bias = dt_bias.reshape(d.HV, d.K)
    A_log = A_log[:, None]
    if self.lower_bound is None:
      return gates.softplus_gate(a, A_log, dt_bias)
    return gates.lower_bound_gate(a, A_log, dt_bias, self.lower_bound)

  def output_gate(self, x, d):
    g = self._dense(d.V, ("embed", "kv"), "g_proj_a")(x)
    return self._dense(d.HV * d.V, ("kv", "heads"), "g_proj_b", use_bias=True)(g)

  def recurrence(self, q, k, v, beta, g, *, initial_state, cu_seqlens):
    return ops.kda(q, k[:, :, 0], v[:, :, 0], g, beta[:, :, 0],
                   **self._op_kwargs(initial_state, cu_seqlens))


class LinearAttention(DeltaMixerBase):
  """Causal linear attention baseline: S <- S + k v^T, o = S^T q (no beta, no decay).

  Same projections, ShortConv and output norm as DeltaNet, and the same feature map (identity
  on L2-normalised q and k, q scaled by K ** -0.5), so on MQAR it differs from DeltaNet only
  in the update rule. Computed in plain JAX (chunked, `linear_attention.py`).
  """
  uses_beta = False

  def dims(self) -> MixerDims:
    d = super().dims()
    if d.HV != d.H:
      raise ValueError(f"LinearAttention needs num_v_heads == num_heads; got "
                       f"num_v_heads={self.num_v_heads}, num_heads={self.num_heads}.")
    return d

  def recurrence(self, q, k, v, beta, g, *, initial_state, cu_seqlens):
    del beta, g
    B, T = q.shape[:2]
    resets = None
    if cu_seqlens is not None:  # [B, S + 1] per stream: reset the state at every start
      rows = jnp.arange(B)[:, None]
      resets = jnp.zeros((B, T + 1), bool).at[rows, cu_seqlens].set(True)[:, :T]
    q = ops.l2norm(q) * q.shape[-1] ** -0.5
    return linear_attention(q.astype(self.dtype), ops.l2norm(k[:, :, 0]), v[:, :, 0],
                            resets=resets, initial_state=initial_state,
                            chunk_size=self.chunk_size)
