"""The two `pallas_call`s: the fused forward pass and the fused backward pass.

Forward, grid (B, H, nb, Gb): one step takes `cb` chunks (the row block) of the `hb` value heads
of group gb of q/k head h. For each chunk in order (a `fori_loop`, rows sliced from the blocks
with `pl.ds`) and each of its heads, it runs `maths.chunk_forward`: gate sums, scores, the
inverse, W and U, then the state step. W, U, the scores and the inverse live only in VMEM; the
state lives in a VMEM scratch across the chunk axis ("arbitrary"). HBM sees the inputs, o, the
final state and, when a backward follows, the state entering every chunk.

Backward, the same grid with the chunk axis reversed: per chunk it reloads the entering state,
recomputes the chunk in VMEM and differentiates `maths.chunk_forward` with `jax.vjp` in-kernel
(the cotangent of the state is carried in a VMEM scratch), so the preparation's gradient is
fused with the reverse state pass. dq and dk sum over the value heads of a q/k head in float32
scratch: the value-head groups are the innermost grid axis, so the dq/dk blocks stay resident
while the groups visit them.

A chunk that starts a sequence (scalar-prefetched `start`, `seq`) loads its initial state by a
DMA from HBM (h0 stays in HBM: any chunk may need any row of it).

Layouts (the glue in api.py makes them, free reshapes when K and V are multiples of 128):
  q [B, T, H*Kp]; k [B, T*n, H*Kp]; v [B, T*n, HV*Vp]: a head is a 128-aligned lane block.
  beta, head gates: [B, HV, nb, cb, C] float32: each chunk's per-step values are one lane row.
  channel gates: [B, T, HV*Kp]. segments: [B, nb, cb, C] (steps), [B, nb, cb, Ct] (tokens).
  states: [B, HV, nb*cb, Kp, Vp] float32.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import maths

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every static size and switch of one call (hashable: a nondiff argument of the vjp)."""
  ctx: maths.Chunk
  B: int
  T: int            # tokens (rows of q and o), after any padding to one row block
  H: int
  HV: int
  Kp: int
  Vp: int
  N: int
  cb: int           # chunks per grid step
  nb: int           # row blocks: nb * cb >= nc
  hb: int           # value heads per grid step
  has_h0: bool
  has_sadd: bool
  packed_finals: bool   # emit the state entering every chunk and V_new (document finals)
  q_dtype: str
  v_dtype: str
  g_dtype: str | None
  vmem_limit_bytes: int | None
  interpret: object = False

  @property
  def G(self):
    return self.HV // self.H

  @property
  def Gb(self):
    return self.G // self.hb

  @property
  def nc(self):
    return self.nb * self.cb

  @property
  def Ct(self):
    return self.ctx.Ct

  @property
  def C(self):
    return self.ctx.C

  @property
  def grid(self):
    return (self.B, self.H, self.nb, self.Gb)

  def compiler_params(self):
    if self.interpret:
      return None
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"),
        vmem_limit_bytes=self.vmem_limit_bytes)


# --------------------------------------------------------------------------------------------
# Block specs. Index maps get (b, h, i, gb, start_ref, seq_ref); `blk` maps i to the row block.

def _specs(pl_: Plan, blk):
  Ct, C, cb, Kp, Vp, hb, Gb = pl_.Ct, pl_.C, pl_.cb, pl_.Kp, pl_.Vp, pl_.hb, pl_.Gb
  grp = lambda h, gb: h * Gb + gb
  S = pl.BlockSpec
  return dict(
      q=S((None, cb * Ct, Kp), lambda b, h, i, gb, *_: (b, blk(i), h)),
      k=S((None, cb * C, Kp), lambda b, h, i, gb, *_: (b, blk(i), h)),
      v=S((None, cb * C, hb * Vp), lambda b, h, i, gb, *_: (b, blk(i), grp(h, gb))),
      o=S((None, cb * Ct, hb * Vp), lambda b, h, i, gb, *_: (b, blk(i), grp(h, gb))),
      rowsC=S((None, hb, None, cb, C), lambda b, h, i, gb, *_: (b, grp(h, gb), blk(i), 0, 0)),
      gch=S((None, cb * C, hb * Kp), lambda b, h, i, gb, *_: (b, blk(i), grp(h, gb))),
      segs=S((None, None, cb, C), lambda b, h, i, gb, *_: (b, blk(i), 0, 0)),
      segt=S((None, None, cb, Ct), lambda b, h, i, gb, *_: (b, blk(i), 0, 0)),
      states=S((None, hb, cb, Kp, Vp), lambda b, h, i, gb, *_: (b, grp(h, gb), blk(i), 0, 0)),
      # All G value heads of q/k head h: constant while the chunk and group axes run, so
      # the block is never revisited after another one was visited.
      head_state=S((None, pl_.G, Kp, Vp), lambda b, h, i, gb, *_: (b, h, 0, 0)),
      any=S(memory_space=pl.ANY),
  )


