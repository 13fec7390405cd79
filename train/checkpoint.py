"""Checkpoints: orbax CheckpointManager holding the train state and the data iterator state.

orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves only a temporary directory: `latest_step` never sees it, and it is
removed when the next manager opens the directory.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from deltajax.train.data import DataState


class Checkpointer:
  """Saves and restores (train state, data state) under `directory`, keeping the last `keep`."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, data_state: DataState) -> None:
    """Starts an asynchronous save of step `step` (it completes in the background)."""
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state.to_json())))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, DataState]:
    """Restores step `step` into the shapes, dtypes and shardings of `abstract_state` (a tree
    of jax.ShapeDtypeStruct with .sharding)."""
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], DataState.from_json(out["data"])

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
