"""The chunk-parallel outputs, and the part of their backward the reverse pass needs.

Per (chunk, value head, stream), with q scaled (and normalised if asked), h the state entering
the chunk and V_new from the state pass:

  Attn = scores(q, k)_ij      (j <= i, same segment)    [C, C], never written out
  Qg   = q exp(G) first                                  [C, K]
  o    = Qg h + Attn V_new                               forward
  dV_direct = Attn^T dO,  Qg (pieces)                    backward (`output_backward`)

o and dV_direct are formed one 64-column block of V at a time, so SMEM holds a [K, 64] block
of h rather than all of it (K = V = 256 fits).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import chunk_io as io
from . import mosaic as mg
from .gates import levels
from .spec import Spec

VB = 64  # V columns per output block


def _attention(spec: Spec, chip: mg.Chip, q_ref, k_ref, s, b, h, t0, side):
  """Loads q, k and the side inputs of one chunk; returns (Attn [C, C] float32,
  Qg [C, K] float32); s["q_op"], s["k_op"] hold q and k as operands."""
  C, K, P = spec.C, spec.K, spec.parts

  def load(q_in, k_in, bar):
    copies = [(q_ref.at[b, pl.ds(t0, C), h // spec.G], q_in),
              (k_ref.at[b, pl.ds(t0, C), h // spec.G], k_in)]
    mg.copy_in(copies + io.side_copies(spec, side, s, b, h, t0), bar)
    mg.wait(bar)
    q, _ = io.normalize(chip, chip.load(q_in), spec.l2norm)
    k, _ = io.normalize(chip, chip.load(k_in), spec.l2norm)
    chip.put(q * spec.scale, s["q_op"])
    chip.put(k, s["k_op"])

  mg.scoped(load, q_in=mg.tile((C, K), spec.in_dtype), k_in=mg.tile((C, K), spec.in_dtype),
            bar=mg.barriers(2 + io.side_count(spec))[0])
  q_op, k_op = mg.Operand(s["q_op"]), mg.Operand(s["k_op"])

  def scores(ga=None, gb=None):
    cg = io.chunk_gates(spec, chip, s, None if ga is None else (mg.Operand(ga), mg.Operand(gb),
                                                                None))
    q, k = (chip.load_pieces(x) for x in (q_op, k_op)) if spec.gate == "channel" else (None,) * 2
    attn = cg.scores(q, q_op, k, k_op, diagonal=True)
    first = io.row_mask(chip, s, "first", (C, K))
    qg = io.mul(chip.load_pieces(q_op), io.decay_rows(spec, chip, cg, (C, K)), first)
    return attn, qg

  if spec.gate == "channel":
    attn, qg = mg.scoped(scores, ga=mg.operand(P, C, K), gb=mg.operand(P, C, K))
  else:
    attn, qg = scores()
  return attn, qg


def _side_specs(spec: Spec) -> dict:
  P, C, K = spec.parts, spec.C, spec.K
  return dict(q_op=mg.operand(P, C, K), k_op=mg.operand(P, C, K), a_op=mg.operand(P, C, C),
              **io.side_scratch(spec))


def _forward_kernel(spec: Spec, interpret: bool, q_ref, k_ref, *refs, **s):
  chip = mg.Chip(interpret)
  ns = io.side_count(spec)
  side, (h_ref, vn_ref, o_ref) = refs[:ns], refs[ns:]
  C, K, P = spec.C, spec.K, spec.parts
  c, h, b = lax.axis_index("chunk"), lax.axis_index("head"), lax.axis_index("stream")
  t0 = c * C
  attn, qg = _attention(spec, chip, q_ref, k_ref, s, b, h, t0, side)
  a_op = chip.put(attn, s["a_op"])
  qg_op = chip.put(qg, s["q_op"])

  def block(j, h_op, vn_op, o_out, bar):
    cols = pl.ds(j * VB, VB)   # h and V_new are stored as pieces: copied straight in
    mg.copy_in([(h_ref.at[spec.state_pieces(b, h, c), :, cols], h_op),
                (vn_ref.at[spec.pieces(b, h), pl.ds(t0, C), cols], vn_op)], bar)
    mg.wait(bar)
    o = chip.mm(qg_op, mg.Operand(h_op)) + chip.mm(a_op, mg.Operand(vn_op))
    chip.store(o, o_out)
    mg.copy_out([(o_out, o_ref.at[b, pl.ds(t0, C), h, cols])])
    mg.finish_copies_out()

  for j in range(spec.V // VB):
    mg.scoped(functools.partial(block, j), h_op=mg.operand(P, K, VB),
              vn_op=mg.operand(P, C, VB), o_out=mg.tile((C, VB), spec.in_dtype),
              bar=mg.barriers(2)[0])


def forward_cost(spec: Spec) -> pl.CostEstimate:
  C, K, V, P = spec.C, spec.K, spec.V, spec.parts
  prod = P * (P + 1) // 2
  n_scores = len(levels(C)) + 1 if spec.gate == "channel" else 1
  chunks = spec.B * spec.HV * spec.nc
  inb = spec.in_dtype.itemsize
  sd = 2 * P
  g_bytes = {None: 0, "head": 8, "channel": 4 * K * 1.25}[spec.gate]
  flops = 2 * chunks * prod * (n_scores * C * C * K + C * K * V + C * C * V)
  bytes_ = (spec.B * spec.T * (spec.HV * (2 * K * inb + g_bytes + V * (sd + inb)))
            + chunks * K * V * sd)
  return pl.CostEstimate(flops=int(flops), transcendentals=int(chunks * C * (C + K) * n_scores),
                         bytes_accessed=int(bytes_))


def forward(spec: Spec, q, k, gates, masks, h, V_new, *, interpret: bool):
  """o [B, T, HV, V] in q's dtype."""
  out_type = jax.ShapeDtypeStruct((spec.B, spec.T, spec.HV, spec.V), spec.in_dtype)
  call = mg.kernel(functools.partial(_forward_kernel, spec, interpret), out_type=out_type,
                   scratch=_side_specs(spec), grid=(spec.nc, spec.HV, spec.B),
                   grid_names=("chunk", "head", "stream"), interpret=interpret,
                   name="deltajax_output", cost=forward_cost(spec))
  return call(q, k, *gates, *masks, h.reshape(spec.state_shape),
              V_new.reshape(spec.step_shape(spec.V)))


