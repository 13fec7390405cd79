"""The `pallas_call`s: per-chunk preparation and its vjp, the forward and reverse state passes.

Arrays are chunk-major per head: [B, HV, nc, X, Y] with one [X, Y] block per (b, h, chunk).
Per-token vectors are stored as [.., C, 1] columns (beta) or [.., 1, C] rows (per-head gates)
so every block's last two dims are full array dims (the TPU block rule). States are transposed,
[.., V, K] (see maths.py). Sequence starts are float flags [B, 1, nc, 1, 1].

`cfg.sequential` chooses how the chunk recurrence is expressed:
* "grid": grid (B, HV, nc), chunk axis "arbitrary", the running state in a VMEM scratch (TPU).
* "loop": grid (B, HV), a `fori_loop` over chunks inside the program, state in registers (GPU,
  where grid programs run concurrently).
The preparation is independent per chunk and always uses the grid (B, HV, nc).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..config import SQUEEZED, KernelConfig
from . import maths

_F32 = jnp.float32


def _spec(shape, chunk_of, *, loop: bool):
  """BlockSpec of one [X, Y] block (grid) or one head's [n, X, Y] run of blocks (loop).

  shape: the array's [B, HV or 1, n, X, Y]; a size-1 head or chunk axis is broadcast.
  chunk_of: grid chunk index -> block chunk index (ignored for a size-1 chunk axis).
  """
  X, Y = shape[-2:]
  head = (lambda h: h) if shape[1] > 1 else (lambda h: 0)
  if loop:
    return pl.BlockSpec((SQUEEZED, SQUEEZED, shape[2], X, Y),
                        lambda b, h: (b, head(h), 0, 0, 0))
  chunk = chunk_of if shape[2] > 1 else (lambda c: 0)
  return pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, X, Y),
                      lambda b, h, c: (b, head(h), chunk(c), 0, 0))


def _load(ref, c):
  """The block of chunk c (None: the grid already selected it; size-1 chunk axis: block 0)."""
  if c is None:
    return ref[...]
  return ref[c] if ref.shape[0] > 1 else ref[0]


def _store(ref, c, x):
  if c is None:
    ref[...] = x
  elif ref.shape[0] > 1:
    ref[c] = x
  else:
    ref[0] = x


def _out(shape, like):
  """float32 ShapeDtypeStruct that varies over the same manual mesh axes as `like`.

  Inside `shard_map` with check_vma=True, pallas_call needs to be told how its outputs vary:
  jax >= 0.10 spells it `manual_axis_type=`, jax 0.7-0.9 `vma=`; elsewhere nothing is added.
  """
  aval = jax.typeof(like) if hasattr(jax, "typeof") else None
  for field in ("manual_axis_type", "vma"):
    if aval is not None and hasattr(aval, field):
      try:
        return jax.ShapeDtypeStruct(shape, _F32, **{field: getattr(aval, field)})
      except TypeError:
        continue
  return jax.ShapeDtypeStruct(shape, _F32)


def _scratch(cfg: KernelConfig, shape):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return [pltpu.VMEM(shape, _F32)]


# ---------------------------------------------------------------------------------------------
# Preparation: one program per (b, h, chunk).

def _prepare_kernel(*refs, gate_kind, sub):
  n_gate = {None: 0, "head": 1, "channel": 1}[gate_kind]
  q, k, v, beta, *gate = (r[...] for r in refs[:4 + n_gate])
  gate = (gate_kind, *gate) if gate_kind else None
  for ref, x in zip(refs[4 + n_gate:], maths.prepare(q, k, v, beta, gate, sub=sub)):
    ref[...] = x


def prepare(cfg: KernelConfig, q, k, v, beta, gate_kind, gates):
  """Qg, Kd, W [B,HV,nc,C,K]; U [.., C, V]; D [.., 1, K]; Attn [.., C, C] for every chunk.

  q, k [B, HV, nc, C, K]; v [.., C, V]; beta [.., C, 1]; gates () or (g_row [.., 1, C],) for
  gate_kind "head", or (g [.., C, K],) for "channel".
  """
  B, HV, nc, C, K = q.shape
  V = v.shape[-1]
  ins = (q, k, v, beta, *gates)
  lead = (B, HV, nc)
  outs = [_out(lead + s, q) for s in ((C, K), (C, K), (C, K), (C, V), (1, K), (C, C))]
  spec = lambda shape: _spec(shape, lambda c: c, loop=False)
  kernel = functools.partial(_prepare_kernel, gate_kind=gate_kind, sub=cfg.sub_block)
  return pl.pallas_call(
      kernel, out_shape=outs, grid=lead, in_specs=[spec(x.shape) for x in ins],
      out_specs=[spec(o.shape) for o in outs], interpret=cfg.interpret,
      compiler_params=cfg.compiler_params(("parallel",) * 3))(*ins)


def _prepare_backward_kernel(*refs, gate_kind, sub):
  n_gate = {None: 0, "head": 1, "channel": 1}[gate_kind]
  n_in = 4 + n_gate + 6
  q, k, v, beta, *rest = (r[...] for r in refs[:n_in])
  gate = (gate_kind, *rest[:n_gate]) if gate_kind else None
  grads = maths.prepare_backward(q, k, v, beta, gate, rest[n_gate:], sub=sub)
  for ref, x in zip(refs[n_in:], grads):
    ref[...] = x


def prepare_backward(cfg: KernelConfig, q, k, v, beta, gate_kind, gates, cts):
  """vjp of `prepare`, recomputing it per chunk: dq, dk, dv, dbeta [.., C, 1] and dg.

  Inputs as `prepare`; cts = (dQg, dKd, dW, dU, dD, dAttn) shaped like its outputs.
  dg is [.., 1, C] for gate_kind "head", [.., C, K] for "channel" (absent for None).
  """
  B, HV, nc, C, K = q.shape
  ins = (q, k, v, beta, *gates, *cts)
  shapes = [q.shape, k.shape, v.shape, beta.shape]
  if gate_kind:
    shapes.append(gates[0].shape)
  outs = [_out(s, q) for s in shapes]
  spec = lambda shape: _spec(shape, lambda c: c, loop=False)
  kernel = functools.partial(_prepare_backward_kernel, gate_kind=gate_kind, sub=cfg.sub_block)
  return pl.pallas_call(
      kernel, out_shape=outs, grid=(B, HV, nc), in_specs=[spec(x.shape) for x in ins],
      out_specs=[spec(o.shape) for o in outs], interpret=cfg.interpret,
      compiler_params=cfg.compiler_params(("parallel",) * 3))(*ins)


# ---------------------------------------------------------------------------------------------
# Forward state pass with the outputs fused in.

def _forward_kernel(start_ref, h0_ref, *refs, nc):
  ins, (o_ref, s_ref), scratch = refs[:6], refs[6:8], refs[8:]

  def chunk(c, ST_prev):
    ld = lambda r: _load(r, c)
    ST = jnp.where(ld(start_ref) > 0.5, ld(h0_ref), ST_prev)
    o, ST = maths.forward_step(ST, *map(ld, ins))
    _store(o_ref, c, o)
    _store(s_ref, c, ST)
    return ST

  if scratch:                        # grid mode: this program is one chunk
    state, = scratch
    state[...] = chunk(None, state[...])
  else:                              # loop mode: this program is every chunk of one head
    V, K = h0_ref.shape[-2:]
    lax.fori_loop(0, nc, chunk, jnp.zeros((V, K), _F32))


def forward(cfg: KernelConfig, start, h0T, p):
  """O [B, HV, nc, C, V] and ST_out [B, HV, nc, V, K] (the transposed state after each chunk).

  start [B, 1, nc, 1, 1] float flags; h0T [B, HV, 1 or nc, V, K] the (transposed) state a
  starting chunk loads; p = (Qg, Kd, W, U, D, Attn) from `prepare`.
  """
  B, HV, nc, C, K = p[0].shape
  V = p[3].shape[-1]
  loop = cfg.sequential == "loop"
  outs = [_out((B, HV, nc, C, V), p[0]), _out((B, HV, nc, V, K), p[0])]
  ins = (start, h0T, *p)
  spec = lambda shape: _spec(shape, lambda c: c, loop=loop)
  grid = (B, HV) if loop else (B, HV, nc)
  return pl.pallas_call(
      functools.partial(_forward_kernel, nc=nc), out_shape=outs, grid=grid,
      in_specs=[spec(x.shape) for x in ins], out_specs=[spec(o.shape) for o in outs],
      scratch_shapes=[] if loop else _scratch(cfg, (V, K)), interpret=cfg.interpret,
      compiler_params=cfg.compiler_params(
          ("parallel", "parallel") + (() if loop else ("arbitrary",))))(*ins)


# ---------------------------------------------------------------------------------------------
# Reverse state pass with the per-chunk cotangents fused in.

def _backward_kernel(start_ref, next_ref, h0_ref, prev_ref, *refs, nc):
  ins, outs, scratch = refs[:8], refs[8:15], refs[15:]

  def chunk(c, dS_carry):
    ld = lambda r: _load(r, c)
    prev = prev_ref[...] if c is None else prev_ref[jnp.maximum(c - 1, 0)]
    starts = ld(start_ref) > 0.5
    ST = jnp.where(starts, ld(h0_ref), prev)
    dST_next = jnp.where(ld(next_ref) > 0.5, 0.0, dS_carry)
    dST_in, grads = maths.backward_step(dST_next, ST, *map(ld, ins))
    for ref, x in zip(outs, grads):
      _store(ref, c, x)
    # Plain batches keep one dh0 block per head: the reverse order visits chunk 0 last.
    _store(outs[-1], c, jnp.where(starts, dST_in, 0.0))
    return dST_in

  if scratch:
    carry, = scratch
    carry[...] = chunk(None, carry[...])
  else:
    V, K = h0_ref.shape[-2:]
    lax.fori_loop(0, nc, lambda i, d: chunk(nc - 1 - i, d), jnp.zeros((V, K), _F32))


def backward(cfg: KernelConfig, start, next_start, h0T, ST_out, p, dO, dST_out):
  """The reverse pass over chunks.

  Args:
    start, next_start: [B, 1, nc, 1, 1] flags (chunk c, resp. chunk c + 1, starts a sequence;
      next_start is 1 for the last chunk).
    h0T: [B, HV, 1 or nc, V, K] as in `forward`; ST_out: `forward`'s state after each chunk.
    p: (Qg, Kd, W, U, D, Attn); dO [B, HV, nc, C, V]; dST_out [B, HV, nc, V, K].
  Returns:
    (dQg, dKd, dW, dU, dD, dAttn) shaped like p, and dh0T shaped like h0T (the cotangent of
    the state loaded by each starting chunk; zero elsewhere).
  """
  B, HV, nc, C, K = p[0].shape
  V = p[3].shape[-1]
  loop = cfg.sequential == "loop"
  rev = lambda c: nc - 1 - c
  prev = lambda c: jnp.maximum(nc - 2 - c, 0)
  spec = lambda shape, of=rev: _spec(shape, of, loop=loop)
  ins = (start, next_start, h0T, ST_out, *p, dO, dST_out)
  in_specs = [spec(x.shape) for x in ins]
  if not loop:
    in_specs[3] = spec(ST_out.shape, prev)
  outs = [_out(x.shape, p[0]) for x in (*p, h0T)]
  grid = (B, HV) if loop else (B, HV, nc)
  out = pl.pallas_call(
      functools.partial(_backward_kernel, nc=nc), out_shape=outs, grid=grid,
      in_specs=in_specs, out_specs=[spec(o.shape) for o in outs],
      scratch_shapes=[] if loop else _scratch(cfg, (V, K)), interpret=cfg.interpret,
      compiler_params=cfg.compiler_params(
          ("parallel", "parallel") + (() if loop else ("arbitrary",))))(*ins)
  return tuple(out[:6]), out[6]