def _rows_valid(n_rows: int, first_row, limit: int):
  return maths.iota((n_rows, 1), 0) + first_row < limit


class _Loader:
  """Reads one chunk's rows from the input blocks, rows past the sequence end zeroed (they are
  padding of a partial block: uninitialised, NaN in the interpreter)."""

  def __init__(self, pl_: Plan, refs, c, chunk):
    self.p, self.r, self.c = pl_, refs, c
    Ct, C = pl_.Ct, pl_.C
    self.rows_t = pl.ds(pl.multiple_of(c * Ct, Ct), Ct)
    self.rows_s = pl.ds(pl.multiple_of(c * C, C), C)
    self.ok_t = _rows_valid(Ct, chunk * Ct, pl_.T)
    self.ok_s = _rows_valid(C, chunk * C, pl_.T * pl_.ctx.n)

  def tok(self, ref, lanes=slice(None)):
    return jnp.where(self.ok_t, ref[self.rows_t, lanes], 0)

  def step(self, ref, lanes=slice(None)):
    return jnp.where(self.ok_s, ref[self.rows_s, lanes], 0)

  def row(self, ref, j):
    return ref[j, pl.ds(self.c, 1), :]

  def seg(self):
    if not self.p.ctx.packed:
      return None
    s_row = self.r["segs"][pl.ds(self.c, 1), :]
    t_row = self.r["segt"][pl.ds(self.c, 1), :]
    return maths.row_to_col(s_row), s_row, maths.row_to_col(t_row)

  def gate(self, j):
    p = self.p
    if p.ctx.gate == "head":
      return self.row(self.r["g"], j)
    if p.ctx.gate == "channel":
      return self.step(self.r["g"], pl.ds(j * p.Kp, p.Kp)).astype(F32)
    return None


def _chunk_fn(pl_: Plan, seg):
  return functools.partial(maths.chunk_forward, seg=seg, ctx=pl_.ctx)


# --------------------------------------------------------------------------------------------
# Forward.

def _forward_kernel(start_ref, seq_ref, *refs, pl_: Plan, names_in, names_out):
  n_in, n_out = len(names_in), len(names_out)
  r = dict(zip(names_in, refs[:n_in]))
  r.update(zip(names_out, refs[n_in:n_in + n_out]))
  state, = refs[n_in + n_out:]
  b, h, i, gb = (pl.program_id(a) for a in range(4))
  hb, Vp = pl_.hb, pl_.Vp
  grp = h * pl_.Gb + gb

  def chunk_body(c, carry):
    chunk = i * pl_.cb + c
    ld = _Loader(pl_, r, c, chunk)
    flag = b * pl_.nc + chunk
    q, k, seg = ld.tok(r["q"]), ld.step(r["k"]), ld.seg()
    for j in range(hb):
      slot = gb * hb + j

      @pl.when(start_ref[flag] == 1)
      def _load():
        if pl_.has_h0:
          pltpu.sync_copy(r["h0"].at[seq_ref[flag], grp * hb + j], state.at[slot])
        else:
          state[slot] = jnp.zeros(state.shape[1:], F32)

      S = state[slot]
      if "states" in r:
        r["states"][j, c] = S
      v = ld.step(r["v"], pl.ds(j * Vp, Vp))
      o, S_next, v_new = _chunk_fn(pl_, seg)(q, k, v, ld.row(r["beta"], j), ld.gate(j), S)
      if pl_.has_sadd:
        S_next = S_next + r["sadd"][j, c]
      state[slot] = S_next
      r["final"][slot] = S_next
      r["o"][ld.rows_t, pl.ds(j * Vp, Vp)] = o.astype(r["o"].dtype)
      if "vnew" in r:
        r["vnew"][ld.rows_s, pl.ds(j * Vp, Vp)] = v_new
    return carry

  lax.fori_loop(0, pl_.cb, chunk_body, 0)


