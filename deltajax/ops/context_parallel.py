"""Context parallelism: the time axis split over a mesh axis, the shards joined by a prefix scan.

An op called with `cp_axis=` inside `jax.shard_map`, its time axis split over that mesh axis
(D shards of Tl tokens, shard i holding tokens [i Tl, (i + 1) Tl)), returns each shard's part
of the whole sequence's output. Per stream and value head the delta rule is affine in its
state, so the state leaving shard i is F_i(S) = M_i S + X_i of the state S entering it
(M_i [K, K], X_i [K, V], float32), and every state and output inside the shard is affine in S:

1. Local run, one call of the implementation (any of the registry's: recurrent, chunk,
   pallas). The values are widened to V + K, v' = [v | 0], and the shard starts from the
   state [0 | I]. The state then stays [X_t | M_t]: the run returns the zero-start outputs
   o0_t, the read-out r_t = M_t^T (scale q_t) [K] of the transition, and the map
   [X | M] as its final state. The K-only work (scores, the inverse, W) is shared; only the
   V-wide products widen. (A second run from the identity, or the product of the chunk
   form's per-chunk transitions, would redo the preparation or need a second pass for the
   outputs, and neither would work for every implementation.)
2. Prefix scan over `ppermute`: maps compose as F_j o F_i = (M_j M_i, M_j X_i + X_j); at step
   s shard i receives the running composite of shard i - 2^s (Hillis-Steele), so after
   ceil(log2 D) exchanges shard i holds F_i o ... o F_0. Shard 0 starts from the initial state
   itself (M_0 = 0), so that composite is the true state leaving shard i whatever it is
   applied to: its X. One more `ppermute` hands it on to shard i + 1 as S_in.
3. Correction: o_t = o0_t + S_in^T r_t, one [K] x [K, V] product per token; the final state is
   the last shard's, broadcast by `psum`.

The backward is JAX's transpose of these steps, which is their mirror: the transpose of a
`ppermute` is the `ppermute` the other way, and of `X <- X + M X_prev` the cotangent of X_prev
is M^T dX: a reverse (suffix) scan of the cotangents with the transposed maps, in the same
ceil(log2 D) exchanges, then the implementation's own backward on the widened run
(tests/cp_checks.py checks the exchanges). It keeps only the maps of each exchange,
ceil(log2 D) [B, HV, K, K + V] arrays, besides the local run's residuals.

Packed documents (`cu_seqlens`, the GLOBAL boundaries, replicated on every shard): a shard
runs its own slice of them. The document open at its first token, if it started on an earlier
shard, is the one that starts from [0 | I]; every other document starts from its initial state
(or zeros) with no identity part, so a boundary inside the shard makes M = 0 past it, and
the correction reaches only the tokens of the continuing document. The rows of the local
run's initial and final states are
* the global documents, when initial states are given or final states asked for (the caller
  already holds N of them); each document's final state comes from the shard holding its
  last token, summed over the shards by `psum`;
* otherwise two per stream (a layer's packed rows can hold T documents): the continuing
  document, and one shared by every document that starts inside the shard, all of which
  start from zeros; its first and last token are those of the shard's last document, whose
  final state is the state leaving the shard.

Legend as in deltajax.core.problem; D shards, Tl tokens per shard, R rows of states.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from deltajax.core import documents
from deltajax.core.documents import Documents
from deltajax.core.problem import Problem
from deltajax.ops import registry

_HI = lax.Precision.HIGHEST
_F32 = jnp.float32


def axis_size(cp_axis) -> int:
  """The number of shards along `cp_axis` (1 for None); ValueError unless it is bound."""
  if cp_axis is None:
    return 1
  if not isinstance(cp_axis, str):
    raise ValueError(f"cp_axis must be a mesh axis name (str) or None; got {cp_axis!r}.")
  try:
    return lax.axis_size(cp_axis)
  except NameError as e:
    raise ValueError(
        f"cp_axis={cp_axis!r} is not a bound mesh axis: call the op inside jax.shard_map "
        f"over a mesh with an axis {cp_axis!r}, the time axis split over it (or pass "
        f"cp_axis=None).") from e


def check_divisible(T: int, shards: int, cp_axis: str) -> None:
  """ValueError unless the whole sequence's T splits evenly into `shards` along `cp_axis`."""
  if T % shards:
    raise ValueError(f"the time axis T={T} must be divisible by the size {shards} of mesh "
                     f"axis cp_axis={cp_axis!r}.")


def local_problem(p: Problem, rows: int, packed: bool) -> Problem:
  """The shard's run: values widened by K, its rows' initial and final states."""
  return dataclasses.replace(p, V=p.V + p.K, N=rows, packed=packed, has_initial_state=True,
                             output_final_state=True)


