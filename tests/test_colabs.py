"""The notebooks in colabs/: stored without outputs, in sync with colabs/make_notebooks.py, and
every code cell runs, in order, in a fresh namespace at the small size (DELTAJAX_COLAB_SMALL=1),
with matplotlib's non-interactive Agg backend."""
from __future__ import annotations

import importlib.util
import json
import os
import traceback

import pytest

from conftest import fast_compile_mode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
EXPECTED = ["01_quickstart.ipynb", "02_kernels_and_benchmarks.ipynb",
            "03_activation_sparsity.ipynb", "04_state_tracking.ipynb"]
NAMES = sorted(f for f in os.listdir(COLABS) if f.endswith(".ipynb"))


def _load(name: str) -> dict:
  with open(os.path.join(COLABS, name), encoding="utf-8") as f:
    return json.load(f)


def _generator():
  spec = importlib.util.spec_from_file_location("make_notebooks",
                                                os.path.join(COLABS, "make_notebooks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_four_notebooks_are_there():
  assert NAMES == EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs_one_line_per_entry(name):
  nb = _load(name)
  assert nb["nbformat"] == 4, f"{name}: nbformat {nb['nbformat']}"
  kinds = [cell["cell_type"] for cell in nb["cells"]]
  assert kinds[0] == "markdown" and "code" in kinds, f"{name}: cells {kinds}"
  for i, cell in enumerate(nb["cells"]):
    where = f"{name} cell {i}"
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [], f"{where} has stored outputs"
      assert cell["execution_count"] is None, f"{where} has an execution count"
    lines = cell["source"]
    assert isinstance(lines, list) and lines, f"{where}: source must be a non-empty list"
    assert all(line.endswith("\n") for line in lines[:-1]), f"{where}: one line per entry"
    assert not any("\n" in line[:-1] for line in lines), f"{where}: one line per entry"
    if cell["cell_type"] == "code":
      magic = [line for line in lines if line.lstrip().startswith(("!", "%"))]
      assert not magic, f"{where}: shell magics {magic} (the notebooks must run as plain Python)"


def test_notebooks_match_their_generator():
  """colabs/make_notebooks.py is the single source of truth: rerun it after editing cells."""
  gen = _generator()
  assert sorted(gen.NOTEBOOKS) == EXPECTED
  for name, cells in gen.NOTEBOOKS.items():
    with open(os.path.join(COLABS, name), encoding="utf-8") as f:
      stored = f.read()
    assert stored == gen.render(cells), (
        f"colabs/{name} differs from colabs/make_notebooks.py: run "
        f"`python colabs/make_notebooks.py`")


@pytest.fixture
def small_run(monkeypatch):
  """The CI size, a headless matplotlib, and XLA's fast-compile mode (compile time dominates
  these tiny runs); everything restored afterwards."""
  monkeypatch.setenv("DELTAJAX_COLAB_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  with fast_compile_mode():
    yield
  plt.close("all")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, small_run):
  namespace = {"__name__": "__main__"}
  for i, cell in enumerate(_load(name)["cells"]):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    try:
      exec(compile(source, f"<{name} cell {i}>", "exec"), namespace)  # pylint: disable=exec-used
    except Exception:  # pylint: disable=broad-except
      pytest.fail(f"{name}: code cell {i} raised.\n--- cell source ---\n{source}\n"
                  f"--- error ---\n{traceback.format_exc()}", pytrace=False)