def forward(pl_: Plan, start, seq, q, k, v, beta, g, segs, segt, h0, sadd, *, emit_states: bool):
  """o [B, T, HV*Vp], final [B, HV, Kp, Vp] and, as asked, states and V_new (see module doc)."""
  sp = _specs(pl_, lambda i: i)
  names_in, arrays, in_specs = [], [], []

  def add(name, x, spec):
    if x is not None:
      names_in.append(name)
      arrays.append(x)
      in_specs.append(spec)

  add("q", q, sp["q"])
  add("k", k, sp["k"])
  add("v", v, sp["v"])
  add("beta", beta, sp["rowsC"])
  add("g", g, sp["rowsC"] if pl_.ctx.gate == "head" else sp["gch"])
  add("segs", segs, sp["segs"])
  add("segt", segt, sp["segt"])
  add("h0", h0, sp["any"])
  add("sadd", sadd, sp["states"])
  B, HV, Kp, Vp, nc, C = pl_.B, pl_.HV, pl_.Kp, pl_.Vp, pl_.nc, pl_.C
  outs = dict(o=(jax.ShapeDtypeStruct((B, pl_.T, HV * Vp), pl_.q_dtype), sp["o"]),
              final=(jax.ShapeDtypeStruct((B, HV, Kp, Vp), F32), sp["head_state"]))
  if emit_states or pl_.packed_finals:
    outs["states"] = (jax.ShapeDtypeStruct((B, HV, nc, Kp, Vp), F32), sp["states"])
  if pl_.packed_finals:
    outs["vnew"] = (jax.ShapeDtypeStruct((B, nc * C, HV * Vp), F32),
                    pl.BlockSpec((None, pl_.cb * C, pl_.hb * Vp),
                                 lambda b, h, i, gb, *_: (b, i, h * pl_.Gb + gb)))
  names_out = list(outs)
  kernel = functools.partial(_forward_kernel, pl_=pl_, names_in=tuple(names_in),
                             names_out=tuple(names_out))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=pl_.grid, in_specs=in_specs,
      out_specs=[outs[n][1] for n in names_out],
      scratch_shapes=[pltpu.VMEM((pl_.G, Kp, Vp), F32)])
  res = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=[outs[n][0] for n in names_out],
      compiler_params=pl_.compiler_params(), interpret=pl_.interpret,
      cost_estimate=cost_estimate(pl_, backward=False), name="delta_chunk_fwd_tpu",
  )(start, seq, *arrays)
  return dict(zip(names_out, res))


# --------------------------------------------------------------------------------------------
# Backward.

