"""Loading one chunk's inputs into a kernel: TMA copies, the q/k normalisation, the gates.

Shared by the chunk-parallel kernels (prepare, output and their backward), which each run one
(chunk, value head, stream) per block.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import mosaic as mg
from .gates import REFERENCE_OFFSET, REFERENCE_STRIDE, ChunkGates
from .spec import Spec

L2_EPS = 1e-6  # as deltajax.core.inputs.l2norm


def gate_inputs(spec: Spec) -> int:
  """How many GMEM inputs carry the gates: G, plus its reference-row view per channel."""
  return {None: 0, "head": 3, "channel": 2}[spec.gate]


def mask_inputs(spec: Spec) -> int:
  return 3 if spec.packed else 0


def side_count(spec: Spec) -> int:
  """How many TMA copies `side_copies` starts."""
  return gate_inputs(spec) + mask_inputs(spec)


def side_scratch(spec: Spec) -> dict:
  """SMEM for one chunk's gates and document masks."""
  C, K = spec.C, spec.K
  s = {}
  if spec.gate == "head":
    s["g"], s["g_lo"], s["g_rev"] = mg.vector(C), mg.vector(C), mg.vector(C)
  elif spec.gate == "channel":
    s["g"] = mg.tile((C, K))
    s["g_refs"] = plgpu.SMEM((C // REFERENCE_STRIDE, K), jnp.float32)
  if spec.packed:
    s.update(seg=mg.vector(C), first=mg.vector(C), last=mg.vector(C))
  return s


def gate_scratch(spec: Spec) -> dict:
  """Operand buffers the per-channel levels (and the masked score products) work in."""
  P, C, K = spec.parts, spec.C, spec.K
  return dict(ga=mg.operand(P, C, K), gb=mg.operand(P, C, K), gm=mg.operand(P, C, C))


def side_copies(spec: Spec, refs, s: dict, b, h, t0) -> list:
  """TMA copies of one chunk's gates and masks. refs: the gate inputs then the mask inputs."""
  C = spec.C
  out = []
  refs = list(refs)
  if spec.gate == "head":
    out.append((refs.pop(0).at[b, h, pl.ds(t0, C)], s["g"]))
    out.append((refs.pop(0).at[b, h, pl.ds(t0, C)], s["g_lo"]))
    out.append((refs.pop(0).at[b, h, pl.ds(t0, C)], s["g_rev"]))
  elif spec.gate == "channel":
    g, g4 = refs.pop(0), refs.pop(0)
    out.append((g.at[b, pl.ds(t0, C), h], s["g"]))
    out.append((g4.at[b, pl.ds(t0 // REFERENCE_STRIDE, C // REFERENCE_STRIDE),
                      REFERENCE_OFFSET, h], s["g_refs"]))
  if spec.packed:
    for name in ("seg", "first", "last"):
      out.append((refs.pop(0).at[b, pl.ds(t0, C)], s[name]))
  return out


def load_keys(spec: Spec, chip: mg.Chip, k_ref, beta_ref, side, s: dict, b, h, t0):
  """Copies a chunk's k (its q/k head by index), beta and side inputs into SMEM, puts k
  (L2-normalised if asked) into the operand tile s["k_op"], and returns beta as rows.

  k's input tile lives in a scope of its own, so the SMEM it took is free for what follows.
  """
  rows = pl.ds(t0, spec.C)

  def load(k_in, bar):
    copies = [(k_ref.at[b, rows, h // spec.G], k_in), (beta_ref.at[b, h, rows], s["beta"])]
    mg.copy_in(copies + side_copies(spec, side, s, b, h, t0), bar)
    mg.wait(bar)
    chip.put(normalize(chip, chip.load(k_in), spec.l2norm)[0], mg.Operand(s["k_op"]))

  mg.scoped(load, k_in=mg.tile((spec.C, spec.K), spec.in_dtype),
            bar=mg.barriers(2 + side_count(spec))[0])
  return chip.rows(s["beta"])


def chunk_gates(spec: Spec, chip: mg.Chip, s: dict, scratch=None) -> ChunkGates:
  """The loaded gates and segments as a `ChunkGates` (after the copies landed)."""
  cg = ChunkGates(chip=chip, kind=spec.gate, C=spec.C, scratch=scratch)
  if spec.gate == "head":
    cg.g_rows, cg.g_cols = chip.rows(s["g"]), chip.cols(s["g"])
    cg.lo_rows, cg.lo_cols = chip.rows(s["g_lo"]), chip.cols(s["g_lo"])
  elif spec.gate == "channel":
    cg.g, cg.g_refs = chip.load(s["g"]), s["g_refs"]
  if spec.packed:
    cg.seg_rows, cg.seg_cols = chip.rows(s["seg"]), chip.cols(s["seg"])
  return cg


def normalize(chip: mg.Chip, x, l2norm: bool):
  """x [C, K] float32 -> (x / |x| or x, 1 / |x| per row or None)."""
  if not l2norm:
    return x, None
  inv = lax.rsqrt(jnp.sum(x * x, axis=1) + L2_EPS)
  return x * chip.to_rows(inv, x.shape), inv


def normalize_vjp(chip: mg.Chip, xn, inv, dxn):
  """Back through x -> x / |x| (inv = 1 / |x|, xn the result): (dxn - xn (xn . dxn)) inv."""
  if inv is None:
    return dxn
  dot = jnp.sum(xn * dxn, axis=1)
  return (dxn - xn * chip.to_rows(dot, xn.shape)) * chip.to_rows(inv, xn.shape)


def decay_rows(spec: Spec, chip: mg.Chip, cg: ChunkGates, shape):
  """exp(G) per row (and channel): the decay from the chunk start through each step."""
  if spec.gate == "head":
    return chip.to_rows(jnp.exp(cg.g_rows + cg.lo_rows), shape)
  if spec.gate == "channel":
    return jnp.exp(cg.g)
  return None


def row_mask(chip: mg.Chip, s: dict, name: str, shape):
  """first / last as a [C, N] multiplier (None without documents)."""
  if name not in s:
    return None
  return chip.to_rows(chip.rows(s[name]), shape)


def mul(x, *factors):
  for f in factors:
    if f is not None:
      x = x * f
  return x
