"""ONNX and TorchScript exports: the same answers as the MLflow pyfunc model on raw rows, through the CLI, and
refusals that name the problem (no torch network, a missing column, a network that disagrees with the model).

One real sweep (iris, through Ray and MLflow) covers the path from a sweep's name and the registry's champion; the
regression and scikit-learn models are trained in-process by the same code a trial runs (the mlp trainer, a
LogisticRegression) and saved as the sweep would save them, which keeps this file within its time budget.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from automl import Sweep
from automl.cli import app
from automl.data import PreparedData, prepare
from automl.errors import ExportError
from automl.export import export_model
from automl.spec import DataSpec

FORMATS = ("mlflow", "onnx", "torchscript")


@dataclass
class Exported:
    root: Path
    rows: pd.DataFrame  # raw validation rows, original columns
    dirs: dict[str, Path]  # format -> export directory
    uri: str = ""  # the store's tracking URI (a sweep's model)
    sweep: Any = None  # its SweepResult


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def run_sweep(root: Path, spec: dict[str, Any]) -> tuple[Any, pd.DataFrame]:
    sweep = Sweep.from_dict(spec, workdir=root, base_dir=root)
    result = sweep.run()
    assert result.best is not None
    assert result.best.model_uri
    assert sweep.spec.data is not None
    rows = prepare(sweep.spec.data, base_dir=sweep.base_dir, seed=sweep.spec.seed).raw_val
    return result, rows


def onnx_outputs(folder: Path, rows: pd.DataFrame) -> np.ndarray:
    """The export's own files, read with the libraries alone (skops, onnxruntime): what a user elsewhere does."""
    import onnxruntime as ort

    manifest = json.loads((folder / "manifest.json").read_text())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"features": features(folder, rows, manifest)})[0])


