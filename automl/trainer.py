"""The trainer contract, and the registry that finds trainers by name.

This module is all that ``trainers/`` (and a user's own trainer) import from automl::

    def train(params, data, report):          # or a class with fit(self, params, data, report)
        for epoch in range(params["epochs"]):
            ...
            report(epoch + 1, {"val_loss": ..., "val_accuracy": ...})   # may raise StopTrial
        return model                          # predict(X) on data's features, or None

``data`` is a ``Dataset`` (already split and preprocessed) or ``None`` when the spec has no ``data``. automl
wraps the returned model with the preprocessing and label decoding, so the exported model takes raw rows.

Checkpoints (optional; ``method: pbt`` needs them). A trainer that sets ``checkpoints = True`` (a class
attribute, or an attribute of the function) promises two things when ``wants_checkpoints(report)``:

- it starts from ``restored_checkpoint(report)`` when that is not None: the bytes one of its own reports gave,
  holding whatever it needs to continue (weights, optimizer, the epoch, the schedule), with the *current*
  ``params`` (a mutable hyperparameter may have changed since);
- it passes ``checkpoint=`` to every ``report``: a function of no arguments returning those bytes, called only
  when the sweep needs one (at a PBT interval boundary, after which ``report`` raises ``StopTrial``).

The bytes are the trainer's own format; automl moves and stores them and never unpickles them (the built-in torch
trainers write safetensors with a JSON header). ``mutable`` (optional) names the parameters that may change
between two segments of one training; those that shape the model (depth, width) may not.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from automl.errors import TrainerError
from automl.metrics import evaluate

__all__ = [
    "BUILTIN_TRAINERS",
    "CheckpointReport",
    "Dataset",
    "Report",
    "SavableModel",
    "StopTrial",
    "Trainer",
    "TrainerRef",
    "device",
    "evaluate",
    "resolve_trainer",
    "restored_checkpoint",
    "supports_checkpoints",
    "wants_checkpoints",
]

ENTRY_POINT_GROUP = "automl.trainers"
# AutoML mode names each model's parameters <model>__<param>, as scikit-learn pipelines name their steps'.
MODEL_PARAM_SEPARATOR = "__"
BUILTIN_TRAINERS = {
    "mlp": "trainers.mlp:MLPTrainer",
    "cnn": "trainers.cnn:CNNTrainer",
    "hist_gradient_boosting": "trainers.sklearn_models:HistGradientBoostingTrainer",
    "random_forest": "trainers.sklearn_models:RandomForestTrainer",
    "logistic_regression": "trainers.sklearn_models:LogisticRegressionTrainer",
    "ridge": "trainers.sklearn_models:RidgeTrainer",
    "svm": "trainers.sklearn_models:SVMTrainer",
    "auto": "trainers.auto:AutoTrainer",  # AutoML mode: a `model` parameter picks one of the trainers above
}


class StopTrial(BaseException):
    """Raised by ``report`` when the sweep stops this trial (early stopping, time budget, cancel).

    It derives from ``BaseException`` so that a trainer's ``except Exception`` does not swallow it.
    """


class Report(Protocol):
    def __call__(self, step: int, metrics: Mapping[str, float]) -> None: ...


class CheckpointReport(Protocol):
    """``report`` as a checkpointing trainer calls it when ``wants_checkpoints(report)`` (see the module doc)."""

    def __call__(self, step: int, metrics: Mapping[str, float], *,
                 checkpoint: Callable[[], bytes] | None = None) -> None: ...


def wants_checkpoints(report: Any) -> bool:
    """Whether this ``report`` takes ``checkpoint=`` (a PBT segment); a plain report does not."""
    return getattr(report, "checkpoints", False) is True


def restored_checkpoint(report: Any) -> bytes | None:
    """The checkpoint this training continues from (a PBT segment after the first), or None: from scratch."""
    data = getattr(report, "restored", None)
    return bytes(data) if data is not None else None


def supports_checkpoints(trainer: Any) -> bool:
    """Whether a trainer (class or function) declares ``checkpoints = True``."""
    return getattr(trainer, "checkpoints", False) is True


def mutable_parameters(trainer: Any) -> frozenset[str] | None:
    """The parameters a checkpointing trainer lets change between segments (None: it does not say)."""
    names = getattr(trainer, "mutable", None)
    return frozenset(names) if names is not None else None


@dataclass(frozen=True)
class Dataset:
    """What a trainer receives: preprocessed features (float32) and encoded targets.

    Classification targets are class indices into ``classes``; regression targets are float32.
    """

    task: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    feature_names: list[str]
    classes: list[Any] = field(default_factory=list)
    target: str = "target"
    # (channels, height, width) when each row is an image flattened in C-H-W order (image folders,
    # sklearn:digits); None for ordinary tables. Image trainers (cnn) reshape rows with it.
    image_shape: tuple[int, int, int] | None = None

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def class_weights(self) -> np.ndarray:
        """``class_weight: balanced`` as scikit-learn computes it: n_samples / (n_classes * count per class)."""
        counts = np.bincount(self.y_train.astype(np.int64), minlength=self.n_classes).astype(np.float64)
        return (len(self.y_train) / (self.n_classes * np.maximum(counts, 1.0))).astype(np.float32)

    def evaluate(self, y_pred: np.ndarray, *, proba: np.ndarray | None = None) -> dict[str, float]:
        """All validation metrics that apply to this task (DESIGN.md section 2 names)."""
        return evaluate(self.task, self.y_val, y_pred, proba=proba, n_classes=self.n_classes)


class SavableModel(ABC):
    """A fitted model that saves itself in a safe format (safetensors, JSON, skops): never a bare pickle.

    ``predict`` and ``predict_proba`` take the features the trainer was trained on (``Dataset.X_*``).
    """

    @abstractmethod
    def predict(self, X: np.ndarray) -> np.ndarray: ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} gives no probabilities")

    def torch_module(self) -> Any:
        """A ``torch.nn.Module`` in eval mode for ONNX and TorchScript export, or ``None`` when the model is not
        a torch network. It maps a float32 batch of features ``(n, n_features)`` to class probabilities
        ``(n, n_classes)`` (classification) or to predictions ``(n,)`` in target units (regression), so an
        export needs no code besides the preprocessing that travels with it."""
        return None

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the model into the (existing, empty) directory ``path``."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path) -> SavableModel:
        """Read back what ``save`` wrote."""


class Trainer(ABC):
    """A trainer as a class; a plain function ``train(params, data, report)`` is accepted too."""

    # Optional: True when fit() honours restored_checkpoint(report) and reports checkpoint= (method: pbt).
    checkpoints: ClassVar[bool] = False
    # Optional: the parameters that may change between two segments of a training (None: not declared).
    mutable: ClassVar[frozenset[str] | None] = None

    @abstractmethod
    def fit(self, params: dict[str, Any], data: Dataset | None, report: Report) -> Any: ...

    @classmethod
    def search_space(cls, task: str, n_rows: int) -> dict[str, Any] | None:
        """Optional: what AutoML mode searches for this trainer, or ``None`` when it does not suit ``task``
        (classification or regression) or a table of ``n_rows`` rows (too slow).

        Returns ``{"parameters": {...}, "fixed": {...}, "start": {...}}``: spec-format parameter definitions,
        values passed unsearched, and a first configuration worth trying (the library's defaults).
        """
        return None

    def warmup(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Optional: called once per worker before its first trial (import libraries, initialise kernels),
        so that one-off start-up costs overlap the sweep's own start-up instead of the first trials."""


# --------------------------------------------------------------------------------------------- devices


def device() -> Any:
    """The torch device a trial should train on: the GPU Ray assigned to it, else the CPU.

    When the spec asked for a GPU (``resources.gpu``) but CUDA is not available where the trial runs, this
    warns and falls back to the CPU, so that the same spec runs on a laptop and on a GPU cluster.
    """
    import warnings

    import torch

    gpus: list[Any] = []
    try:
        import ray

        if ray.is_initialized():
            gpus = list(ray.get_gpu_ids())
    except Exception:  # outside a Ray worker: no assignment to honour
        gpus = []
    if torch.cuda.is_available() and (gpus or not _in_ray_worker()):
        return torch.device("cuda")
    if gpus:
        warnings.warn(
            f"resources.gpu: Ray assigned GPU {gpus} but CUDA is not available here; training on the CPU",
            RuntimeWarning, stacklevel=2,
        )
        global DEVICE_NOTE
        DEVICE_NOTE = f"cpu (GPU {gpus} assigned, CUDA unavailable)"
    return torch.device("cpu")


DEVICE_NOTE: str | None = None  # read by the runner: recorded on the trial's MLflow run


def _in_ray_worker() -> bool:
    try:
        import ray

        return bool(ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TrainerRef:
    """Where a trainer lives, in a form that travels to Ray workers: ``module:attr`` plus a search path."""

    name: str
    target: str
    search_path: str | None = None

    def load(self) -> Callable[[dict[str, Any], Dataset | None, Report], Any]:
        """Import the trainer and return its ``fit``-shaped callable."""
        obj = self.load_object()
        if inspect.isclass(obj):
            if not callable(getattr(obj, "fit", None)):
                raise TrainerError(f"trainer '{self.name}': class {obj.__name__} has no fit(params, data, report)")
            instance: Any = obj()
            fit: Callable[[dict[str, Any], Dataset | None, Report], Any] = instance.fit
            return fit
        if callable(obj):
            return obj
        raise TrainerError(f"trainer '{self.name}': {self.target} is neither a function nor a class")

    def load_object(self) -> Any:
        """Import the trainer's module and return the named function or class (not instantiated)."""
        module_name, _, attr = self.target.partition(":")
        if self.search_path and self.search_path not in sys.path:
            sys.path.insert(0, self.search_path)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise TrainerError(f"trainer '{self.name}': cannot import module '{module_name}' ({exc})") from None
        obj = getattr(module, attr, None)
        if obj is None:
            raise TrainerError(f"trainer '{self.name}': module '{module_name}' has no attribute '{attr}'")
        return obj


_REGISTRY: tuple[tuple[tuple[str, int], ...], dict[str, str]] | None = None


def registered_trainers() -> dict[str, str]:
    """Built-in trainers plus those installed packages register under the ``automl.trainers`` group."""
    global _REGISTRY
    # Reading every installed package's entry points costs ~20 ms; a service checks each submitted spec with it.
    # Installing or removing a package changes its site folder's mtime, which is part of the key.
    key = tuple((p, _mtime_ns(p)) for p in sys.path)
    if _REGISTRY is not None and _REGISTRY[0] == key:
        return dict(_REGISTRY[1])
    found = dict(BUILTIN_TRAINERS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    _REGISTRY = (key, found)
    return dict(found)


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path or ".").st_mtime_ns
    except OSError:
        return -1


def resolve_trainer(name: str, base_dir: Path | None = None) -> TrainerRef:
    """A registered name, or ``module:attr`` resolved against ``base_dir`` (the spec file's directory).

    Nothing is imported here (so ``automl validate`` stays fast); a missing module file is reported now.
    """
    registry = registered_trainers()
    if name in registry:
        return TrainerRef(name=name, target=registry[name])
    if ":" not in name:
        known = ", ".join(sorted(registry))
        raise TrainerError(
            f"trainer: unknown trainer '{name}'; use one of {known} or 'module:function' for your own code"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or not attr.isidentifier():
        raise TrainerError(f"trainer: '{name}' must look like 'module:function' or 'module:Class'")
    search = str(base_dir.resolve()) if base_dir is not None else None
    if search is not None:
        candidate = Path(search, *module_name.split("."))
        local = candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file()
        if not local and importlib.util.find_spec(module_name.split(".")[0]) is None:
            raise TrainerError(
                f"trainer: module '{module_name}' not found next to the spec ({search}) nor installed"
            )
    return TrainerRef(name=name, target=name, search_path=search)
