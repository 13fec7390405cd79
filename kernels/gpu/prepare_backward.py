"""The chunk-parallel backward of the preparation, after the reverse pass.

Per (chunk, value head, stream), with dV_new from the reverse pass, dSo the cotangent of the
state leaving the chunk, h the state entering it and X = (I + A)^-1 recomputed:

  dY_U = X^T dV_new                         (V blocks)   dv = beta dY_U
  dA   = -dY_U V_new^T (strict, same segment)            since dA = -X^T (dW W^T + dU U^T),
  dY_W = -dY_U h^T                                       dW = -dV_new h^T, V_new = U - W h
  dKd  = V_new dSo^T,  dD = sum_V dSo * h                (V blocks)
  dKK  = beta dA
  dk   = apply(dKK, k) + apply_t(dKK, k) + beta exp(G) first dY_W + exp(G_last - G) last dKd
  dG   = k . (apply(dKK, k) - apply_t(dKK, k) + beta exp(G) first dY_W - exp(G_last - G) last
         dKd), and the row C - 1 (G_last) gains the sum of the last term
  dbeta = sum_V v dY_U + sum_j dA KK + sum_K k exp(G) first dY_W

W and U themselves are never needed. dk (of the normalised k), dG and dD go back to XLA, which
adds the outputs' share (output.backward) and runs the vjp of the normalisation and of the
gate sums.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import chunk_io as io
from . import mosaic as mg
from .gates import levels, unit_lower_inverse
from .output import VB, _store_gate_grad, _store_rows, gate_grad_type
from .prepare import _decay_to_end
from .spec import Spec


def _kernel(spec: Spec, interpret: bool, k_ref, v_ref, beta_ref, *refs, **s):
  chip = mg.Chip(interpret)
  ns = io.side_count(spec)
  side = refs[:ns]
  dvn_ref, h_ref, vn_ref, dso_ref, dk_ref, dv_ref, dbeta_ref, dd_ref, *dg_ref = refs[ns:]
  # dg_ref: () or (dG,) per channel or (dG, dG_rev) per head
  C, K, V, P, IP = spec.C, spec.K, spec.V, spec.parts, spec.inverse_parts
  c, h, b = lax.axis_index("chunk"), lax.axis_index("head"), lax.axis_index("stream")
  t0 = c * C
  rows = pl.ds(t0, C)
  k_op = mg.Operand(s["k_op"])

  beta = io.load_keys(spec, chip, k_ref, beta_ref, side, s, b, h, t0)

  def scores(ga=None, gb=None):
    scratch = None if ga is None else (mg.Operand(ga), mg.Operand(gb), None)
    cg = io.chunk_gates(spec, chip, s, scratch)
    k = chip.load_pieces(k_op) if spec.gate == "channel" else None
    return cg.scores(k, k_op, k, k_op, diagonal=False)

  if spec.gate == "channel":
    KK = mg.scoped(scores, ga=mg.operand(P, C, K), gb=mg.operand(P, C, K))
  else:
    KK = scores()
  kk_op = chip.put(KK, s["kk_op"])

  def inverse(ia, ix, it):
    A = chip.to_rows(beta, (C, C)) * KK
    X = unit_lower_inverse(chip, A, (mg.Operand(ia), mg.Operand(ix), mg.Operand(it)))
    chip.put(X, s["x_op"])

  mg.scoped(inverse, ia=mg.operand(IP, C, C), ix=mg.operand(IP, C, C), it=mg.operand(IP, C, C))
  x_op = mg.Operand(s["x_op"])

  # V blocks, first pass: dY_U, dv, dbeta (from U), dA, dY_W.
  def through_inverse(j, carry, dvn_op, h_op, vn_op, v_in, dyu_op, bar):
    dyw, dA, dbeta = carry
    cols = pl.ds(j * VB, VB)
    mg.copy_in([(dvn_ref.at[spec.pieces(b, h), rows, cols], dvn_op),
                (h_ref.at[spec.state_pieces(b, h, c), :, cols], h_op),
                (vn_ref.at[spec.pieces(b, h), rows, cols], vn_op),
                (v_ref.at[b, rows, h, cols], v_in)], bar)
    mg.wait(bar)
    dyu = chip.mm(x_op.T, mg.Operand(dvn_op))                         # [C, VB]
    v = chip.load(v_in)
    dbeta = dbeta + jnp.sum(v * dyu, axis=1)
    chip.store(chip.to_rows(beta, dyu.shape) * dyu, v_in)             # dv, in v's dtype
    mg.copy_out([(v_in, dv_ref.at[b, rows, h, cols])])
    dyu_op = chip.put(dyu, dyu_op)
    dyw = dyw - chip.mm(dyu_op, mg.Operand(h_op).T)
    dA = dA - chip.mm(dyu_op, mg.Operand(vn_op).T)
    mg.finish_copies_out()
    return dyw, dA, dbeta

  carry = (chip.zeros((C, K)), chip.zeros((C, C)), chip.zeros_rows(C))
  for j in range(V // VB):
    carry = mg.scoped(functools.partial(through_inverse, j, carry),
                      dvn_op=mg.operand(P, C, VB), h_op=mg.operand(P, K, VB),
                      vn_op=mg.operand(P, C, VB), v_in=mg.tile((C, VB), spec.in_dtype),
                      dyu_op=mg.operand(P, C, VB), bar=mg.barriers(4)[0])
  dyw, dA, dbeta = carry

  # V blocks, second pass: dKd and dD from the state cotangent.
  def through_state(j, carry, h_op, vn_op, dso_op, bar):
    dkd, dD = carry
    cols = pl.ds(j * VB, VB)
    mg.copy_in([(h_ref.at[spec.state_pieces(b, h, c), :, cols], h_op),
                (vn_ref.at[spec.pieces(b, h), rows, cols], vn_op),
                (dso_ref.at[spec.state_pieces(b, h, c), :, cols], dso_op)], bar)
    mg.wait(bar)
    dkd = dkd + chip.mm(mg.Operand(vn_op), mg.Operand(dso_op).T)
    dD = dD + jnp.sum(chip.load_pieces(mg.Operand(dso_op)) * chip.load_pieces(mg.Operand(h_op)),
                      axis=1)
    return dkd, dD

  carry = (chip.zeros((C, K)), chip.zeros_rows(K))
  for j in range(V // VB):
    carry = mg.scoped(functools.partial(through_state, j, carry), h_op=mg.operand(P, K, VB),
                      vn_op=mg.operand(P, C, VB), dso_op=mg.operand(P, K, VB),
                      bar=mg.barriers(3)[0])
  dkd, dD = carry

  def grads(ga=None, gm=None):
    scratch = (None if ga is None else mg.Operand(ga),) * 2 + (mg.Operand(gm),)
    cg = io.chunk_gates(spec, chip, s, scratch)
    k = chip.load_pieces(k_op)
    dAm = jnp.where(cg.pairs(False), dA, 0.0)
    dkk = chip.to_rows(beta, (C, C)) * dAm
    db = dbeta + jnp.sum(dAm * chip.load_pieces(kk_op), axis=1)
    ew = io.mul(dyw, io.decay_rows(spec, chip, cg, (C, K)),
                io.row_mask(chip, s, "first", (C, K)))                      # exp(G) first dY_W
    db = db + jnp.sum(k * ew, axis=1)
    ew = chip.to_rows(beta, (C, K)) * ew
    kd = io.mul(dkd, _decay_to_end(spec, chip, cg, s, (C, K)),
                io.row_mask(chip, s, "last", (C, K)))                       # exp(G_last - G) last dKd
    t2, t3 = cg.apply(dkk, k, k_op), cg.apply_t(dkk, k, k_op)
    dk = t2 + t3 + ew + kd
    dg = k * (t2 - t3 + ew)
    return dk, dg, k * kd, db

  if spec.gate == "channel":   # apply uses only the b buffer, apply_t only the a buffer
    dk, dg, kkd, db = mg.scoped(grads, ga=mg.operand(P, C, K), gm=mg.operand(P, C, C))
  else:
    dk, dg, kkd, db = mg.scoped(grads, gm=mg.operand(P, C, C))

  _store_rows(spec, chip, s, dk, dk_ref.at[b, rows, h])
  if spec.gate == "channel":   # through exp(G_last - G): G[C - 1] gains the sum, G loses it
    i = chip.iota((C, K), 0)
    last_row = chip.to_cols(jnp.sum(kkd, axis=0), (C, K))
    _store_gate_grad(spec, chip, s, dg - kkd + jnp.where(i == C - 1, last_row, 0.0), dg_ref[0],
                     b, h, rows)
  elif spec.gate == "head":   # through exp(G_rev), G_rev its own input (no cancellation in dg)
    _store_gate_grad(spec, chip, s, dg, dg_ref[0], b, h, rows)
    _store_gate_grad(spec, chip, s, kkd, dg_ref[1], b, h, rows)

  def vectors(db_buf, dd_buf):
    db_buf[...] = db
    dd_buf[...] = dD
    mg.copy_out([(db_buf, dbeta_ref.at[b, h, rows]), (dd_buf, dd_ref.at[b, h, c])])
    mg.finish_copies_out()

  mg.scoped(vectors, db_buf=mg.vector(C), dd_buf=mg.vector(K))


def cost(spec: Spec) -> pl.CostEstimate:
  C, K, V, P, IP = spec.C, spec.K, spec.V, spec.parts, spec.inverse_parts
  prod = lambda p: p * (p + 1) // 2
  n_scores = len(levels(C)) + 1 if spec.gate == "channel" else 1
  per_chunk = (3 * n_scores * C * C * K * prod(P)
               + 2 * (C.bit_length() - 2) * C ** 3 * prod(IP)
               + (C * C * V * 2 + 2 * C * K * V) * prod(P))
  chunks = spec.B * spec.HV * spec.nc
  inb = spec.in_dtype.itemsize
  g_bytes = {None: 0, "head": 8, "channel": 4 * K * 1.25}[spec.gate]
  steps = spec.B * spec.T * spec.HV
  bytes_ = (steps * ((K + 2 * V) * inb + 8 + 2 * g_bytes + 3 * 2 * P * V + 4 * K)
            + chunks * 2 * (2 * P * K * V) + chunks * 4 * K)
  return pl.CostEstimate(flops=int(2 * per_chunk * chunks),
                         transcendentals=int(chunks * C * K * 3 * n_scores),
                         bytes_accessed=int(bytes_))


def prepare_backward(spec: Spec, k, v, beta, gates, masks, dV_new, h, V_new, dSo, *,
                     interpret: bool):
  """(dk [B, T, HV, K] float32 of the normalised k, dv [B, T, HV, V] in v's dtype,
  dbeta [B, HV, T], dD [B, HV, nc, K], and None without gates, (dG,) per channel or
  (dG, dG_rev) per head), all float32 but dv."""
  B, HV, T, K, V = spec.B, spec.HV, spec.T, spec.K, spec.V
  out_type = (jax.ShapeDtypeStruct((B, T, HV, K), jnp.float32),
              jax.ShapeDtypeStruct((B, T, HV, V), spec.in_dtype),
              jax.ShapeDtypeStruct((B, HV, T), jnp.float32),
              jax.ShapeDtypeStruct((B, HV, spec.nc, K), jnp.float32))
  if spec.gate:
    out_type += (gate_grad_type(spec),) * (2 if spec.gate == "head" else 1)
  P, C = spec.parts, spec.C
  scratch = dict(k_op=mg.operand(P, C, K), beta=mg.vector(C), x_op=mg.operand(P, C, C),
                 kk_op=mg.operand(P, C, C), **io.side_scratch(spec))
  call = mg.kernel(functools.partial(_kernel, spec, interpret), out_type=out_type,
                   scratch=scratch, grid=(spec.nc, HV, B), grid_names=("chunk", "head", "stream"),
                   interpret=interpret, name="deltajax_prepare_backward", cost=cost(spec))
  dk, dv, dbeta, dD, *dG = call(k, v, beta, *gates, *masks, dV_new.reshape(spec.step_shape(V)),
                                h.reshape(spec.state_shape), V_new.reshape(spec.step_shape(V)),
                                dSo.reshape(spec.state_shape))
  return dk, dv, dbeta, dD, (tuple(dG) if dG else None)