def torchscript_outputs(folder: Path, rows: pd.DataFrame) -> np.ndarray:
    import torch

    manifest = json.loads((folder / "manifest.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+: TorchScript is deprecated, still works
        module = torch.jit.load(str(folder / "model.pt"))
    with torch.no_grad():
        return np.asarray(module(torch.from_numpy(features(folder, rows, manifest))).numpy())


def features(folder: Path, rows: pd.DataFrame, manifest: dict[str, Any]) -> np.ndarray:
    import skops.io

    file = folder / "preprocessor.skops"
    pre = skops.io.load(file, trusted=skops.io.get_untrusted_types(file=file))
    return np.asarray(pre.transform(rows[manifest["columns"]]), dtype=np.float32)


def local_model(root: Path, data: DataSpec, fit: Callable[[PreparedData], Any]) -> tuple[Path, pd.DataFrame]:
    """A model trained in this process and saved as a sweep saves its best model (bundle, then MLflow pyfunc
    model): the pyfunc directory, and the raw validation rows."""
    from automl.bundle import pack_model, write_bundle
    from automl.export import save_pyfunc_model

    prepared = prepare(data, seed=0)
    packed = pack_model(fit(prepared))
    assert packed is not None
    bundle = write_bundle(root / "bundle", packed, prepared, info={"trainer": "test", "params": {}})
    return save_pyfunc_model(root / "pyfunc", bundle, prepared), prepared.raw_val


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def iris(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Iris with text labels and a categorical column (one-hot encoded): a 3-trial MLP sweep, registered, exported
    to every format through the CLI (from the sweep's name, and from the registry's champion)."""
    from sklearn.datasets import load_iris

    root = tmp_path_factory.mktemp("iris")
    bunch = load_iris(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame["site"] = np.random.default_rng(0).choice(["north", "south", "east"], size=len(frame))
    frame["species"] = bunch.target_names[bunch.target]
    frame.to_csv(root / "iris.csv", index=False)
    spec = {
        "name": "iris-export", "trainer": "mlp",
        "data": {"source": "iris.csv", "target": "species"},
        "metric": {"name": "val_accuracy", "goal": "maximize"}, "method": "random",
        "budget": {"trials": 3, "max_concurrent": 2}, "seed": 3,
        "fixed": {"epochs": 6, "lr": 0.02},
        "parameters": {"width": {"type": "int", "low": 8, "high": 32},
                       "activation": {"type": "categorical", "choices": ["relu", "tanh", "gelu"]}},
        "tracking": {"register_as": "iris-export"},
    }
    result, rows = run_sweep(root, spec)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    dirs = {f: root / f"export-{f}" for f in FORMATS}
    for fmt in FORMATS:
        source = "models:/iris-export@champion" if fmt == "onnx" else "iris-export"
        out = cli("export", source, "--format", fmt, "--out", str(dirs[fmt]), "--tracking-uri", uri)
        assert out.exit_code == 0, out.output
    return Exported(root, rows, dirs, uri=uri, sweep=result)


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A regression MLP (predictions in target units) exported through the Python API."""
    from trainers.mlp import MLPTrainer

    def fit(prepared: PreparedData) -> Any:
        return MLPTrainer().fit({"epochs": 8, "width": 16, "lr": 0.01}, prepared.dataset, lambda *_: None)

    root = tmp_path_factory.mktemp("diabetes")
    pyfunc_dir, rows = local_model(root, DataSpec(source="sklearn:diabetes"), fit)
    dirs = {"mlflow": pyfunc_dir}
    for fmt in ("onnx", "torchscript"):
        dirs[fmt] = export_model(str(pyfunc_dir), root / f"export-{fmt}", format=fmt)
    return Exported(root, rows, dirs)


def pyfunc(exported: Exported) -> Any:
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(exported.dirs["mlflow"]))


# --------------------------------------------------------------------------------------------- agreement


def test_classification_exports_agree_with_the_pyfunc_model(iris: Exported) -> None:
    model = pyfunc(iris)
    proba = model.predict(iris.rows, params={"predict_method": "predict_proba"})
    labels = np.asarray(model.predict(iris.rows))
    assert list(proba.columns) == ["setosa", "versicolor", "virginica"]
    assert set(labels) <= {"setosa", "versicolor", "virginica"}

    onnx_proba = onnx_outputs(iris.dirs["onnx"], iris.rows)
    ts_proba = torchscript_outputs(iris.dirs["torchscript"], iris.rows)
    assert onnx_proba.shape == ts_proba.shape == (len(iris.rows), 3)
    np.testing.assert_allclose(onnx_proba, proba.to_numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ts_proba, proba.to_numpy(), rtol=0, atol=1e-5)
    classes = np.asarray(proba.columns)
    assert (classes[onnx_proba.argmax(axis=1)] == labels).all()
    assert (classes[ts_proba.argmax(axis=1)] == labels).all()

    # automl predict: every kind of export, raw rows from a CSV, the same labels as the pyfunc model.
    iris.rows.to_csv(iris.root / "rows.csv", index=False)
    for fmt, folder in iris.dirs.items():
        out = cli("predict", str(folder), str(iris.root / "rows.csv"))
        assert out.exit_code == 0, (fmt, out.output)
        assert out.stdout.splitlines() == ["prediction", *labels.tolist()], fmt


def test_regression_exports_agree_with_the_pyfunc_model(diabetes: Exported) -> None:
    values = np.asarray(pyfunc(diabetes).predict(diabetes.rows), dtype=np.float64)
    assert values.std() > 0  # a trained network, not a constant
    for outputs in (onnx_outputs(diabetes.dirs["onnx"], diabetes.rows),
                    torchscript_outputs(diabetes.dirs["torchscript"], diabetes.rows)):
        assert outputs.shape == (len(diabetes.rows),)  # target units, one value per row
        np.testing.assert_allclose(outputs, values, rtol=1e-5, atol=1e-5)
    diabetes.rows.to_csv(diabetes.root / "rows.csv", index=False)
    for fmt in ("onnx", "torchscript"):
        out = cli("predict", str(diabetes.dirs[fmt]), str(diabetes.root / "rows.csv"))
        assert out.exit_code == 0, out.output
        np.testing.assert_allclose([float(v) for v in out.stdout.splitlines()[1:]], values, rtol=1e-5)


# --------------------------------------------------------------------------------------------- layout


def test_export_directories_hold_the_model_its_preprocessing_and_a_manifest(iris: Exported) -> None:
    import onnx

    parent = iris.sweep.parent_run_id
    for fmt, file in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        folder = iris.dirs[fmt]
        assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", "preprocessor.skops", file])
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["columns"] == [*(c for c in iris.rows.columns)]
        assert manifest["dtypes"] == {str(c): str(t) for c, t in iris.rows.dtypes.items()}
        assert manifest["classes"] == ["setosa", "versicolor", "virginica"]
        assert manifest["metric"]["name"] == "val_accuracy"
        assert manifest["params"] == iris.sweep.best.params
        assert manifest["source"]["run_id"] == parent  # from runs:/ (torchscript) and the registry alias (onnx)
        export = manifest["export"]
        assert (export["format"], export["file"]) == (fmt, file)
        n_features = len(iris.rows.columns) - 1 + 3  # four numbers, and site one-hot encoded
        assert export["input"] == {"name": "features", "dtype": "float32", "shape": [None, n_features]}
        assert export["output"]["shape"] == [None, 3]
        assert export["torch"]
    assert json.loads((iris.dirs["onnx"] / "manifest.json").read_text())["source"]["model_uri"] == (
        "models:/iris-export@champion")
    onnx.checker.check_model(str(iris.dirs["onnx"] / "model.onnx"), full_check=True)
    graph = onnx.load(str(iris.dirs["onnx"] / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic


# --------------------------------------------------------------------------------------------- refusals


def test_a_missing_column_is_one_line_naming_it_for_every_kind(iris: Exported) -> None:
    iris.rows.drop(columns=["site"]).to_csv(iris.root / "no_site.csv", index=False)
    for fmt, folder in iris.dirs.items():
        out = cli("predict", str(folder), str(iris.root / "no_site.csv"))
        assert out.exit_code == 2, (fmt, out.output)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (fmt, out.stderr)
        assert lines[0].startswith("error: input is missing column(s) site; the model takes:"), fmt


def test_export_refuses_a_model_without_a_torch_network(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    def fit(prepared: PreparedData) -> Any:
        return LogisticRegression(max_iter=200).fit(prepared.dataset.X_train, prepared.dataset.y_train)

    pyfunc_dir, _ = local_model(tmp_path, DataSpec(source="sklearn:iris"), fit)
    for fmt in ("onnx", "torchscript"):
        out = cli("export", str(pyfunc_dir), "--format", fmt, "--out", str(tmp_path / fmt))
        assert out.exit_code == 2
        assert out.stderr.strip() == (f"error: --format {fmt} needs a torch network; the best model is "
                                      "LogisticRegression; use --format mlflow")
        assert not (tmp_path / fmt).exists()


def test_export_refuses_a_network_that_disagrees_with_the_model(iris: Exported, tmp_path: Path) -> None:
    """A trainer whose torch_module() is not the function its predict() computes: the check catches it."""
    import torch

    from automl.bundle import ModelBundle
    from automl.portable import write_export

    bundle = ModelBundle(next(iris.dirs["mlflow"].glob("artifacts/*")))
    example = iris.rows.head(5)
    honest = bundle.model.torch_module

    def shifted() -> Any:
        module = copy.deepcopy(honest())  # the head shares the model's own network: shift a copy
        last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.bias[0] += 0.5  # class 0 gets a higher score than predict() gives it
        return module

    bundle.model.torch_module = shifted
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(ExportError, match=rf"--format {fmt}: the export differs from the model by up to"):
            write_export(bundle, example, tmp_path / fmt, format=fmt, source={})
        assert not (tmp_path / fmt).exists()
    # An honest network exports, and refuses an --out that is not empty.
    bundle.model.torch_module = honest
    write_export(bundle, example, tmp_path / "ok", format="onnx", source={})
    out = cli("export", "iris-export", "--format", "onnx", "--out", str(tmp_path / "ok"), "--tracking-uri", iris.uri)
    assert out.exit_code == 2
    assert "exists and is not empty" in out.stderr
