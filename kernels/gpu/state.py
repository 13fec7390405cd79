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


def forward_cost(spec: Spec) -> pl.CostEstimate:
  P, C, K, V = spec.parts, spec.C, spec.K, spec.V
  prod = P * (P + 1) // 2
  chunks = spec.B * spec.HV * spec.nc
  sd = jnp.dtype(spec.state_dtype).itemsize
  reads = chunks * spec.vblocks * (2 * P * 2 * C * K + 4 * K) + chunks * C * V * sd
  writes = chunks * (K * V * sd + C * V * sd)
  return pl.CostEstimate(flops=int(chunks * 2 * 2 * C * K * V * prod), transcendentals=0,
                         bytes_accessed=int(reads + writes + 2 * spec.B * spec.HV * K * V * 4))


def _forward_specs(spec: Spec, with_add: bool) -> tuple[dict, tuple]:
  P, C, K, Vb, sd = spec.parts, spec.C, spec.K, spec.block_v, spec.state_dtype
  specs = dict(w=mg.operand(P, C, K), kd=mg.operand(P, C, K), u=mg.tile((C, Vb), sd),
               d=mg.vector(K), s_op=mg.operand(P, K, Vb), vn_op=mg.operand(P, C, Vb),
               h_out=mg.tile((K, Vb), sd), vn_out=mg.tile((C, Vb), sd))
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
    ins = [(lambda c: w_ref.at[b, h, :, rows(c)], s["w"]),
           (lambda c: kd_ref.at[b, h, :, rows(c)], s["kd"]),
           (lambda c: u_ref.at[b, h, rows(c), cols], s["u"]),
           (lambda c: d_ref.at[b, h, c], s["d"])]
    if with_add:
      ins.append((lambda c: add_ref.at[b, h, c, :, cols], s["add"]))

    def chunk(c, slot, S):
      w, kd, u, d, *add = slot
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # last chunk's copies out are done
      chip.store(S, s["h_out"])
      V_new = chip.load(u) - chip.mm(mg.Operand(w), chip.put(S, s["s_op"]))
      chip.store(V_new, s["vn_out"])
      mg.copy_out([(s["h_out"], h_ref.at[b, h, c, :, cols]),
                   (s["vn_out"], vn_ref.at[b, h, rows(c), cols])])
      S = chip.to_rows(chip.rows(d), S.shape) * S + chip.mm(mg.Operand(kd).T,
                                                            chip.put(V_new, s["vn_op"]))
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
  """(h [B, HV, nc, K, V] state dtype, V_new [B, HV, T, V] state dtype, final [B, HV, K, V]
  float32): the state pass. S_add None or [B, HV, nc, K, V] float32."""
  slots = choose_slots(*_forward_specs(spec, S_add is not None))
  assert slots, "checked by kernels.gpu.check_supported"
  B, HV, nc, T, K, V, sd = spec.B, spec.HV, spec.nc, spec.T, spec.K, spec.V, spec.state_dtype
  out_type = (jax.ShapeDtypeStruct((B, HV, nc, K, V), sd),
              jax.ShapeDtypeStruct((B, HV, T, V), sd),
              jax.ShapeDtypeStruct((B, HV, K, V), jnp.float32))
  call = mg.kernel(functools.partial(_forward_kernel, spec, interpret, S_add is not None, slots),
                   out_type=out_type, scratch={}, grid=(spec.vblocks, HV, B),
                   grid_names=("vblock", "head", "stream"), interpret=interpret,
                   name="deltajax_state_forward", cost=forward_cost(spec))
  extra = () if S_add is None else (S_add,)
  return call(W, U, Kd, D, h0, *extra)


def reverse_cost(spec: Spec) -> pl.CostEstimate:
  P, C, K, V = spec.parts, spec.C, spec.K, spec.V
  prod = P * (P + 1) // 2
  chunks = spec.B * spec.HV * spec.nc
  sd = jnp.dtype(spec.state_dtype).itemsize
  reads = chunks * spec.vblocks * (3 * P * 2 * C * K + 4 * K) + chunks * C * V * (2 + 4)
  writes = chunks * (K * V * sd + C * V * sd)
  return pl.CostEstimate(flops=int(chunks * 3 * 2 * C * K * V * prod), transcendentals=0,
                         bytes_accessed=int(reads + writes + 2 * spec.B * spec.HV * K * V * 4))


