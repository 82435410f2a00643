"""Opening a model runs no code from it (issue 13): the skops files of a bundle hold only the types automl's own
bundles contain (an exact allow-list, checked here against every scikit-learn trainer and preprocessor), and a
manifest's model loader may only name a registered trainer's package or a module the caller trusts, checked before
anything is imported. Crafted model directories are refused by the real CLI (predict in a real subprocess) with
one line and exit status 2, and the code they carry never runs (its marker file is never written)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from automl.bundle import (
    MANIFEST,
    PREPROCESSOR,
    SKOPS_ALLOWED_TYPES,
    ModelBundle,
    _load_skops,
    loader_allowed,
    pack_model,
    write_bundle,
)
from automl.cli import app
from automl.data import PreparedData, make_preprocessor, passthrough_preprocessor, prepare
from automl.errors import ExportError
from automl.spec import DataSpec
from trainers.sklearn_models import (
    HistGradientBoostingTrainer,
    LogisticRegressionTrainer,
    RandomForestTrainer,
    RidgeTrainer,
    SVMTrainer,
)

ASSETS = Path(__file__).resolve().parent / "assets"
_SCRIPT = Path(sys.executable).with_name("automl")
AUTOML = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "automl.cli"]
SIDE_EFFECT_MODULE = "automl_test_import_side_effect"

# Each built-in scikit-learn trainer with small, fast settings, on the tasks it takes.
FITS: dict[str, tuple[type, dict[str, Any], tuple[str, ...]]] = {
    "hist_gradient_boosting": (HistGradientBoostingTrainer, {"max_iter": 4, "report_every": 4},
                               ("iris", "breast_cancer", "diabetes")),
    "random_forest": (RandomForestTrainer, {"n_estimators": 3, "report_every": 3},
                      ("iris", "breast_cancer", "diabetes")),
    "logistic_regression": (LogisticRegressionTrainer, {}, ("iris", "breast_cancer")),
    "logistic_regression_elasticnet": (LogisticRegressionTrainer, {"l1_ratio": 0.5, "max_iter": 200}, ("iris",)),
    "ridge": (RidgeTrainer, {}, ("diabetes",)),
    "svm": (SVMTrainer, {}, ("iris", "breast_cancer", "diabetes")),
}
FIT_CASES = [(name, data) for name, (_, _, datasets) in FITS.items() for data in datasets]


@pytest.fixture(scope="module")
def datasets() -> dict[str, PreparedData]:
    """Multiclass, binary and regression data (small bundled datasets)."""
    return {name: prepare(DataSpec(source=f"sklearn:{name}"), seed=0) for name in ("iris", "breast_cancer", "diabetes")}


def reported_types(obj: Any, file: Path) -> set[str]:
    """What skops reports as untrusted (outside its defaults) for ``obj`` dumped to ``file``."""
    import skops.io

    skops.io.dump(obj, file)
    return set(skops.io.get_untrusted_types(file=file))


# --------------------------------------------------------------------------------------------- the allow-list


@pytest.mark.parametrize(("trainer", "data"), FIT_CASES)
def test_every_sklearn_trainers_model_is_in_the_allow_list_and_loads(
    trainer: str, data: str, datasets: dict[str, PreparedData], tmp_path: Path
) -> None:
    cls, params, _ = FITS[trainer]
    ds = datasets[data].dataset
    model = cls().fit(dict(params), ds, lambda *_: None)
    file = tmp_path / "model.skops"
    assert reported_types(model, file) <= SKOPS_ALLOWED_TYPES
    loaded = _load_skops(file)
    np.testing.assert_allclose(loaded.predict(ds.X_val), model.predict(ds.X_val))


def test_the_toy_class_trainers_model_is_in_the_allow_list(
    datasets: dict[str, PreparedData], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ASSETS))
    from toy_trainers import LogisticFitter
    ds = datasets["iris"].dataset
    model = LogisticFitter().fit({"C": 1.0}, ds, lambda *_: None)
    assert reported_types(model, tmp_path / "model.skops") <= SKOPS_ALLOWED_TYPES


def mixed_rows(n: int = 80) -> pd.DataFrame:
    """Numbers, text categories (one rare), booleans, integers and missing values of each kind."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "x": rng.normal(size=n),
        "colour": rng.choice(["red", "green", "blue", "teal"], size=n, p=[0.5, 0.3, 0.17, 0.03]),
        "flag": rng.choice([True, False], size=n),
        "count": rng.integers(0, 5, size=n),
        "unused": rng.normal(size=n),
    })
    frame.loc[3, "x"] = np.nan
    frame.loc[4, "colour"] = None
    frame.loc[5, "colour"] = "once"  # a category of one row: infrequent where the encoder groups rare values
    return frame


