"""notebooks/quickstart.ipynb runs from top to bottom in a fresh kernel (nbclient), so it cannot rot."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT = 240  # seconds per cell; the sweep cell is the slow one (a few seconds here)


@pytest.fixture(autouse=True)
def _keep_mlflow_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests set MLflow's process-wide tracking URI (as a user's script does); later tests must not
    inherit it."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)


def cell(nb: Any, tag: str) -> Any:
    (found,) = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    return found


def text_of(code_cell: Any) -> str:
    """What a cell printed and displayed as text."""
    parts = []
    for out in code_cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def test_the_notebook_is_committed_clean() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [], f"cell {c.id} has stored outputs; clear them before committing"
            assert c.execution_count is None


@pytest.mark.usefixtures("ray_session")
def test_quickstart_runs_and_predicts_with_the_champion(tmp_path: Path) -> None:
    import ray

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel joins this session's Ray through RAY_ADDRESS (as any automl sweep honours it) instead of
    # starting a second one; run by hand, the notebook starts a local Ray of its own.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    import automl.engine

    automl.engine.release_idle_workers()  # this session's warm workers hold its CPUs: the kernel's engine needs them
    # kernel_name python3: jupyter_client runs the kernel spec's "python" as this very interpreter, the venv's.
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell's traceback, if any cell fails

    # The store landed in the notebook's working directory, not in the repository.
    assert (tmp_path / "mlflow.db").is_file()
    assert not (NOTEBOOK.parent / "mlflow.db").exists()

    assert re.search(r"best: trial \d, val_accuracy 0\.\d{3}", text_of(cell(nb, "sweep")))
    board = text_of(cell(nb, "leaderboard"))
    assert "val_accuracy" in board
    assert board.count("COMPLETE") == 4
    assert any("image/png" in out.get("data", {}) for out in cell(nb, "plot").outputs)
    assert re.search(r"champion: digits-quickstart version 1, val_accuracy = 0\.\d{3}", text_of(cell(nb, "champion")))

    printed = dict(line.split(":", 1) for line in text_of(cell(nb, "predict")).strip().splitlines())
    predicted, actual = ast.literal_eval(printed["predicted"].strip()), ast.literal_eval(printed["actual"].strip())
    assert len(predicted) == len(actual) == 8
    assert sum(p == a for p, a in zip(predicted, actual, strict=True)) >= 5  # a trained model, not chance

    # The champion the notebook used is the registry's, as this process loads it from the notebook's store.
    from sklearn.datasets import load_digits

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/digits-quickstart@champion")
    rows = load_digits(as_frame=True).frame.drop(columns="target").sample(8, random_state=1)
    assert [int(p) for p in model.predict(rows)] == predicted
