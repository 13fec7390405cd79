"""The tests' oracle: the recurrences written from the maths in DESIGN.md, token by token.

It shares nothing with the paths it checks: no deltajax import, its own L2 norm, value heads
reading their query/key head through an index array, documents cut out with Python slices and
run one at a time. Run it on float64 arrays (under `jax.enable_x64`) and the tolerance then
measures the path under test, not the oracle's rounding; gradients come from `jax.vjp` of it.

    S <- exp(g_t) S                         (per head, or per key channel with Diag)
    S <- S + k_tj (beta_tj (v_tj - S^T k_tj))^T   for each Householder step j
    o_t = S^T (scale q_t)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HI = lax.Precision.HIGHEST


def _normalize(x):
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def _one_sequence(q, k, v, beta, g, S, gate):
  """q [T, HV, K]; k [T, n, HV, K]; v [T, n, HV, V]; beta [T, n, HV]; g None, [T, HV] or
  [T, HV, K]; S [HV, K, V]. Returns o [T, HV, V] and the last S."""
  def token(S, x):
    qt, kt, vt, bt, gt = x
    if gate == "head":
      S = jnp.exp(gt)[:, None, None] * S
    elif gate == "channel":
      S = jnp.exp(gt)[:, :, None] * S
    for j in range(kt.shape[0]):
      err = vt[j] - jnp.einsum("hkv,hk->hv", S, kt[j], precision=_HI)
      S = S + jnp.einsum("hk,hv->hkv", kt[j], bt[j][:, None] * err, precision=_HI)
    return S, jnp.einsum("hkv,hk->hv", S, qt, precision=_HI)

  T = q.shape[0]
  gs = jnp.zeros((T,)) if g is None else g
  S, o = lax.scan(token, S, (q, k, v, beta, gs))
  return o, S


def oracle(q, k, v, beta, g, h0, *, gate, scale=None, use_qk_l2norm=False, cu_seqlens=None):
  """Outputs [B, T, HV, V] and final states [N, HV, K, V] of any op.

  Args as the public ops, with the step axis always present: k [B, T, n, H, K],
  v [B, T, n, HV, V], beta [B, T, n, HV]. gate: None, "head" or "channel". h0: [N, HV, K, V]
  (zeros if None). cu_seqlens: None, [N + 1] (B = 1) or [B, S + 1], concrete.
  """
  B, T, H, K = q.shape
  HV, V = v.shape[-2:]
  head = np.arange(HV) // (HV // H)                    # value head -> its query/key head
  if use_qk_l2norm:
    q, k = _normalize(q), _normalize(k)
  q = q * (K ** -0.5 if scale is None else scale)
  q, k = q[:, :, head], k[:, :, :, head]
  if cu_seqlens is None:
    bounds = [(b, 0, T) for b in range(B)]
  else:
    cu = np.asarray(cu_seqlens).reshape(B, -1)
    bounds = [(b, int(s), int(e)) for b in range(B) for s, e in zip(cu[b, :-1], cu[b, 1:])]
  if h0 is None:
    h0 = jnp.zeros((len(bounds), HV, K, V), q.dtype)
  outs = [[] for _ in range(B)]
  finals = []
  for i, (b, s, e) in enumerate(bounds):
    if e == s:
      finals.append(h0[i])
      continue
    cut = lambda x: None if x is None else x[b, s:e]
    o, S = _one_sequence(cut(q), cut(k), cut(v), cut(beta), cut(g), h0[i], gate)
    outs[b].append(o)
    finals.append(S)
  o = jnp.stack([jnp.concatenate(rows, axis=0) for rows in outs])
  return o, jnp.stack(finals)
