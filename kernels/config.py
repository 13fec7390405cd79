"""`KernelConfig`: which Pallas kernels `impl="pallas"` runs, how, and their tuning.

backend "auto" (the default) picks the kernels by the platform being lowered for, with
`jax.lax.platform_dependent`: Mosaic TPU on "tpu", the GPU kernels on "cuda"; on any other
platform (CPU) the TPU kernels run in the TPU interpreter. So
`jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))` yields the TPU kernels on a machine
without accelerators. backend "tpu" or "gpu" runs that backend's kernels: compiled on its own
platform, or with `interpret=True` in that backend's own Pallas interpreter on CPU (the TPU
interpreter; for the GPU kernels the interpreter of their lowering) — how CI tests them.

Written against jax 0.10.2 (this project's floor, pyproject.toml); names that moved are noted
where they are used.
"""
from __future__ import annotations

import dataclasses

import jax

BACKENDS = ("auto", "tpu", "gpu")


def _power_of_two(name: str, x) -> None:
  if not isinstance(x, int) or isinstance(x, bool) or x < 1 or x & (x - 1):
    raise ValueError(f"{name} must be a power of two >= 1; got {x!r}.")


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
    inverse_precision: the inverse's products in the bfloat16 mode: "x3" (three bfloat16
      passes, ~2^-16 relative) or "bfloat16" (one pass, ~55% fewer MXU FLOPs; to be weighed
      on a device against the bfloat16 tolerance).
  """
  chunks_per_step: int | None = None
  heads_per_step: int | None = None
  rows_per_step: int = 256
  vmem_limit_bytes: int | None = None
  generation: str | None = None
  precision: str = "auto"
  inverse_precision: str = "x3"

  def __post_init__(self):
    if self.inverse_precision not in ("x3", "bfloat16"):
      raise ValueError(f"TpuOptions.inverse_precision must be 'x3' or 'bfloat16'; "
                       f"got {self.inverse_precision!r}.")
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


@dataclasses.dataclass(frozen=True)
class GpuOptions:
  """Tuning of the GPU kernels.

  sub_block: row block of the per-channel (KDA) gate scores.
  num_warps, num_stages: launch parameters.
  """
  sub_block: int = 16
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    _power_of_two("GpuOptions.sub_block", self.sub_block)


def tpu_interpreter():
  """The TPU interpreter's params with every check on, or None if this jax lacks it.

  Uninitialised memory reads as NaN, out-of-bounds reads raise, races are detected.
  """
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  params = getattr(pltpu, "InterpretParams", None)
  if params is None:
    return None
  return params(uninitialized_memory="nan", out_of_bounds_reads="raise", detect_races=True)


def gpu_interpreter():
  """The interpreter of the GPU kernels' lowering (Pallas' own interpreter for Triton)."""
  return True


_INTERPRETERS = {"tpu": tpu_interpreter, "gpu": gpu_interpreter}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Which kernels run and how (see the module docstring).

  Attributes:
    backend: "auto", "tpu" or "gpu".
    interpret: run the backend's kernels in its Pallas interpreter (CPU; needs backend "tpu"
      or "gpu").
    tpu, gpu: tuning of each backend's kernels.
  """
  backend: str = "auto"
  interpret: bool = False
  tpu: TpuOptions = TpuOptions()
  gpu: GpuOptions = GpuOptions()

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"KernelConfig.backend must be one of {BACKENDS}; got {self.backend!r}.")
    if not isinstance(self.interpret, bool):
      raise ValueError(f"KernelConfig.interpret must be True or False; got {self.interpret!r}.")
    if self.interpret and self.backend == "auto":
      raise ValueError("KernelConfig.interpret=True needs backend='tpu' or 'gpu' (the kernels "
                       "to interpret); got backend='auto'.")

  def interpreter(self):
    """The `interpret=` argument for this backend's pallas calls (None when compiled)."""
    return _INTERPRETERS[self.backend]() if self.interpret else None

  def check_usable(self, platform: str) -> None:
    """ValueError unless this config can run on `platform` ("cpu", "gpu" or "tpu")."""
    if self.interpret:
      if self.interpreter() is None:
        raise ValueError(f"KernelConfig.interpret=True with backend={self.backend!r} needs that "
                         f"backend's Pallas interpreter, which this jax lacks; use "
                         f"interpret=False on a {self.backend.upper()}, or impl='chunk'.")
      return
    if self.backend != "auto" and self.backend != platform:
      raise ValueError(f"KernelConfig.backend={self.backend!r} compiles kernels for a "
                       f"{self.backend.upper()}, but this machine's platform is {platform!r}; "
                       f"use backend='auto' (kernels for the platform lowered for), "
                       f"interpret=True (the {self.backend.upper()} kernels in their "
                       f"interpreter), or impl='chunk'.")
