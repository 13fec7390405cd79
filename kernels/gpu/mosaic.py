"""What the Mosaic GPU kernels use of Pallas, in one place, for the compiler and its interpreter.

Every kernel in this folder is a `plgpu.kernel` (Pallas' Mosaic GPU entry point; `pallas_call`
on Mosaic GPU is deprecated) run by one warpgroup (128 threads) per block. Matmuls are
`plgpu.wgmma`: bf16 operands in swizzled SMEM tiles, a float32 accumulator in registers.

The same kernel code runs compiled (lowered for "cuda" to the `mosaic_gpu_v2` custom call) and
in the Mosaic GPU interpreter on CPU (`interpret=True`). The interpreter (jax 0.10.2) lacks a
few things the compiler needs, so `Chip` writes them one way or the other:

  * register layouts: compiled, a vector read from SMEM must say whether it runs along the rows
    or the columns of the WGMMA layout (`plgpu.load(..., layout=WGMMA.reduce(1 or 0))`) and an
    iota must carry the WGMMA layout; the interpreter knows no layouts (and no `plgpu.load`);
  * transposed wgmma operands: compiled, `plgpu.transpose_ref`; the interpreter's wgmma takes no
    transposed refs, so there the operand is first copied transposed into a scratch tile.

Everything else (TMA copies, barriers, wgmma, SMEM tiling and swizzling) is the same code.

Precision. A float32 value enters a matmul as `parts` bf16 pieces (x = x0 + x1 + ...), and a
product of two split operands sums the piece products whose indices add to less than the
largest part count (1 piece: plain bf16; 2: 3 products, ~16 bits; 3: 6 products, ~24 bits,
float32-like). wgmma multiplies bf16 exactly into float32, so this is what the hardware
computes, in the interpreter too (which multiplies the bf16 tiles in float32).

Names by jax version: the interpreter's parameters are
`jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams` in jax 0.10 (passed as
`interpret=`); newer releases export them from `jax.experimental.pallas.mosaic_gpu` as
`InterpretParams` (`interpret_params` tries both).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

F32 = jnp.float32
BF16 = jnp.bfloat16
SWIZZLE = 128  # bytes; the widest swizzle, which wgmma needs for 64 bf16 columns per tile row
BLOCK = 64     # rows of one wgmma tile (Hopper's M) and the padding unit of K and V


def interpret_params():
  """The Mosaic GPU interpreter's parameters (None if this jax has no such interpreter)."""
  for get in (lambda: plgpu.InterpretParams,
              lambda: __import__("jax._src.pallas.mosaic_gpu.interpret.params",
                                 fromlist=["InterpretGPUParams"]).InterpretGPUParams):
    try:
      return get()()
    except (AttributeError, ImportError):
      continue
  return None


