"""The ``auto`` trainer behind AutoML mode: a ``model`` parameter picks the trainer, the rest go to it.

Parameters follow scikit-learn's ``<step>__<param>`` convention: ``random_forest__max_depth`` reaches the
``random_forest`` trainer as ``max_depth``, and is dropped in trials that picked another model. Parameters
without a prefix (other than ``model``) go to whichever model the trial picked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from automl.trainer import MODEL_PARAM_SEPARATOR as SEPARATOR
from automl.trainer import Dataset, Report, Trainer, resolve_trainer


def split_params(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``{"model": "ridge", "ridge__alpha": 1.0, "mlp__lr": ...}`` -> ``("ridge", {"alpha": 1.0})``."""
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("auto: needs a 'model' parameter naming the trainer of each trial (e.g. random_forest)")
    own: dict[str, Any] = {}
    for key, value in params.items():
        if key == "model":
            continue
        prefix, sep, name = key.partition(SEPARATOR)
        if not sep:
            own[key] = value
        elif prefix == model:
            own[name] = value
    return model, own


class AutoTrainer(Trainer):
    """Dispatches each trial to the trainer its ``model`` parameter names; each is imported once per worker."""

    def __init__(self) -> None:
        self._fits: dict[str, Callable[[dict[str, Any], Dataset | None, Report], Any]] = {}

    def fit(self, params: dict[str, Any], data: Dataset | None, report: Report) -> Any:
        model, own = split_params(params)
        if model == "auto":
            raise ValueError("auto: model cannot be 'auto' itself")
        return self._fit(model)(own, data, report)

    def _fit(self, model: str) -> Callable[[dict[str, Any], Dataset | None, Report], Any]:
        fit = self._fits.get(model)
        if fit is None:
            fit = self._fits[model] = resolve_trainer(model).load()
        return fit

    def warmup(self) -> None:
        # AutoML mode's first trials are the scikit-learn models' defaults (automl.quick.FIRST): their imports
        # (scikit-learn, skops: seconds on a busy machine) are paid while the sweep starts, not inside the first
        # trials' share of a short --time. The neural network's torch is imported when its turn comes.
        warm = getattr(getattr(self._fit("logistic_regression"), "__self__", None), "warmup", None)
        if callable(warm):
            warm()
