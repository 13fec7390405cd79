"""`pallas_chunk`: the chunkwise delta rule on Pallas kernels, with a recomputing custom_vjp.

What runs where:
* forward: `calls.prepare` (Pallas: gate sums, scores, block-doubling inverse, W, U per chunk)
  then `calls.forward` (Pallas: the state pass with the state on chip, outputs fused in).
* backward: `calls.prepare` (Pallas) recomputes the per-chunk quantities, `calls.backward`
  (Pallas) runs the reverse pass over chunks with dS on chip and emits every per-chunk
  cotangent, and `calls.prepare_backward` (Pallas, recomputing the preparation again) turns
  those into dq, dk, dv, dbeta and dg. Only the inputs and the per-chunk states are kept
  between passes; plain JAX does only the layout glue.

Legend: B streams, HV heads, nc chunks, C chunk length, K key dim, V value dim, N sequences.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deltajax.ops.layout import Layout
from ..config import KernelConfig, default_config
from . import calls

_F32 = jnp.float32


def _gate_inputs(g):
  """The kernels' view of g: (kind, arrays); one gate per token as a [.., 1, C] row."""
  if g is None:
    return None, ()
  if g.ndim == 4:                                     # [B, HV, nc, C]: one gate per head
    return "head", (g[..., None, :],)
  return "channel", (g,)                              # [B, HV, nc, C, K]


def _h0T(h0, seq, packed: bool):
  """The transposed state each chunk may load: [B, HV, 1, V, K] (plain) or [B, HV, nc, V, K]."""
  if packed:
    return jnp.swapaxes(jnp.moveaxis(h0[seq], 2, 1), -1, -2)
  return jnp.swapaxes(h0, -1, -2)[:, :, None]


def _flags(x):
  """[B, nc] bool -> [B, 1, nc, 1, 1] float32."""
  return x.astype(_F32)[:, None, :, None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def core(q, k, v, beta, g, h0, start, seq, packed: bool, cfg: KernelConfig):
  """O [B, HV, nc, C, V] and the transposed states ST_out [B, HV, nc, V, K] after each chunk.

  Inputs as `deltajax.ops.chunk.chunk_core` but stream-major (q, k [B, HV, nc, C, K],
  v [.., C, V], beta [.., C], g None / [.., C] / [.., C, K], h0 [N, HV, K, V], start/seq
  [B, nc]);
  `packed` is True when chunks may load any sequence's h0 (cu_seqlens), False when stream b
  loads h0[b] at chunk 0.
  """
  return _core_fwd(q, k, v, beta, g, h0, start, seq, packed, cfg)[0]


def _core_fwd(q, k, v, beta, g, h0, start, seq, packed, cfg):
  kind, gates = _gate_inputs(g)
  p = calls.prepare(cfg, q, k, v, beta[..., None], kind, gates)
  o, ST_out = calls.forward(cfg, _flags(start), _h0T(h0, seq, packed), p)
  return (o, ST_out), (q, k, v, beta, g, h0, start, seq, ST_out)


def _core_bwd(packed, cfg, res, cts):
  q, k, v, beta, g, h0, start, seq, ST_out = res
  dO, dST_out = cts
  kind, gates = _gate_inputs(g)
  p = calls.prepare(cfg, q, k, v, beta[..., None], kind, gates)    # recomputed, not stored
  next_start = jnp.concatenate([start[:, 1:], jnp.ones_like(start[:, :1])], axis=1)
  dp, dh0T = calls.backward(cfg, _flags(start), _flags(next_start), _h0T(h0, seq, packed),
                            ST_out, p, dO, dST_out)
  dq, dk, dv, dbeta, *dg = calls.prepare_backward(cfg, q, k, v, beta[..., None], kind, gates,
                                                  dp)
  dg = None if g is None else dg[0].reshape(g.shape)
  dh0 = jnp.swapaxes(dh0T, -1, -2)                    # [B, HV, 1 or nc, K, V]
  if packed:
    dh0 = jnp.zeros_like(h0).at[seq].add(jnp.moveaxis(dh0, 2, 1))
  else:
    dh0 = dh0[:, :, 0]
  return dq, dk, dv, dbeta[..., 0], dg, dh0, None, None


core.defvjp(_core_fwd, _core_bwd)


def check_supported(K: int, V: int, C: int, cfg: KernelConfig) -> None:
  """Raises ValueError for shapes a backend's lowering cannot take, naming the way out."""
  if cfg.backend == "gpu" and not cfg.interpret:
    for name, n in (("key dim K", K), ("value dim V", V), ("chunk_size", C)):
      if n & (n - 1):
        raise ValueError(f"impl='pallas' on GPU (Triton lowering) needs the {name} to be a "
                         f"power of two; got {n}. Use impl='chunk' for this shape.")


def pallas_chunk(q, k, v, beta, g, h0, layout: Layout, config: KernelConfig | None = None):
  """The chunkwise form on Pallas kernels, over a layout from `make_layout`.

  Args and returns as `deltajax.ops.chunk.chunk`: q, k [B, T, HV, K] float32 (q scaled, heads
  already repeated); v [B, T, HV, V]; beta [B, T, HV]; g None, [B, T, HV] or [B, T, HV, K];
  h0 [N, HV, K, V]. Returns o [B, T, HV, V] float32 and the final states [N, HV, K, V].
  config: a `KernelConfig`; default `default_config()` for the first device.
  """
  cfg = config or default_config()
  check_supported(q.shape[-1], v.shape[-1], layout.C, cfg)
  heads_first = lambda x: None if x is None else jnp.moveaxis(layout.to_chunks(x), 3, 1)
  o, ST_out = core(heads_first(q), heads_first(k), heads_first(v), heads_first(beta),
                   heads_first(g), h0, layout.start, layout.seq, layout.src is not None, cfg)
  finals = jnp.swapaxes(ST_out[layout.last_stream, :, layout.last_chunk], -1, -2)
  return layout.from_chunks(jnp.moveaxis(o, 1, 3)), finals