def reset_interpreter() -> None:
  """Clears the interpreter's state after a kernel raised (the interpreter asks for it)."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ip  # pylint: disable=g-import-not-at-top
    ip.reset_gpu_interpret_mode_state()
  except (ImportError, AttributeError):
    pass


def _transforms(dtype) -> tuple:
  """Tiling and swizzle of a 2-D SMEM tile of `dtype` whose minor dim is a multiple of
  SWIZZLE // itemsize (64 bf16 or 32 float32 values): the layout wgmma and the WGMMA register
  layout load from without bank conflicts."""
  cols = SWIZZLE // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(SWIZZLE))


def tile(shape: Sequence[int], dtype=F32):
  """SMEM for [..., R, N] tiles of `dtype` (R a multiple of 8, N of 128 // itemsize)."""
  return plgpu.SMEM(tuple(shape), dtype, transforms=_transforms(dtype))


def operand(parts: int, rows: int, cols: int):
  """SMEM for one wgmma operand of `parts` bf16 pieces: [parts, rows, cols]."""
  return tile((parts, rows, cols), BF16)


def vector(n: int, dtype=F32):
  """Untiled SMEM for one vector (or for rows read one at a time)."""
  return plgpu.SMEM((n,), dtype)


# Hopper's shared memory per block (227 KiB; the Mosaic GPU lowering checks it), less a margin
# for barriers and the lowering's own scratch.
SMEM_BYTES = 227 * 1024 - 2048


def smem_bytes(specs) -> int:
  """Bytes of SMEM a list (or dict) of allocations takes (barriers counted as 0)."""
  specs = specs.values() if isinstance(specs, dict) else specs
  total = 0
  for s in specs:
    shape = getattr(s, "shape", None)
    if shape is not None and hasattr(s, "dtype"):
      total += int(jnp.dtype(s.dtype).itemsize) * math.prod(shape)
  return total


def scoped(fn, **specs):
  """fn(**refs) with SMEM `specs` allocated for its duration only (scopes that follow each
  other reuse the same memory)."""
  return pl.run_scoped(lambda **refs: fn(**refs), **specs)


def barriers(*arrivals: int):
  """One barrier per entry; each TMA copy that signals a barrier is one arrival."""
  return tuple(plgpu.Barrier(num_arrivals=a, num_barriers=1) for a in arrivals)


@dataclasses.dataclass(frozen=True)
class Operand:
  """A wgmma operand: an SMEM ref [parts, R, N] of bf16 pieces, most significant first, read
  as [R, N] or (transposed) [N, R]."""
  ref: Any
  transposed: bool = False

  @property
  def T(self) -> "Operand":
    return dataclasses.replace(self, transposed=not self.transposed)

  @property
  def parts(self) -> int:
    return self.ref.shape[0]

  @property
  def shape(self) -> tuple[int, int]:
    r, n = self.ref.shape[1:]
    return (n, r) if self.transposed else (r, n)


def _piece_pairs(pa: int, pb: int) -> list[tuple[int, int]]:
  """Index pairs of the piece products kept, smallest terms first (they are added first)."""
  keep = max(pa, pb)
  pairs = [(i, j) for i in range(pa) for j in range(pb) if i + j < keep]
  return sorted(pairs, key=lambda ij: -sum(ij))


@dataclasses.dataclass(frozen=True)
class Chip:
  """The in-kernel helpers of one kernel trace: compiled (`interpret=False`) or interpreted."""
  interpret: bool

  # -- registers ---------------------------------------------------------------------------
  def _layout(self, x, layout):
    return x if self.interpret else plgpu.layout_cast(x, layout)

  def rows(self, ref) -> jax.Array:
    """A vector [M] from SMEM that runs along the rows of an [M, N] value (index = row)."""
    if self.interpret:
      return ref[...].astype(F32)
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1)).astype(F32)

  def cols(self, ref) -> jax.Array:
    """A vector [N] from SMEM that runs along the columns of an [M, N] value."""
    if self.interpret:
      return ref[...].astype(F32)
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0)).astype(F32)

  def iota(self, shape, dim: int) -> jax.Array:
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

  def zeros(self, shape) -> jax.Array:
    return self._layout(jnp.zeros(shape, F32), plgpu.Layout.WGMMA)

  def zeros_rows(self, n: int) -> jax.Array:
    """A zero vector [n] that runs along rows (like a row sum of a WGMMA value)."""
    return self._layout(jnp.zeros((n,), F32), plgpu.Layout.WGMMA.reduce(1))

  def to_rows(self, x, shape) -> jax.Array:
    """[M] along rows -> [M, N]."""
    return lax.broadcast_in_dim(x, shape, (0,))

  def to_cols(self, x, shape) -> jax.Array:
    """[N] along columns -> [M, N]."""
    return lax.broadcast_in_dim(x, shape, (1,))

  def col_to_rows(self, x, scratch) -> jax.Array:
    """A column-indexed vector re-read as a row-indexed one, through a vector of SMEM (the
    WGMMA layout keeps rows and columns of a vector in different threads)."""
    scratch[...] = x
    plgpu.commit_smem()
    return self.rows(scratch)

  # -- SMEM --------------------------------------------------------------------------------
  def load(self, ref) -> jax.Array:
    """A tiled SMEM tile as float32 registers (WGMMA layout)."""
    return ref[...].astype(F32)

  def load_pieces(self, op: "Operand") -> jax.Array:
    """The float32 value an operand's pieces sum to (its own layout, not transposed)."""
    total = None
    for i in range(op.parts):
      x = op.ref[i].astype(F32)
      total = x if total is None else total + x
    return total

  def store(self, x, ref) -> None:
    """float32 registers into a tiled SMEM tile of the tile's dtype."""
    ref[...] = x.astype(ref.dtype)

  def put(self, x, op: Operand | Any) -> Operand:
    """Splits float32 x [R, N] into the operand's bf16 pieces and stores them."""
    op = op if isinstance(op, Operand) else Operand(op)
    rest = x
    for i in range(op.parts):
      piece = rest.astype(BF16)
      op.ref[i] = piece
      if i + 1 < op.parts:
        rest = rest - piece.astype(F32)
    plgpu.commit_smem()  # the stores must be visible to wgmma / TMA
    return op

  # -- matmul ------------------------------------------------------------------------------
  def mm(self, a: Operand, b: Operand) -> jax.Array:
    """a @ b in float32 from the operands' bf16 pieces: [M, Kc] @ [Kc, N] -> [M, N]."""
    (m, kc), (kc2, n) = a.shape, b.shape
    assert kc == kc2, (a.shape, b.shape)
    if self.interpret and (a.transposed or b.transposed):
      return self._mm_materialized(a, b)
    pairs = _piece_pairs(a.parts, b.parts)

    def view(op: Operand, i: int):
      piece = op.ref.at[i]
      return plgpu.transpose_ref(piece, (1, 0)) if op.transposed else piece

    def body(acc):
      for i, j in pairs:
        plgpu.wgmma(acc, view(a, i), view(b, j))
      return acc[...]
    return pl.run_scoped(body, plgpu.ACC((m, n), F32))

  def _mm_materialized(self, a: Operand, b: Operand) -> jax.Array:
    """Interpreter only: copies transposed operands into scratch tiles first."""
    ops = [x for x in (a, b) if x.transposed]

    def body(*scratch):
      fresh = []
      for x, s in zip(ops, scratch):
        for i in range(x.parts):
          s[i] = x.ref[i].T
        fresh.append(Operand(s))
      it = iter(fresh)
      aa = next(it) if a.transposed else a
      bb = next(it) if b.transposed else b
      return self.mm(aa, bb)
    return pl.run_scoped(body, *[operand(x.parts, *x.shape) for x in ops])