def _backward_kernel(spec: Spec, interpret: bool, q_ref, k_ref, *refs, **s):
  chip = mg.Chip(interpret)
  ns = io.side_count(spec)
  side = refs[:ns]
  do_ref, h_ref, vn_ref, dvd_ref, qg_ref, dq_ref, dk_ref, *dg_ref = refs[ns:]
  dg_ref = dg_ref[0] if dg_ref else None
  C, K, P = spec.C, spec.K, spec.parts
  c, h, b = lax.axis_index("chunk"), lax.axis_index("head"), lax.axis_index("stream")
  t0 = c * C
  rows = pl.ds(t0, C)
  attn, qg = _attention(spec, chip, q_ref, k_ref, s, b, h, t0, side)
  a_op = chip.put(attn, s["a_op"])

  def qg_out(qg_op):
    chip.put(qg, qg_op)
    mg.copy_out([(qg_op, qg_ref.at[spec.pieces(b, h), rows])])
    mg.finish_copies_out()

  mg.scoped(qg_out, qg_op=mg.operand(P, C, K))

  # dV_direct = Attn^T dO per V block; dQg = dO h^T and dAttn = dO V_new^T summed over them.
  def block(j, carry, do_in, do_op, h_op, vn_op, out, bar):
    dqg, dattn = carry
    cols = pl.ds(j * VB, VB)
    mg.copy_in([(do_ref.at[b, rows, h, cols], do_in),
                (h_ref.at[spec.state_pieces(b, h, c), :, cols], h_op),
                (vn_ref.at[spec.pieces(b, h), rows, cols], vn_op)], bar)
    mg.wait(bar)
    do_op = chip.put(chip.load(do_in), do_op)
    chip.put(chip.mm(a_op.T, do_op), out)
    mg.copy_out([(out, dvd_ref.at[spec.pieces(b, h), rows, cols])])
    dqg = dqg + chip.mm(do_op, mg.Operand(h_op).T)
    dattn = dattn + chip.mm(do_op, mg.Operand(vn_op).T)
    mg.finish_copies_out()
    return dqg, dattn

  carry = (chip.zeros((C, K)), chip.zeros((C, C)))
  for j in range(spec.V // VB):
    carry = mg.scoped(functools.partial(block, j, carry), do_in=mg.tile((C, VB), spec.in_dtype),
                      do_op=mg.operand(P, C, VB), h_op=mg.operand(P, K, VB),
                      vn_op=mg.operand(P, C, VB), out=mg.operand(P, C, VB),
                      bar=mg.barriers(3)[0])
  dqg, dattn = carry

  # Through Qg = q exp(G) first and Attn = scores(q, k):
  #   dq = dQg exp(G) first + apply(dAttn, k),  dk = apply_t(dAttn, q),
  #   dG = q . dq - k . dk (over K per head gate, per channel otherwise),
  # the diagonal of dAttn left out of dG: it carries no decay, and its two shares would cancel
  # only up to rounding, noise that dominates dg where strong gates make it small.
  def grads(ga=None, gb=None, gm=None):
    scratch = (mg.Operand(ga) if ga is not None else None,
               mg.Operand(gb) if gb is not None else None, mg.Operand(gm))
    cg = io.chunk_gates(spec, chip, s, scratch)
    q_op, k_op = mg.Operand(s["q_op"]), mg.Operand(s["k_op"])
    q, k = chip.load_pieces(q_op), chip.load_pieces(k_op)
    i, j = chip.iota((C, C), 0), chip.iota((C, C), 1)
    dattn_m = jnp.where(cg.pairs(True), dattn, 0.0)
    diag = chip.to_rows(jnp.sum(jnp.where(i == j, dattn_m, 0.0), axis=1), (C, K))
    dattn_off = jnp.where(i == j, 0.0, dattn_m)
    first = io.row_mask(chip, s, "first", (C, K))
    dq_gated = (io.mul(dqg, io.decay_rows(spec, chip, cg, (C, K)), first)
                + cg.apply(dattn_off, k, k_op))
    dk_gated = cg.apply_t(dattn_off, q, q_op)
    return dq_gated + diag * k, dk_gated + diag * q, q * dq_gated - k * dk_gated

  if spec.gate == "channel":   # apply uses only the b buffer, apply_t only the a buffer
    dq, dk, dg = mg.scoped(lambda ga, gm: grads(ga, ga, gm), ga=mg.operand(P, C, K),
                           gm=mg.operand(P, C, C))
  else:
    dq, dk, dg = mg.scoped(grads, gm=mg.operand(P, C, C))
  _store_rows(spec, chip, s, dq, dq_ref.at[b, rows, h])
  _store_rows(spec, chip, s, dk, dk_ref.at[b, rows, h])
  _store_gate_grad(spec, chip, s, dg, dg_ref, b, h, rows)


def _store_rows(spec: Spec, chip: mg.Chip, s, x, dst):
  """x [C, K] float32 to GMEM through a scope of SMEM."""
  def body(buf):
    chip.store(x, buf)
    mg.copy_out([(buf, dst)])
    mg.finish_copies_out()
  mg.scoped(body, buf=mg.tile(x.shape))


def _store_gate_grad(spec: Spec, chip: mg.Chip, s, x, dg_ref, b, h, rows):
  """The gradient of G from x [C, K] (per channel as is, per head summed over K)."""
  if spec.gate == "channel":
    _store_rows(spec, chip, s, x, dg_ref.at[b, rows, h])
  elif spec.gate == "head":
    def body(buf):
      buf[...] = jnp.sum(x, axis=1)
      mg.copy_out([(buf, dg_ref.at[b, h, rows])])
      mg.finish_copies_out()
    mg.scoped(body, buf=mg.vector(spec.C))


def gate_grad_type(spec: Spec):
  if spec.gate == "channel":
    return jax.ShapeDtypeStruct((spec.B, spec.T, spec.HV, spec.K), jnp.float32)
  return jax.ShapeDtypeStruct((spec.B, spec.HV, spec.T), jnp.float32)


def backward_cost(spec: Spec) -> pl.CostEstimate:
  C, K, V, P = spec.C, spec.K, spec.V, spec.parts
  prod = P * (P + 1) // 2
  n_scores = len(levels(C)) + 1 if spec.gate == "channel" else 1
  chunks = spec.B * spec.HV * spec.nc
  inb = spec.in_dtype.itemsize
  g_bytes = {None: 0, "head": 8, "channel": 4 * K * 1.25}[spec.gate]
  flops = 2 * chunks * prod * (n_scores * C * C * K * 3 + C * C * V * 2 + C * K * V)
  bytes_ = (spec.B * spec.T * spec.HV * (2 * K * inb + g_bytes * 2 + V * (inb + 4 * P) + 2 * K * 4
                                         + 2 * P * K)
            + chunks * K * V * 2 * P)
  return pl.CostEstimate(flops=int(flops), transcendentals=int(chunks * C * (C + K) * n_scores * 3),
                         bytes_accessed=int(bytes_))


def backward(spec: Spec, q, k, gates, masks, dO, h, V_new, *, interpret: bool):
  """The outputs' backward, before the reverse pass.

  Returns (dV_direct = Attn^T dO [B, HV, P, T, V] pieces, Qg [B, HV, P, T, K] pieces,
  dq [B, T, HV, K] and dk [B, T, HV, K] float32: the gradients through Qg and Attn of the
  scaled (normalised) q and of the (normalised) k, dG: theirs of G, [B, HV, T] or
  [B, T, HV, K] float32, None without gates).
  """
  B, HV, T, K, V, P = spec.B, spec.HV, spec.T, spec.K, spec.V, spec.parts
  rows_f32 = jax.ShapeDtypeStruct((B, T, HV, K), jnp.float32)
  out_type = (jax.ShapeDtypeStruct(spec.step_shape(V), mg.BF16),
              jax.ShapeDtypeStruct(spec.step_shape(K), mg.BF16),
              rows_f32, rows_f32) + ((gate_grad_type(spec),) if spec.gate else ())
  scratch = _side_specs(spec)
  call = mg.kernel(functools.partial(_backward_kernel, spec, interpret), out_type=out_type,
                   scratch=scratch, grid=(spec.nc, HV, B),
                   grid_names=("chunk", "head", "stream"), interpret=interpret,
                   name="deltajax_output_backward", cost=backward_cost(spec))
  dvd, qg, dq, dk, *dg = call(q, k, *gates, *masks, dO, h.reshape(spec.state_shape),
                             V_new.reshape(spec.step_shape(V)))
  return (dvd.reshape(B, HV, P, T, V), qg.reshape(B, HV, P, T, K), dq, dk,
          dg[0] if dg else None)
