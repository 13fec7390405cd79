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
from .gates import levels, unit_lower_inverse
from .spec import Spec


def out_types(spec: Spec):
  P, B, HV, T, K, V = spec.parts, spec.B, spec.HV, spec.T, spec.K, spec.V
  return (jax.ShapeDtypeStruct((B, HV, P, T, K), mg.BF16),     # W pieces
          jax.ShapeDtypeStruct((B, HV, T, V), spec.state_dtype),  # U
          jax.ShapeDtypeStruct((B, HV, P, T, K), mg.BF16))     # Kd pieces


def cost(spec: Spec) -> pl.CostEstimate:
  """FLOPs (2 per multiply-add, wgmma piece products counted) and HBM bytes of `prepare`."""
  C, K, V, P, IP = spec.C, spec.K, spec.V, spec.parts, spec.inverse_parts
  products = lambda p: p * (p + 1) // 2
  n_scores = len(levels(C)) + 1 if spec.gate == "channel" else 1
  per_chunk = (n_scores * C * C * K * products(P)
               + 2 * (C.bit_length() - 2) * C ** 3 * products(IP)
               + C * C * (K + V) * products(P))
  chunks = spec.B * spec.HV * spec.nc
  inb = spec.in_dtype.itemsize
  g_bytes = {None: 0, "head": 4, "channel": 4 * K * 1.25}[spec.gate]
  bytes_in = spec.B * spec.T * spec.HV * ((K + V) * inb + 4 + g_bytes)
  bytes_out = spec.B * spec.T * spec.HV * (2 * P * 2 * K + jnp.dtype(spec.state_dtype).itemsize * V)
  return pl.CostEstimate(flops=int(2 * per_chunk * chunks),
                         transcendentals=int(chunks * C * K * (n_scores + 2)),
                         bytes_accessed=int(bytes_in + bytes_out))


def _kernel(spec: Spec, interpret: bool, k_ref, v_ref, beta_ref, *refs, **s):
  chip = mg.Chip(interpret)
  ng, nm = io.gate_inputs(spec), io.mask_inputs(spec)
  side, (w_ref, u_ref, kd_ref) = refs[:ng + nm], refs[ng + nm:]
  C, K, V, P = spec.C, spec.K, spec.V, spec.parts
  c, h, b = lax.axis_index("chunk"), lax.axis_index("head"), lax.axis_index("stream")
  t0 = c * C
  copies = [(k_ref.at[b, pl.ds(t0, C), h // spec.G], s["k_in"]),
            (v_ref.at[b, pl.ds(t0, C), h], s["v_in"]),
            (beta_ref.at[b, h, pl.ds(t0, C)], s["beta"])]
  copies += io.side_copies(spec, side, s, b, h, t0)
  mg.copy_in(copies, s["bar"])
  mg.wait(s["bar"])

  beta = chip.rows(s["beta"])
  k, _ = io.normalize(chip, chip.load(s["k_in"]), spec.l2norm)

  def inverse(k_op, ga, gb, gm, ia, ix, it):
    cg = io.chunk_gates(spec, chip, s, (mg.Operand(ga), mg.Operand(gb), mg.Operand(gm)))
    k_op = chip.put(k, k_op)
    A = chip.to_rows(beta, (C, C)) * cg.scores(k, k_op, k, k_op, diagonal=False)
    X = unit_lower_inverse(chip, A, (mg.Operand(ia), mg.Operand(ix), mg.Operand(it)))
    chip.put(X, s["x_op"])

  IP = spec.inverse_parts
  pl.run_scoped(inverse, *[mg.operand(P, C, K)] * 3, mg.operand(P, C, C),
                *[mg.operand(IP, C, C)] * 3)

  cg = io.chunk_gates(spec, chip, s)
  x_op = mg.Operand(s["x_op"])
  first = io.row_mask(chip, s, "first", (C, K))
  last = io.row_mask(chip, s, "last", (C, K))
  bk = chip.to_rows(beta, (C, K))

  def outputs(y_op, w_op, kd_op, yv_op, u_out):
    # W = X (beta k exp(G) first)
    yw = io.mul(bk * k, io.decay_rows(spec, chip, cg, (C, K)), first)
    chip.put(chip.mm(x_op, chip.put(yw, y_op)), w_op)
    # Kd = k exp(G_last - G) last
    kd = io.mul(k, _decay_to_end(spec, chip, cg, s, (C, K)), last)
    chip.put(kd, kd_op)
    # U = X (beta v)
    yv = chip.to_rows(beta, (C, V)) * chip.load(s["v_in"])
    chip.store(chip.mm(x_op, chip.put(yv, yv_op)), u_out)
    mg.copy_out([(w_op, w_ref.at[b, h, :, pl.ds(t0, C)]),
                 (kd_op, kd_ref.at[b, h, :, pl.ds(t0, C)]),
                 (u_out, u_ref.at[b, h, pl.ds(t0, C)])])
    mg.finish_copies_out()

  pl.run_scoped(outputs, *[mg.operand(P, C, K)] * 3, mg.operand(P, C, V),
                mg.tile((C, V), spec.state_dtype))


def _decay_to_end(spec: Spec, chip: mg.Chip, cg, s, shape):
  """exp(G_last - G) per row (and channel): the decay from after each step to the chunk end."""
  C = spec.C
  if spec.gate == "head":
    return chip.to_rows(jnp.exp(s["g"][C - 1] - cg.g_rows), shape)
  if spec.gate == "channel":
    from .gates import REFERENCE_STRIDE  # pylint: disable=g-import-not-at-top
    last = chip.to_cols(chip.cols(s["g_refs"].at[(C - 1) // REFERENCE_STRIDE]), shape)
    return jnp.exp(last - cg.g)
  return None


def scratch(spec: Spec) -> dict:
  C, K, V, P = spec.C, spec.K, spec.V, spec.parts
  n_copies = 3 + io.side_count(spec)
  return dict(
      k_in=mg.tile((C, K), spec.in_dtype), v_in=mg.tile((C, V), spec.in_dtype),
      beta=mg.vector(C), x_op=mg.operand(P, C, C), bar=mg.barriers(n_copies)[0],
      **io.side_scratch(spec))


def prepare(spec: Spec, k, v, beta, gates, masks, *, interpret: bool):
  """W, U, Kd for every chunk (layouts in spec.py). gates: () / (G,) / (G, G4); masks: () or
  (seg, first, last)."""
  call = mg.kernel(functools.partial(_kernel, spec, interpret), out_type=out_types(spec),
                   scratch=scratch(spec), grid=(spec.nc, spec.HV, spec.B),
                   grid_names=("chunk", "head", "stream"), interpret=interpret,
                   name="deltajax_prepare", cost=cost(spec))
  return call(k, v, beta, *gates, *masks)
