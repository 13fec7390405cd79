"""Pure-JAX references of each Mosaic GPU kernel, on the kernels' own layouts (spec.py).

Written from the maths (explicit decay tensors, a dense inverse), sharing no code with the
kernels, and exact in float64: the tests compare every kernel with its reference here, and
the whole op with the float64 token loop.
"""
from __future__ import annotations

import jax.numpy as jnp

from .spec import Spec


def _chunks(x, spec: Spec, axis: int):
  """Splits `axis` (length T) into [nc, C]."""
  shape = x.shape[:axis] + (spec.nc, spec.C) + x.shape[axis + 1:]
  return x.reshape(shape)


def _heads(x, spec: Spec):
  """[B, T, H, K] q/k -> [B, HV, nc, C, K] for every value head."""
  x = jnp.repeat(x, spec.G, axis=2)
  return _chunks(jnp.moveaxis(x, 2, 1), spec, 2)


def load_qk(spec: Spec, x, dtype, scale=1.0):
  x = _heads(x.astype(dtype), spec)
  if spec.l2norm:
    x = x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
  return x * scale


def gates(spec: Spec, G, masks, dtype):
  """(decay [B, HV, nc, C, C(, K)] over pairs j <= i of a segment, exp(G) [.., C, 1|K],
  exp(G_last - G) [.., C, 1|K], first, last [B, 1, nc, C, 1], same [B, 1, nc, C, C])."""
  B, HV, nc, C = spec.B, spec.HV, spec.nc, spec.C
  if spec.gate is None:
    Gc = jnp.zeros((B, HV, nc, C, 1), dtype)
  elif spec.gate == "head":
    Gc = _chunks(G.astype(dtype), spec, 2)[..., None]
  else:
    Gc = _chunks(jnp.moveaxis(G.astype(dtype), 2, 1), spec, 2)
  if masks:
    seg, first, last = (_chunks(m.astype(dtype), spec, 1)[:, None] for m in masks)
    same = seg[..., :, None] == seg[..., None, :]
    first, last = first[..., None], last[..., None]
  else:
    same = jnp.ones((1, 1, 1, C, C), bool)
    first = last = jnp.ones((1, 1, 1, C, 1), dtype)
  lower = jnp.tril(jnp.ones((C, C), bool))
  diff = Gc[..., :, None, :] - Gc[..., None, :, :]                  # [.., C, C, 1|K]
  pairs = (lower & same)[..., None]
  decay = jnp.where(pairs, jnp.exp(jnp.where(pairs, diff, -jnp.inf)), 0.0)
  return decay, jnp.exp(Gc), jnp.exp(Gc[..., -1:, :] - Gc), first, last, same


def _scores(a, b, decay, strict: bool):
  s = jnp.einsum("...id,...jd,...ijd->...ij", a, b,
                 jnp.broadcast_to(decay, decay.shape[:-1] + (a.shape[-1],)))
  if strict:
    C = a.shape[-2]
    s = jnp.where(jnp.tril(jnp.ones((C, C), bool), -1), s, 0.0)
  return s


def prepare_core(spec: Spec, kn, v, beta, G, masks):
  """W, U, Kd [B, HV, T, K | V] from the loaded k [B, T, HV, K] (normalised if asked)."""
  dtype = kn.dtype
  kc = _chunks(jnp.moveaxis(kn, 2, 1), spec, 2)
  vc = _chunks(jnp.moveaxis(v.astype(dtype), 2, 1), spec, 2)
  bc = _chunks(beta.astype(dtype), spec, 2)[..., None]                # [B, HV, nc, C, 1]
  decay, eG, to_end, first, last, _ = gates(spec, G, masks, dtype)
  A = bc * _scores(kc, kc, decay, strict=True)
  X = jnp.linalg.inv(jnp.eye(spec.C, dtype=dtype) + A)
  W = X @ (bc * kc * eG * first)
  U = X @ (bc * vc)
  Kd = kc * to_end * last
  flat = lambda x: x.reshape(spec.B, spec.HV, spec.T, x.shape[-1])
  return flat(W), flat(U), flat(Kd)


def prepare(spec: Spec, k, v, beta, G, masks, dtype=jnp.float64):
  """W, U, Kd as [B, HV, T, K], [B, HV, T, V], [B, HV, T, K] (unsplit)."""
  _, kn = loaded_qk(spec, k, k, dtype)
  return prepare_core(spec, kn, v, beta, None if G is None else G.astype(dtype), masks)


def prepare_backward(spec: Spec, k, v, beta, G, masks, dV_new, h, V_new, dSo,
                     dtype=jnp.float64):
  """The vjp of `prepare_core` and D's share, given the state pass's cotangents:
  (dk [B, T, HV, K] of the loaded k, dv, dbeta, dD [B, HV, nc, K], dG or None)."""
  import jax  # pylint: disable=g-import-not-at-top
  _, kn = loaded_qk(spec, k, k, dtype)
  G = None if G is None else G.astype(dtype)
  ch = lambda x: _chunks(x.astype(dtype), spec, 2)
  dvn, vn = ch(dV_new), ch(V_new)
  h, dSo = h.astype(dtype), dSo.astype(dtype)
  T_ = lambda x: jnp.swapaxes(x, -1, -2)
  flat = lambda x: x.reshape(spec.B, spec.HV, spec.T, x.shape[-1])
  dW, dU, dKd = flat(-dvn @ T_(h)), flat(dvn), flat(vn @ T_(dSo))
  _, vjp = jax.vjp(lambda kn, v, beta, G: prepare_core(spec, kn, v, beta, G, masks),
                   kn, v.astype(dtype), beta.astype(dtype), G)
  dk, dv, dbeta, dG = vjp((dW, dU, dKd))
  dD = jnp.sum(dSo * h, axis=-1)
  return dk, dv, dbeta, dD, dG


