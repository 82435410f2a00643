"""Third-party trainers: a package that registers one under the ``automl.trainers`` entry point group is
found by name. The test builds a real wheel, pip-installs it into this environment, runs a sweep with it
through Ray and MLflow, and uninstalls it."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from automl import Sweep
from automl.tracking import PARENT_TAG
from automl.trainer import registered_trainers

pytestmark = pytest.mark.usefixtures("ray_session")

DIST = "automl_tiny_plugin"
PLUGIN = '''
"""A tiny third-party trainer: nearest class centroid with a shrinkage parameter, one report."""
import numpy as np


class CentroidTrainer:
    def fit(self, params, data, report):
        shrink = float(params["shrink"])
        centroids = np.stack([data.X_train[data.y_train == k].mean(axis=0) for k in range(data.n_classes)])
        centroids = centroids * (1.0 - shrink)
        pred = ((data.X_val[:, None, :] - centroids[None]) ** 2).sum(axis=2).argmin(axis=1)
        report(1, {**data.evaluate(pred), "train_loss": 0.0, "val_loss": float((pred != data.y_val).mean())})
        return None
'''


def _record_line(name: str, blob: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(blob)}"


def build_wheel(folder: Path) -> Path:
    """A minimal, valid wheel written by hand: no build backend needed, so installing takes a second."""
    info = f"{DIST}-0.1.dist-info"
    files = {
        f"{DIST}.py": PLUGIN.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: automl-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": f"[automl.trainers]\ncentroid = {DIST}:CentroidTrainer\n".encode(),
    }
    record = [_record_line(n, b) for n, b in files.items()] + [f"{info}/RECORD,,"]
    wheel = folder / f"{DIST}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, blob in files.items():
            zf.writestr(name, blob)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    _pip("install", "--no-deps", "--no-index", str(wheel))
    try:
        yield
    finally:
        _pip("uninstall", "-y", DIST)


@pytest.mark.usefixtures("installed_plugin")
def test_an_installed_plugin_trainer_runs_a_sweep_by_its_registered_name(workdir: Path) -> None:
    assert registered_trainers()["centroid"] == f"{DIST}:CentroidTrainer"
    spec = {
        "name": "plugin", "trainer": "centroid", "data": {"source": "sklearn:iris"},
        "metric": "val_accuracy", "method": "grid", "budget": {"max_concurrent": 2},
        "parameters": {"shrink": {"type": "categorical", "choices": [0.0, 0.5]}},
    }
    result = Sweep.from_dict(spec, workdir=workdir).run()
    assert [t.state for t in result.trials] == ["COMPLETE", "COMPLETE"]
    assert result.best is not None
    assert result.best.value is not None
    assert result.best.value > 0.6
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_run(result.parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")
    assert sorted(r.data.params["shrink"] for r in runs) == ["0.0", "0.5"]
    assert all("val_balanced_accuracy" in r.data.metrics for r in runs)


def test_an_unknown_trainer_name_lists_the_installed_ones(workdir: Path) -> None:
    from automl.errors import TrainerError

    with pytest.raises(TrainerError, match=r"unknown trainer 'nope'; use one of .*mlp"):
        Sweep.from_dict({**_spec_stub(), "trainer": "nope"}, workdir=workdir)


def _spec_stub() -> dict[str, object]:
    return {"name": "x", "metric": "val_accuracy", "data": {"source": "sklearn:iris"},
            "parameters": {"lr": {"type": "float", "low": 0.001, "high": 0.1}}}