def check_supported(p: Problem, impl: str) -> None:
  """ValueError naming cp_axis when `impl` cannot run a shard (the widened values)."""
  if impl == "auto":
    return
  reason = registry.IMPLEMENTATIONS[impl].unsupported(local_problem(p, p.B, p.packed))
  if reason is not None:
    raise ValueError(f"cp_axis runs each shard with the values widened to V + K = "
                     f"{p.V + p.K} (the shard's transition rides along them), and impl={impl!r} "
                     f"does not support {reason}; use impl='chunk'.")


@dataclasses.dataclass(frozen=True)
class _Rows:
  """The rows of the local run's states.

  docs: the local documents (None: one row per stream). value0 [R, HV, K, V]: the initial
  states' value part. from_identity [R] bool: the row continues the previous shard's state.
  end [B] int32: the row of the state leaving the shard. cont [B] int32: the row of the
  document open at the shard's first token.
  """
  docs: Documents | None
  value0: jax.Array
  from_identity: jax.Array
  end: jax.Array
  cont: jax.Array


def _stream_rows(p: Problem, h0, shard) -> _Rows:
  """One row per stream; shard 0 starts from h0, every other shard from the identity."""
  first = shard == 0
  value0 = jnp.zeros((p.B, p.HV, p.K, p.V), _F32)
  if h0 is not None:
    value0 = jnp.where(first, h0.astype(_F32), value0)
  streams = jnp.arange(p.B, dtype=jnp.int32)
  return _Rows(None, value0, jnp.broadcast_to(~first, (p.B,)), streams, streams)


def _clipped(cu, t0, Tl: int):
  """The global boundaries [B, S + 1] seen by the shard of tokens [t0, t0 + Tl)."""
  return jnp.clip(cu - t0, 0, Tl).astype(jnp.int32)


def _continuing(cu, local: Documents, t0):
  """([B] the document of each stream's first local token, [B] it started on an earlier shard)."""
  cont = local.doc[:, 0]
  return cont, cu[:, :-1].reshape(-1)[cont] < t0


def _document_rows(p: Problem, h0, cu, t0, Tl: int) -> _Rows:
  """The global documents as rows (N of them), sliced to the shard."""
  local = documents.from_cu_seqlens(_clipped(cu, t0, Tl), p.B, Tl)
  cont, continuing = _continuing(cu, local, t0)
  from_identity = jnp.zeros((p.N,), bool).at[cont].set(continuing)
  value0 = jnp.zeros((p.N, p.HV, p.K, p.V), _F32)
  if h0 is not None:  # a continuing document's own h0 was applied where it started
    value0 = jnp.where(from_identity[:, None, None, None], 0.0, h0.astype(_F32))
  return _Rows(local, value0, from_identity, local.doc[:, -1], cont)


def _compact_rows(p: Problem, cu, t0, Tl: int) -> _Rows:
  """Two rows per stream: b, the document open at the first token; B + b, every document
  starting inside the shard (all from zeros; first and last token of the last one)."""
  B = p.B
  local = documents.from_cu_seqlens(_clipped(cu, t0, Tl), B, Tl)
  _, continuing = _continuing(cu, local, t0)
  t = jnp.arange(Tl, dtype=jnp.int32)
  inner = local.reset & (t > 0)                                        # [B, Tl]
  later = jnp.cumsum(inner, axis=1) > 0                                # past the first one
  rows = jnp.arange(B, dtype=jnp.int32)
  first_inner = jnp.min(jnp.where(inner, t, Tl), axis=1)
  last_start = jnp.max(jnp.where(inner, t, -1), axis=1)
  docs = Documents(
      reset=local.reset,
      doc=jnp.where(later, B + rows[:, None], rows[:, None]),
      stream=jnp.concatenate([rows, rows]),
      first=jnp.concatenate([jnp.zeros((B,), jnp.int32),
                             jnp.where(last_start >= 0, last_start, Tl)]),
      last=jnp.concatenate([first_inner - 1, jnp.full((B,), Tl - 1, jnp.int32)]),
      N=2 * B)
  from_identity = jnp.concatenate([continuing, jnp.zeros((B,), bool)])
  return _Rows(docs, jnp.zeros((2 * B, p.HV, p.K, p.V), _F32), from_identity,
               docs.doc[:, -1], rows)


def _compose(M, X):
  """M [B, HV, K, K] applied to X [B, HV, K, V] (or to another map's M)."""
  return jnp.einsum("bhkj,bhjv->bhkv", M, X, precision=_HI)


def prefix_scan(M, X, cp_axis: str, shards: int):
  """X of F_i o ... o F_0 on shard i, from each shard's own map (M [B, HV, K, K], X).

  Hillis-Steele over `ppermute`: at step s shard i receives the composite of shard i - 2^s;
  shards i < 2^s receive zeros and keep theirs. The last step needs no M.
  """
  shard = lax.axis_index(cp_axis)
  step = 1
  while step < shards:
    perm = [(j, j + step) for j in range(shards - step)]
    X_prev = lax.ppermute(X, cp_axis, perm)
    if 2 * step < shards:
      M_prev = lax.ppermute(M, cp_axis, perm)
      X = X + _compose(M, X_prev)
      M = jnp.where(shard >= step, _compose(M, M_prev), M)
    else:
      X = X + _compose(M, X_prev)
    step *= 2
  return X


