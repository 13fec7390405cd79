"""The public ops: one function per op, every implementation behind `impl=`.

Conventions follow flash-linear-attention so results compare one to one: time-major tensors
q, k [B, T, H, K], v [B, T, HV, V], beta [B, T, HV], state [B, HV, K, V] (or [N, HV, K, V] with
`cu_seqlens`), `o_t = S_t^T (scale * q_t)`, gates are natural-log decays applied before the
delta step, states are float32 whatever the input dtype and outputs have q's dtype.

The inputs go to the implementation as they are (no cast, normalisation, scaling or head
repeat here): each loads them where it computes (deltajax.core.problem describes the contract).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deltajax.core import documents
from deltajax.core.inputs import l2norm
from deltajax.core.problem import Problem
from deltajax.ops import checks
from deltajax.ops import registry

__all__ = ["delta_rule", "gated_delta_rule", "kda", "delta_product", "l2norm", "resolve_impl"]


def resolve_impl(impl: str, p: Problem, platform: str | None = None) -> str:
  """What `impl` runs for `p` on `platform` (default: this machine's backend)."""
  if impl != "auto":
    return impl
  return registry.choose(p, platform or _platform(jax.default_backend()))


def _platform(backend: str) -> str:
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def _check_supported(impl: str, p: Problem) -> None:
  reason = registry.IMPLEMENTATIONS[impl].unsupported(p)
  if reason is not None:
    others = [name for name, other in registry.IMPLEMENTATIONS.items()
              if name != impl and other.unsupported(p) is None]
    raise ValueError(f"impl={impl!r} does not support {reason}; use impl="
                     f"{' or '.join(repr(o) for o in others) or 'another implementation'}.")


def _run(q, k, v, beta, g, *, gate, steps: bool, scale, initial_state, output_final_state,
         cu_seqlens, use_qk_l2norm, chunk_size, impl, kernel_config):
  """Shared body of every op. Single-step ops pass k, v, beta without the step axis."""
  dims = checks.check_inputs(q, k, v, beta, g, gate=gate, n=1 if steps else None,
                             initial_state=initial_state, cu_seqlens=cu_seqlens,
                             chunk_size=chunk_size, impl=impl, scale=scale)
  if kernel_config is not None:
    kernel_config.check_usable(_platform(jax.default_backend()))
  if not steps:
    k, v, beta = k[:, :, None], v[:, :, None], beta[:, :, None]
  p = Problem(gate=None if g is None else gate, B=dims.B, T=dims.T, H=dims.H, HV=dims.HV,
              K=dims.K, V=dims.V, n=dims.n, N=dims.N, packed=cu_seqlens is not None,
              scale=float(dims.K ** -0.5 if scale is None else scale),
              use_qk_l2norm=bool(use_qk_l2norm), chunk_size=int(chunk_size),
              has_initial_state=initial_state is not None,
              output_final_state=bool(output_final_state), dtype=jnp.dtype(q.dtype).name)
  docs = None if cu_seqlens is None else documents.from_cu_seqlens(cu_seqlens, dims.B, dims.T)
  args = (q, k, v, beta, g, initial_state, docs)
  if impl == "auto":
    chosen = {platform: registry.choose(p, platform) for platform in registry.PLATFORMS}
    if len(set(chosen.values())) == 1:
      impl = chosen["cpu"]
    else:  # picked by the platform being lowered for, so cross-lowering picks right
      run = lambda name: lambda *a: registry.IMPLEMENTATIONS[name].run(p, *a, kernel_config)
      o, final = jax.lax.platform_dependent(
          *args, default=run(chosen["cpu"]), cuda=run(chosen["gpu"]), rocm=run(chosen["gpu"]),
          tpu=run(chosen["tpu"]))
      return _finish(p, o, final, initial_state, docs)
  _check_supported(impl, p)
  o, final = registry.IMPLEMENTATIONS[impl].run(p, *args, kernel_config)
  return _finish(p, o, final, initial_state, docs)


def _finish(p: Problem, o, final, initial_state, docs):
  if not p.output_final_state:
    return o, None
  final = final.astype(jnp.promote_types(final.dtype, jnp.float32))
  if docs is not None:  # empty documents pass their initial state through
    h0 = 0.0 if initial_state is None else initial_state.astype(final.dtype)
    final = jnp.where(docs.empty[:, None, None, None], h0, final)
  return o, final


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               cu_seqlens=None, use_qk_l2norm=False, chunk_size=64, impl="auto",
               kernel_config=None):
  """DeltaNet: S <- S + k (beta (v - S^T k))^T, o = S^T (scale q).

  Args:
    q, k: [B, T, H, K] floating point.
    v: [B, T, HV, V], HV a multiple of H (value head i reads query/key head i // (HV // H)).
    beta: [B, T, HV] write strengths (in [0, 1], or [0, 2] for negative eigenvalues).
    scale: query scale, a finite number; default K ** -0.5.
    initial_state: [B, HV, K, V] ([N, HV, K, V] with cu_seqlens), any float dtype.
    output_final_state: also return the final state, float32.
    cu_seqlens: packed sequences, states reset at each boundary: [N + 1] int32 boundaries in
      one stream (B = 1, as flash-linear-attention), or [B, S + 1] per stream (sequence s of
      stream b is state row b * S + s). Non-decreasing from 0 to T; an empty sequence passes
      its initial state through, so a fixed-size cu_seqlens can describe a varying number of
      documents under jit. Values are checked when concrete. The chunked paths' cost does not
      grow with the number of sequences.
    use_qk_l2norm: normalise q and k over K (in float32) before use.
    chunk_size: Householder steps per chunk of the chunkwise paths, a power of two >= 16.
    impl: "auto", "recurrent", "chunk" or "pallas" (deltajax.ops.registry says what each
      supports and what "auto" picks on each platform).
    kernel_config: a `deltajax.kernels.KernelConfig` for the Pallas kernels (default: chosen
      by the platform lowered for).

  Returns:
    o [B, T, HV, V] in q's dtype, and the final state [B or N, HV, K, V] float32 (or None).

  Raises:
    ValueError: for a wrong rank, shape or dtype, bad cu_seqlens, scale, chunk_size, impl or
      kernel_config, or an implementation that does not support the call.
  """
  return _run(q, k, v, beta, None, gate=None, steps=False, scale=scale,
              initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
              impl=impl, kernel_config=kernel_config)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, use_qk_l2norm=False,
                     chunk_size=64, impl="auto", kernel_config=None):
  """Gated DeltaNet: S <- exp(g) S, then the delta step of `delta_rule`.

  g: [B, T, HV] natural-log decays (<= 0), one per value head and token. Everything else as
  `delta_rule`.
  """
  return _run(q, k, v, beta, g, gate="head", steps=False, scale=scale,
              initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
              impl=impl, kernel_config=kernel_config)


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, use_qk_l2norm=False, chunk_size=64, impl="auto", kernel_config=None):
  """Kimi Delta Attention: S <- Diag(exp(g)) S, then the delta step of `delta_rule`.

  g: [B, T, HV, K] natural-log decays (<= 0), one per key channel; any value in (-inf, 0]
  stays finite on every path. Everything else as `delta_rule`.
  """
  return _run(q, k, v, beta, g, gate="channel", steps=False, scale=scale,
              initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
              impl=impl, kernel_config=kernel_config)


def delta_product(q, k, v, beta, g=None, *, scale=None, initial_state=None,
                  output_final_state=False, cu_seqlens=None, use_qk_l2norm=False,
                  chunk_size=64, impl="auto", kernel_config=None):
  """Gated DeltaProduct: per token, optional S <- exp(g) S, then n delta steps; read out once.

  Args:
    q: [B, T, H, K].
    k: [B, T, n, H, K]; v: [B, T, n, HV, V]; beta: [B, T, n, HV] — step j of token t uses
      k[:, t, j], v[:, t, j], beta[:, t, j].
    g: None or [B, T, HV] log-decays, applied once per token before its first step.
    Everything else as `delta_rule` (cu_seqlens counts tokens, not steps; a chunk holds
    chunk_size // n tokens).

  Returns:
    o [B, T, HV, V] in q's dtype and the final state (or None).
  """
  return _run(q, k, v, beta, g, gate="head", steps=True, scale=scale,
              initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
              impl=impl, kernel_config=kernel_config)
