"""The built-in scikit-learn trainers: ``hist_gradient_boosting``, ``random_forest``, ``logistic_regression``,
``ridge`` and ``svm``.

Each trainer takes the hyperparameters in its ``DEFAULTS`` (any other name is refused with the list of accepted
ones; values are checked by scikit-learn itself, whose messages name the parameter) and returns the fitted
scikit-learn estimator, which automl saves with skops. Every report carries all the metrics of DESIGN.md
section 2 for the task, plus ``train_loss`` and ``val_loss`` (log loss for classification, MSE for regression).

``hist_gradient_boosting`` and ``random_forest`` grow their model in chunks of ``report_every`` boosting
iterations or trees (``warm_start``) and report after each chunk, with step = iterations or trees so far, so
that early stopping (ASHA, Hyperband, median) can stop them; the others report once, at step 1.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np

from automl.trainer import Dataset, Report, Trainer

__all__ = [
    "HistGradientBoostingTrainer",
    "LogisticRegressionTrainer",
    "RandomForestTrainer",
    "RidgeTrainer",
    "SVMTrainer",
]

CLASS_WEIGHTS = (None, "balanced")
# The folds used to calibrate the SVM's probabilities (see SVMTrainer).
SVM_CALIBRATION_FOLDS = 3


# --------------------------------------------------------------------------------------------- shared helpers


def _check(name: str, defaults: dict[str, Any], params: dict[str, Any], data: Dataset | None
           ) -> tuple[dict[str, Any], Dataset]:
    """Known parameter names only; ``class_weight`` is None or 'balanced', and only for classification."""
    if data is None:
        raise ValueError(f"{name}: needs data (add a data: section to the spec)")
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"{name}: unknown parameter '{unknown[0]}'; it takes {', '.join(defaults)}")
    p = {**defaults, **params}
    if "class_weight" in p:
        if p["class_weight"] not in CLASS_WEIGHTS:
            raise ValueError(f"{name}: class_weight must be 'balanced' or null (got {p['class_weight']!r})")
        if p["class_weight"] is not None and data.task != "classification":
            raise ValueError(f"{name}: class_weight applies to classification only; this data is {data.task}")
    for key in ("report_every", "max_iter", "n_estimators"):  # the chunked trainers count with these
        if key in p and (isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1):
            raise ValueError(f"{name}: {key} must be an integer >= 1 (got {p[key]!r})")
    return p, data


def _random_state() -> int:
    # automl seeds numpy's global generator per trial (spec seed + trial number): drawing the estimator's seed
    # from it makes a trial reproducible, and an int (not None) keeps warm-started chunks one consistent model.
    return int(np.random.randint(2**31 - 1))


def _trial_cpus() -> int:
    # Ray sets OMP_NUM_THREADS to the CPUs it gave the trial's actor (resources.cpu): use that many, no more.
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def _proba(model: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities with one column per class of the dataset, also for classes absent from the training split."""
    raw = np.asarray(model.predict_proba(X), dtype=np.float64)
    # Rows of float32 probabilities sum to one only to float32 precision; log_loss checks in float64.
    raw /= raw.sum(axis=1, keepdims=True)
    if raw.shape[1] == n_classes:
        return raw
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(model.classes_, dtype=np.int64)] = raw
    return full


def _metrics(model: Any, data: Dataset) -> dict[str, float]:
    """Every validation metric for the task, plus train_loss and val_loss."""
    from sklearn.metrics import log_loss, mean_squared_error

    if data.task == "classification":
        labels = np.arange(data.n_classes)
        proba_val = _proba(model, data.X_val, data.n_classes)
        metrics = data.evaluate(np.asarray(model.predict(data.X_val)), proba=proba_val)
        metrics["train_loss"] = float(log_loss(data.y_train, _proba(model, data.X_train, data.n_classes),
                                               labels=labels))
        metrics["val_loss"] = float(log_loss(data.y_val, proba_val, labels=labels))
        return metrics
    pred_val = np.asarray(model.predict(data.X_val))
    metrics = data.evaluate(pred_val)
    metrics["train_loss"] = float(mean_squared_error(data.y_train, model.predict(data.X_train)))
    metrics["val_loss"] = float(mean_squared_error(data.y_val, pred_val))
    return metrics