def _backward_kernel(start_ref, seq_ref, *refs, pl_: Plan, names_in, names_out):
  del seq_ref
  n_in, n_out = len(names_in), len(names_out)
  r = dict(zip(names_in, refs[:n_in]))
  r.update(zip(names_out, refs[n_in:n_in + n_out]))
  dstate, acc_q, acc_k = refs[n_in + n_out:]
  b, h, i, gb = (pl.program_id(a) for a in range(4))
  blk = pl_.nb - 1 - i
  hb, Vp, Kp, cb = pl_.hb, pl_.Vp, pl_.Kp, pl_.cb
  gate = pl_.ctx.gate

  @pl.when(i == 0)
  def _init_state():
    for j in range(hb):
      dstate[gb * hb + j] = r["dfinal"][gb * hb + j]

  @pl.when(gb == 0)
  def _init_acc():
    acc_q[...] = jnp.zeros(acc_q.shape, F32)
    acc_k[...] = jnp.zeros(acc_k.shape, F32)

  def chunk_body(t, carry):
    c = cb - 1 - t
    chunk = blk * cb + c
    ld = _Loader(pl_, r, c, chunk)
    flag = b * pl_.nc + chunk
    starts = start_ref[flag] == 1
    q, k, seg = ld.tok(r["q"]).astype(F32), ld.step(r["k"]).astype(F32), ld.seg()
    dq = jnp.zeros(q.shape, F32)
    dk = jnp.zeros(k.shape, F32)
    for j in range(hb):
      slot = gb * hb + j
      dSo = dstate[slot]
      if "dsadd" in r:
        r["dsadd"][j, c] = dSo
      v = ld.step(r["v"], pl.ds(j * Vp, Vp)).astype(F32)
      beta = ld.row(r["beta"], j)
      g = ld.gate(j)
      S = r["states"][j, c]
      do = ld.tok(r["do"], pl.ds(j * Vp, Vp)).astype(F32)
      dvn = (ld.step(r["dvnew"], pl.ds(j * Vp, Vp)) if "dvnew" in r
             else jnp.zeros((pl_.C, Vp), F32))
      fn = _chunk_fn(pl_, seg)
      if g is None:
        _, vjp = jax.vjp(lambda q, k, v, beta, S: fn(q, k, v, beta, None, S), q, k, v, beta, S)
        dq_j, dk_j, dv, dbeta, dS_in = vjp((do, dSo, dvn))
        dg = None
      else:
        _, vjp = jax.vjp(fn, q, k, v, beta, g, S)
        dq_j, dk_j, dv, dbeta, dg, dS_in = vjp((do, dSo, dvn))
      if "dstates" in r:
        dS_in = dS_in + r["dstates"][j, c]
      if pl_.has_h0:
        if "dh0" in r and r["dh0"].ndim == 4:          # packed: one block per chunk
          r["dh0"][j, c] = jnp.where(starts, dS_in, 0.0)
        else:
          r["dh0"][slot] = dS_in                       # the last write is chunk 0's
      dstate[slot] = jnp.where(starts, 0.0, dS_in)
      dq, dk = dq + dq_j, dk + dk_j
      r["dv"][ld.rows_s, pl.ds(j * Vp, Vp)] = dv.astype(r["dv"].dtype)
      r["dbeta"][j, pl.ds(c, 1), :] = dbeta
      if gate == "head":
        r["dg"][j, pl.ds(c, 1), :] = dg
      elif gate == "channel":
        r["dg"][ld.rows_s, pl.ds(j * Kp, Kp)] = dg.astype(r["dg"].dtype)
    acc_q[ld.rows_t, :] += dq
    acc_k[ld.rows_s, :] += dk
    return carry

  lax.fori_loop(0, cb, chunk_body, 0)

  @pl.when(gb == pl_.Gb - 1)
  def _write_qk():
    r["dq"][...] = acc_q[...].astype(r["dq"].dtype)
    r["dk"][...] = acc_k[...].astype(r["dk"].dtype)


def backward(pl_: Plan, start, seq, q, k, v, beta, g, segs, segt, states, do, dfinal,
             dstates, dvnew):
  """dq [B, T, H*Kp], dk [B, T*n, H*Kp], dv, dbeta, dg (as their inputs' layouts), dh0
  ([B, HV, Kp, Vp], or per chunk [B, HV, nc, Kp, Vp] when packed) and dS_add (per chunk)."""
  sp = _specs(pl_, lambda i: pl_.nb - 1 - i)
  names_in, arrays, in_specs = [], [], []

  def add(name, x, spec):
    if x is not None:
      names_in.append(name)
      arrays.append(x)
      in_specs.append(spec)

  add("q", q, sp["q"])
  add("k", k, sp["k"])
  add("v", v, sp["v"])
  add("beta", beta, sp["rowsC"])
  g_spec = sp["rowsC"] if pl_.ctx.gate == "head" else sp["gch"]
  add("g", g, g_spec)
  add("segs", segs, sp["segs"])
  add("segt", segt, sp["segt"])
  add("states", states, sp["states"])
  add("do", do, sp["o"])
  add("dfinal", dfinal, sp["head_state"])
  add("dstates", dstates, sp["states"])
  add("dvnew", dvnew, sp["v"])
  B, H, HV, Kp, Vp, nc, C, T, n = pl_.B, pl_.H, pl_.HV, pl_.Kp, pl_.Vp, pl_.nc, pl_.C, pl_.T, pl_.ctx.n
  sds = jax.ShapeDtypeStruct
  outs = dict(
      dq=(sds((B, T, H * Kp), pl_.q_dtype), sp["q"]),
      dk=(sds((B, T * n, H * Kp), pl_.q_dtype), sp["k"]),
      dv=(sds((B, T * n, HV * Vp), pl_.v_dtype), sp["v"]),
      dbeta=(sds(beta.shape, F32), sp["rowsC"]))
  if g is not None:
    outs["dg"] = (sds(g.shape, F32 if pl_.ctx.gate == "head" else pl_.g_dtype), g_spec)
  if pl_.has_h0:
    if pl_.ctx.packed:
      outs["dh0"] = (sds((B, HV, nc, Kp, Vp), F32), sp["states"])
    else:
      outs["dh0"] = (sds((B, HV, Kp, Vp), F32), sp["head_state"])
  if pl_.has_sadd:
    outs["dsadd"] = (sds((B, HV, nc, Kp, Vp), F32), sp["states"])
  names_out = list(outs)
  kernel = functools.partial(_backward_kernel, pl_=pl_, names_in=tuple(names_in),
                             names_out=tuple(names_out))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=pl_.grid, in_specs=in_specs,
      out_specs=[outs[nm][1] for nm in names_out],
      scratch_shapes=[pltpu.VMEM((pl_.G, Kp, Vp), F32),
                      pltpu.VMEM((pl_.cb * pl_.Ct, Kp), F32),
                      pltpu.VMEM((pl_.cb * C, Kp), F32)])
  res = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=[outs[nm][0] for nm in names_out],
      compiler_params=pl_.compiler_params(), interpret=pl_.interpret,
      cost_estimate=cost_estimate(pl_, backward=True), name="delta_chunk_bwd_tpu",
  )(start, seq, *arrays)
  return dict(zip(names_out, res))


