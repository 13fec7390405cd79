"""Coefficient schedules for sparsity penalties, as optax-style functions `step -> value`."""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from deltajax.sparsity import checks


def prosparse_l1_schedule(stage_values: Sequence[float], stage_steps: Sequence[int], *,
                          init_value: float = 0.0, warmup_steps: int = 0,
                          rise_fraction: float = 1.0):
  """ProSparse-style progressive L1 coefficient.

  `init_value` for `warmup_steps` steps; then stage i (lasting stage_steps[i] steps) rises from
  the previous stage's value to stage_values[i] along a quarter sine over the first
  rise_fraction of the stage and holds it for the rest; after the last stage the value stays at
  stage_values[-1]. Works with a traced integer or float step (under jit).
  """
  values = [float(v) for v in stage_values]
  steps = list(stage_steps)
  if not values or len(values) != len(steps):
    raise ValueError(f"stage_values and stage_steps must be non-empty and of equal length; got "
                     f"{len(values)} values and {len(steps)} steps.")
  for v in values:
    checks.check_nonneg("stage_values", v)
  for s in steps:
    checks.check_positive_int("stage_steps", s)
  checks.check_nonneg("init_value", init_value)
  if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
    raise ValueError(f"warmup_steps must be an int >= 0; got {warmup_steps!r}.")
  if not 0.0 < rise_fraction <= 1.0:
    raise ValueError(f"rise_fraction must lie in (0, 1]; got {rise_fraction!r}.")

  starts = np.cumsum([warmup_steps] + steps[:-1]).astype(np.float32)
  rises = np.maximum(np.asarray(steps, np.float32) * rise_fraction, 1.0)
  lows = np.asarray([float(init_value)] + values[:-1], np.float32)
  highs = np.asarray(values, np.float32)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    # Progress through each stage's rise in [0, 1]; a stage not yet begun contributes 0.
    p = jnp.clip((t - starts) / rises, 0.0, 1.0)
    rise = (highs - lows) * jnp.sin(0.5 * jnp.pi * p)
    return jnp.float32(init_value) + jnp.sum(rise)

  return schedule