def _grow(model: Any, size_param: str, total: int, every: int, data: Dataset, report: Report) -> Any:
    """Fit a warm-started ensemble ``every`` members at a time up to ``total``, reporting after each chunk.

    The steps are multiples of ``every`` (and ``total`` last) whatever ``total`` is, so that trials with
    different sizes report at the same steps, as the median rule compares them.
    """
    done = 0
    while done < total:
        done = min(done + every, total)
        model.set_params(**{size_param: done})
        model.fit(data.X_train, data.y_train)
        report(done, _metrics(model, data))  # may raise StopTrial: the sweep stops this trial here
    return model


class _SklearnTrainer(Trainer):
    name = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def fit(self, params: dict[str, Any], data: Dataset | None, report: Report) -> Any:
        from threadpoolctl import threadpool_limits

        p, data = _check(self.name, self.DEFAULTS, params, data)
        # OpenMP (HistGradientBoosting) and BLAS pools held to the trial's CPUs: threads beyond them spin
        # against the other trials' threads; on a busy 2-core machine a HistGradientBoosting fit took 10 times
        # longer with 2 threads than with 1.
        with threadpool_limits(limits=_trial_cpus()):
            return self._fit(p, data, report)

    @abstractmethod
    def _fit(self, p: dict[str, Any], data: Dataset, report: Report) -> Any:
        """Fit with the checked parameters ``p`` (defaults filled in); report; return the estimator."""

    def warmup(self) -> None:
        # Importing scikit-learn costs about 2 s, and skops (which saves the fitted model at the end of each
        # trial) 2 to 3 s more, as it imports every scikit-learn estimator: pay both once per worker, while
        # the sweep starts, not in its first trials.
        import sklearn.calibration
        import sklearn.compose
        import sklearn.ensemble
        import sklearn.linear_model
        import sklearn.metrics
        import sklearn.svm  # noqa: F401
        import skops.io  # noqa: F401


# --------------------------------------------------------------------------------------------- trainers


class HistGradientBoostingTrainer(_SklearnTrainer):
    """``HistGradientBoostingClassifier`` / ``Regressor`` (by the data's task); reports every ``report_every``
    boosting iterations."""

    name = "hist_gradient_boosting"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "learning_rate": 0.1,
        "max_iter": 100,
        "max_leaf_nodes": 31,
        "max_depth": None,
        "min_samples_leaf": 20,
        "l2_regularization": 0.0,
        "max_features": 1.0,
        "max_bins": 255,
        "class_weight": None,
        "report_every": 10,
    }

    @classmethod
    def search_space(cls, task: str, n_rows: int) -> dict[str, Any] | None:
        return {
            "parameters": {
                "learning_rate": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
                "max_iter": {"type": "int", "low": 50, "high": 300, "step": 10},
                "max_leaf_nodes": {"type": "int", "low": 7, "high": 63, "log": True},
                "min_samples_leaf": {"type": "int", "low": 5, "high": 50, "log": True},
                "max_features": {"type": "float", "low": 0.3, "high": 1.0},
            },
            "fixed": {"report_every": 10},
            "start": {"learning_rate": 0.1, "max_iter": 100, "max_leaf_nodes": 31, "min_samples_leaf": 20,
                      "max_features": 1.0},
        }

    def _fit(self, p: dict[str, Any], data: Dataset, report: Report) -> Any:
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        every, total = p.pop("report_every"), p.pop("max_iter")
        class_weight = p.pop("class_weight")
        # The library's own early stopping is off: the sweep's pruner stops trials on the reported metric, and
        # the internal one would hold out part of the training split besides automl's validation split.
        common = {**p, "warm_start": True, "early_stopping": False, "random_state": _random_state()}
        if data.task == "classification":
            # Known cost: with class weights, scikit-learn 1.9 bins the features with a weighted percentile per
            # bin, about 2 s per 30 numeric features, again on each warm-started chunk (scikit-learn#34248).
            model: Any = HistGradientBoostingClassifier(**common, class_weight=class_weight)
        else:
            model = HistGradientBoostingRegressor(**common)
        return _grow(model, "max_iter", total, every, data, report)


