"""`run`: the delta-rule ops on the Mosaic TPU kernels, with their `custom_vjp`.

What happens where:
* plain JAX (glue, `_layout`): free reshapes of q, k, v to head-major lane blocks (a copy only
  when K or V must be padded to a multiple of 128), the small per-step arrays (beta, head gates,
  segments) as one lane row per chunk, the chunk table of packed documents, and
  deltajax.core.packing for documents that start or end inside a chunk;
* `kernels.forward`: everything per chunk (q/k loading, gate sums, scores, inverse, W, U, the
  state step, the outputs), fused; it keeps the state entering every chunk for the backward;
* `kernels.backward`: the reverse pass, recomputing each chunk in VMEM and differentiating it.

Legend as in deltajax.core.problem; Kp, Vp: K, V rounded up to a multiple of 128.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deltajax.core import packing
from deltajax.core.documents import Documents, chunk_documents
from deltajax.core.problem import Problem, cdiv

from ..config import TpuOptions
from . import kernels, maths

F32 = jnp.float32
LANES = 128
MAX_HEAD_DIM = 256
DTYPES = ("float32", "bfloat16", "float16")
_OTHER = "impl='chunk' (XLA, any size and dtype) or impl='recurrent'"


def interpret_params():
  """The TPU interpreter with its checks on: uninitialised memory reads as NaN, out-of-bounds
  reads raise, races between grid steps are detected (jax >= 0.7; `pltpu.InterpretParams`)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise",
                               detect_races=True)


def _round_up(x: int, m: int) -> int:
  return cdiv(x, m) * m


def check(p: Problem, q, k, v, beta, g, h0) -> None:
  """ValueError for what these kernels do not take, naming the argument and the way out."""
  for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g),
                  ("initial_state", h0)):
    if x is not None and jnp.dtype(x.dtype).name not in DTYPES:
      raise ValueError(f"impl='pallas' on TPU takes {name} of dtype float32, bfloat16 or "
                       f"float16; got {jnp.dtype(x.dtype).name}. Use {_OTHER}.")
  for name, d in (("key dim K", p.K), ("value dim V", p.V)):
    if d > MAX_HEAD_DIM:
      raise ValueError(f"impl='pallas' on TPU takes a {name} up to {MAX_HEAD_DIM}; got {d}. "
                       f"Use {_OTHER}.")
  n, Ct = p.n, p.tokens_per_chunk
  if n & (n - 1) or Ct % 8:
    raise ValueError(
        f"impl='pallas' on TPU needs the Householder steps per token n to be a power of two "
        f"with chunk_size // n >= 8 tokens per chunk; got n={n}, chunk_size={p.chunk_size}. "
        f"Use {_OTHER}.")
  if p.gate == "channel" and n != 1:
    raise ValueError(f"per-channel gates take one step per token; got n={n}.")


def _numerics(p: Problem, options: TpuOptions) -> maths.Numerics:
  operand = options.precision
  if operand == "auto":
    operand = "float32" if p.dtype in ("float32", "float64") else "bfloat16"
  return maths.Numerics(operand, inverse=options.inverse_precision)


