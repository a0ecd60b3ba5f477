"""The quickstart notebook runs top to bottom (tiny setting)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "colabs" / "quickstart.ipynb"


def test_quickstart_notebook_executes(monkeypatch):
  monkeypatch.setenv("HETLORA_NOTEBOOK_FAST", "1")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3").execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "accuracy by round" in outputs
  assert "hetlora: a[0]" in outputs.replace("   ", " ").replace("  ", " ")