def state_forward(spec: Spec, W, U, Kd, D, h0, S_add=None):
  """h [B, HV, nc, K, V], V_new [B, HV, T, V], final [B, HV, K, V] from unsplit W, U, Kd."""
  import jax  # pylint: disable=g-import-not-at-top
  ch = lambda x: _chunks(x, spec, 2)                                 # [B, HV, nc, C, .]
  W, U, Kd = ch(W), ch(U), ch(Kd)
  adds = jnp.zeros(W.shape[:3] + (spec.K, spec.V), W.dtype) if S_add is None else S_add

  def body(S, x):
    w, u, kd, d, add = x
    v_new = u - w @ S
    return d[..., None] * S + jnp.swapaxes(kd, -1, -2) @ v_new + add, (S, v_new)
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (W, U, Kd, D, adds))
  final, (h, v_new) = jax.lax.scan(body, h0.astype(W.dtype), xs)
  h = jnp.moveaxis(h, 0, 2)
  v_new = jnp.moveaxis(v_new, 0, 2).reshape(spec.B, spec.HV, spec.T, spec.V)
  return h, v_new, final


def state_reverse(spec: Spec, Qg, W, Kd, D, dO, dV_direct, dfinal, dh=None):
  """dSo [B, HV, nc, K, V], dV_new [B, HV, T, V], dh0 [B, HV, K, V] (unsplit inputs; dO in
  the kernels' [B, T, HV, V])."""
  import jax  # pylint: disable=g-import-not-at-top
  ch = lambda x: _chunks(x, spec, 2)
  Qg, W, Kd, dV_direct = ch(Qg), ch(W), ch(Kd), ch(dV_direct)
  dO = ch(jnp.moveaxis(dO, 2, 1).astype(Qg.dtype))
  dh = jnp.zeros(W.shape[:3] + (spec.K, spec.V), W.dtype) if dh is None else dh
  T_ = lambda x: jnp.swapaxes(x, -1, -2)

  def body(dS, x):
    qg, w, kd, d, do, dvd, dhc = x
    dV = dvd + kd @ dS
    return d[..., None] * dS + T_(qg) @ do - T_(w) @ dV + dhc, (dS, dV)
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (Qg, W, Kd, D, dO, dV_direct, dh))
  dh0, (dso, dv) = jax.lax.scan(body, dfinal.astype(W.dtype), xs, reverse=True)
  dso = jnp.moveaxis(dso, 0, 2)
  dv = jnp.moveaxis(dv, 0, 2).reshape(spec.B, spec.HV, spec.T, spec.V)
  return dso, dv, dh0


def output(spec: Spec, q, k, G, masks, h, V_new, dtype=jnp.float64):
  """o [B, T, HV, V] from the states entering each chunk and V_new (unsplit)."""
  qc = load_qk(spec, q, dtype, spec.scale)
  kc = load_qk(spec, k, dtype)
  decay, eG, _, first, _, _ = gates(spec, G, masks, dtype)
  attn = _scores(qc, kc, decay, strict=False)
  vn = _chunks(V_new.astype(dtype), spec, 2)
  o = (qc * eG * first) @ h.astype(dtype) + attn @ vn               # [B, HV, nc, C, V]
  return jnp.moveaxis(o.reshape(spec.B, spec.HV, spec.T, spec.V), 1, 2)


def output_core(spec: Spec, qs, k, G, masks, h, V_new):
  """o [B, T, HV, V] from loaded q (normalised, scaled) and k, both [B, T, HV, K]; G as the
  kernels take it; h [B, HV, nc, K, V]; V_new [B, HV, T, V]."""
  heads = lambda x: _chunks(jnp.moveaxis(x, 2, 1), spec, 2)
  qc, kc = heads(qs), heads(k)
  decay, eG, _, first, _, _ = gates(spec, G, masks, qs.dtype)
  attn = _scores(qc, kc, decay, strict=False)
  o = (qc * eG * first) @ h + attn @ _chunks(V_new, spec, 2)
  return jnp.moveaxis(o.reshape(spec.B, spec.HV, spec.T, spec.V), 1, 2)


def loaded_qk(spec: Spec, q, k, dtype=jnp.float64):
  """q (normalised if asked, scaled) and k (normalised if asked) as [B, T, HV, K]."""
  flat = lambda x: jnp.moveaxis(x.reshape(spec.B, spec.HV, spec.T, spec.K), 1, 2)
  return flat(load_qk(spec, q, dtype, spec.scale)), flat(load_qk(spec, k, dtype))


def output_backward(spec: Spec, q, k, G, masks, dO, h, V_new, dtype=jnp.float64):
  """The vjp of `output_core` with h fixed: (dV_direct [B, HV, T, V], Qg [B, HV, T, K],
  dq, dk [B, T, HV, K] (of the loaded q and k), dG like G or None)."""
  import jax  # pylint: disable=g-import-not-at-top
  qs, kn = loaded_qk(spec, q, k, dtype)
  G = None if G is None else G.astype(dtype)
  f = lambda qs, kn, G, V_new: output_core(spec, qs, kn, G, masks, h.astype(dtype), V_new)
  _, vjp = jax.vjp(f, qs, kn, G, V_new.astype(dtype))
  dq, dk, dG, dvd = vjp(dO.astype(dtype))
  qc = _chunks(jnp.moveaxis(qs, 2, 1), spec, 2)
  _, eG, _, first, _, _ = gates(spec, G, masks, dtype)
  qg = (qc * eG * first).reshape(spec.B, spec.HV, spec.T, spec.K)
  return dvd, qg, dq, dk, dG
