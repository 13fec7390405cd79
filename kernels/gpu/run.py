"""`run`: the op contract of deltajax.core.problem on the Mosaic GPU kernels.

XLA glue around `core.core` (all of it differentiable, so the gradients of the raw inputs come
from `jax.vjp` of this glue composed with the kernels' custom_vjp):

* DeltaProduct's n Householder steps per token become steps of their own (the gate on a
  token's first step, q and the output on its last); every op is then the same recurrence.
* Time is cut into chunks of 64 steps (one wgmma row tile), whatever `chunk_size` says (the
  result does not depend on it); T is padded to whole chunks with steps that change nothing
  (k = v = beta = g = 0) and K, V to multiples of 64 with zeros.
* Gates: G, the log-decay summed from each chunk's start, by a cumsum over the chunk; per
  channel, each step's gate is first raised to `gates.MIN_CHANNEL_GATE` = -20 (see gates.py:
  it bounds the factored exponents; e^-20 is below float32's resolution of what it scales).
  D = exp(G at the chunk's end) is the state's decay across a chunk.
* Packed documents (deltajax.core.documents) stay inside the chunk grid: per step, its segment
  inside its chunk (pairs of different segments never interact), whether it reads the state
  entering the chunk (`first`) and whether it writes the state leaving it (`last`). A chunk
  that holds a boundary, or whose successor starts a document, passes no state on (D = 0);
  the document starting at a chunk boundary gets its initial state added to the state leaving
  the chunk before (S_add), one starting inside a chunk gets it through
  deltajax.core.packing.inject_initial_states, and the per-document final states come from
  deltajax.core.packing.document_finals on the states entering each chunk and V_new.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deltajax.core import packing
from deltajax.core.documents import Documents, chunk_documents
from deltajax.core.problem import Problem, cdiv

from . import core
from .gates import MIN_CHANNEL_GATE
from .mosaic import BLOCK
from .spec import CHUNK, Spec

MAX_HEAD_DIM = 256
# float32 operands are two or three bf16 pieces; these are the largest K, V whose kernels fit
# a Hopper SM's shared memory with each (the Mosaic GPU lowering checks it; so do the tests).
MAX_HEAD_DIM_FLOAT32 = {2: 128, 3: 64}
DTYPES = ("bfloat16", "float16", "float32")


def pieces(p: Problem, options) -> int:
  """bf16 pieces per float32 operand for `p` (1 for 16-bit inputs)."""
  if p.dtype != "float32":
    return 1
  if options is not None and options.float32_pieces is not None:
    return options.float32_pieces
  dim = cdiv(max(p.K, p.V), BLOCK) * BLOCK
  return 3 if dim <= MAX_HEAD_DIM_FLOAT32[3] else 2


def unsupported(p: Problem, options=None) -> str | None:
  """Why the Mosaic GPU kernels cannot run `p` (None if they can)."""
  if p.dtype not in DTYPES:
    return f"inputs of dtype {p.dtype} (they take {', '.join(DTYPES)})"
  if max(p.K, p.V) > MAX_HEAD_DIM:
    return f"K={p.K}, V={p.V} (they take K and V up to {MAX_HEAD_DIM})"
  if p.dtype == "float32":
    P = pieces(p, options)
    if max(p.K, p.V) > MAX_HEAD_DIM_FLOAT32[P]:
      return (f"float32 inputs with K={p.K}, V={p.V} and GpuOptions.float32_pieces={P}: "
              f"operands of {P} bf16 pieces fit a Hopper SM's shared memory up to K, V = "
              f"{MAX_HEAD_DIM_FLOAT32[P]} (bfloat16 inputs: up to {MAX_HEAD_DIM})")
  return None


def check_supported(p: Problem, options=None) -> None:
  reason = unsupported(p, options)
  if reason is not None:
    raise ValueError(f"impl='pallas' on GPU (Mosaic GPU kernels) does not support {reason}; "
                     f"use impl='chunk', which supports every size and dtype.")


def _pad_to(x, axis: int, size: int):
  if x is None or x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _as_steps(p: Problem, q, k, v, beta, g, docs):
  """DeltaProduct's Householder steps as steps of their own: (q, k, v, beta, g, docs) with
  T * n steps and n = 1 (the identity for n = 1)."""
  n = p.n
  B, T = p.B, p.T
  merge = lambda x: x.reshape(B, T * n, *x.shape[3:])
  k, v, beta = merge(k), merge(v), merge(beta)
  if n == 1:
    return q, k, v, beta, g, docs
  q = jnp.zeros((B, T, n) + q.shape[2:], q.dtype).at[:, :, -1].set(q).reshape(B, T * n,
                                                                            *q.shape[2:])
  if g is not None:
    g = jnp.zeros((B, T, n) + g.shape[2:], g.dtype).at[:, :, 0].set(g).reshape(B, T * n,
                                                                              *g.shape[2:])
  if docs is not None:
    steps = lambda x: jnp.repeat(x, n, axis=1)
    reset = jnp.zeros((B, T, n), bool).at[:, :, 0].set(docs.reset).reshape(B, T * n)
    docs = Documents(reset=reset, doc=steps(docs.doc), stream=docs.stream,
                     first=docs.first * n, last=docs.last * n + n - 1, N=docs.N)
  return q, k, v, beta, g, docs


def _two_sum(a, b):
  """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _compensated_chunk_cumsum(x, C: int, axis: int):
  """(G, G_lo): the running sum of x along `axis` from each chunk's start, and the rounding
  error it made (G + G_lo is the sum to about twice float32's precision).

  A head gate's decay between two steps is exp(G_i - G_j); with G_i - G_j formed from rounded
  running sums its exponent is off by ~|G| eps, and strong gates make |G| ~ 1e3 over a chunk.
  The kernels form (G_i - G_j) + (lo_i - lo_j) instead. The gradient is that of the plain
  running sum (the compensation's derivative is zero).
  """
  shape = x.shape
  xc = jax.lax.stop_gradient(x).reshape(shape[:axis] + (shape[axis] // C, C) + shape[axis + 1:])

  def add(a, b):   # double-float addition of (high, low) pairs
    s, err = _two_sum(a[0], b[0])
    return s, err + (a[1] + b[1])
  # A parallel prefix (log2 C levels), not a 64-step loop: on a GPU each step of a
  # sequential scan would be a kernel launch of its own.
  s, e = jax.lax.associative_scan(add, (xc, jnp.zeros_like(xc)), axis=axis + 1)
  plain = _chunk_cumsum(x, C, axis)
  G = plain + jax.lax.stop_gradient(s.reshape(shape) - plain)   # value s, gradient of cumsum
  return G, e.reshape(shape)


def _chunk_rest(x, C: int, axis: int):
  """The sum of x along `axis` after each position to its chunk's end (exclusive): the decay
  from a step to the chunk end, summed directly rather than as G_last - G (whose gradient
  would be a difference of large running sums for strong gates)."""
  shape = x.shape
  xc = x.reshape(shape[:axis] + (shape[axis] // C, C) + shape[axis + 1:])
  after = jnp.flip(jnp.cumsum(jnp.flip(xc, axis + 1), axis=axis + 1), axis + 1)   # inclusive
  pad = [(0, 0)] * xc.ndim
  pad[axis + 1] = (0, 1)
  after = jax.lax.slice_in_dim(jnp.pad(after, pad), 1, C + 1, axis=axis + 1)   # shift: exclusive
  return after.reshape(shape)


def _chunk_cumsum(x, C: int, axis: int):
  """The sum of x along `axis` (length T, a multiple of C) from the start of each chunk."""
  shape = x.shape
  x = x.reshape(shape[:axis] + (shape[axis] // C, C) + shape[axis + 1:])
  return jnp.cumsum(x, axis=axis + 1).reshape(shape)


def _document_masks(docs: Documents, B: int, T: int, nc: int, C: int):
  """(seg, first, last [B, T] float32, start [B, nc] bool, seq [B, nc]) for T padded steps."""
  cd = chunk_documents(docs, C, nc)
  seg = cd.segment                                                   # [B, nc, C]
  next_start = jnp.concatenate([cd.start[:, 1:], jnp.zeros_like(cd.start[:, :1])], axis=1)
  first = seg == 0
  last = (seg == seg[..., -1:]) & ~next_start[..., None]
  flat = lambda x: x.reshape(B, nc * C).astype(jnp.float32)
  return flat(seg), flat(first), flat(last), cd.start, cd.seq, next_start, seg[..., -1] == 0


def run(p: Problem, q, k, v, beta, g, h0, docs, *, options=None, interpret=False):
  """o [B, T, HV, V] in q's dtype and the final states [N, HV, K, V] float32 (or None).

  Inputs as deltajax.core.problem describes. options: a `GpuOptions`; interpret: run the
  kernels in the Mosaic GPU interpreter (truthy) or compiled.
  """
  from ..config import GpuOptions  # pylint: disable=g-import-not-at-top
  options = options or GpuOptions()
  check_supported(p, options)
  interpret = bool(interpret)
  q, k, v, beta, g, docs = _as_steps(p, q, k, v, beta, g, docs)
  n, T0, C = p.n, p.T * p.n, CHUNK
  ps = dataclasses.replace(p, T=T0, n=1, chunk_size=C)       # the problem over steps
  if p.gate == "channel":
    g = jnp.maximum(g, jnp.asarray(MIN_CHANNEL_GATE, g.dtype))

  o_add = S_add = None
  if docs is not None and h0 is not None:
    # (packing takes the step axis of deltajax.core.problem's contract: n = 1 here)
    v, o_add, S_add = packing.inject_initial_states(ps, q, k[:, :, None], v[:, :, None], g,
                                                    h0, docs)
    v = v[:, :, 0]

  B, H, HV = p.B, p.H, p.HV
  T = cdiv(T0, C) * C
  nc = T // C
  Kp, Vp = cdiv(p.K, BLOCK) * BLOCK, cdiv(p.V, BLOCK) * BLOCK
  parts = pieces(p, options)
  spec = Spec(B=B, T=T, H=H, HV=HV, K=Kp, V=Vp, gate=p.gate, packed=docs is not None,
              l2norm=p.use_qk_l2norm, scale=float(p.scale), dtype=p.dtype, parts=parts,
              inverse_parts=max(parts, options.inverse_pieces), block_v=options.block_v
              if Vp % options.block_v == 0 else BLOCK)

  pad = lambda x: _pad_to(x, 1, T)
  qp = _pad_to(pad(q), 3, Kp)
  kp = _pad_to(pad(k), 3, Kp)
  vp = _pad_to(pad(v).astype(q.dtype), 3, Vp)
  betap = jnp.moveaxis(pad(beta).astype(jnp.float32), 1, 2)         # [B, HV, T]

  gates, G_last = (), None
  if p.gate == "head":
    G, G_lo = _compensated_chunk_cumsum(pad(g).astype(jnp.float32), C, 1)   # [B, T, HV]
    last = lambda x: jnp.moveaxis(x.reshape(B, nc, C, HV)[:, :, -1], 1, 2)[..., None]
    G_last = last(G) + last(G_lo)                                      # [B, HV, nc, 1]
    G_rev = _chunk_rest(pad(g).astype(jnp.float32), C, 1)
    gates = tuple(jnp.moveaxis(x, 1, 2) for x in (G, G_lo, G_rev))
  elif p.gate == "channel":
    G = _chunk_cumsum(_pad_to(pad(g).astype(jnp.float32), 3, Kp), C, 1)   # [B, T, HV, Kp]
    G_last = jnp.moveaxis(G.reshape(B, nc, C, HV, Kp)[:, :, -1], 1, 2)     # [B, HV, nc, Kp]
    gates = (G,)
  D = jnp.ones((B, HV, nc, Kp), jnp.float32)
  if G_last is not None:
    D = D * jnp.exp(G_last)

  h0p = None if h0 is None else _pad_to(_pad_to(h0.astype(jnp.float32), 2, Kp), 3, Vp)
  masks = ()
  if docs is None:
    h0s = jnp.zeros((B, HV, Kp, Vp), jnp.float32) if h0p is None else h0p
  else:
    seg, first, last, start, seq, next_start, whole = _document_masks(docs, B, T, nc, C)
    masks = (seg, first, last)
    keep = (whole & ~next_start).astype(jnp.float32)                   # [B, nc]
    D = D * keep[:, None, :, None]
    if h0p is None:
      h0s = jnp.zeros((B, HV, Kp, Vp), jnp.float32)
    else:
      h0s = h0p[seq[:, 0]]
      # A document starting at chunk c > 0 enters it with its own initial state: added to the
      # state leaving chunk c - 1, which passes nothing else on (D = 0, no `last` rows).
      entering = jnp.where(next_start[:, :, None, None, None],
                           h0p[jnp.concatenate([seq[:, 1:], seq[:, :1]], axis=1)], 0.0)
      S_add = _pad_to(_pad_to(S_add, 3, Kp), 4, Vp) + entering       # [B, nc, HV, Kp, Vp]
      S_add = jnp.moveaxis(S_add, 1, 2)

  expose = docs is not None and p.output_final_state
  o, final, h, V_new = core.core(spec, interpret, expose, qp, kp, vp, betap, gates, masks, D,
                                 h0s, S_add)
  o = o[:, :T0, :, :p.V]
  if o_add is not None:
    o = (o.astype(jnp.float32) + o_add[..., :p.V]).astype(o.dtype)
  if n > 1:
    o = o[:, n - 1::n]
  if not p.output_final_state:
    return o, None
  if docs is None:
    return o, final[:, :, :p.K, :p.V]
  S_in = jnp.moveaxis(h[..., :p.K, :p.V], 2, 1)                       # [B, nc, HV, K, V]
  v_steps = jnp.moveaxis(V_new[..., :T0, :p.V], 1, 2)                 # [B, T0, HV, V]
  v_steps = _pad_to(v_steps, 1, T).reshape(B, nc, C, HV, p.V)
  return o, packing.document_finals(ps, k[:, :, None], g, h0, docs, S_in, v_steps)