# --------------------------------------------------------------------------------------------
# Cost model (what `pl.CostEstimate` declares; docs/kernels.md derives the roofline from it).

def chunk_flops(pl_: Plan) -> dict[str, float]:
  """Matmul FLOPs (2 per multiply-add) of one chunk of one value head in the forward, by part,
  counting the MXU passes of the chosen precision (3 for the split products in 16-bit mode)."""
  C, Ct, Kp, Vp, n = pl_.C, pl_.Ct, pl_.Kp, pl_.Vp, pl_.ctx.n
  nm = pl_.ctx.numerics
  split = 1 if nm.f32 else 3
  levels = max(C.bit_length() - 2, 0)                     # inverse rounds with products
  out = dict(
      scores=2.0 * C * C * Kp + 2.0 * Ct * C * Kp,
      inverse=2 * levels * 2.0 * C ** 3 * (1 if nm.inverse == "bfloat16" else split),
      wu=2.0 * C * C * (Kp + Vp),
      state=2.0 * (C + Ct) * Kp * Vp + 2.0 * Ct * C * Vp + 2.0 * C * Kp * Vp)
  gate = pl_.ctx.gate
  if gate == "head":
    out["gates"] = 2.0 * C ** 3 * split * (1 if n == 1 else 2)
  elif gate == "channel":
    lv = C.bit_length() - 1
    out["gates"] = (lv + 2) * 2.0 * C * C * Kp * split
    out["scores"] = lv * 2.0 * 2 * C * C * Kp
  return out


def cost_estimate(pl_: Plan, *, backward: bool) -> pl.CostEstimate:
  """FLOPs, transcendentals and HBM bytes of one pallas_call (padded dims, as the MXU sees
  them). The backward recomputes the forward chunk and runs its vjp: about 3x its FLOPs."""
  chunks = pl_.B * pl_.HV * pl_.nc
  per = sum(chunk_flops(pl_).values())
  flops = chunks * per * (3.0 if backward else 1.0)
  C, Kp, Vp = pl_.C, pl_.Kp, pl_.Vp
  trans = chunks * (C * Kp * (4 if pl_.ctx.gate == "channel" else 0) + 2 * C * C)
  isz = lambda dt: jnp.dtype(dt).itemsize
  T, n, H, HV = pl_.T, pl_.ctx.n, pl_.H, pl_.HV
  qk = pl_.B * (T + T * n) * H * Kp * isz(pl_.q_dtype)
  vv = pl_.B * T * n * HV * Vp * isz(pl_.v_dtype)
  oo = pl_.B * T * HV * Vp * isz(pl_.q_dtype)
  small = pl_.B * HV * pl_.nc * C * 4 * (2 if pl_.ctx.gate == "head" else 1)
  if pl_.ctx.gate == "channel":
    small += pl_.B * T * HV * Kp * isz(pl_.g_dtype)
  states = pl_.B * HV * pl_.nc * Kp * Vp * 4
  if backward:
    nbytes = 2 * (qk + vv + small) + oo + states
  else:
    nbytes = qk + vv + small + oo + states
  return pl.CostEstimate(flops=int(flops), transcendentals=int(trans), bytes_accessed=int(nbytes))