def infrequent_preprocessor(X: pd.DataFrame) -> Any:
    """make_preprocessor's shape with rare categories grouped (max_categories, handle_unknown infrequent_if_exist)
    and a dropped column: a variant the preprocessing may take."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    num = Pipeline([("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                    ("scale", StandardScaler())])
    cat = Pipeline([("impute", SimpleImputer(strategy="most_frequent", keep_empty_features=True)),
                    ("onehot", OneHotEncoder(handle_unknown="infrequent_if_exist", max_categories=3,
                                             min_frequency=3, sparse_output=False))])
    return ColumnTransformer([("num", num, ["x", "count"]), ("cat", cat, ["colour", "flag"]),
                              ("dropped", "drop", ["unused"])],
                             remainder="drop", sparse_threshold=0.0, verbose_feature_names_out=False)


PREPROCESSORS: dict[str, Callable[[pd.DataFrame], Any]] = {
    "make_preprocessor": make_preprocessor,
    "passthrough_preprocessor": lambda X: passthrough_preprocessor(X[["x", "count"]]),
    "infrequent_categories": infrequent_preprocessor,
}


@pytest.mark.parametrize("variant", list(PREPROCESSORS))
def test_every_preprocessor_is_in_the_allow_list_and_loads(variant: str, tmp_path: Path) -> None:
    rows = mixed_rows()
    pre = PREPROCESSORS[variant](rows).fit(rows)
    if variant == "infrequent_categories":
        assert pre.named_transformers_["cat"]["onehot"].infrequent_categories_[0] is not None
    file = tmp_path / PREPROCESSOR
    assert reported_types(pre, file) <= SKOPS_ALLOWED_TYPES
    unseen = rows.head(3).assign(colour=["violet", "red", None])  # an unknown category too
    np.testing.assert_allclose(_load_skops(file).transform(unseen), pre.transform(unseen))


def test_the_data_modules_own_preprocessing_is_in_the_allow_list(datasets: dict[str, PreparedData],
                                                                 tmp_path: Path) -> None:
    for name, prepared in datasets.items():
        assert reported_types(prepared.preprocessor, tmp_path / f"{name}.skops") <= SKOPS_ALLOWED_TYPES, name


# --------------------------------------------------------------------------------------------- the loader rule


def test_a_loader_must_be_in_a_registered_trainers_package_or_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loader_allowed("trainers.mlp")
    assert loader_allowed("trainers._torch")  # trainers.mlp:MLPTrainer is registered: its package is
    assert not loader_allowed("os")
    assert not loader_allowed("my_trainers")
    assert loader_allowed("my_trainers", ["my_trainers"])
    assert loader_allowed("mypkg.models.nets", ["mypkg"])
    assert not loader_allowed("mypkgx", ["mypkg"])
    assert not loader_allowed("mypkg", ["mypkg.models"])
    assert not loader_allowed(".trainers", ["trainers"])
    assert not loader_allowed("trainers..mlp")
    # An installed plugin's entry point registers its package.
    import automl.bundle

    monkeypatch.setattr(automl.bundle, "registered_trainers", lambda: {"t": "myplug.trainer:T"})
    assert loader_allowed("myplug.models")
    assert not loader_allowed("trainers.mlp")


USER_MODULE = '''
import json

import numpy as np

from automl.trainer import SavableModel


class Constant(SavableModel):
    def __init__(self, label):
        self.label = int(label)

    def predict(self, X):
        return np.full(len(X), self.label)

    def save(self, path):
        (path / "constant.json").write_text(json.dumps(self.label))

    @classmethod
    def load(cls, path):
        return cls(json.loads((path / "constant.json").read_text()))
'''


def test_a_users_own_model_loads_only_when_its_module_is_trusted(
    datasets: dict[str, PreparedData], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = "automl_test_user_models"
    (tmp_path / f"{module}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    from automl_test_user_models import Constant

    prepared = datasets["iris"]
    packed = pack_model(Constant(2))
    assert packed is not None
    assert packed.loader == f"{module}:Constant"
    bundle_dir = write_bundle(tmp_path / "bundle", packed, prepared, info={})
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ExportError, match=rf"refused model loader {module}:Constant: .*--trust-module {module} if"):
        ModelBundle(bundle_dir)
    assert module not in sys.modules  # refused before the import
    bundle = ModelBundle(bundle_dir, trusted_modules=[module])
    assert set(bundle.predict(prepared.raw_val)) == {prepared.dataset.classes[2]}
    with pytest.raises(ExportError, match=r"'trusted_modules' parameter must be module names .* Got 'my-code' inst"):
        ModelBundle(bundle_dir, trusted_modules=["my-code"])


# --------------------------------------------------------------------------------------------- crafted models


@dataclass
class Genuine:
    """A real model saved as a sweep saves its best one: the bundle, the MLflow pyfunc directory around it, and
    five raw rows to predict."""

    prepared: PreparedData
    model: Any
    bundle: Path
    pyfunc: Path
    rows: Path


@pytest.fixture(scope="module")
def genuine(datasets: dict[str, PreparedData], tmp_path_factory: pytest.TempPathFactory) -> Genuine:
    from sklearn.linear_model import LogisticRegression

    from automl.export import save_pyfunc_model

    root = tmp_path_factory.mktemp("genuine")
    prepared = datasets["iris"]
    model = LogisticRegression(max_iter=200).fit(prepared.dataset.X_train, prepared.dataset.y_train)
    packed = pack_model(model)
    assert packed is not None
    bundle = write_bundle(root / "bundle", packed, prepared, info={"trainer": "test", "params": {}})
    pyfunc = save_pyfunc_model(root / "pyfunc", bundle, prepared)
    prepared.raw_val.head(5).to_csv(root / "rows.csv", index=False)
    return Genuine(prepared, model, bundle, pyfunc, root / "rows.csv")


def test_a_genuine_model_loads_and_predicts(genuine: Genuine) -> None:
    classes = genuine.prepared.dataset.classes
    expected = [classes[i] for i in genuine.model.predict(genuine.prepared.dataset.X_val)]
    assert list(ModelBundle(genuine.bundle).predict(genuine.prepared.raw_val)) == expected
    out = CliRunner().invoke(app, ["predict", str(genuine.pyfunc), str(genuine.rows)])
    assert out.exit_code == 0, out.output
    assert out.stdout.split() == ["prediction", *(str(label) for label in expected[:5])]


def craft_skops(path: Path, module: str, name: str, args: list[Any]) -> None:
    """A skops file by hand: its one object is ``module.name(*args)`` (skops's constructor-from-reduce node, whose
    arguments are plain JSON values, trusted by default), so ``module.name`` is the only type it reports."""
    import skops.io

    schema = json.loads(zipfile.ZipFile(io.BytesIO(skops.io.dumps(tuple(args)))).read("schema.json"))
    arguments = {k: v for k, v in schema.items() if k not in ("protocol", "_skops_version")}
    root = {"__class__": name, "__module__": module, "__loader__": "ConstructorFromReduceNode",
            "content": arguments, "__id__": 1, "protocol": schema["protocol"],
            "_skops_version": schema["_skops_version"]}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("schema.json", json.dumps(root))


def write_marker(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


class _Payload:
    """Pickles to ``exec(code)``: what a pickle loaded with numpy.load(allow_pickle=True) would run."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def _skops_exec(bundle: Path, marker: Path) -> None:
    craft_skops(bundle / PREPROCESSOR, "builtins", "exec", [write_marker(marker)])


