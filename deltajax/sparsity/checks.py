"""Argument checks for the sparsity package.

They run on Python values and static shapes only, so a bad config or a bad width fails with a
`ValueError` naming the argument, what it got and what it needs, before any tracing work.
"""
from __future__ import annotations

import math
import numbers


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}; got {value!r}.")


def check_k(k) -> None:
  """k is a count (int >= 1) or a fraction (float in (0, 1]); the width is checked later."""
  if isinstance(k, bool) or not isinstance(k, numbers.Real):
    raise ValueError(f"k must be an int count >= 1 or a float fraction in (0, 1]; got {k!r}.")
  if isinstance(k, numbers.Integral):
    if k < 1:
      raise ValueError(f"k must be an int count >= 1 or a float fraction in (0, 1]; got k={k}.")
  elif not 0.0 < k <= 1.0:
    raise ValueError(f"k as a fraction must lie in (0, 1]; got k={k!r}.")


def resolve_k(k, width: int) -> int:
  """The number of entries to keep out of `width`: a count as is; a fraction k keeps
  floor(k * width) (at least 1), so the kept fraction never exceeds k."""
  check_k(k)
  if isinstance(k, numbers.Integral):
    if k > width:
      raise ValueError(f"k must be <= the width of the last axis ({width}); got k={k}.")
    return int(k)
  # The small slack absorbs binary rounding (0.29 * 100 = 28.999999999999996).
  return max(1, min(width, int(math.floor(float(k) * width + 1e-9))))


def check_nonneg(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
    raise ValueError(f"{name} must be a real number >= 0; got {value!r}.")


def check_positive(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
    raise ValueError(f"{name} must be a real number > 0; got {value!r}.")


def check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be an int >= 1; got {value!r}.")


def check_rank(name: str, shape: tuple[int, ...], min_rank: int, layout: str) -> None:
  if len(shape) < min_rank:
    raise ValueError(f"{name} must have rank >= {min_rank} {layout}; got shape {shape}.")
