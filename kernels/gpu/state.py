"""The sequential passes over chunks: forward (states) and reverse (state cotangents).

One block per (V block, value head, stream); the state [K, Vb] stays in registers (float32,
the wgmma accumulator's layout) across the chunk loop, and the next chunk's inputs are copied
in by TMA while the current one is computed (two SMEM slots per input).

Forward, per chunk (S the state entering it):
  h_c   = S                                     (kept: the outputs and the backward read it)
  V_new = U - W S
  S     = D * S + Kd^T V_new (+ S_add)
Reverse, per chunk backwards (dS the cotangent of the state leaving it):
  dSo_c  = dS                                   (kept: the chunk-parallel backward reads it)
  dV_new = dV_direct + Kd dS
  dS     = D * dS + Qg^T dO - W^T dV_new (+ dh_c from outside)
Two (forward) or three (reverse) [C, K] x [K, Vb] products per chunk: all that is sequential.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import mosaic as mg
from .spec import Spec


def run_chunks(nc: int, ins, bars, body, carry, *, reverse: bool, slots: int):
  """carry = body(c, slot_refs, carry) for every chunk c, in order or reversed.

  ins: [(view: c -> GMEM ref of chunk c, buffer: SMEM [slots, ...])]; bars: `slots` barriers
  of len(ins) arrivals each. With two slots the TMA copies of chunk c + 1 are in flight while
  chunk c runs; with one (when two do not fit in SMEM) each chunk waits for its own copies.
  """
  order = (lambda i: nc - 1 - i) if reverse else (lambda i: i)

  def issue(i, slot):
    c = order(i)
    for view, buf in ins:
      plgpu.copy_gmem_to_smem(view(c), buf.at[slot], bars.at[slot])

  if slots == 2:
    issue(0, 0)

  def step(i, carry):
    # The previous chunk's copies out may still read SMEM that this chunk (and the copies in)
    # are about to overwrite.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    if slots == 2:
      slot = lax.rem(i, 2)

      @pl.when(i + 1 < nc)
      def _():
        issue(i + 1, 1 - slot)
    else:
      slot = 0
      issue(i, 0)
    plgpu.barrier_wait(bars.at[slot])
    return body(order(i), [buf.at[slot] for _, buf in ins], carry)

  return lax.fori_loop(0, nc, step, carry)


def _with_slots(specs: dict, slotted: tuple, slots: int) -> dict:
  """specs with a leading [slots] axis on the per-chunk input buffers."""
  out = dict(specs)
  for name in slotted:
    x = specs[name]
    out[name] = plgpu.SMEM((slots,) + tuple(x.shape), x.dtype, transforms=x.transforms)
  return out


def choose_slots(specs: dict, slotted: tuple) -> int:
  """2 (prefetch the next chunk) if it fits in SMEM, else 1; 0 if not even one fits."""
  for slots in (2, 1):
    if mg.smem_bytes(_with_slots(specs, slotted, slots)) <= mg.SMEM_BYTES:
      return slots
  return 0


def load_state(src, cols_view, chip):
  """A float32 [K, Vb] tile from GMEM into registers, through a scope of SMEM."""
  def body(buf, bar):
    mg.copy_in([(cols_view(src), buf)], bar)
    mg.wait(bar)
    return chip.load(buf)
  K, Vb = cols_view(src).shape
  return mg.scoped(body, buf=mg.tile((K, Vb)), bar=mg.barriers(1)[0])


def store_state(S, dst, chip):
  def body(buf):
    chip.store(S, buf)
    mg.copy_out([(buf, dst)])
    mg.finish_copies_out()
  mg.scoped(body, buf=mg.tile(S.shape))


def _pieces(x):
  """[..., P, N, M] -> [prod(...) * P, N, M] (see spec.py)."""
  return x.reshape((-1,) + x.shape[-2:])


def forward_cost(spec: Spec) -> pl.CostEstimate:
  P, C, K, V = spec.parts, spec.C, spec.K, spec.V
  prod = P * (P + 1) // 2
  chunks = spec.B * spec.HV * spec.nc
  reads = chunks * spec.vblocks * (2 * P * 2 * C * K + 4 * K) + chunks * P * 2 * C * V
  writes = chunks * P * 2 * (K * V + C * V)
  return pl.CostEstimate(flops=int(chunks * 2 * 2 * C * K * V * prod), transcendentals=0,
                         bytes_accessed=int(reads + writes + 2 * spec.B * spec.HV * K * V * 4))


def _forward_specs(spec: Spec, with_add: bool) -> tuple[dict, tuple]:
  P, C, K, Vb = spec.parts, spec.C, spec.K, spec.block_v
  specs = dict(w=mg.operand(P, C, K), kd=mg.operand(P, C, K), u=mg.operand(P, C, Vb),
               d=mg.vector(K), s_op=mg.operand(P, K, Vb), vn_op=mg.operand(P, C, Vb))
  slotted = ("w", "kd", "u", "d")
  if with_add:
    specs["add"] = mg.tile((K, Vb))
    slotted += ("add",)
  return specs, slotted


def _forward_kernel(spec: Spec, interpret: bool, with_add: bool, slots: int, w_ref, u_ref,
                    kd_ref, d_ref, h0_ref, *refs):
  chip = mg.Chip(interpret)
  add_ref = refs[0] if with_add else None
  h_ref, vn_ref, final_ref = refs[1:] if with_add else refs
  C, Vb = spec.C, spec.block_v
  j, h, b = lax.axis_index("vblock"), lax.axis_index("head"), lax.axis_index("stream")
  cols = pl.ds(j * Vb, Vb)
  rows = lambda c: pl.ds(c * C, C)
  S0 = load_state(h0_ref, lambda r: r.at[b, h, :, cols], chip)

  def loop(**s):
    ins = [(lambda c: w_ref.at[spec.pieces(b, h), rows(c)], s["w"]),
           (lambda c: kd_ref.at[spec.pieces(b, h), rows(c)], s["kd"]),
           (lambda c: u_ref.at[spec.pieces(b, h), rows(c), cols], s["u"]),
           (lambda c: d_ref.at[b, h, c], s["d"])]
    if with_add:
      ins.append((lambda c: add_ref.at[(b * spec.HV + h) * spec.nc + c, :, cols], s["add"]))

    def chunk(c, slot, S):
      w, kd, u, d, *add = slot
      s_op = chip.put(S, s["s_op"])                       # also h_c, copied out from here
      V_new = chip.load_pieces(mg.Operand(u)) - chip.mm(mg.Operand(w), s_op)
      vn_op = chip.put(V_new, s["vn_op"])
      mg.copy_out([(s["s_op"], h_ref.at[spec.state_pieces(b, h, c), :, cols]),
                   (s["vn_op"], vn_ref.at[spec.pieces(b, h), rows(c), cols])])
      S = chip.to_rows(chip.rows(d), S.shape) * S + chip.mm(mg.Operand(kd).T, vn_op)
      if add:
        S = S + chip.load(add[0])
      return S

    S = run_chunks(spec.nc, ins, s["bars"], chunk, S0, reverse=False, slots=slots)
    mg.finish_copies_out()
    return S

  specs, slotted = _forward_specs(spec, with_add)
  S = mg.scoped(loop, bars=plgpu.Barrier(num_arrivals=len(slotted), num_barriers=slots),
                **_with_slots(specs, slotted, slots))
  store_state(S, final_ref.at[b, h, :, cols], chip)


def forward(spec: Spec, W, U, Kd, D, h0, S_add, *, interpret: bool):
  """The state pass: (h [B, HV, nc, P, K, V] pieces, V_new [B, HV, P, T, V] pieces,
  final [B, HV, K, V] float32). S_add None or [B, HV, nc, K, V] float32."""
  slots = choose_slots(*_forward_specs(spec, S_add is not None))
  assert slots, "checked by kernels.gpu.check_supported"
  B, HV, nc, P, T, K, V = spec.B, spec.HV, spec.nc, spec.parts, spec.T, spec.K, spec.V
  out_type = (jax.ShapeDtypeStruct(spec.state_shape, mg.BF16),
              jax.ShapeDtypeStruct(spec.step_shape(V), mg.BF16),
              jax.ShapeDtypeStruct((B, HV, K, V), jnp.float32))
  call = mg.kernel(functools.partial(_forward_kernel, spec, interpret, S_add is not None, slots),
                   out_type=out_type, scratch={}, grid=(spec.vblocks, HV, B),
                   grid_names=("vblock", "head", "stream"), interpret=interpret,
                   name="deltajax_state_forward", cost=forward_cost(spec))
  extra = () if S_add is None else (_pieces(S_add),)
  h, V_new, final = call(_pieces(W), _pieces(U), _pieces(Kd), D, h0, *extra)
  return h.reshape(B, HV, nc, P, K, V), V_new.reshape(B, HV, P, T, V), final


def reverse_cost(spec: Spec) -> pl.CostEstimate:
  P, C, K, V = spec.parts, spec.C, spec.K, spec.V
  prod = P * (P + 1) // 2
  chunks = spec.B * spec.HV * spec.nc
  reads = (chunks * spec.vblocks * (3 * P * 2 * C * K + 4 * K)
           + chunks * C * V * (spec.in_dtype.itemsize + 2 * P))
  writes = chunks * P * 2 * (K * V + C * V)
  return pl.CostEstimate(flops=int(chunks * 3 * 2 * C * K * V * prod), transcendentals=0,
                         bytes_accessed=int(reads + writes + 2 * spec.B * spec.HV * K * V * 4))


def _direct_do(spec: Spec, dtype) -> bool:
  """dO is its own (single) bf16 piece: copied straight into the operand tile."""
  return spec.parts == 1 and jnp.dtype(dtype) == jnp.dtype(mg.BF16)


def _reverse_specs(spec: Spec, dO_dtype, with_dh: bool) -> tuple[dict, tuple]:
  P, C, K, Vb = spec.parts, spec.C, spec.K, spec.block_v
  specs = dict(qg=mg.operand(P, C, K), w=mg.operand(P, C, K), kd=mg.operand(P, C, K),
               d=mg.vector(K), dvd=mg.operand(P, C, Vb), ds_op=mg.operand(P, K, Vb),
               dv_op=mg.operand(P, C, Vb))
  if _direct_do(spec, dO_dtype):
    specs["do"] = mg.operand(1, C, Vb)
  else:
    specs.update(do=mg.tile((C, Vb), dO_dtype), do_op=mg.operand(P, C, Vb))
  slotted = ("qg", "w", "kd", "d", "do", "dvd")
  if with_dh:
    specs["dh"] = mg.tile((K, Vb))
    slotted += ("dh",)
  return specs, slotted


def _reverse_kernel(spec: Spec, interpret: bool, with_dh: bool, slots: int, qg_ref, w_ref,
                    kd_ref, d_ref, do_ref, dvd_ref, dfinal_ref, *refs):
  chip = mg.Chip(interpret)
  dh_ref = refs[0] if with_dh else None
  dso_ref, dvn_ref, dh0_ref = refs[1:] if with_dh else refs
  C, Vb = spec.C, spec.block_v
  j, h, b = lax.axis_index("vblock"), lax.axis_index("head"), lax.axis_index("stream")
  cols = pl.ds(j * Vb, Vb)
  rows = lambda c: pl.ds(c * C, C)
  direct = _direct_do(spec, do_ref.dtype)
  dS0 = load_state(dfinal_ref, lambda r: r.at[b, h, :, cols], chip)

  def loop(**s):
    do_view = ((lambda c: do_ref.at[pl.ds(b, 1), rows(c), h, cols]) if direct
               else (lambda c: do_ref.at[b, rows(c), h, cols]))
    ins = [(lambda c: qg_ref.at[spec.pieces(b, h), rows(c)], s["qg"]),
           (lambda c: w_ref.at[spec.pieces(b, h), rows(c)], s["w"]),
           (lambda c: kd_ref.at[spec.pieces(b, h), rows(c)], s["kd"]),
           (lambda c: d_ref.at[b, h, c], s["d"]),
           (do_view, s["do"]),
           (lambda c: dvd_ref.at[spec.pieces(b, h), rows(c), cols], s["dvd"])]
    if with_dh:
      ins.append((lambda c: dh_ref.at[(b * spec.HV + h) * spec.nc + c, :, cols], s["dh"]))

    def chunk(c, slot, dS):
      qg, w, kd, d, do, dvd, *dh = slot
      ds_op = chip.put(dS, s["ds_op"])                   # also dSo_c, copied out from here
      dV = chip.load_pieces(mg.Operand(dvd)) + chip.mm(mg.Operand(kd), ds_op)
      dv_op = chip.put(dV, s["dv_op"])
      mg.copy_out([(s["ds_op"], dso_ref.at[spec.state_pieces(b, h, c), :, cols]),
                   (s["dv_op"], dvn_ref.at[spec.pieces(b, h), rows(c), cols])])
      do_op = mg.Operand(do) if direct else chip.put(chip.load(do), s["do_op"])
      dS = (chip.to_rows(chip.rows(d), dS.shape) * dS
            + chip.mm(mg.Operand(qg).T, do_op) - chip.mm(mg.Operand(w).T, dv_op))
      if dh:
        dS = dS + chip.load(dh[0])
      return dS

    dS = run_chunks(spec.nc, ins, s["bars"], chunk, dS0, reverse=True, slots=slots)
    mg.finish_copies_out()
    return dS

  specs, slotted = _reverse_specs(spec, do_ref.dtype, with_dh)
  dS = mg.scoped(loop, bars=plgpu.Barrier(num_arrivals=len(slotted), num_barriers=slots),
                 **_with_slots(specs, slotted, slots))
  store_state(dS, dh0_ref.at[b, h, :, cols], chip)


def reverse(spec: Spec, Qg, W, Kd, D, dO, dV_direct, dfinal, dh, *, interpret: bool):
  """The reverse pass: (dSo [B, HV, nc, P, K, V] pieces: the cotangent of the state leaving
  each chunk, dV_new [B, HV, P, T, V] pieces, dh0 [B, HV, K, V] float32).

  Qg, W, Kd: [B, HV, P, T, K] pieces; D [B, HV, nc, K]; dO [B, T, HV, V] (o's dtype);
  dV_direct [B, HV, P, T, V] pieces (Attn^T dO plus any outside cotangent of V_new);
  dfinal [B, HV, K, V] float32; dh None or [B, HV, nc, K, V] float32 (outside cotangents of
  the states entering the chunks).
  """
  slots = choose_slots(*_reverse_specs(spec, dO.dtype, dh is not None))
  assert slots, "checked by kernels.gpu.check_supported"
  B, HV, nc, P, T, K, V = spec.B, spec.HV, spec.nc, spec.parts, spec.T, spec.K, spec.V
  out_type = (jax.ShapeDtypeStruct(spec.state_shape, mg.BF16),
              jax.ShapeDtypeStruct(spec.step_shape(V), mg.BF16),
              jax.ShapeDtypeStruct((B, HV, K, V), jnp.float32))
  call = mg.kernel(functools.partial(_reverse_kernel, spec, interpret, dh is not None, slots),
                   out_type=out_type, scratch={}, grid=(spec.vblocks, HV, B),
                   grid_names=("vblock", "head", "stream"), interpret=interpret,
                   name="deltajax_state_reverse", cost=reverse_cost(spec))
  extra = () if dh is None else (_pieces(dh),)
  dso, dV, dh0 = call(_pieces(Qg), _pieces(W), _pieces(Kd), D, dO, _pieces(dV_direct), dfinal,
                      *extra)
  return dso.reshape(B, HV, nc, P, K, V), dV.reshape(B, HV, P, T, V), dh0