def _skops_numpy_load(bundle: Path, marker: Path) -> None:
    payload = marker.with_name("payload.pkl")
    payload.write_bytes(pickle.dumps(_Payload(write_marker(marker))))
    craft_skops(bundle / PREPROCESSOR, "numpy", "load", [str(payload), None, True])  # mmap_mode, allow_pickle


def _set_loader(loader: str) -> Callable[[Path, Path], None]:
    def tamper(bundle: Path, marker: Path) -> None:
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["model"]["loader"] = loader
        (bundle / MANIFEST).write_text(json.dumps(manifest))

    return tamper


# case -> (how the bundle is tampered with, what the one error line says)
CRAFTED: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "skops_builtins_exec": (_skops_exec, "refused: it holds types automl does not load (builtins.exec)"),
    "skops_numpy_load": (_skops_numpy_load, "refused: it holds types automl does not load (numpy.load)"),
    "loader_os_system": (_set_loader("os:system"), "refused model loader os:system: its module is not in a "
                         "registered trainer's package; register the trainer's package under the automl.trainers "
                         "entry point, or pass --trust-module os if you wrote it"),
    "loader_import_side_effect": (_set_loader(f"{SIDE_EFFECT_MODULE}:Model"),
                                  f"refused model loader {SIDE_EFFECT_MODULE}:Model: its module is not in a "
                                  "registered trainer's package"),
}


@dataclass
class Crafted:
    folder: Path  # the MLflow pyfunc directory, its bundle tampered with
    marker: Path  # written if any of the crafted code runs
    modules: Path  # on the path of the processes that open it: a module that writes the marker when imported


def craft(root: Path, genuine: Genuine, case: str) -> Crafted:
    folder = root / case / "model"
    shutil.copytree(genuine.pyfunc, folder)
    marker = root / case / "marker"
    modules = root / case / "modules"
    modules.mkdir()
    (modules / f"{SIDE_EFFECT_MODULE}.py").write_text(f"{write_marker(marker)}\n")
    (bundle,) = folder.glob("artifacts/*")
    CRAFTED[case][0](bundle, marker)
    return Crafted(folder, marker, modules)


