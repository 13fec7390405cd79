"""The chunk-parallel preparation: per (chunk, value head, stream), W, U and Kd.

Per chunk (k normalised if asked, G the decay from the chunk start, `first` the steps that read
the state entering the chunk, `last` those that write the state leaving it):

  A  = beta_i scores(k, k)_ij  (j < i, same segment)
  X  = (I + A)^-1                       block doubling, float32-like (mosaic: pieces)
  W  = X (beta k exp(G) first)          [C, K]
  U  = X (beta v)                       [C, V]
  Kd = k exp(G_last - G) last           [C, K]

Everything of one chunk stays on chip: the score matrix, the inverse and the right-hand sides
are never written out; only W, U, Kd are (what the sequential state pass reads).
Cost per chunk: C^2 K (scores; x4 levels per channel) + 2 (log2 C - 1) C^3 x 3 (inverse, 3
piece products) + C^2 (K + V) (W, U) multiply-adds.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import chunk_io as io
from . import mosaic as mg
from .gates import REFERENCE_STRIDE, levels, unit_lower_inverse
from .spec import Spec


def out_types(spec: Spec):
  return (jax.ShapeDtypeStruct(spec.step_shape(spec.K), mg.BF16),     # W pieces
          jax.ShapeDtypeStruct(spec.step_shape(spec.V), mg.BF16),     # U pieces
          jax.ShapeDtypeStruct(spec.step_shape(spec.K), mg.BF16))     # Kd pieces


def cost(spec: Spec) -> pl.CostEstimate:
  """FLOPs (2 per multiply-add, every wgmma piece product counted) and HBM bytes."""
  C, K, V, P, IP = spec.C, spec.K, spec.V, spec.parts, spec.inverse_parts
  products = lambda p: p * (p + 1) // 2
  n_scores = len(levels(C)) + 1 if spec.gate == "channel" else 1
  per_chunk = (n_scores * C * C * K * products(P)
               + 2 * (C.bit_length() - 2) * C ** 3 * products(IP)
               + C * C * (K + V) * products(P))
  chunks = spec.B * spec.HV * spec.nc
  inb = spec.in_dtype.itemsize
  g_bytes = {None: 0, "head": 8, "channel": 4 * K * 1.25}[spec.gate]
  steps = spec.B * spec.T * spec.HV
  bytes_in = steps * ((K + V) * inb + 4 + g_bytes)
  bytes_out = steps * P * 2 * (2 * K + V)
  return pl.CostEstimate(flops=int(2 * per_chunk * chunks),
                         transcendentals=int(chunks * C * K * (n_scores + 2)),
                         bytes_accessed=int(bytes_in + bytes_out))


def _kernel(spec: Spec, interpret: bool, k_ref, v_ref, beta_ref, *refs, **s):
  chip = mg.Chip(interpret)
  ns = io.side_count(spec)
  side, (w_ref, u_ref, kd_ref) = refs[:ns], refs[ns:]
  C, K, V, P, IP = spec.C, spec.K, spec.V, spec.parts, spec.inverse_parts
  c, h, b = lax.axis_index("chunk"), lax.axis_index("head"), lax.axis_index("stream")
  t0 = c * C
  rows = pl.ds(t0, C)
  k_op = mg.Operand(s["k_op"])

  # Scopes that follow each other reuse SMEM: K = V = 256 fits in bf16, 128 in float32.
  beta = io.load_keys(spec, chip, k_ref, beta_ref, side, s, b, h, t0)

  def scores(ga=None, gb=None):
    scratch = None if ga is None else (mg.Operand(ga), mg.Operand(gb), None)
    cg = io.chunk_gates(spec, chip, s, scratch)
    k = chip.load_pieces(k_op) if spec.gate == "channel" else None
    return chip.to_rows(beta, (C, C)) * cg.scores(k, k_op, k, k_op, diagonal=False)

  if spec.gate == "channel":
    A = mg.scoped(scores, ga=mg.operand(P, C, K), gb=mg.operand(P, C, K))
  else:
    A = scores()

  def inverse(ia, ix, it):
    X = unit_lower_inverse(chip, A, (mg.Operand(ia), mg.Operand(ix), mg.Operand(it)))
    chip.put(X, s["x_op"])

  mg.scoped(inverse, ia=mg.operand(IP, C, C), ix=mg.operand(IP, C, C), it=mg.operand(IP, C, C))
  x_op = mg.Operand(s["x_op"])
  cg = io.chunk_gates(spec, chip, s)
  bk = chip.to_rows(beta, (C, K))

  def w_out(y_op):          # W = X (beta k exp(G) first)
    k = chip.load_pieces(k_op)
    first = io.row_mask(chip, s, "first", (C, K))
    yw = io.mul(bk * k, io.decay_rows(spec, chip, cg, (C, K)), first)
    chip.put(chip.mm(x_op, chip.put(yw, y_op)), y_op)
    mg.copy_out([(y_op, w_ref.at[spec.pieces(b, h), rows])])
    mg.finish_copies_out()

  def kd_out(kd_op):        # Kd = k exp(G_last - G) last
    k = chip.load_pieces(k_op)
    last = io.row_mask(chip, s, "last", (C, K))
    chip.put(io.mul(k, _decay_to_end(spec, chip, cg, s, (C, K)), last), kd_op)
    mg.copy_out([(kd_op, kd_ref.at[spec.pieces(b, h), rows])])
    mg.finish_copies_out()

  def u_out(v_in, y_op, bar):   # U = X (beta v)
    mg.copy_in([(v_ref.at[b, rows, h], v_in)], bar)
    mg.wait(bar)
    yv = chip.to_rows(beta, (C, V)) * chip.load(v_in)
    chip.put(chip.mm(x_op, chip.put(yv, y_op)), y_op)
    mg.copy_out([(y_op, u_ref.at[spec.pieces(b, h), rows])])
    mg.finish_copies_out()

  mg.scoped(w_out, y_op=mg.operand(P, C, K))
  mg.scoped(kd_out, kd_op=mg.operand(P, C, K))
  mg.scoped(u_out, v_in=mg.tile((C, V), spec.in_dtype), y_op=mg.operand(P, C, V),
            bar=mg.barriers(1)[0])


def _decay_to_end(spec: Spec, chip: mg.Chip, cg, s, shape):
  """exp(G_last - G) per row (and channel): the decay from after each step to the chunk end."""
  C = spec.C
  if spec.gate == "head":   # its own input (the sum after each step): no difference of sums
    return chip.to_rows(jnp.exp(chip.rows(s["g_rev"])), shape)
  if spec.gate == "channel":
    last = chip.to_cols(chip.cols(s["g_refs"].at[(C - 1) // REFERENCE_STRIDE]), shape)
    return jnp.exp(last - cg.g)
  return None


def scratch(spec: Spec) -> dict:
  P, C, K = spec.parts, spec.C, spec.K
  return dict(k_op=mg.operand(P, C, K), beta=mg.vector(C), x_op=mg.operand(P, C, C),
              **io.side_scratch(spec))


def prepare(spec: Spec, k, v, beta, gates, masks, *, interpret: bool):
  """W, U, Kd pieces for every chunk ([B, HV, P, T, K | V], spec.py). gates: () / (G,) /
  (G, G4); masks: () or (seg, first, last)."""
  call = mg.kernel(functools.partial(_kernel, spec, interpret), out_type=out_types(spec),
                   scratch=scratch(spec), grid=(spec.nc, spec.HV, spec.B),
                   grid_names=("chunk", "head", "stream"), interpret=interpret,
                   name="deltajax_prepare", cost=cost(spec))
  W, U, Kd = call(k, v, beta, *gates, *masks)
  shape = lambda n: (spec.B, spec.HV, spec.parts, spec.T, n)
  return W.reshape(shape(spec.K)), U.reshape(shape(spec.V)), Kd.reshape(shape(spec.K))