def _reverse_specs(spec: Spec, dO_dtype, with_dh: bool) -> tuple[dict, tuple]:
  P, C, K, Vb, sd = spec.parts, spec.C, spec.K, spec.block_v, spec.state_dtype
  specs = dict(qg=mg.operand(P, C, K), w=mg.operand(P, C, K), kd=mg.operand(P, C, K),
               d=mg.vector(K), do=mg.tile((C, Vb), dO_dtype), dvd=mg.tile((C, Vb), sd),
               ds_op=mg.operand(P, K, Vb), do_op=mg.operand(P, C, Vb),
               dv_op=mg.operand(P, C, Vb), dso_out=mg.tile((K, Vb), sd),
               dvn_out=mg.tile((C, Vb), sd))
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
  dS0 = load_state(dfinal_ref, lambda r: r.at[b, h, :, cols], chip)

  def loop(**s):
    ins = [(lambda c: qg_ref.at[b, h, :, rows(c)], s["qg"]),
           (lambda c: w_ref.at[b, h, :, rows(c)], s["w"]),
           (lambda c: kd_ref.at[b, h, :, rows(c)], s["kd"]),
           (lambda c: d_ref.at[b, h, c], s["d"]),
           (lambda c: do_ref.at[b, rows(c), h, cols], s["do"]),
           (lambda c: dvd_ref.at[b, h, rows(c), cols], s["dvd"])]
    if with_dh:
      ins.append((lambda c: dh_ref.at[b, h, c, :, cols], s["dh"]))

    def chunk(c, slot, dS):
      qg, w, kd, d, do, dvd, *dh = slot
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      chip.store(dS, s["dso_out"])
      dV = chip.load(dvd) + chip.mm(mg.Operand(kd), chip.put(dS, s["ds_op"]))
      chip.store(dV, s["dvn_out"])
      mg.copy_out([(s["dso_out"], dso_ref.at[b, h, c, :, cols]),
                   (s["dvn_out"], dvn_ref.at[b, h, rows(c), cols])])
      dS = (chip.to_rows(chip.rows(d), dS.shape) * dS
            + chip.mm(mg.Operand(qg).T, chip.put(chip.load(do), s["do_op"]))
            - chip.mm(mg.Operand(w).T, chip.put(dV, s["dv_op"])))
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
  """(dSo [B, HV, nc, K, V] state dtype: the cotangent of the state leaving each chunk,
  dV_new [B, HV, T, V] state dtype, dh0 [B, HV, K, V] float32).

  Qg, W, Kd: [B, HV, P, T, K] pieces; D [B, HV, nc, K]; dO [B, T, HV, V] (o's dtype);
  dV_direct [B, HV, T, V] state dtype (Attn^T dO plus any outside cotangent of V_new);
  dfinal [B, HV, K, V] float32; dh None or [B, HV, nc, K, V] float32 (outside cotangents of
  the states entering the chunks).
  """
  slots = choose_slots(*_reverse_specs(spec, dO.dtype, dh is not None))
  assert slots, "checked by kernels.gpu.check_supported"
  B, HV, nc, T, K, V, sd = spec.B, spec.HV, spec.nc, spec.T, spec.K, spec.V, spec.state_dtype
  out_type = (jax.ShapeDtypeStruct((B, HV, nc, K, V), sd),
              jax.ShapeDtypeStruct((B, HV, T, V), sd),
              jax.ShapeDtypeStruct((B, HV, K, V), jnp.float32))
  call = mg.kernel(functools.partial(_reverse_kernel, spec, interpret, dh is not None, slots),
                   out_type=out_type, scratch={}, grid=(spec.vblocks, HV, B),
                   grid_names=("vblock", "head", "stream"), interpret=interpret,
                   name="deltajax_state_reverse", cost=reverse_cost(spec))
  extra = () if dh is None else (dh,)
  return call(Qg, W, Kd, D, dO, dV_direct, dfinal, *extra)