def copy_in(pairs, barrier) -> None:
  """Starts TMA copies GMEM -> SMEM that all signal `barrier` (created with one arrival per
  copy); `wait` blocks on it."""
  for src, dst in pairs:
    plgpu.copy_gmem_to_smem(src, dst, barrier)


def wait(barrier) -> None:
  plgpu.barrier_wait(barrier)


def copy_out(pairs) -> None:
  """TMA copies SMEM -> GMEM after the SMEM writes before them (one commit group)."""
  plgpu.commit_smem()
  for src, dst in pairs:
    plgpu.copy_smem_to_gmem(src, dst)


def finish_copies_out() -> None:
  plgpu.wait_smem_to_gmem(0)


def kernel(body, *, out_type, scratch: dict, grid, grid_names, interpret: bool, name: str,
           cost: pl.CostEstimate | None = None):
  """A Mosaic GPU kernel, one warpgroup per block, over `grid` (names `grid_names`).

  body(*in_refs, *out_refs, **scratch_refs). Built like `plgpu.kernel` (the scratch is
  allocated by a `run_scoped` inside the body, since swizzled SMEM refs are transformed refs)
  but through `pl.kernel`, which also takes the cost estimate that XLA schedules with.
  `interpret` runs it in the Mosaic GPU interpreter.
  """
  params = False
  if interpret:
    params = interpret_params()
    if params is None:
      raise ValueError("This jax has no Mosaic GPU interpreter; KernelConfig(backend='gpu', "
                       "interpret=True) needs jax >= 0.10.")

  def entry(*refs):
    pl.run_scoped(functools.partial(body, *refs), **scratch)

  try:
    mesh = plgpu.Mesh(grid=tuple(grid), grid_names=tuple(grid_names))
    return pl.kernel(entry, out_type=out_type, mesh=mesh, interpret=params,
                     cost_estimate=cost, name=name)
  except TypeError:  # a jax whose pl.kernel / plgpu.Mesh take other arguments (not 0.10.2)
    return plgpu.kernel(entry, out_type=out_type, grid=tuple(grid),
                        grid_names=tuple(grid_names), interpret=params)
