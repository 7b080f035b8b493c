"""The notebooks in ``notebooks/`` run top to bottom and are committed without outputs.

Each notebook's code cells are executed in order in one fresh namespace (what a Jupyter
kernel does for plain Python cells), in a temporary working directory, with matplotlib's
non-interactive Agg back-end. A notebook that raises fails its test, so the guides cannot
rot. Cells must not use IPython magics.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _load(path: Path) -> dict:
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4, f"{path.name}: nbformat {nb['nbformat']}"
    return nb


def test_there_are_six_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_are_stripped(path):
    for i, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has a count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("QUESTS_TORCH_CACHE", str(tmp_path / "cache"))
    namespace: dict = {"__name__": "__main__"}
    t0 = time.perf_counter()
    for i, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        assert not source.lstrip().startswith(("%", "!")), f"{path.name} cell {i}: magic"
        try:
            exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
        finally:
            plt.close("all")
    elapsed = time.perf_counter() - t0
    print(f"{path.name}: {elapsed:.1f} s")
    assert os.getcwd() == str(tmp_path)