class RandomForestTrainer(_SklearnTrainer):
    """``RandomForestClassifier`` / ``Regressor`` (by the data's task); reports every ``report_every`` trees."""

    name = "random_forest"
    # criterion and max_features None: scikit-learn's default for the task (gini and sqrt for classification,
    # squared_error and 1.0 for regression).
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "n_estimators": 100,
        "criterion": None,
        "max_depth": None,
        "min_samples_split": 2,
        "min_samples_leaf": 1,
        "max_features": None,
        "max_leaf_nodes": None,
        "bootstrap": True,
        "max_samples": None,
        "class_weight": None,
        "report_every": 10,
    }

    @classmethod
    def search_space(cls, task: str, n_rows: int) -> dict[str, Any] | None:
        return {
            "parameters": {
                "n_estimators": {"type": "int", "low": 50, "high": 300, "step": 10},
                "max_depth": {"type": "categorical", "choices": [None, 4, 8, 16]},
                "min_samples_leaf": {"type": "int", "low": 1, "high": 8},
                "max_features": {"type": "categorical", "choices": ["sqrt", "log2", 0.5, 1.0]},
            },
            "fixed": {"report_every": 10},
            "start": {"n_estimators": 100, "max_depth": None, "min_samples_leaf": 1,
                      "max_features": "sqrt" if task == "classification" else 1.0},
        }

    def _fit(self, p: dict[str, Any], data: Dataset, report: Report) -> Any:
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

        every, total = p.pop("report_every"), p.pop("n_estimators")
        class_weight = p.pop("class_weight")
        kwargs = {k: v for k, v in p.items() if not (k in ("criterion", "max_features") and v is None)}
        common = {**kwargs, "warm_start": True, "n_jobs": _trial_cpus(), "random_state": _random_state()}
        if data.task == "classification":
            # 'balanced' as explicit weights: the same numbers, without scikit-learn's warning that the preset
            # may differ between warm-started fits (it cannot here: every chunk sees the same training split).
            weights = None
            if class_weight == "balanced":
                present = np.unique(data.y_train)
                weights = {int(i): float(data.class_weights()[i]) for i in present}
            model: Any = RandomForestClassifier(**common, class_weight=weights)
        else:
            model = RandomForestRegressor(**common)
        return _grow(model, "n_estimators", total, every, data, report)


class LogisticRegressionTrainer(_SklearnTrainer):
    """``LogisticRegression`` (classification only); one report."""

    name = "logistic_regression"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "C": 1.0,
        "l1_ratio": 0.0,
        "max_iter": 1000,
        "tol": 1e-4,
        "class_weight": None,
    }

    @classmethod
    def search_space(cls, task: str, n_rows: int) -> dict[str, Any] | None:
        if task != "classification":
            return None
        return {
            "parameters": {
                "C": {"type": "float", "low": 1e-3, "high": 100.0, "log": True},
                "l1_ratio": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.1},
                "class_weight": {"type": "categorical", "choices": [None, "balanced"]},
            },
            "start": {"C": 1.0, "l1_ratio": 0.0, "class_weight": None},
        }

    def _fit(self, p: dict[str, Any], data: Dataset, report: Report) -> Any:
        import sklearn
        from sklearn.linear_model import LogisticRegression

        if data.task != "classification":
            raise ValueError(f"{self.name}: is a classifier; this data is {data.task} (use ridge, svm, "
                             "random_forest or hist_gradient_boosting, or set data.task: classification)")
        l1_ratio = p["l1_ratio"]
        # lbfgs for a pure L2 penalty (fast); saga is the solver that handles L1 and elastic-net penalties.
        kwargs: dict[str, Any] = {**p, "solver": "lbfgs" if l1_ratio == 0 else "saga", "random_state": _random_state()}
        if tuple(int(x) for x in sklearn.__version__.split(".")[:2]) < (1, 8):
            kwargs["penalty"] = "l2" if l1_ratio == 0 else "elasticnet"  # before 1.8, l1_ratio needed a penalty
        model = LogisticRegression(**kwargs)
        model.fit(data.X_train, data.y_train)
        report(1, _metrics(model, data))
        return model


