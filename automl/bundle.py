"""The model bundle: a trained model plus the preprocessing and label decoding it needs to take raw rows.

Layout of a bundle directory (everything in safe formats; loading executes no pickled code)::

    manifest.json       columns and dtypes, task, classes, metric, params, source run, model loader
    preprocessor.skops  the scikit-learn preprocessing, fitted on the training split (skops, trusted types only)
    model/              what the model's own ``save`` wrote (an MLP: mlp.json + weights.safetensors)
"""

from __future__ import annotations

import importlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from automl.errors import ExportError
from automl.trainer import SavableModel

if TYPE_CHECKING:
    import pandas as pd

    from automl.data import PreparedData

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREPROCESSOR = "preprocessor.skops"
SKOPS_LOADER = "skops"
# Types a preprocessor or scikit-learn model file may contain; anything else is refused at load time.
_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.", "builtins.", "collections.")


@dataclass(frozen=True)
class PackedModel:
    """A trained model as bytes, small enough to travel from a Ray worker to the driver."""

    loader: str
    files: dict[str, bytes]


def pack_model(model: Any) -> PackedModel | None:
    """Serialise what a trainer returned; ``None`` when it has no safe format (it is then not exportable)."""
    if model is None:
        return None
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
    import skops.io

    untrusted = skops.io.get_untrusted_types(file=file)
    refused = [t for t in untrusted if not t.startswith(_TRUSTED_PREFIXES)]
    if refused:
        raise ExportError(f"{file.name}: refusing to load untrusted types {refused}")
    return skops.io.load(file, trusted=untrusted)


def _load_model(loader: str, model_dir: Path) -> Any:
    if loader == SKOPS_LOADER:
        return _load_skops(model_dir / "model.skops")
    module_name, _, qualname = loader.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise ExportError(f"model loader '{loader}' cannot be imported; install the trainer's package") from None
    # Only a SavableModel's own load() is called: a manifest cannot name an arbitrary callable to run.
    if not (isinstance(obj, type) and issubclass(obj, SavableModel)):
        raise ExportError(f"model loader '{loader}' is not a SavableModel")
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
    """A loaded bundle: ``predict`` and ``predict_proba`` on a pandas frame of raw rows."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.model = _load_model(self.manifest["model"]["loader"], self.path / "model")

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Labels (the original class values) for classification; values for regression."""
        raw = np.asarray(self.model.predict(self.features(frame)))
        return self.labels(raw) if self.task == "classification" else raw

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        if self.task != "classification":
            raise ExportError("predict_proba: the model is a regression model")
        return np.asarray(self.model.predict_proba(self.features(frame)))
