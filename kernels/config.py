"""Kernel configuration and the small compatibility layer over Pallas' moving API.

Backends and lowerings (checked against jax 0.10.2; GPU and TPU compilation is not verified in
this repository's CI, which has neither):

* TPU: Mosaic TPU. The sequential chunk axis is the last grid axis, marked "arbitrary", and the
  state lives in a VMEM scratch buffer across it (`sequential="grid"`).
* GPU: the Triton lowering, chosen explicitly by passing Triton compiler params (jax >= 0.10
  picks the lowering from the params' type; with no params jax 0.11 defaults to Mosaic GPU,
  whose `pallas_call` support is deprecated in favour of `plgpu.kernel`). Triton is itself
  deprecated in jax 0.11 but still ships; a Mosaic GPU port is future work. A Triton grid runs
  its programs concurrently, so the chunk loop is a `fori_loop` inside one program per
  (batch, head) and the state stays in registers (`sequential="loop"`).
* CPU: `interpret=True` runs the same kernel code (either `sequential` mode) for tests.

Names by jax version: `pltpu.CompilerParams` (>= 0.6; `pltpu.TPUCompilerParams` before),
`jax.experimental.pallas.triton.CompilerParams` (>= 0.6; `TritonCompilerParams` before),
`pl.squeezed` for a squeezed block dimension (`None` before).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.experimental import pallas as pl

SQUEEZED = getattr(pl, "squeezed", None)
_SEQUENTIAL = ("grid", "loop")
_BACKENDS = ("tpu", "gpu", "cpu")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """How the delta-rule kernels are laid out and lowered.

  Attributes:
    backend: "tpu", "gpu" or "cpu"; picks the compiler params.
    interpret: run the kernels in the Pallas interpreter (always on CPU): True, or a
      `pltpu.InterpretParams(...)` for the TPU interpreter (simulated VMEM/SMEM, uninitialised
      memory as NaN, out-of-bounds and race checks) with `sequential="grid"`.
    sequential: "grid" (chunk axis in the grid, state in a scratch buffer; TPU) or "loop"
      (chunk loop inside one program per (batch, head), state in registers; GPU).
    sub_block: row block of the per-channel (KDA) gate scores; exponents are formed exactly
      inside a sub_block x sub_block tile and through a reference row across tiles.
    num_warps, num_stages: Triton launch parameters (GPU only).
    vmem_limit_bytes: Mosaic scoped-VMEM limit (TPU only; None keeps the default).

  Tiles are whole chunks: a block is [C, K], [C, V] or [C, C] for a chunk of C tokens (the
  op's `chunk_size`), which meets the TPU rule (last two block dims multiples of 8 x 128 or
  the full dims) for any K and V; the GPU lowering needs C, K and V to be powers of two.
  """
  backend: str = "cpu"
  interpret: Any = True
  sequential: str = "grid"
  sub_block: int = 16
  num_warps: int = 4
  num_stages: int = 1
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    if self.backend not in _BACKENDS:
      raise ValueError(f"KernelConfig.backend must be one of {_BACKENDS}; got {self.backend!r}.")
    if self.sequential not in _SEQUENTIAL:
      raise ValueError(f"KernelConfig.sequential must be one of {_SEQUENTIAL}; "
                       f"got {self.sequential!r}.")
    sb = self.sub_block
    if not isinstance(sb, int) or sb < 1 or sb & (sb - 1):
      raise ValueError(f"KernelConfig.sub_block must be a power of two >= 1; got {sb!r}.")

  def compiler_params(self, dimension_semantics: tuple[str, ...]):
    """Backend compiler params for a grid with these semantics (None in interpret mode)."""
    if self.interpret:
      return None
    if self.backend == "tpu":
      from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
      cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
      return cls(dimension_semantics=dimension_semantics,
                 vmem_limit_bytes=self.vmem_limit_bytes)
    if self.backend == "gpu":
      from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
      cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
      return cls(num_warps=self.num_warps, num_stages=self.num_stages)
    return None


def config_for(platform: str, device_kind: str = "") -> KernelConfig:
  """Defaults per device. Untuned on real hardware (none was available); see docs/kernels.md."""
  del device_kind  # Same layout on every TPU/GPU generation until tuned.
  if platform == "tpu":
    return KernelConfig(backend="tpu", interpret=False, sequential="grid")
  if platform in ("gpu", "cuda", "rocm"):
    return KernelConfig(backend="gpu", interpret=False, sequential="loop", num_warps=4,
                        num_stages=1)
  return KernelConfig(backend="cpu", interpret=True, sequential="grid")


@functools.lru_cache(maxsize=None)
def default_config() -> KernelConfig:
  """The config for `jax.devices()[0]`: compiled on TPU/GPU, interpreted elsewhere."""
  dev = jax.devices()[0]
  return config_for(dev.platform, getattr(dev, "device_kind", ""))
