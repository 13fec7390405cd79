"""Initial and final states of documents that start or end inside a chunk.

A chunked implementation handles documents that start on a chunk boundary by loading their
initial state as the state entering the chunk, and reads the final state of a document that
ends on one from the state leaving the chunk. The other documents meet their states inside a
chunk; both directions are linear, so they are plain JAX around the implementation's core:

* `inject_initial_states`: the delta step is affine in the state, so a document whose rows
  start from h0_d instead of zeros has V_new lowered by W h0_d = (I + A)^-1 (beta K e^G h0_d):
  the same as running it from zeros on v' = v - (k e^G)^T h0_d (G the decay since the
  document's first token). Its outputs gain (q e^G)^T h0_d, and the state leaving the chunk,
  if the document is still open there, gains e^{G_end} h0_d.
* `document_finals`: the state after a document's last token, from the state its segment
  entered the chunk with and that segment's rows of V_new.

Each costs one [Ct, K] x [K, V] product per document (gathers of its chunk's rows), and runs
only when initial states (resp. final states) are asked for with packed documents.

Legend as in deltajax.core.problem; Ct tokens per chunk, nc chunks, C = Ct * n steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from deltajax.core.documents import Documents
from deltajax.core.inputs import as_float32, load_g, load_k
from deltajax.core.problem import Problem

_HI = lax.Precision.HIGHEST


def _window(p: Problem, begin):
  """The Ct token positions [N, Ct] from each document's `begin` [N] (they may run past T:
  gather with `jnp.clip(pos, 0, T - 1)`, mask with pos itself), and their chunk [N]."""
  Ct = p.tokens_per_chunk
  return begin[:, None] + jnp.arange(Ct, dtype=jnp.int32), jnp.clip(begin // Ct, 0,
                                                                      p.num_chunks - 1)


def _gate_sums(p: Problem, g_rows, own):
  """Decays over a document's rows, from g_rows [N, Ct, HV(, K)] and own [N, Ct] bool.

  Returns (through [N, Ct, HV, 1|K]: the sum over its tokens up to and including each,
  after [N, Ct, HV, 1|K]: the sum over its tokens after each, total [N, HV, 1|K]).
  """
  g = jnp.where(own.reshape(own.shape + (1,) * (g_rows.ndim - 2)), load_g(g_rows), 0.0)
  g = g[..., None] if p.gate == "head" else g
  Ct = g.shape[1]
  upto = jnp.tril(jnp.ones((Ct, Ct), g.dtype))
  through = jnp.einsum("ts,ns...->nt...", upto, g, precision=_HI)
  after = jnp.einsum("ts,ns...->nt...", jnp.triu(jnp.ones((Ct, Ct), g.dtype), 1), g,
                     precision=_HI)
  return through, after, jnp.sum(g, axis=1)


def inject_initial_states(p: Problem, q, k, v, g, h0, docs: Documents):
  """Initial states of documents starting inside a chunk, moved into the inputs.

  Returns (v' like v in float32, o_add [B, T, HV, V] float32 to add to the outputs, S_add
  [B, nc, HV, K, V] float32 to add to the state leaving each chunk).
  """
  Ct, nc, H, G = p.tokens_per_chunk, p.num_chunks, p.H, p.G
  pos, chunk = _window(p, docs.first)
  idx = jnp.clip(pos, 0, p.T - 1)
  chunk_end = jnp.minimum((chunk + 1) * Ct - 1, p.T - 1)
  active = ~docs.empty & (docs.first % Ct != 0)
  own = (pos >= docs.first[:, None]) & (pos <= jnp.minimum(docs.last, chunk_end)[:, None])
  own = own & active[:, None]
  rows = lambda x: x[docs.stream[:, None], idx]                         # [N, Ct, ...]
  h = as_float32(h0).reshape(p.N, H, G, p.K, p.V)
  decay = 1.0
  total = jnp.zeros((p.N, p.HV, 1))
  if g is not None:
    through, _, total = _gate_sums(p, rows(g), own)
    decay = jnp.exp(through).reshape(p.N, Ct, H, G, -1)                 # [N, Ct, H, G, 1|K]
  kq = lambda x: jnp.einsum("nthgk,nhgkv->nthgv", x, h, precision=_HI)
  kn = load_k(p, rows(k))                                              # [N, Ct, n, H, K]
  dv = jnp.stack([kq(kn[:, :, j, :, None] * decay) for j in range(p.n)], axis=2)
  qn = load_k(p, rows(q))[:, :, :, None] * p.scale                     # [N, Ct, H, 1, K]
  do = kq(qn * decay)                                                  # [N, Ct, H, G, V]
  keep = own[:, :, None, None, None]
  dv = jnp.where(keep[:, :, None], dv, 0.0).reshape(p.N, Ct, p.n, p.HV, p.V)
  do = jnp.where(keep, do, 0.0).reshape(p.N, Ct, p.HV, p.V)
  at = (docs.stream[:, None], idx)
  v_shifted = as_float32(v).at[at].add(-dv)
  o_add = jnp.zeros((p.B, p.T, p.HV, p.V), do.dtype).at[at].add(do)
  open_at_end = docs.last >= chunk_end
  s = jnp.exp(total).reshape(p.N, H, G, -1)[..., None] * h             # [N, H, G, K, V]
  s = jnp.where((active & open_at_end)[:, None, None, None, None], s, 0.0)
  S_add = jnp.zeros((p.B, nc, p.HV, p.K, p.V), s.dtype).at[docs.stream, chunk].add(
      s.reshape(p.N, p.HV, p.K, p.V))
  return v_shifted, o_add, S_add


def document_finals(p: Problem, k, g, h0, docs: Documents, S_in, v_new):
  """The state after every document's last token, [N, HV, K, V] float32.

  S_in: [B, nc, HV, K, V] the state entering each chunk; v_new: [B, nc, C, HV, V] the chunk
  form's V_new (steps of a chunk in order). Empty documents get zeros (the caller passes
  their initial states through).
  """
  Ct, n, H, G = p.tokens_per_chunk, p.n, p.H, p.G
  pos, chunk = _window(p, jnp.clip(docs.last // Ct, 0, p.num_chunks - 1) * Ct)
  idx = jnp.clip(pos, 0, p.T - 1)
  own = (pos >= docs.first[:, None]) & (pos <= docs.last[:, None]) & ~docs.empty[:, None]
  rows = lambda x: x[docs.stream[:, None], idx]
  first_segment = docs.first <= chunk * Ct
  entering = S_in[docs.stream, chunk]                                  # [N, HV, K, V]
  own_h0 = jnp.zeros_like(entering) if h0 is None else as_float32(h0)
  entering = jnp.where(first_segment[:, None, None, None], entering, own_h0)
  kn = load_k(p, rows(k))[:, :, :, :, None]                            # [N, Ct, n, H, 1, K]
  decay_end = 1.0
  if g is not None:
    _, after, total = _gate_sums(p, rows(g), own)
    kn = kn * jnp.exp(after).reshape(p.N, Ct, 1, H, G, -1)
    decay_end = jnp.exp(total)[..., None]                              # [N, HV, 1|K, 1]
  kn = jnp.where(own[:, :, None, None, None, None], kn, 0.0)
  kn = jnp.broadcast_to(kn, kn.shape[:4] + (G, p.K)).reshape(p.N, Ct * n, p.HV, p.K)
  vn = v_new[docs.stream, chunk][:, :Ct * n]                           # [N, C, HV, V]
  return decay_end * entering + jnp.einsum("nchk,nchv->nhkv", kn, vn, precision=_HI)
