"""Gated scores inside a chunk: S_ij = sum_d a_id b_jd exp(sum_{j < s <= i} g_sd), j <= i.

Scalar gate differences G_i - G_j are formed as sums of the gates between j and i, never by
subtracting running sums (which loses precision for strong gates). Per-channel gates (KDA)
factor exp(G_i - G_j) as exp(G_i) exp(-G_j) only while no channel decays by more than e^80 over
a chunk (or a 16-token sub-block), where float32 holds both factors; stronger gates use factors
exp(G_i - G_r) exp(G_r - G_j) through a point r between the tokens, both <= 1, so any gate in
(-inf, 0] stays finite.

Legend: C tokens (steps) of a chunk, K key dim; leading axes are batch axes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_SUB = 16  # sub-block of the per-channel gate scores; the diagonal blocks cost C * _SUB * K.
_GROUP = 16  # chunks per step of the per-channel sub-block loop (bounds its memory)
# Largest decay over a chunk (or sub-block) for which per-channel scores factor through its
# start: the column factors reach e^{+decay}, and float32 ends near e^88.
_MAX_FACTORED_DECAY = 80.0
# Gates rounded to this grid sum without rounding error in float32 while the sums stay below
# 2^7 in magnitude (7 + 16 bits of a 24-bit significand).
_GRID = 2.0 ** 16


def tril(C: int, diagonal: bool) -> jax.Array:
  return jnp.tril(jnp.ones((C, C), bool), 0 if diagonal else -1)


def sum_over(mask, g, axis: int):
  """out_i = sum_s mask[..., i, s] g_s along `axis`, as a matmul with a 0/1 matrix.

  mask: [C, C], or batched [..., C, C] over g's axes before `axis` (broadcast like them).
  Cumulative gate sums are matmuls here: XLA's cumsum runs at a few ns per element on CPU and
  Mosaic TPU has none, and a masked matmul adds only the terms it names (exact zeros elsewhere),
  so it is as precise as a running sum. Always at HIGHEST precision: gates are never bfloat16.
  """
  axis %= g.ndim
  trailing = g.ndim - axis - 1
  g = jnp.moveaxis(g, axis, -1)
  mask = mask.reshape(mask.shape[:-2] + (1,) * trailing + mask.shape[-2:]).astype(g.dtype)
  out = jnp.einsum("...is,...s->...i", mask, g, precision=lax.Precision.HIGHEST)
  return jnp.moveaxis(out, -1, axis)


def segment_sums(g, axis: int):
  """seg[..., i, j, ...] = sum_{j < s <= i} g_s along `axis` (0 on and above the diagonal).

  Built by summing only the terms between j and i rather than subtracting two running sums:
  G_i - G_j loses |G| * eps of absolute precision (strong gates reach |G| ~ 1e3 in a chunk),
  which shows up as 1e-5 relative error in the gate gradients.
  """
  axis %= g.ndim
  C = g.shape[axis]
  s = jnp.arange(C)
  between = (s[None, :, None] <= s[:, None, None]) & (s[None, :, None] > s[None, None, :])
  g = jnp.moveaxis(g, axis, -1)                                    # [..., C]
  seg = jnp.einsum("isj,...s->...ij", between.astype(g.dtype), g,
                   precision=lax.Precision.HIGHEST)                # [..., i, j]
  return jnp.moveaxis(seg, (-2, -1), (axis, axis + 1))


def _cumulative(g, axis: int):
  """sum_{s <= i} g_s along `axis`: the decay from the chunk start through token i."""
  C = g.shape[axis]
  return sum_over(tril(C, True), g, axis)


def _rest_sums(g, axis: int):
  """sum_{s > i} g_s along `axis`: the decay from token i to the end of its (sub-)chunk."""
  C = g.shape[axis]
  return sum_over(~tril(C, True), g, axis)


def gated_scores(rows, b, g, *, diagonal: bool, precision=None):
  """S_ij = sum_d a_id b_jd exp(sum_{j < s <= i} g_sd) for j < i (j <= i with `diagonal`).

  Args:
    rows: row factors a, each [..., C, K] like b. They share b's gate exponentials; each is its
      own product (on CPU two products cost less than one over stacked operands).
    b: [..., C, K].
    g: None, [..., C] (one log-gate per row) or [..., C, K] (per channel); g <= 0. Any gate in
      (-inf, 0] stays finite.
  Returns:
    a tuple of [..., C, C], one per row factor.
  """
  C = b.shape[-2]
  if g is not None and g.ndim == b.ndim:
    scores = _channel_scores(tuple(rows), b, g, precision=precision)
    if not diagonal:
      return scores
    # The diagonal (no decay) on its own: inside a factored product its gate gradients would
    # be two large terms that cancel, leaving rounding noise in dg for strong gates.
    eye = jnp.eye(C, dtype=b.dtype)
    return tuple(s + jnp.sum(a * b, axis=-1)[..., :, None] * eye for s, a in zip(scores, rows))
  mask = tril(C, diagonal)
  decay = None if g is None else jnp.exp(jnp.where(mask, segment_sums(g, -1), -jnp.inf))
  scores = (jnp.einsum("...ik,...jk->...ij", a, b, precision=precision) for a in rows)
  return tuple(jnp.where(mask, s, 0.0) if decay is None else s * decay for s in scores)


def _split(g):
  """g = hi + lo with hi on the 2^-16 grid and |lo| <= 2^-17. Sums of hi of magnitude < 128 are
  exact; hi carries no gradient (lo carries all of it, so d/dg is unchanged)."""
  hi = jnp.where(jnp.abs(g) < 2.0 ** 20, jnp.round(g * _GRID) / _GRID, g)
  hi = lax.stop_gradient(hi)
  return hi, g - hi


def _exp_split(hi, lo):
  """e^{hi + lo} for |lo| <= 2^-10, never rounding hi + lo.

  A factor e^x computed from a rounded x is off by eps |x| relative; factoring e^{G_i - G_j}
  through a reference point makes |x| large (up to 40 here) even for pairs whose own decay is
  small, so the exponent is carried exactly as an exact grid part and a small remainder whose
  exponential is a cubic (error < 2^-40).
  """
  return jnp.exp(hi) * _exp_small(lo)


def _exp_small(y):
  return 1 + y * (1 + y / 2 * (1 + y / 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _factored_scores(rows, b, x, lo, precision):
  """Strictly lower (a e^{x + lo}) (b e^{-x - lo})^T for each a in rows, [..., C, C].

  x [..., C, K] is exact and carries no gradient (`_split`); lo is the small remainder. The
  backward recomputes the factors instead of keeping them: two [C, K] arrays of residuals
  instead of seven.
  """
  return _factored_fwd(rows, b, x, lo, precision)[0]


def _factored_fwd(rows, b, x, lo, precision):
  left, right = _exp_split(x, lo), b * _exp_split(-x, -lo)
  mask = tril(b.shape[-2], False)
  scores = tuple(jnp.where(mask, jnp.einsum("...ik,...jk->...ij", a * left, right,
                                            precision=precision), 0.0) for a in rows)
  return scores, (rows, b, x, lo)


def _factored_bwd(precision, res, d_scores):
  rows, b, x, lo = res
  up, down = jnp.exp(x), jnp.exp(-x)
  left, col = up * _exp_small(lo), down * _exp_small(-lo)            # e^{x+lo}, e^{-x-lo}
  right = b * col
  mask = tril(b.shape[-2], False)
  d_rows, d_left, d_right = [], 0.0, 0.0
  for a, d in zip(rows, d_scores):
    d = jnp.where(mask, d, 0.0)
    d_row_factor = jnp.einsum("...ij,...jk->...ik", d, right, precision=precision)
    d_rows.append(d_row_factor * left)
    d_left = d_left + d_row_factor * a
    d_right = d_right + jnp.einsum("...ij,...ik->...jk", d, a * left, precision=precision)
  # d/dy of the cubic in _exp_small is the quadratic 1 + y + y^2 / 2.
  d_exp_small = lambda y: 1 + y * (1 + y / 2)
  d_lo = d_left * up * d_exp_small(lo) - d_right * b * down * d_exp_small(-lo)
  return tuple(d_rows), d_right * col, jnp.zeros_like(x), d_lo


_factored_scores.defvjp(_factored_fwd, _factored_bwd)


def _channel_scores(rows, b, g, *, precision=None):
  """Per-channel scores below the diagonal: one product per row factor while they fit float32,
  else by sub-blocks.

  While no channel decays by more than _MAX_FACTORED_DECAY over the chunk, e^{G_i - G_j}
  factors through the midpoint M of each channel's decay as e^{G_i - M} e^{M - G_j}, both
  within e^{+-40} and accurate to a few ulp (`_exp_split`), and each score matrix is one C x C
  product, as for scalar gates. Stronger gates take `_sub_block_scores`, exact for any gate in
  (-inf, 0]; the choice is one `lax.cond` over the whole batch. XLA reserves the memory of
  both branches, so the sub-block one runs rematerialised, over groups of `_GROUP` entries of
  the leading (chunk) axis at a time: its memory does not grow with the sequence.
  """
  C, sub = b.shape[-2], min(_SUB, b.shape[-2])
  hi, lo = (_cumulative(x, -2) for x in _split(g))                # g over (chunk start, i]
  fits = jnp.max(-hi[..., -1, :]) < _MAX_FACTORED_DECAY
  sub_decay = -jnp.sum(g.reshape(*g.shape[:-2], C // sub, sub, -1), axis=-2)
  sub_blocks_fit = jnp.max(sub_decay) < _MAX_FACTORED_DECAY

  def factored(rows, b, g):
    centre = jnp.round(hi[..., -1:, :] * (_GRID / 2)) / _GRID     # M, on the grid
    return _factored_scores(rows, b, hi - centre, lo, precision)   # hi - centre is exact

  by_block = jax.checkpoint(functools.partial(
      _sub_block_scores, diagonal_fits=sub_blocks_fit, precision=precision))
  by_blocks = lambda *xs: lax.map(lambda x: by_block(*x), xs, batch_size=_GROUP)
  return lax.cond(fits, factored, by_blocks, rows, b, g)


def _sub_block_scores(rows, b, g, *, diagonal_fits, precision=None):
  """Per-channel scores below the diagonal by sub-blocks of `_SUB` rows (I) and columns (J),
  for any gate.

  Row factors are a e^{own_i - m_I}: own is g over (start of I, i] and m_I half of block I's
  decay (0 when the diagonal blocks are banded), so the exponent stays within
  +-_MAX_FACTORED_DECAY / 2 (or <= 0). Below the diagonal blocks (J < I) the column factors are
  b e^{rest_j + mid_IJ + m_I}: g over (j, end of J], over the whole blocks between J and I, and
  m_I, all <= 0. Inside a diagonal block the column factor is b e^{m_I - own_j}, within
  e^{+-40} while no sub-block decays by more than _MAX_FACTORED_DECAY in any channel
  (`diagonal_fits`, one scalar for the whole batch); else the diagonal blocks are summed band
  by band with exponents <= 0 (`_diagonal_block_scores`). Exponents are carried as exact grid
  parts plus small remainders (`_exp_split`); where the grid sums are not exact (beyond 2^7)
  the factors are below e^-88 and the pairs they scale vanish in float32 anyway. Every row
  block has its own column factors ([..., nb, C, K] in all), which is why `_channel_scores`
  runs this over a few chunks at a time.
  """
  C, K = b.shape[-2:]
  sub = min(_SUB, C)
  nb = C // sub
  blocked = lambda x: x.reshape(*x.shape[:-2], nb, sub, x.shape[-1])
  blk = jnp.arange(nb)
  between = (blk[None, None, :] > blk[None, :, None]) & (blk[None, None, :] < blk[:, None, None])

  def sums(x):                                                      # x: a grid or remainder part
    xb = blocked(x)
    own = sum_over(tril(sub, True), xb, -2)                       # over (start of I, i]
    rest = sum_over(~tril(sub, True), xb, -2)                     # over (j, end of J]
    mid = jnp.einsum("IJL,...Lk->...IJk", between.astype(x.dtype), own[..., -1, :],
                     precision=lax.Precision.HIGHEST)               # [..., nb(I), nb(J), K]
    return own, rest, mid

  (own, rest, mid), (own_lo, rest_lo, mid_lo) = map(sums, _split(g))
  # m_I only where the diagonal blocks are factored; else 0 keeps every exponent <= 0.
  half = jnp.where(diagonal_fits, jnp.round(own[..., -1:, :] * (_GRID / 2)) / _GRID, 0.0)
  pick = lambda x, I: lax.dynamic_index_in_dim(x, I, axis=x.ndim - 3, keepdims=False)

  def row_block(I):                                                 # -> [..., sub, C] per row
    J = blk[:, None, None]
    m = pick(half, I)[..., None, :, :]                              # [..., 1, 1, K]
    below, diag = J < I, (J == I) & diagonal_fits
    expo = jnp.where(below, rest + pick(mid, I)[..., None, :] + m, -jnp.inf)
    expo = jnp.where(diag, m - own, expo)                           # [..., nb(J), sub, K]
    expo_lo = jnp.where(below, rest_lo + pick(mid_lo, I)[..., None, :], -own_lo)
    right = b * _exp_split(expo, expo_lo).reshape(g.shape)
    left = _exp_split(pick(own, I) - m[..., 0, :, :], pick(own_lo, I))
    return tuple(jnp.einsum("...ik,...jk->...ij", pick(blocked(a), I) * left, right,
                            precision=precision) for a in rows)

  by_rows = jax.vmap(row_block)(blk)                               # [nb, ..., sub, C] each
  mask = tril(C, False)
  scores = (jnp.where(mask, jnp.moveaxis(x, 0, -3).reshape(*x.shape[1:-2], C, C), 0.0)
            for x in by_rows)
  bands = lax.cond(diagonal_fits,
                   lambda *_: tuple(jnp.zeros(b.shape[:-1] + (C,), b.dtype) for _ in rows),
                   functools.partial(_diagonal_block_scores, sub=sub), rows, b, g)
  return tuple(map(jnp.add, scores, bands))


def _diagonal_block_scores(rows, b, g, *, sub: int):
  """The per-channel scores strictly below the diagonal inside the diagonal sub-blocks, one
  band at a time, for any gate.

  Band d >= 1 holds the pairs (i, i - d) of each sub-block:
  sum_k a_ik b_{i-d,k} e^{g over (i-d, i]} (an exponent <= 0). Bands run in a rematerialised
  loop so that no temporary, forward or backward, is larger than [..., C, K].
  """
  C = b.shape[-2]
  s = jnp.arange(C)
  b_padded = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(sub, 0), (0, 0)])

  @jax.checkpoint
  def band(d):
    window = (s[None, :] > s[:, None] - d) & (s[None, :] <= s[:, None])     # (i - d, i]
    b_d = lax.dynamic_slice_in_dim(b_padded, sub - d, C, axis=-2)           # b_{i - d}
    col = b_d * jnp.exp(sum_over(window, g, -2))
    return tuple(jnp.where(s % sub >= d, jnp.sum(a * col, axis=-1), 0.0) for a in rows)

  bands = lax.map(band, jnp.arange(1, sub))                                # [sub-1, ..., C] each
  i, j, d = s[None, :, None], s[None, None, :], jnp.arange(1, sub)[:, None, None]
  on_band = (i - j == d).astype(b.dtype)
  return tuple(jnp.einsum("d...i,dij->...ij", x, on_band) for x in bands)
