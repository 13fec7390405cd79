"""Argument checks shared by every op and implementation.

Everything here runs on shapes, dtypes and (when concrete) values before any tracing work, so
bad input fails with a `ValueError` that names the argument, what it got and what it needs.
"""
from __future__ import annotations

import dataclasses

import math

import jax
import jax.numpy as jnp
import numpy as np

from deltajax.core.problem import check_chunk_size
from deltajax.ops.registry import IMPLEMENTATIONS

IMPLS = ("auto", *IMPLEMENTATIONS)


@dataclasses.dataclass(frozen=True)
class Dims:
  """Sizes of one call. B batch, T time, H query/key heads, HV value heads, K key dim, V value dim.

  `n` is the number of Householder steps per token (1 except for delta_product); `N` the number
  of sequences (B, or len(cu_seqlens) - 1 when packed).
  """
  B: int
  T: int
  H: int
  HV: int
  K: int
  V: int
  n: int = 1
  N: int = 0


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def _check_float(name: str, x) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array (float32, bfloat16 or float16); "
                     f"got dtype {dtype}.")


def _expect(name: str, x, want: tuple[int, ...], layout: str) -> None:
  got = _shape(x)
  if got != want:
    raise ValueError(f"{name} must have shape {layout} = {want}; got {got}.")


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> int:
  """Returns the number of packed sequences N. Values are checked when concrete.

  [N + 1] packs N sequences in one stream (B must be 1); [B, S + 1] packs S per stream
  (N = B * S). Empty sequences (repeated boundaries) are allowed and pass their initial state
  through, so a fixed-size cu_seqlens can describe a varying number of documents under jit.
  """
  if isinstance(cu_seqlens, (list, tuple)):
    cu_seqlens = np.asarray(cu_seqlens)
  shape = _shape(cu_seqlens)
  if len(shape) not in (1, 2) or shape[-1] < 2:
    raise ValueError(f"cu_seqlens must be [N + 1] (one stream) or [B, S + 1] (per stream), "
                     f"with N, S >= 1; got shape {shape}.")
  if not jnp.issubdtype(jnp.result_type(cu_seqlens), jnp.integer):
    raise ValueError(f"cu_seqlens must be an integer array; got dtype "
                     f"{jnp.result_type(cu_seqlens)}.")
  if len(shape) == 1 and B != 1:
    raise ValueError(f"cu_seqlens of shape [N + 1] packs sequences along one stream and needs "
                     f"batch size 1; got B={B} (give [B, S + 1] boundaries per stream instead).")
  if len(shape) == 2 and shape[0] != B:
    raise ValueError(f"cu_seqlens of shape [B, S + 1] needs one row per stream, B={B}; got "
                     f"shape {shape}.")
  if not isinstance(cu_seqlens, jax.core.Tracer):
    for c in np.asarray(cu_seqlens).reshape(-1, shape[-1]):
      if c[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0; got {c[0]} (cu_seqlens={c.tolist()}).")
      if c[-1] != T:
        raise ValueError(f"cu_seqlens must end at T={T}; got {c[-1]} "
                         f"(cu_seqlens={c.tolist()}).")
      if np.any(np.diff(c) < 0):
        raise ValueError(f"cu_seqlens must be non-decreasing; got {c.tolist()}.")
  return shape[-1] - 1 if len(shape) == 1 else B * (shape[-1] - 1)


def check_scale(scale) -> None:
  if scale is None:
    return
  if (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating))
      or not math.isfinite(scale)):
    raise ValueError(f"scale must be a finite number (or None for K ** -0.5); got {scale!r}.")


def check_inputs(q, k, v, beta, g, *, gate: str | None, n: int | None, initial_state,
                 cu_seqlens, chunk_size, impl: str, scale=None) -> Dims:
  """Validates one call. `gate` is None, "head" ([B,T,HV]) or "channel" ([B,T,HV,K]).

  `n` is None for single-step ops; for delta_product k/v/beta carry an extra axis of size n
  after T.
  """
  check_impl(impl)
  check_chunk_size(chunk_size)
  check_scale(scale)
  for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
    _check_float(name, x)
  if g is not None:
    _check_float("g", g)
  if _shape(q).__len__() != 4:
    raise ValueError(f"q must have rank 4 [B, T, H, K]; got shape {_shape(q)}.")
  B, T, H, K = _shape(q)
  extra = () if n is None else (n,)
  sub = "" if n is None else "n, "
  if len(_shape(k)) != 4 + len(extra):
    raise ValueError(f"k must have rank {4 + len(extra)} [B, T, {sub}H, K]; got shape {_shape(k)}.")
  if n is None:
    _expect("k", k, (B, T, H, K), "[B, T, H, K]")
  else:
    if _shape(k)[2] < 1:
      raise ValueError(f"k must have n >= 1 Householder steps on axis 2; got shape {_shape(k)}.")
    n = _shape(k)[2]
    extra = (n,)
    _expect("k", k, (B, T, n, H, K), "[B, T, n, H, K]")
  vs = _shape(v)
  if len(vs) != 4 + len(extra):
    raise ValueError(f"v must have rank {4 + len(extra)} [B, T, {sub}HV, V]; got shape {vs}.")
  HV, V = vs[-2], vs[-1]
  _expect("v", v, (B, T, *extra, HV, V), f"[B, T, {sub}HV, V]")
  if HV % H:
    raise ValueError(f"the number of value heads HV={HV} (v's axis -2) must be a multiple of the "
                     f"number of query/key heads H={H}.")
  _expect("beta", beta, (B, T, *extra, HV), f"[B, T, {sub}HV]")
  if gate == "head":
    if g is not None:
      _expect("g", g, (B, T, HV), "[B, T, HV]")
  elif gate == "channel":
    _expect("g", g, (B, T, HV, K), "[B, T, HV, K]")
  N = B
  if cu_seqlens is not None:
    N = check_cu_seqlens(cu_seqlens, B, T)
  if initial_state is not None:
    _check_float("initial_state", initial_state)
    _expect("initial_state", initial_state, (N, HV, K, V),
            "[N, HV, K, V]" if cu_seqlens is not None else "[B, HV, K, V]")
  return Dims(B=B, T=T, H=H, HV=HV, K=K, V=V, n=1 if n is None else n, N=N)
