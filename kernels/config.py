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


# Per-TensorCore VMEM of each TPU generation (from jax's own table, `pltpu.get_tpu_info_for_chip`
# in jax 0.10). Used when lowering for a TPU that is not attached (cross-lowering on a CPU).
TPU_VMEM_BYTES = {"v4": 16 << 20, "v5e": 128 << 20, "v5p": 64 << 20, "v6e": 128 << 20,
                  "v7x": 64 << 20}
# Without a TPU attached and no generation named: a scoped-VMEM limit every generation from v5
# grants (v4's 16 MiB VMEM needs TpuOptions(generation="v4")).
DEFAULT_TPU_VMEM_LIMIT = 32 << 20
_TPU_PRECISIONS = ("auto", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class TpuOptions:
  """Tuning of the Mosaic TPU kernels (deltajax.kernels.tpu).

  Attributes:
    chunks_per_step: chunks one grid step runs (None: `rows_per_step` steps' worth, fewer if
      the VMEM budget needs it).
    heads_per_step: value heads one grid step runs; must divide HV // H (None: as many as fill
      256 lanes of V).
    rows_per_step: the default rows (Householder steps) per grid step; a grid step costs
      ~0.35 us of overhead, so a step should hold several chunks.
    vmem_limit_bytes: the scoped-VMEM limit passed to Mosaic (None: half the VMEM of the TPU
      attached, from `pltpu.get_tpu_info()`; else of `generation`; else 32 MiB).
    generation: "v4", "v5e", "v5p", "v6e" or "v7x", for the default limit when lowering for a
      TPU that is not attached.
    precision: "auto" (bfloat16 MXU operands for 16-bit inputs, float32 at HIGHEST for
      float32 inputs), "bfloat16" or "float32".
  """
  chunks_per_step: int | None = None
  heads_per_step: int | None = None
  rows_per_step: int = 256
  vmem_limit_bytes: int | None = None
  generation: str | None = None
  precision: str = "auto"

  def __post_init__(self):
    for name in ("chunks_per_step", "heads_per_step", "vmem_limit_bytes"):
      val = getattr(self, name)
      if val is not None and (not isinstance(val, int) or val < 1):
        raise ValueError(f"TpuOptions.{name} must be a positive int or None; got {val!r}.")
    if not isinstance(self.rows_per_step, int) or self.rows_per_step < 1:
      raise ValueError(f"TpuOptions.rows_per_step must be a positive int; "
                       f"got {self.rows_per_step!r}.")
    if self.generation is not None and self.generation not in TPU_VMEM_BYTES:
      raise ValueError(f"TpuOptions.generation must be one of {tuple(TPU_VMEM_BYTES)} or None; "
                       f"got {self.generation!r}.")
    if self.precision not in _TPU_PRECISIONS:
      raise ValueError(f"TpuOptions.precision must be one of {_TPU_PRECISIONS}; "
                       f"got {self.precision!r}.")

  def vmem_limit(self) -> int:
    """The scoped-VMEM limit in bytes (see `vmem_limit_bytes`)."""
    if self.vmem_limit_bytes is not None:
      return self.vmem_limit_bytes
    if self.generation is not None:
      return TPU_VMEM_BYTES[self.generation] // 2
    try:
      if jax.default_backend() == "tpu":
        from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
        return pltpu.get_tpu_info().vmem_capacity_bytes // 2
    except (ValueError, RuntimeError, AttributeError):
      pass
    return DEFAULT_TPU_VMEM_LIMIT

  def vmem_budget_bytes(self) -> int:
    """What the tiles may take: 3/4 of the limit (the rest for Mosaic's own temporaries)."""
    return self.vmem_limit() * 3 // 4
