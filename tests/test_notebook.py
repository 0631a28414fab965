"""Runs notebooks/quickstart.ipynb headless with a tiny step count."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.data
def test_quickstart_notebook_runs(tmp_path):
  path = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
  nb = nbformat.read(path, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1, "the notebook has one cell tagged 'parameters'"
  params[0].source = (f"NUM_STEPS = 2\nWORKDIR = {str(tmp_path / 'run')!r}\n"
                      "LABEL = 3")
  client = NotebookClient(nb, timeout=1200, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(
                              ROOT, "notebooks")}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells
                    if c.cell_type == "code" for o in c.get("outputs", []))
  assert "trained to step 2" in outputs
  assert "(8, 28, 28, 1)" in outputs
  images = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) >= 2  # the grid and the chosen label's figure
  assert os.path.isfile(tmp_path / "run" / "samples.png")
