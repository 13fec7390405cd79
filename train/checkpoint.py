"""Checkpoints: orbax CheckpointManager holding the train state and the grain iterator state.

Each step directory holds `state/` (the sharded TrainState) and `data/` (grain's handler writes
one `process_<i>-of-<n>.json` per process with that process's iterator position), saved
together so a restored run continues the same data stream from the same step.

orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves only a temporary directory: `latest_step` never sees it, and it is
removed when the next manager opens the directory.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (train state, data iterator) under `directory`, keeping the last
  `keep`."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator) -> None:
    """Saves step `step`. The iterator's position is written before this returns (grain's
    handler is synchronous); the arrays finish writing in the background."""
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator) -> Any:
    """Restores step `step`: returns the train state in the shapes, dtypes and shardings of
    `abstract_state` (jax.ShapeDtypeStructs with .sharding), and moves `data_iterator` to
    where this process's data stood at that step."""
    data_dir = os.path.join(self.directory, str(step), "data")
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.exists(os.path.join(data_dir, mine)):
      found = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
      raise ValueError(
          f"checkpoint {step} in {self.directory} has no data iterator state {mine} (found "
          f"{found or 'none'}): it was written by a run with another number of processes or "
          "by an older deltajax. Resume with the process count it was saved with, or use a "
          "new run.workdir.")
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return out["state"]

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