def _shift(S, cp_axis: str, shards: int):
  """Shard i + 1 receives shard i's S; shard 0 zeros."""
  if shards == 1:
    return jnp.zeros_like(S)
  return lax.ppermute(S, cp_axis, [(j, j + 1) for j in range(shards - 1)])


def run(p: Problem, impl: str, local: Callable, q, k, v, beta, g, h0, cu_seqlens,
        cp_axis: str):
  """The op on this shard's tokens; p describes the shard (T = Tl), inputs as
  deltajax.core.problem (k, v, beta with the step axis), cu_seqlens global or None.

  local(problem, q, k, v, beta, g, h0, docs) runs the implementation `impl` names.
  Returns (o [B, Tl, HV, V] in q's dtype, the final states [N, HV, K, V] float32 or None,
  the global Documents or None: what the op layer needs to pass empty documents' initial
  states through).
  """
  check_supported(p, impl)
  shards = axis_size(cp_axis)
  shard = lax.axis_index(cp_axis)
  Tl, V = p.T, p.V
  t0 = shard * Tl
  cu = None if cu_seqlens is None else jnp.asarray(cu_seqlens, jnp.int32).reshape(p.B, -1)
  if cu is None:
    rows = _stream_rows(p, h0, shard)
  elif p.has_initial_state or p.output_final_state:
    rows = _document_rows(p, h0, cu, t0, Tl)
  else:
    rows = _compact_rows(p, cu, t0, Tl)

  identity = jnp.where(rows.from_identity[:, None, None, None], jnp.eye(p.K, dtype=_F32), 0.0)
  identity = jnp.broadcast_to(identity, rows.value0.shape[:-1] + (p.K,))
  start = jnp.concatenate([rows.value0, identity], axis=-1)           # [R, HV, K, V + K]
  v_wide = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (p.K,), v.dtype)], axis=-1)
  pl = local_problem(p, start.shape[0], rows.docs is not None)
  o, final = local(pl, q, k, v_wide, beta, g, start, rows.docs)
  final = final.astype(_F32)

  S_out = prefix_scan(final[rows.end, ..., V:], final[rows.end, ..., :V], cp_axis, shards)
  S_in = _shift(S_out, cp_axis, shards)                                # [B, HV, K, V]
  r = o[..., V:].astype(_F32)
  o = (o[..., :V].astype(_F32) + jnp.einsum("bthk,bhkv->bthv", r, S_in, precision=_HI))
  o = o.astype(p.dtype)
  if not p.output_final_state:
    return o, None, None
  if cu is None:
    return o, lax.psum(jnp.where(shard == shards - 1, S_out, 0.0), cp_axis), None
  # Each document's final state from the shard holding its last token.
  finals = final[..., :V].at[rows.cont].add(_compose(final[rows.cont, ..., V:], S_in))
  first, last = cu[:, :-1].reshape(-1), cu[:, 1:].reshape(-1) - 1
  owner = (last >= first) & (last >= t0) & (last < t0 + Tl)
  finals = lax.psum(jnp.where(owner[:, None, None, None], finals, 0.0), cp_axis)
  return o, finals, documents.from_cu_seqlens(cu, p.B, Tl * shards)


def shard_time(fn: Callable, cp_axis: str, time_args, shared_args, time_out: Any):
  """fn(time_args, shared_args) with time_args' axis 1 (time) split over mesh axis `cp_axis`.

  What a layer calls to run a piece of itself sequence-sharded. Outside `jax.shard_map` it
  wraps fn in one that is manual over `cp_axis` alone (the current mesh, `jax.set_mesh`, must
  have the axis; every other axis stays with XLA's partitioner); inside a shard_map already
  manual over it, fn runs as it is. shared_args are replicated over `cp_axis`. time_out: a
  pytree prefix of fn's output, True where the output has the time axis at 1, False where it
  is the same on every shard.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if cp_axis in mesh.manual_axes:
    return fn(time_args, shared_args)
  if cp_axis not in mesh.axis_names:
    raise ValueError(f"cp_axis={cp_axis!r} is not an axis of the current mesh "
                     f"{dict(mesh.shape)}: run the model under jax.set_mesh(mesh) with a mesh "
                     f"that has it (or set cp_axis=None).")
  for x in jax.tree.leaves(time_args):
    check_divisible(x.shape[1], mesh.shape[cp_axis], cp_axis)
  time, shared = P(None, cp_axis), P()
  # check_vma=False: the Pallas interpreter (jax 0.10.2) cannot run kernels on varying values.
  return jax.shard_map(
      fn, mesh=mesh, in_specs=(jax.tree.map(lambda _: time, time_args),
                               jax.tree.map(lambda _: shared, shared_args)),
      out_specs=jax.tree.map(lambda t: time if t else shared, time_out),
      axis_names=frozenset({cp_axis}), check_vma=False)(time_args, shared_args)
