"""Device mesh and shardings: data parallel over ("data", "fsdp"), parameters sharded (FSDP).

Parameters annotated with logical axis names (`nn.with_logical_partitioning`) are placed by
LOGICAL_RULES through `nn.logical_to_mesh_sharding`. Unannotated arrays (all optimiser state
and any plain parameters) get the FSDP default: the largest axis divisible by the fsdp size is
split over "fsdp", small arrays are replicated. The batch axis is split over both axes.
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Logical parameter axes -> mesh axes.
LOGICAL_RULES = (("batch", BATCH_AXES), ("embed", "fsdp"), ("vocab", None), ("heads", None),
                 ("mlp", None), ("kv", None), ("conv", None))
# Arrays smaller than this stay replicated: sharding them costs more than it saves.
MIN_SHARD_SIZE = 1024


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when the environment describes a multi-process job
  (explicit coordinator, a multi-host TPU slice, or a SLURM/Open MPI launch)."""
  env = os.environ
  multi = (env.get("JAX_COORDINATOR_ADDRESS") or "," in env.get("TPU_WORKER_HOSTNAMES", "")
           or int(env.get("SLURM_NTASKS", "1")) > 1
           or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if multi and not jax.distributed.is_initialized():
    jax.distributed.initialize()
  return bool(multi)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ("data", "fsdp") mesh over `devices` (default all); -1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("run.mesh_data and run.mesh_fsdp: at most one may be -1")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n or data < 1 or fsdp < 1:
    raise ValueError(f"run.mesh_data x run.mesh_fsdp: got {data} x {fsdp}, need a product "
                     f"equal to the {n} devices")
  return Mesh(np.array(devices).reshape(data, fsdp), MESH_AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """The default placement: split the largest axis divisible by `fsdp`, else replicate."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE:
    return P()
  axes = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in axes:
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def _fits(shape: tuple[int, ...], spec: P, mesh: Mesh) -> bool:
  """Whether every dimension splits evenly over the mesh axes `spec` puts on it."""
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if dim % int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64)):
      return False
  return True


def state_shardings(abstract_state: Any, mesh: Mesh, logical_specs: Any = None) -> Any:
  """NamedShardings for every leaf of `abstract_state` (ShapeDtypeStructs).

  logical_specs: optional tree (same structure) of PartitionSpecs with logical axis names
  (from `nn.get_partition_spec` of the boxed state). A leaf whose logical axes map onto the
  mesh, evenly, is placed that way; every other leaf gets the FSDP default.
  """
  fsdp = mesh.shape["fsdp"]
  default = lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp))
  if logical_specs is None:
    return jax.tree.map(default, abstract_state)
  mapped = nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)

  def pick(x, s):
    if any(a is not None for a in s.spec) and _fits(x.shape, s.spec, mesh):
      return s
    return default(x)
  return jax.tree.map(pick, abstract_state, mapped)


def batch_sharding(mesh: Mesh, micro: bool = False) -> NamedSharding:
  """Rows split over every device; time unsplit. micro: arrays are [micro-batches, rows, T]
  (gradient accumulation) and the micro-batch axis is not split."""
  return NamedSharding(mesh, P(None, BATCH_AXES) if micro else P(BATCH_AXES))


def put_batch(local: dict[str, np.ndarray], sharding: NamedSharding,
              rows_axis: int = 0) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays, sharded. Each process passes only what
  it read (its shard, see data.Source.batches); axis `rows_axis` is process_count times
  longer globally."""
  def put(v):
    shape = list(v.shape)
    shape[rows_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, v, tuple(shape))
  return {k: put(v) for k, v in local.items()}
