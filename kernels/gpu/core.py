"""The Mosaic GPU kernels end to end on kernel-ready inputs, with their `custom_vjp`.

Forward:  prepare (chunk-parallel) -> state.forward (sequential per V block) -> output
          (chunk-parallel).
Backward: prepare again (W, Kd; recomputed, not stored) and output.backward (chunk-parallel:
          Attn^T dO, Qg, the q/k/G gradients through the outputs) -> state.reverse
          (sequential) -> prepare_backward (chunk-parallel: dk, dv, dbeta, dG, dD).
Kept between the passes: the inputs, h (the state entering each chunk) and V_new, as bf16
pieces: O(T (K + V) + (T / C) K V) memory.

The kernels read q and k raw and normalise and scale them themselves; their gradients are
those of the loaded (normalised, scaled) q and k, which `_load_vjp` takes back through the
loading in XLA (elementwise and one reduction over K, fused by XLA).

Legend and layouts: spec.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import output, prepare, prepare_backward, state
from .chunk_io import L2_EPS
from .spec import Spec


def _g4(spec: Spec, gates):
  """The kernels' gate inputs: () / (G,) / (G, G viewed [B, T/4, 4, HV, K]) for the
  per-channel reference rows."""
  if spec.gate == "channel":
    G, = gates
    return (G, G.reshape(spec.B, spec.T // 4, 4, spec.HV, spec.K))
  return tuple(gates)


def _pieces(x, parts: int, axis: int):
  """float32 x -> `parts` bf16 pieces stacked on `axis` (x = their sum to ~8 * parts bits)."""
  out, rest = [], x.astype(jnp.float32)
  for i in range(parts):
    piece = rest.astype(jnp.bfloat16)
    out.append(piece)
    rest = rest - piece.astype(jnp.float32)
  return jnp.stack(out, axis)


def _sum_pieces(x, axis: int):
  return jnp.sum(x.astype(jnp.float32), axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def core(spec: Spec, interpret: bool, expose: bool, q, k, v, beta, gates, masks, D, h0, S_add):
  """(o [B, T, HV, V], final [B, HV, K, V] float32, and with `expose` the states entering each
  chunk [B, HV, nc, K, V] and V_new [B, HV, T, V] float32 (what the per-document final states
  are formed from); else None, None).

  q, k [B, T, H, K] and v [B, T, HV, V] raw; beta [B, HV, T]; gates () or, per head,
  (G, G_lo, G_rev): G's running sums, their compensation and the sums after each step to the
  chunk's end, or (G,) per channel; masks () or
  (seg, first, last); D [B, HV, nc, K]; h0 [B, HV, K, V]; S_add None or [B, HV, nc, K, V].
  """
  return _fwd(spec, interpret, expose, q, k, v, beta, gates, masks, D, h0, S_add)[0]


def _fwd(spec, interpret, expose, q, k, v, beta, gates, masks, D, h0, S_add):
  g4 = _g4(spec, gates)
  W, U, Kd = prepare.prepare(spec, k, v, beta, g4, masks, interpret=interpret)
  h, V_new, final = state.forward(spec, W, U, Kd, D, h0, S_add, interpret=interpret)
  o = output.forward(spec, q, k, g4, masks, h, V_new, interpret=interpret)
  states = (_sum_pieces(h, 3), _sum_pieces(V_new, 2)) if expose else (None, None)
  res = (q, k, v, beta, gates, masks, D, h0, S_add, h, V_new)
  return (o, final) + states, res


def _load(spec: Spec, x, scale: float):
  """How the kernels load q (scale = spec.scale) and k (scale = 1): float32, normalised over K
  if asked, scaled."""
  x = x.astype(jnp.float32)
  if spec.l2norm:
    x = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)
  return x * scale


def _load_vjp(spec: Spec, x, d_loaded, scale: float):
  """The gradient of raw q or k [B, T, H, K] from that of the loaded one per value head
  [B, T, HV, K] (value heads of a group share their q/k head)."""
  B, T, H, K = x.shape
  d = d_loaded.reshape(B, T, H, spec.G, K).sum(axis=3)
  _, vjp = jax.vjp(lambda x: _load(spec, x, scale), x)
  return vjp(d.astype(jnp.float32))[0].astype(x.dtype)


def _bwd(spec, interpret, expose, res, cts):
  q, k, v, beta, gates, masks, D, h0, S_add, h, V_new = res
  dO, dfinal, dh_out, dvn_out = cts
  g4 = _g4(spec, gates)
  W, _, Kd = prepare.prepare(spec, k, v, beta, g4, masks, interpret=interpret)
  dvd, Qg, dq, dk_o, dG_o = output.backward(spec, q, k, g4, masks, dO, h, V_new,
                                            interpret=interpret)
  if expose and dvn_out is not None:   # outside cotangents of V_new join Attn^T dO
    dvd = _pieces(_sum_pieces(dvd, 2) + dvn_out, spec.parts, 2)
  dh = dh_out if expose else None
  dSo, dV_new, dh0 = state.reverse(spec, Qg, W, Kd, D, dO, dvd, dfinal, dh,
                                   interpret=interpret)
  dk_p, dv, dbeta, dD, dG_p = prepare_backward.prepare_backward(
      spec, k, v, beta, g4, masks, dV_new, h, V_new, dSo, interpret=interpret)
  dq = _load_vjp(spec, q, dq, spec.scale)
  dk = _load_vjp(spec, k, dk_o + dk_p, 1.0)
  # Per head the gates are (G, its compensation, G_rev): the first two carry G's gradient.
  if spec.gate == "head":
    dG = dG_o + dG_p[0]
    dgates = (dG, dG, dG_p[1])
  elif spec.gate == "channel":
    dgates = (dG_o + dG_p[0],)
  else:
    dgates = ()
  dS_add = None if S_add is None else _sum_pieces(dSo, 3)
  return (dq, dk, dv.astype(v.dtype), dbeta.astype(beta.dtype), dgates,
          tuple(jnp.zeros_like(m) for m in masks), dD, dh0, dS_add)


core.defvjp(_fwd, _bwd)