class RidgeTrainer(_SklearnTrainer):
    """``Ridge`` (regression only); one report."""

    name = "ridge"
    DEFAULTS: ClassVar[dict[str, Any]] = {"alpha": 1.0}

    @classmethod
    def search_space(cls, task: str, n_rows: int) -> dict[str, Any] | None:
        if task != "regression":
            return None
        return {"parameters": {"alpha": {"type": "float", "low": 1e-3, "high": 1000.0, "log": True}},
                "start": {"alpha": 1.0}}

    def _fit(self, p: dict[str, Any], data: Dataset, report: Report) -> Any:
        from sklearn.linear_model import Ridge

        if data.task != "regression":
            raise ValueError(f"{self.name}: is a regressor; this data is {data.task} (use logistic_regression, "
                             "svm, random_forest or hist_gradient_boosting, or set data.task: regression)")
        model = Ridge(**p)
        model.fit(data.X_train, data.y_train)
        report(1, _metrics(model, data))
        return model


class SVMTrainer(_SklearnTrainer):
    """``SVC`` (classification, with calibrated probabilities) or ``SVR`` (regression); one report."""

    name = "svm"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "C": 1.0,
        "kernel": "rbf",
        "gamma": "scale",
        "degree": 3,
        "coef0": 0.0,
        "epsilon": 0.1,  # regression only
        "class_weight": None,  # classification only
    }
    # A kernel SVM's fit grows with the square of the rows (or worse): AutoML mode leaves it out above this.
    MAX_ROWS = 10_000

    @classmethod
    def search_space(cls, task: str, n_rows: int) -> dict[str, Any] | None:
        if n_rows > cls.MAX_ROWS:
            return None
        parameters: dict[str, Any] = {
            "C": {"type": "float", "low": 1e-2, "high": 1000.0, "log": True},
            "kernel": {"type": "categorical", "choices": ["rbf", "linear"]},
        }
        start: dict[str, Any] = {"C": 1.0, "kernel": "rbf"}
        if task == "regression":
            parameters["epsilon"] = {"type": "float", "low": 0.01, "high": 1.0, "log": True}
            start["epsilon"] = 0.1
        return {"parameters": parameters, "start": start}

    def _fit(self, p: dict[str, Any], data: Dataset, report: Report) -> Any:
        from sklearn.svm import SVC, SVR

        epsilon, class_weight = p.pop("epsilon"), p.pop("class_weight")
        model: Any
        weights = None
        if data.task == "classification":
            if epsilon != self.DEFAULTS["epsilon"]:
                raise ValueError(f"{self.name}: epsilon applies to regression (SVR) only; this data is "
                                 "classification")
            model = self._calibrated(SVC(**p), data)
            if class_weight == "balanced":
                # As sample weights on the whole fit, not SVC(class_weight=...): the calibrator must see them
                # too, or its sigmoid maps decision values back to the skewed class frequencies, and predict
                # (the argmax of the probabilities) undoes the balancing.
                weights = data.class_weights()[data.y_train.astype(np.int64)]
        else:
            from sklearn.compose import TransformedTargetRegressor
            from sklearn.preprocessing import StandardScaler

            # SVR on a standardised target: epsilon (the tube width) is then in target standard deviations, so
            # one search range suits every target scale; predictions come back in the target's units.
            model = TransformedTargetRegressor(SVR(**p, epsilon=epsilon), transformer=StandardScaler())
        model.fit(data.X_train, data.y_train, sample_weight=weights)
        report(1, _metrics(model, data))
        return model

    def _calibrated(self, svc: Any, data: Dataset) -> Any:
        """The SVC with probabilities (for val_roc_auc and val_log_loss) from Platt scaling.

        ``CalibratedClassifierCV(..., ensemble=False)`` rather than ``SVC(probability=True)`` (deprecated in
        scikit-learn 1.9): the same method (sigmoid fitted on cross-validated decision values, then one SVC
        fitted on the whole split), but with 3 folds instead of libsvm's internal 5, and ``predict`` is the
        argmax of ``predict_proba``, so val_accuracy and val_log_loss describe the same model.
        """
        from sklearn.calibration import CalibratedClassifierCV

        counts = np.bincount(data.y_train.astype(np.int64))
        smallest = int(counts[counts > 0].min())
        folds = min(SVM_CALIBRATION_FOLDS, smallest)
        if folds < 2:
            raise ValueError(f"{self.name}: calibrating probabilities needs at least 2 training rows per class; "
                             f"a class has {smallest} (use more data or a larger training split)")
        return CalibratedClassifierCV(svc, method="sigmoid", cv=folds, ensemble=False)
