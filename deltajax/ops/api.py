"""The public ops: one function per op, every implementation behind `impl=`.

Conventions follow flash-linear-attention so results compare one to one: time-major tensors
q, k [B, T, H, K], v [B, T, HV, V], beta [B, T, HV], state [B, HV, K, V] (or [N, HV, K, V] with
`cu_seqlens`), `o_t = S_t^T (scale * q_t)`, gates are natural-log decays applied before the
delta step, states are float32 whatever the input dtype and outputs have q's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from deltajax.ops import checks
from deltajax.ops.chunk import chunk
from deltajax.ops.layout import make_layout
from deltajax.ops.recurrent import recurrent

# Below this many tokens per sequence the token loop beats the chunk form's fixed cost
# (measured on CPU, docs/benchmarks.md); it is also the decode path (T = 1).
_RECURRENT_MAX_T = 16


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum(x^2) + eps) over the last axis, in float32 (or float64 for float64 x)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def resolve_impl(impl: str, T: int) -> str:
  """What `impl="auto"` runs: the token loop for short inputs, else the chunk form.

  The Pallas kernels are opt-in (`impl="pallas"`) until they are verified on the accelerator
  at hand; see docs/benchmarks.md.
  """
  if impl != "auto":
    return impl
  return "recurrent" if T <= _RECURRENT_MAX_T else "chunk"


def _run(q, k, v, beta, g, dims: checks.Dims, *, scale, initial_state, output_final_state,
         cu_seqlens, use_qk_l2norm, chunk_size, impl):
  """Shared body of every op. g: None, [B, T, HV] or [B, T, HV, K]."""
  impl = resolve_impl(impl, dims.T)
  out_dtype = q.dtype
  # float32 whatever the input dtype; float64 inputs (under jax_enable_x64) stay float64, which
  # is how the tests run the reference above the precision of the paths they check.
  compute = jnp.result_type(*[x for x in (q, k, v, beta, g) if x is not None], jnp.float32)
  as_compute = lambda x: None if x is None else x.astype(compute)
  q, k, v, beta, g = map(as_compute, (q, k, v, beta, g))
  if use_qk_l2norm:
    q, k = l2norm(q), l2norm(k)
  q = q * (dims.K ** -0.5 if scale is None else scale)
  group = dims.HV // dims.H
  if group > 1:
    q, k = jnp.repeat(q, group, axis=2), jnp.repeat(k, group, axis=2)
  if initial_state is None:
    h0 = jnp.zeros((dims.N, dims.HV, dims.K, dims.V), compute)
  else:
    h0 = initial_state.astype(compute)
  if impl == "recurrent":
    o, final = recurrent(q, k, v, beta, g, h0, make_layout(dims.B, dims.T, 1, cu_seqlens))
  else:
    layout = make_layout(dims.B, dims.T, chunk_size, cu_seqlens)
    if impl == "chunk":
      precision = lax.Precision.HIGHEST if out_dtype in (jnp.float32, jnp.float64) else None
      o, final = chunk(q, k, v, beta, g, h0, layout, precision)
    else:
      from deltajax.kernels import pallas_chunk  # pylint: disable=g-import-not-at-top
      o, final = pallas_chunk(q, k, v, beta, g, h0, layout)
  if cu_seqlens is not None:
    empty = jnp.diff(jnp.asarray(cu_seqlens)) == 0
    final = jnp.where(empty[:, None, None, None], h0, final)
  return o.astype(out_dtype), (final if output_final_state else None)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               cu_seqlens=None, use_qk_l2norm=False, chunk_size=64, impl="auto"):
  """DeltaNet: S <- S + k (beta (v - S^T k))^T, o = S^T (scale q).

  Args:
    q, k: [B, T, H, K] floating point.
    v: [B, T, HV, V], HV a multiple of H (value head i reads query/key head i // (HV // H)).
    beta: [B, T, HV] write strengths (in [0, 1], or [0, 2] for negative eigenvalues).
    scale: query scale, default K ** -0.5.
    initial_state: [B, HV, K, V] ([N, HV, K, V] with cu_seqlens), any float dtype.
    output_final_state: also return the final state, float32.
    cu_seqlens: [N + 1] int32 boundaries of packed sequences (B must be 1); states reset at
      each boundary. Non-decreasing: an empty sequence passes its initial state through, so a
      fixed-size cu_seqlens can describe a varying number of documents under jit. Its values
      are checked when it is concrete.
    use_qk_l2norm: normalise q and k over K (in float32) before use.
    chunk_size: chunk length of the chunkwise paths, a power of two >= 16.
    impl: "auto", "recurrent", "chunk" or "pallas".

  Returns:
    o [B, T, HV, V] in q's dtype, and the final state [B or N, HV, K, V] float32 (or None).

  Raises:
    ValueError: for a wrong rank, shape or dtype, bad cu_seqlens, chunk_size or impl.
  """
  dims = checks.check_inputs(q, k, v, beta, None, gate=None, n=None,
                             initial_state=initial_state, cu_seqlens=cu_seqlens,
                             chunk_size=chunk_size, impl=impl)
  return _run(q, k, v, beta, None, dims, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
              use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, impl=impl)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, use_qk_l2norm=False,
                     chunk_size=64, impl="auto"):
  """Gated DeltaNet: S <- exp(g) S, then the delta step of `delta_rule`.

  g: [B, T, HV] natural-log decays (<= 0), one per value head and token. Everything else as
  `delta_rule`.
  """
  dims = checks.check_inputs(q, k, v, beta, g, gate="head", n=None,
                             initial_state=initial_state, cu_seqlens=cu_seqlens,
                             chunk_size=chunk_size, impl=impl)
  return _run(q, k, v, beta, g, dims, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
              use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, impl=impl)


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, use_qk_l2norm=False, chunk_size=64, impl="auto"):
  """Kimi Delta Attention: S <- Diag(exp(g)) S, then the delta step of `delta_rule`.

  g: [B, T, HV, K] natural-log decays (<= 0), one per key channel; any value in (-inf, 0]
  stays finite on every path. Everything else as `delta_rule`.
  """
  dims = checks.check_inputs(q, k, v, beta, g, gate="channel", n=None,
                             initial_state=initial_state, cu_seqlens=cu_seqlens,
                             chunk_size=chunk_size, impl=impl)
  return _run(q, k, v, beta, g, dims, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
              use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, impl=impl)


def delta_product(q, k, v, beta, g=None, *, scale=None, initial_state=None,
                  output_final_state=False, cu_seqlens=None, use_qk_l2norm=False,
                  chunk_size=64, impl="auto"):
  """Gated DeltaProduct: per token, optional S <- exp(g) S, then n delta steps; read out once.

  Args:
    q: [B, T, H, K].
    k: [B, T, n, H, K]; v: [B, T, n, HV, V]; beta: [B, T, n, HV] — step j of token t uses
      k[:, t, j], v[:, t, j], beta[:, t, j].
    g: None or [B, T, HV] log-decays, applied once per token before its first step.
    Everything else as `delta_rule` (cu_seqlens counts tokens, not steps).

  Returns:
    o [B, T, HV, V] in q's dtype and the final state (or None).
  """
  dims = checks.check_inputs(q, k, v, beta, g, gate="head", n=1,
                             initial_state=initial_state, cu_seqlens=cu_seqlens,
                             chunk_size=chunk_size, impl=impl)
  B, T, n, HV = dims.B, dims.T, dims.n, dims.HV
  # The product of n Householder steps is the plain recurrence on time interleaved n times:
  # the gate goes on each token's first sub-step and the read-out on its last.
  interleave = lambda x: x.reshape(B, T * n, *x.shape[3:])
  q_steps = jnp.zeros((B, T, n, *q.shape[2:]), q.dtype).at[:, :, -1].set(q)
  g_steps = None
  if g is not None:
    g_steps = interleave(jnp.zeros((B, T, n, HV), g.dtype).at[:, :, 0].set(g))
  steps = checks.Dims(B=B, T=T * n, H=dims.H, HV=HV, K=dims.K, V=dims.V, N=dims.N)
  o, final = _run(interleave(q_steps), interleave(k), interleave(v), interleave(beta), g_steps,
                  steps, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state,
                  cu_seqlens=None if cu_seqlens is None else jnp.asarray(cu_seqlens) * n,
                  use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, impl=impl)
  return o.reshape(B, T, n, *o.shape[2:])[:, :, -1], final
