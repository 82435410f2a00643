"""The model bundle: a trained model plus the preprocessing and label decoding it needs to take raw rows.

Layout of a bundle directory (everything in safe formats; loading executes no pickled code)::

    manifest.json       columns and dtypes, task, classes, metric, params, source run, model loader
    preprocessor.skops  the scikit-learn preprocessing, fitted on the training split (skops, trusted types only)
    model/              what the model's own ``save`` wrote (an MLP: mlp.json + weights.safetensors)

Opening a bundle runs no code from it: a skops file is loaded only when every type skops does not trust by
default is in ``SKOPS_ALLOWED_TYPES``, and the manifest's model loader must name a ``SavableModel`` in a registered
trainer's package or in a module the caller trusts, which is checked before anything is imported.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from automl.errors import ExportError
from automl.trainer import SavableModel, registered_trainers

if TYPE_CHECKING:
    import pandas as pd

    from automl.data import PreparedData

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREPROCESSOR = "preprocessor.skops"
SKOPS_LOADER = "skops"
# An ``automl.ensemble.EnsembleModel``: model/ensemble.json (weights, each member's loader) and one folder per member
# (model/member0/, ...), each holding what that member's own format wrote and loaded with the same checks.
ENSEMBLE_LOADER = "ensemble"
ENSEMBLE_FILE = "ensemble.json"
# The types a preprocessor.skops or model.skops file may hold besides those skops trusts by default (primitives,
# containers, numpy arrays and ufuncs, scikit-learn's public estimators): exactly the ones skops.io.get_untrusted_types
# reports for the files automl writes, i.e. the preprocessors of automl.data (make_preprocessor, including a
# OneHotEncoder with infrequent categories, and passthrough_preprocessor) and the fitted models of every
# trainers/sklearn_models.py trainer, classification (binary and multiclass) and regression. A file holding any
# other type is refused before skops.io.load is called. Derived with skops 0.12, 0.13 and 0.16 on scikit-learn 1.9:
# skops before 0.14 trusts fewer scikit-learn internals (HistGradientBoosting's losses, links and bin mapper), and
# skops 0.16 reports the tree structures too (it no longer trusts them by default: crafted node indices can crash
# predict; our forests and boosted trees are made of them).
# tests/test_bundle_security.py fits each of those models, dumps it and fails on any reported type missing here.
# To extend (a new built-in scikit-learn trainer or preprocessing step): add the model to that test, run it, review
# each type it reports (loading must only set attributes, never call code chosen by the file), and add it here.
SKOPS_ALLOWED_TYPES = frozenset({
    "numpy.dtype",  # the dtypes fitted transformers record (SimpleImputer, OneHotEncoder, ColumnTransformer)
    # svm (classification): CalibratedClassifierCV(SVC, ensemble=False)
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    # random_forest
    "sklearn.tree._tree.Tree",
    # hist_gradient_boosting (the losses, links and bin mapper are trusted by default from skops 0.14)
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn._loss._loss.CyHalfMultinomialLoss",
    "sklearn._loss.link.IdentityLink",
    "sklearn._loss.link.Interval",
    "sklearn._loss.link.LogitLink",
    "sklearn._loss.link.MultinomialLogit",
    "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.loss.HalfMultinomialLoss",
    "sklearn._loss.loss.HalfSquaredError",
})
# Modules a caller trusts as model loaders where it cannot pass ``trusted_modules`` itself (see ``trusting``).
_TRUSTED_MODULES: ContextVar[tuple[str, ...]] = ContextVar("automl_trusted_modules", default=())


@dataclass(frozen=True)
class PackedModel:
    """A trained model as bytes, small enough to travel from a Ray worker to the driver."""

    loader: str
    files: dict[str, bytes]


def pack_model(model: Any) -> PackedModel | None:
    """Serialise what a trainer returned; ``None`` when it has no safe format (it is then not exportable)."""
    if model is None:
        return None
    from automl.ensemble import EnsembleModel

    if isinstance(model, EnsembleModel):
        return _pack_ensemble(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        if isinstance(model, SavableModel):
            model.save(path)
            loader = f"{type(model).__module__}:{type(model).__qualname__}"
        elif _is_sklearn(model):
            import skops.io

            skops.io.dump(model, path / "model.skops")
            loader = SKOPS_LOADER
        else:
            return None
        files = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    return PackedModel(loader=loader, files=files)


def _pack_ensemble(model: Any) -> PackedModel | None:
    files: dict[str, bytes] = {}
    members = []
    for i, member in enumerate(model.members):
        packed = pack_model(member)
        if packed is None or packed.loader == ENSEMBLE_LOADER:
            return None  # a member without a safe format (or a nested ensemble): the ensemble has none either
        members.append({"loader": packed.loader, "name": model.names[i]})
        files.update({f"member{i}/{name}": blob for name, blob in packed.files.items()})
    description = {"task": model.task, "n_classes": model.n_classes, "weights": [float(w) for w in model.weights],
                   "members": members}
    files[ENSEMBLE_FILE] = json.dumps(description, indent=2).encode()
    return PackedModel(loader=ENSEMBLE_LOADER, files=files)


def _load_ensemble(model_dir: Path, trusted_modules: Iterable[str]) -> Any:
    from automl.ensemble import EnsembleModel

    file = model_dir / ENSEMBLE_FILE
    try:
        description = json.loads(file.read_text())
        weights = [float(w) for w in description["weights"]]
        members = list(description["members"])
        task, n_classes = str(description["task"]), int(description["n_classes"])
        loaders = [m["loader"] for m in members]
        names = [str(m.get("name", "")) for m in members]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{file}: not a readable ensemble description ({_first_line(exc)})") from None
    if len(weights) != len(members) or not members or ENSEMBLE_LOADER in loaders:
        raise ExportError(f"{file}: an ensemble needs one weight per member, and no member may be an ensemble")
    # Member folders are named by position here, never read from the file: nothing outside model/ is opened.
    loaded = [_load_model(loader, model_dir / f"member{i}", trusted_modules=trusted_modules)
              for i, loader in enumerate(loaders)]
    return EnsembleModel(loaded, weights, task=task, n_classes=n_classes, names=names)


def _is_sklearn(model: Any) -> bool:
    return type(model).__module__.startswith("sklearn.") and hasattr(model, "predict")


def write_bundle(
    path: Path,
    packed: PackedModel,
    prepared: PreparedData | None,
    *,
    info: dict[str, Any],
) -> Path:
    """Write a bundle directory at ``path`` (created; must not exist or be empty)."""
    path.mkdir(parents=True, exist_ok=True)
    model_dir = path / "model"
    model_dir.mkdir(exist_ok=True)
    for name, blob in packed.files.items():
        target = model_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob)
    manifest: dict[str, Any] = {"format": FORMAT_VERSION, "model": {"loader": packed.loader}, **info}
    if prepared is not None:
        import skops.io

        skops.io.dump(prepared.preprocessor, path / PREPROCESSOR)
        ds = prepared.dataset
        manifest.update(
            task=ds.task,
            target=ds.target,
            columns=prepared.columns,
            dtypes=prepared.dtypes,
            classes=ds.classes,
            features=ds.feature_names,
        )
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return path


def _load_skops(file: Path) -> Any:
    """Load a skops file whose every type is trusted by skops or in ``SKOPS_ALLOWED_TYPES``; refuse it otherwise,
    without constructing anything (``get_untrusted_types`` reads the file's schema only)."""
    import skops.io

    try:
        reported = set(skops.io.get_untrusted_types(file=file))
    except Exception as exc:
        raise ExportError(f"{file}: not a readable skops file ({_first_line(exc)})") from None
    refused = sorted(reported - SKOPS_ALLOWED_TYPES)
    if refused:
        shown = ", ".join(_printable(t) for t in refused[:10])
        if len(refused) > 10:
            shown += f" and {len(refused) - 10} more"
        raise ExportError(f"{file}: refused: it holds types automl does not load ({shown}); automl opens only the "
                          "types its own models contain")
    try:
        return skops.io.load(file, trusted=sorted(SKOPS_ALLOWED_TYPES))
    except Exception as exc:
        raise ExportError(f"{file}: cannot load it ({_first_line(exc)})") from None


def _printable(text: str) -> str:
    # Names come from the file: quoted and escaped unless they are plain dotted names (or module:Class), so that a
    # refusal stays one line.
    return text if all(part.isidentifier() for part in text.replace(":", ".", 1).split(".")) else ascii(text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def module_names(names: Iterable[str], parameter: str = "trusted_modules") -> tuple[str, ...]:
    """Dotted module names, as given; ``ExportError`` for anything else (a path, a file name, ``module:attr``)."""
    checked = tuple(names)
    for name in checked:
        if not (isinstance(name, str) and all(part.isidentifier() for part in name.split("."))):
            raise ExportError(f"The '{parameter}' parameter must be module names such as my_trainers or "
                              f"mypkg.models. Got {name!r} instead.")
    return checked


@contextmanager
def trusting(modules: Iterable[str]) -> Iterator[None]:
    """Trust ``modules`` (and their submodules) as model loaders of the bundles opened inside the block.

    For callers that cannot pass ``trusted_modules`` to ``ModelBundle`` themselves: MLflow constructs the bundle of
    a pyfunc model (``AutoMLPyfunc.load_context``) inside ``mlflow.pyfunc.load_model``.
    """
    token = _TRUSTED_MODULES.set((*_TRUSTED_MODULES.get(), *module_names(modules)))
    try:
        yield
    finally:
        _TRUSTED_MODULES.reset(token)


def loader_allowed(module_name: str, trusted_modules: Iterable[str] = ()) -> bool:
    """Whether a manifest's model loader may import ``module_name``: a module of a registered trainer's top-level
    package (built in, or an installed package's ``automl.trainers`` entry point; so ``trainers.mlp:MLPTrainer``
    allows ``trainers._torch``), or one of ``trusted_modules`` or a submodule of one. Imports nothing: the
    registry is read from the packages' metadata."""
    parts = module_name.split(".")
    if not all(part.isidentifier() for part in parts):
        return False
    packages = {target.partition(":")[0].strip().split(".")[0] for target in registered_trainers().values()}
    if parts[0] in packages:
        return True
    return any(module_name == t or module_name.startswith(t + ".") for t in trusted_modules)


def _load_model(loader: Any, model_dir: Path, *, trusted_modules: Iterable[str] = ()) -> Any:
    if loader == SKOPS_LOADER:
        return _load_skops(model_dir / "model.skops")
    if loader == ENSEMBLE_LOADER:
        return _load_ensemble(model_dir, trusted_modules)
    manifest = model_dir.parent / MANIFEST
    if not isinstance(loader, str) or loader.count(":") != 1:
        raise ExportError(f"{manifest}: model loader {loader!r} is not of the form module:Class")
    module_name, _, qualname = loader.partition(":")
    trusted = (*trusted_modules, *_TRUSTED_MODULES.get())
    # Checked before anything is imported: importing a module runs its code, so a manifest may only name modules
    # that are installed as trainers or that the caller vouches for.
    if not loader_allowed(module_name, trusted):
        top = _printable(module_name.split(".")[0])
        raise ExportError(
            f"{manifest}: refused model loader {_printable(loader)}: its module is not in a registered trainer's "
            f"package; register the trainer's package under the automl.trainers entry point, or pass "
            f"--trust-module {top} if you wrote it"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise ExportError(f"model loader {_printable(loader)} cannot be imported; install the trainer's package"
                          ) from None
    # Only a SavableModel's own load() is called, of a class defined where the loader may import from: a manifest
    # cannot name an arbitrary callable to run, nor reach another module's class through attributes.
    if not (isinstance(obj, type) and issubclass(obj, SavableModel) and loader_allowed(obj.__module__, trusted)):
        raise ExportError(f"model loader {_printable(loader)} is not a SavableModel")
    return obj.load(model_dir)


def check_columns(present: Any, columns: list[str]) -> None:
    """The one message for rows that lack a column the model takes (every kind of model says the same)."""
    have = set(present)
    missing = [c for c in columns if c not in have]
    if missing:
        raise ExportError(
            f"input is missing column(s) {', '.join(missing)}; the model takes: {', '.join(columns)}"
        )


class Preprocessing:
    """The manifest and the fitted preprocessor of a bundle or an export: raw rows in, the feature matrix the
    model was trained on out, and class indices back to the original labels. Model bundles and ONNX /
    TorchScript exports (automl.portable) share it, so every kind of model takes raw rows the same way."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise ExportError(f"{path}: not an automl model (no {MANIFEST})")
        self.path = path
        self.manifest: dict[str, Any] = json.loads(manifest_file.read_text())
        self.preprocessor = _load_skops(path / PREPROCESSOR) if (path / PREPROCESSOR).is_file() else None

    @property
    def columns(self) -> list[str]:
        return list(self.manifest.get("columns", []))

    @property
    def classes(self) -> list[Any]:
        return list(self.manifest.get("classes", []))

    @property
    def task(self) -> str:
        return str(self.manifest.get("task", "unknown"))

    def features(self, frame: pd.DataFrame) -> np.ndarray:
        """Raw rows -> the feature matrix the model was trained on; a missing column is an ``ExportError``."""
        if self.preprocessor is None:
            return frame.to_numpy()
        check_columns(frame.columns, self.columns)
        rows = frame[self.columns].copy()
        for column, dtype in self.manifest.get("dtypes", {}).items():
            if dtype.startswith(("float", "int")) and rows[column].dtype == object:
                import pandas as pd

                rows[column] = pd.to_numeric(rows[column], errors="coerce")
        return np.asarray(self.preprocessor.transform(rows), dtype=np.float32)

    def labels(self, indices: np.ndarray) -> np.ndarray:
        """Class indices -> the original class values (unchanged when the manifest names no classes)."""
        if self.task == "classification" and self.classes:
            return np.asarray(self.classes, dtype=object)[np.asarray(indices).astype(np.int64)]
        return np.asarray(indices)


class ModelBundle(Preprocessing):
    """A loaded bundle: ``predict`` and ``predict_proba`` on a pandas frame of raw rows.

    ``trusted_modules``: modules (with their submodules) whose ``SavableModel`` the manifest may name besides those
    of registered trainers' packages, e.g. the module of a user's own ``module:function`` trainer.
    """

    def __init__(self, path: Path, *, trusted_modules: Iterable[str] = ()) -> None:
        super().__init__(path)
        model = self.manifest.get("model") if isinstance(self.manifest, dict) else None
        loader = model.get("loader") if isinstance(model, dict) else None
        self.model = _load_model(loader, self.path / "model", trusted_modules=module_names(trusted_modules))

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Labels (the original class values) for classification; values for regression."""
        raw = np.asarray(self.model.predict(self.features(frame)))
        return self.labels(raw) if self.task == "classification" else raw

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        if self.task != "classification":
            raise ExportError("predict_proba: the model is a regression model")
        return np.asarray(self.model.predict_proba(self.features(frame)))