def plan(p: Problem, options: TpuOptions, *, q_dtype, k_dtype, v_dtype, g_dtype,
         has_sadd: bool, interpret) -> kernels.Plan:
  """Tiles and switches of one call: value heads and chunks per grid step within the budget."""
  Kp, Vp = _round_up(p.K, LANES), _round_up(p.V, LANES)
  G, C, Ct, nc = p.G, p.steps_per_chunk, p.tokens_per_chunk, p.num_chunks
  hb = options.heads_per_step
  if hb is None:
    hb = max(d for d in range(1, G + 1) if G % d == 0 and d * Vp <= 2 * LANES)
  elif G % hb:
    raise ValueError(f"TpuOptions.heads_per_step must divide the value heads per q/k head "
                     f"(HV // H = {G}); got {hb}.")
  budget = options.vmem_budget_bytes()
  cb = options.chunks_per_step or max(1, min(nc, options.rows_per_step // C))
  cb = min(cb, nc)
  while cb > 1 and vmem_bytes(p, Kp, Vp, hb, cb, q_dtype) > budget:
    cb -= 1
  nb = cdiv(nc, cb)
  T = max(p.T, cb * Ct)
  ctx = maths.Chunk(Ct=Ct, n=p.n, gate=p.gate, scale=float(p.scale), l2norm=p.use_qk_l2norm,
                    numerics=_numerics(p, options), packed=p.packed)
  return kernels.Plan(
      ctx=ctx, B=p.B, T=T, H=p.H, HV=p.HV, Kp=Kp, Vp=Vp, N=p.N, cb=cb, nb=nb, hb=hb,
      has_h0=p.has_initial_state, has_sadd=has_sadd,
      packed_finals=p.packed and p.output_final_state,
      q_dtype=jnp.dtype(q_dtype).name, v_dtype=jnp.dtype(v_dtype).name,
      g_dtype=None if g_dtype is None else jnp.dtype(g_dtype).name,
      vmem_limit_bytes=options.vmem_limit(), interpret=interpret)


def vmem_bytes(p: Problem, Kp: int, Vp: int, hb: int, cb: int, dtype) -> int:
  """A bound on one grid step's VMEM: double-buffered blocks, scratch, and the backward's
  per-chunk temporaries (forward values plus their vjp, ~40 [C, C]- or [C, 128]-sized f32)."""
  C, Ct, G = p.steps_per_chunk, p.tokens_per_chunk, p.G
  isz = jnp.dtype(dtype).itemsize
  blocks = cb * (Ct * Kp + C * Kp + 2 * C * hb * Vp + Ct * hb * Vp) * isz
  blocks += cb * hb * Kp * Vp * 4 * 2                        # states in, dstates/dh0 out
  blocks += 2 * cb * (Ct + C) * Kp * 4                       # dq, dk (float32 scratch too)
  scratch = G * Kp * Vp * 4
  temps = 40 * C * max(C, Kp, Vp) * 4 + 6 * Kp * Vp * 4
  return 2 * blocks + scratch + temps


# --------------------------------------------------------------------------------------------
# The differentiable core over the kernel layouts.

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(pl_: kernels.Plan, start, seq, q, k, v, beta, g, segs, segt, h0, sadd):
  out = kernels.forward(pl_, start, seq, q, k, v, beta, g, segs, segt, h0, sadd,
                        emit_states=False)
  return out["o"], out["final"], out.get("states"), out.get("vnew")


def _core_fwd(pl_, start, seq, q, k, v, beta, g, segs, segt, h0, sadd):
  out = kernels.forward(pl_, start, seq, q, k, v, beta, g, segs, segt, h0, sadd,
                        emit_states=True)
  res = (start, seq, q, k, v, beta, g, segs, segt, out["states"], h0 is not None,
         sadd is not None)
  return (out["o"], out["final"], out["states"] if pl_.packed_finals else None,
          out.get("vnew")), res


def _core_bwd(pl_, res, cts):
  start, seq, q, k, v, beta, g, segs, segt, states, _, _ = res
  do, dfinal, dstates, dvnew = cts
  out = kernels.backward(pl_, start, seq, q, k, v, beta, g, segs, segt, states, do, dfinal,
                         dstates, dvnew)
  dh0 = out.get("dh0")
  if dh0 is not None and dh0.ndim == 5:                      # packed: per chunk, by sequence
    flat = jnp.moveaxis(dh0, 2, 1).reshape(-1, pl_.HV, pl_.Kp, pl_.Vp)
    dh0 = jnp.zeros((pl_.N, pl_.HV, pl_.Kp, pl_.Vp), F32).at[seq].add(flat)
  return (None, None, out["dq"], out["dk"], out["dv"], out["dbeta"], out.get("dg"), None, None,
          dh0, out.get("dsadd"))


_core.defvjp(_core_fwd, _core_bwd)


# --------------------------------------------------------------------------------------------
# Layout glue.

def _pad_last(x, m: int):
  pad = m - x.shape[-1]
  return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _pad_time(x, T: int):
  pad = T - x.shape[1]
  return x if pad <= 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _rows(x, pl_: kernels.Plan):
  """[B, T * n, HV] per-step values -> [B, HV, nb, cb, C] float32 (one lane row per chunk)."""
  B, steps, HV = x.shape
  x = jnp.pad(x.astype(F32), [(0, 0), (0, pl_.nc * pl_.C - steps), (0, 0)])
  return jnp.moveaxis(x.reshape(B, pl_.nb, pl_.cb, pl_.C, HV), 4, 1)


def run(p: Problem, q, k, v, beta, g, h0, docs: Documents | None, *,
        options: TpuOptions | None = None, interpret=False):
  """The op on the Mosaic TPU kernels; arguments and returns as deltajax.core.problem says.

  options: tiles, VMEM budget and precision (`TpuOptions`); interpret: True runs the kernels in
  the TPU interpreter with its checks (`interpret_params()`), or pass `pltpu.InterpretParams`.
  """
  options = options or TpuOptions()
  check(p, q, k, v, beta, g, h0)
  if interpret is True:
    interpret = interpret_params()
  interpret = interpret or False
  B, T, H, HV, K, V, n = p.B, p.T, p.H, p.HV, p.K, p.V, p.n
  Ct, nc = p.tokens_per_chunk, p.num_chunks
  # The packing glue sums gates by products with 0/1 matrices, where 0 * -inf is NaN: it gets
  # them clamped as the kernels clamp them (e^-8192 is 0 in float32; the gradient below is 0,
  # as e^g's at -inf).
  g_glue = None if g is None else jnp.maximum(g, jnp.asarray(maths.GATE_FLOOR, g.dtype))
  o_add = sadd = None
  if docs is not None and h0 is not None:
    v, o_add, sadd = packing.inject_initial_states(p, q, k, v, g_glue, h0, docs)
  pl_ = plan(p, options, q_dtype=q.dtype, k_dtype=k.dtype, v_dtype=v.dtype,
             g_dtype=None if g is None else g.dtype, has_sadd=sadd is not None,
             interpret=interpret)
  Kp, Vp, ncp, C, Tp = pl_.Kp, pl_.Vp, pl_.nc, pl_.C, pl_.T

  q2 = _pad_time(_pad_last(q, Kp), Tp).reshape(B, Tp, H * Kp)
  k2 = _pad_time(_pad_last(k, Kp), Tp).reshape(B, Tp * n, H * Kp)
  v2 = _pad_time(_pad_last(v, Vp), Tp).reshape(B, Tp * n, HV * Vp)
  beta2 = _rows(beta.reshape(B, T * n, HV), pl_)
  g2 = None
  if p.gate == "head":
    g_steps = jnp.zeros((B, T, n, HV), g.dtype).at[:, :, 0].set(g)
    g2 = _rows(g_steps.reshape(B, T * n, HV), pl_)
  elif p.gate == "channel":
    g2 = _pad_time(_pad_last(g, Kp), Tp).reshape(B, Tp, HV * Kp)
  h0p = None
  if h0 is not None:
    h0p = jnp.pad(h0.astype(F32), [(0, 0), (0, 0), (0, Kp - K), (0, Vp - V)])
  chunk_pad = [(0, 0), (0, ncp - nc)]
  segs = segt = None
  if docs is None:
    start = jnp.broadcast_to(jnp.arange(ncp) == 0, (B, ncp))
    seq = jnp.broadcast_to(jnp.arange(B)[:, None], (B, ncp))
  else:
    cd = chunk_documents(docs, Ct, nc)
    start, seq = jnp.pad(cd.start, chunk_pad), jnp.pad(cd.seq, chunk_pad)
    seg = jnp.pad(cd.segment.astype(F32), chunk_pad + [(0, 0)])         # [B, ncp, Ct]
    segt = seg.reshape(B, pl_.nb, pl_.cb, Ct)
    segs = jnp.repeat(seg, n, axis=-1).reshape(B, pl_.nb, pl_.cb, C)
  if sadd is not None:
    sadd = jnp.pad(jnp.moveaxis(sadd, 1, 2),
                   [(0, 0), (0, 0), (0, ncp - nc), (0, Kp - K), (0, Vp - V)])
  start = start.reshape(-1).astype(jnp.int32)
  seq = seq.reshape(-1).astype(jnp.int32)

  o, final, states, vnew = _core(pl_, start, seq, q2, k2, v2, beta2, g2, segs, segt, h0p, sadd)
  o = o.reshape(B, Tp, HV, Vp)[:, :T, :, :V]
  if o_add is not None:
    o = o + o_add
  o = o.astype(p.dtype)
  if not p.output_final_state:
    return o, None
  if docs is None:
    return o, final[:, :, :K, :V]
  S_in = jnp.moveaxis(states[:, :, :nc, :K, :V], 2, 1)                  # [B, nc, HV, K, V]
  v_steps = vnew.reshape(B, ncp, C, HV, Vp)[:, :nc, :, :, :V]
  return o, packing.document_finals(p, k, g_glue, h0, docs, S_in, v_steps)