def run_cli(*args: str, modules: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["COLUMNS"] = "80"  # a narrow terminal must not wrap the one error line
    env["PYTHONPATH"] = os.pathsep.join([str(modules), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([*AUTOML, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


# Opened by `automl predict` in a real subprocess, two at a time (each costs the CLI's imports, several seconds:
# skops imports every scikit-learn estimator); the other cases through typer's CliRunner in this process.
IN_SUBPROCESS = ("skops_builtins_exec", "loader_import_side_effect")


@pytest.fixture(scope="module")
def predicted(genuine: Genuine, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, tuple[Crafted, int, str]]:
    """``automl predict DIR rows.csv`` in a real subprocess for the ``IN_SUBPROCESS`` cases: the directory, the
    exit status and stderr."""
    root = tmp_path_factory.mktemp("crafted")

    def predict(case: str) -> tuple[str, tuple[Crafted, int, str]]:
        crafted = craft(root, genuine, case)
        proc = run_cli("predict", str(crafted.folder), str(genuine.rows), modules=crafted.modules, cwd=root)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        return case, (crafted, proc.returncode, proc.stderr)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(predict, IN_SUBPROCESS))


@pytest.mark.parametrize("case", list(CRAFTED))
def test_predict_refuses_a_crafted_model_without_running_its_code(
    case: str, genuine: Genuine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if case in IN_SUBPROCESS:
        crafted, status, stderr = request.getfixturevalue("predicted")[case]
    else:
        crafted = craft(tmp_path, genuine, case)
        monkeypatch.syspath_prepend(str(crafted.modules))
        out = CliRunner().invoke(app, ["predict", str(crafted.folder), str(genuine.rows)])
        sys.modules.pop(SIDE_EFFECT_MODULE, None)
        status, stderr = out.exit_code, out.stderr
    assert status == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: cannot load {crafted.folder}: "), lines[0]
    assert CRAFTED[case][1] in lines[0]
    assert not crafted.marker.exists()


@pytest.mark.parametrize("case", list(CRAFTED))
def test_export_refuses_a_crafted_model_without_running_its_code(
    case: str, genuine: Genuine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crafted = craft(tmp_path, genuine, case)
    monkeypatch.syspath_prepend(str(crafted.modules))  # the side-effect module is importable here, as above
    out = CliRunner().invoke(app, ["export", str(crafted.folder), "--format", "onnx", "--out", str(tmp_path / "x")])
    sys.modules.pop(SIDE_EFFECT_MODULE, None)
    assert out.exit_code == 2, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert CRAFTED[case][1] in lines[0]
    assert not crafted.marker.exists()
    assert not (tmp_path / "x").exists()


def test_an_onnx_export_directory_with_a_crafted_preprocessor_is_refused(tmp_path: Path) -> None:
    """predict's other kind of directory (ONNX, TorchScript) reads the same preprocessor file."""
    from automl.export import load_model

    marker = tmp_path / "marker"
    (tmp_path / MANIFEST).write_text(json.dumps({"export": {"format": "onnx"}}))
    _skops_exec(tmp_path, marker)
    with pytest.raises(ExportError, match=r"preprocessor.skops: refused: it holds types automl does not load"):
        load_model(str(tmp_path))
    assert not marker.exists()


def test_trust_module_lets_predict_open_a_users_own_model(
    genuine: Genuine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's own trainer module: refused, with the hint, until named with --trust-module (the CLI's option)."""
    module = "automl_test_trusted_models"
    (tmp_path / f"{module}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = tmp_path / "model"
    shutil.copytree(genuine.pyfunc, folder)
    (bundle,) = folder.glob("artifacts/*")
    _set_loader(f"{module}:Constant")(bundle, tmp_path / "unused")
    (bundle / "model" / "constant.json").write_text("1")
    refused = CliRunner().invoke(app, ["predict", str(folder), str(genuine.rows)])
    assert refused.exit_code == 2, refused.output
    assert f"pass --trust-module {module} if you wrote it" in refused.stderr
    assert module not in sys.modules
    out = CliRunner().invoke(app, ["predict", str(folder), str(genuine.rows), "--trust-module", module])
    monkeypatch.delitem(sys.modules, module, raising=False)
    assert out.exit_code == 0, out.output
    assert out.stdout.split() == ["prediction", *[str(genuine.prepared.dataset.classes[1])] * 5]
    bad = CliRunner().invoke(app, ["predict", str(folder), str(genuine.rows), "--trust-module", f"./{module}"])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == (f"error: The '--trust-module' parameter must be module names such as my_trainers "
                                  f"or mypkg.models. Got './{module}' instead.")
