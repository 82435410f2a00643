"""The scikit-learn trainers trained for real: bundled datasets and generated CSVs (numbers, categories, missing
values), called directly with a recording ``report``, saved as model bundles, and through one real sweep."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from automl.bundle import ModelBundle, pack_model, write_bundle
from automl.data import PreparedData, prepare
from automl.metrics import known_metrics
from automl.spec import DataSpec, load_spec
from automl.trainer import StopTrial, resolve_trainer
from trainers.sklearn_models import (
    HistGradientBoostingTrainer,
    LogisticRegressionTrainer,
    RandomForestTrainer,
    RidgeTrainer,
    SVMTrainer,
)

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["breast_cancer_hgb", "wine_random_forest", "breast_cancer_logistic", "diabetes_ridge", "wine_svm"]
TRAINERS = [HistGradientBoostingTrainer, RandomForestTrainer, LogisticRegressionTrainer, RidgeTrainer, SVMTrainer]


class Recorder:
    """A ``report`` that keeps what the trainer reported, and raises ``StopTrial`` at call ``stop_at``."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.steps: list[int] = []
        self.metrics: list[dict[str, float]] = []
        self.stop_at = stop_at

    def __call__(self, step: int, metrics: Any) -> None:
        self.steps.append(step)
        self.metrics.append(dict(metrics))
        if self.stop_at is not None and len(self.steps) == self.stop_at:
            raise StopTrial


def mixed_frame(rows: int, *, task: str, seed: int = 0, positive_rate: float | None = None,
                noise: float = 0.5) -> pd.DataFrame:
    """Two numeric and two categorical columns, with missing values in both kinds; the target uses all four."""
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    color = rng.choice(["red", "green", "blue"], size=rows)
    size = rng.choice(["S", "M", "L"], size=rows)
    score = (1.5 * x1 - x2 + np.where(color == "red", 1.5, 0.0) - np.where(size == "L", 1.0, 0.0)
             + rng.normal(scale=noise, size=rows))
    frame = pd.DataFrame({"x1": x1, "x2": x2, "color": color, "size": size})
    if task == "classification":
        cut = np.quantile(score, 1 - positive_rate) if positive_rate else 0.0
        frame["label"] = np.where(score > cut, "yes", "no")
    else:
        frame["label"] = score
    frame.loc[rng.choice(rows, rows // 12, replace=False), "x2"] = np.nan
    frame.loc[rng.choice(rows, rows // 12, replace=False), "color"] = None
    return frame


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """As the backend does before every trial: the trainers draw their estimators' seeds from numpy's."""
    np.random.seed(0)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreparedData]:
    folder = tmp_path_factory.mktemp("tables")
    tables = {"mixed_clf": mixed_frame(300, task="classification"), "mixed_reg": mixed_frame(300, task="regression"),
              "imbalanced": mixed_frame(400, task="classification", positive_rate=0.1, noise=1.5)}
    out = {}
    for name, frame in tables.items():
        frame.to_csv(folder / f"{name}.csv", index=False)
        out[name] = prepare(DataSpec(source=str(folder / f"{name}.csv"), target="label"))
    for name in ("breast_cancer", "wine", "diabetes"):
        out[name] = prepare(DataSpec(source=f"sklearn:{name}"))
    return out


def unseen_rows(prepared: PreparedData) -> pd.DataFrame:
    """Raw rows as a user sends them: a category never seen in training, and missing values of both kinds."""
    rows = prepared.raw_val.head(4).copy()
    rows["color"] = ["purple", None, "red", "green"]
    rows["x2"] = [np.nan, 0.5, np.nan, -1.0]
    return rows


# (trainer, dataset, params, metric, bound): the metric on the validation split must beat the bound.
CASES = [
    (HistGradientBoostingTrainer, "breast_cancer", {"max_iter": 40}, "val_roc_auc", 0.97),
    (HistGradientBoostingTrainer, "diabetes", {"max_iter": 25, "learning_rate": 0.05}, "val_r2", 0.2),
    (HistGradientBoostingTrainer, "mixed_clf", {"max_iter": 30, "report_every": 15}, "val_accuracy", 0.8),
    (RandomForestTrainer, "wine", {"n_estimators": 30}, "val_accuracy", 0.9),
    (RandomForestTrainer, "diabetes", {"n_estimators": 25, "min_samples_leaf": 5}, "val_r2", 0.2),
    (RandomForestTrainer, "mixed_reg", {"n_estimators": 20, "max_features": 1.0}, "val_r2", 0.6),
    (LogisticRegressionTrainer, "breast_cancer", {}, "val_roc_auc", 0.98),
    (LogisticRegressionTrainer, "mixed_clf", {"C": 0.5, "l1_ratio": 0.5}, "val_accuracy", 0.8),
    (RidgeTrainer, "diabetes", {"alpha": 1.0}, "val_r2", 0.3),
    (RidgeTrainer, "mixed_reg", {}, "val_r2", 0.7),
    (SVMTrainer, "wine", {"C": 10.0}, "val_accuracy", 0.9),
    (SVMTrainer, "diabetes", {"C": 1.0, "epsilon": 0.5}, "val_r2", 0.15),
    (SVMTrainer, "mixed_clf", {"kernel": "linear"}, "val_accuracy", 0.8),
]


@pytest.mark.parametrize(("cls", "name", "params", "metric", "bound"), CASES,
                         ids=[f"{c[0].name}-{c[1]}" for c in CASES])
def test_trainer_reports_every_metric_learns_and_its_bundle_predicts_raw_rows(
    datasets: dict[str, PreparedData], tmp_path: Path, cls: Any, name: str, params: dict[str, Any], metric: str,
    bound: float,
) -> None:
    prepared = datasets[name]
    data = prepared.dataset
    rec = Recorder()
    model = cls().fit(params, data, rec)

    if cls in (HistGradientBoostingTrainer, RandomForestTrainer):
        size = params["max_iter" if cls is HistGradientBoostingTrainer else "n_estimators"]
        every = params.get("report_every", 10)
        # steps: iterations / trees so far, every `report_every` and at the end
        assert rec.steps == [*range(every, size, every), size]
        assert (model.n_iter_ if cls is HistGradientBoostingTrainer else len(model.estimators_)) == size
    else:
        assert rec.steps == [1]
    for reported in rec.metrics:
        assert set(reported) == set(known_metrics(data.task))
        assert all(math.isfinite(v) for v in reported.values())
    last = rec.metrics[-1]
    assert last[metric] > bound
    if data.task == "classification":
        assert last["val_loss"] == pytest.approx(last["val_log_loss"], rel=1e-3)
    else:
        assert last["val_loss"] == pytest.approx(last["val_rmse"] ** 2, rel=1e-4)

    # The fitted estimator travels as skops bytes and comes back as a bundle that takes raw rows.
    packed = pack_model(model)
    assert packed is not None
    assert packed.loader == "skops"
    bundle = ModelBundle(write_bundle(tmp_path / "bundle", packed, prepared, info={}))
    expected = np.asarray(model.predict(data.X_val))
    if data.task == "classification":
        assert list(bundle.predict(prepared.raw_val)) == [data.classes[i] for i in expected]
        np.testing.assert_allclose(bundle.predict_proba(prepared.raw_val), model.predict_proba(data.X_val),
                                   rtol=1e-6)
    else:
        np.testing.assert_allclose(bundle.predict(prepared.raw_val), expected, rtol=1e-5)
    if name.startswith("mixed"):
        pred = bundle.predict(unseen_rows(prepared))
        assert len(pred) == 4
        if data.task == "classification":
            assert set(pred) <= {"yes", "no"}
        else:
            assert np.isfinite(pred.astype(float)).all()


@pytest.mark.parametrize("cls", [HistGradientBoostingTrainer, RandomForestTrainer])
def test_chunked_trainers_stop_when_report_says_so(datasets: dict[str, PreparedData], cls: Any) -> None:
    size = "max_iter" if cls is HistGradientBoostingTrainer else "n_estimators"
    rec = Recorder(stop_at=2)
    with pytest.raises(StopTrial):
        cls().fit({size: 100, "report_every": 5}, datasets["wine"].dataset, rec)
    assert rec.steps == [5, 10]  # nothing trained past the step at which the sweep stopped it


@pytest.mark.parametrize("cls", [LogisticRegressionTrainer, SVMTrainer, RandomForestTrainer])
def test_class_weight_balanced_raises_balanced_accuracy_on_imbalanced_data(
    datasets: dict[str, PreparedData], cls: Any
) -> None:
    data = datasets["imbalanced"].dataset
    assert np.bincount(data.y_train).min() < 0.15 * len(data.y_train)  # 1 "yes" in 10
    extra = {"n_estimators": 30, "min_samples_leaf": 5} if cls is RandomForestTrainer else {}
    scores = {}
    for weight in (None, "balanced"):
        rec = Recorder()
        cls().fit({"class_weight": weight, **extra}, data, rec)
        scores[weight] = rec.metrics[-1]["val_balanced_accuracy"]
    assert scores["balanced"] > scores[None] + 0.05, scores


@pytest.mark.parametrize(("cls", "name", "params", "message"), [
    (LogisticRegressionTrainer, "diabetes", {}, "logistic_regression: is a classifier; this data is regression"),
    (RidgeTrainer, "wine", {}, "ridge: is a regressor; this data is classification"),
    (RandomForestTrainer, "wine", {"n_trees": 10}, "unknown parameter 'n_trees'; it takes n_estimators, "),
    (SVMTrainer, "wine", {"gama": 0.1}, "svm: unknown parameter 'gama'; it takes C, kernel, gamma"),
    (HistGradientBoostingTrainer, "diabetes", {"class_weight": "balanced"}, "class_weight applies to classif"),
    (LogisticRegressionTrainer, "wine", {"class_weight": "auto"}, "class_weight must be 'balanced' or null"),
    (RandomForestTrainer, "wine", {"report_every": 0}, "report_every must be an integer >= 1 (got 0)"),
    (HistGradientBoostingTrainer, "wine", {"max_iter": 12.5}, "max_iter must be an integer >= 1 (got 12.5)"),
    (SVMTrainer, "wine", {"epsilon": 0.3}, "epsilon applies to regression (SVR) only"),
    (HistGradientBoostingTrainer, "wine", {"learning_rate": -1.0}, "'learning_rate' parameter of HistGradient"),
])
def test_bad_parameters_and_wrong_tasks_fail_with_one_line_naming_the_cause(
    datasets: dict[str, PreparedData], cls: Any, name: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        cls().fit(params, datasets[name].dataset, Recorder())
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="needs data"):
        cls().fit(params, None, Recorder())


def _capped(params: dict[str, Any]) -> dict[str, Any]:
    """A sampled configuration with its ensemble size capped, to keep the test short."""
    return {k: min(v, 30) if k in ("max_iter", "n_estimators") else v for k, v in params.items()}


@pytest.mark.parametrize("spec_name", SPECS)
def test_each_ready_spec_validates_and_its_configurations_train(spec_name: str) -> None:
    import optuna

    from automl.space import SearchSpace

    path = ROOT / "search_spaces" / f"{spec_name}.yaml"
    spec = load_spec(path)
    cls = resolve_trainer(spec.trainer).load_object()
    assert cls in TRAINERS
    space = SearchSpace(spec.parameters)
    assert set(space.all_names()) | set(spec.fixed) <= set(cls.DEFAULTS)
    assert spec.data is not None
    prepared = prepare(spec.data, base_dir=path.parent, seed=spec.seed)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(2):
        params = _capped({**space.suggest(study.ask()), **spec.fixed})
        rec = Recorder()
        cls().fit(params, prepared.dataset, rec)
        assert spec.metric_name in rec.metrics[-1]


@pytest.mark.parametrize("cls", TRAINERS)
def test_automl_search_space_starts_from_the_defaults_and_trains(
    datasets: dict[str, PreparedData], cls: Any
) -> None:
    for task, name in (("classification", "breast_cancer"), ("regression", "diabetes")):
        space = cls.search_space(task, n_rows=500)
        if space is None:
            assert (cls, task) in ((LogisticRegressionTrainer, "regression"), (RidgeTrainer, "classification"))
            continue
        assert set(space["parameters"]) | set(space.get("fixed", {})) <= set(cls.DEFAULTS)
        start = {**space["start"], **space.get("fixed", {})}
        for key, value in space["start"].items():  # the start point is the library's default ...
            if not (cls is RandomForestTrainer and key == "max_features"):
                assert value == cls.DEFAULTS[key], key
        rec = Recorder()
        cls().fit(_capped(start), datasets[name].dataset, rec)  # ... and trains
        assert set(rec.metrics[-1]) == set(known_metrics(task))
    assert SVMTrainer.search_space("classification", n_rows=SVMTrainer.MAX_ROWS + 1) is None


@pytest.mark.usefixtures("ray_session")
def test_sweep_of_a_mixed_csv_exports_a_model_that_predicts_raw_rows(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from automl import Sweep

    mixed_frame(300, task="classification", seed=1).to_csv(workdir / "table.csv", index=False)
    spec = {
        "name": "mixed-hgb",
        "trainer": "hist_gradient_boosting",
        "data": {"source": "table.csv", "target": "label"},
        "metric": {"name": "val_roc_auc", "goal": "maximize"},
        "method": "random",
        "budget": {"trials": 3, "max_concurrent": 2},
        "fixed": {"max_iter": 30, "report_every": 10},
        "parameters": {
            "learning_rate": {"type": "float", "low": 0.05, "high": 0.3, "log": True},
            "max_leaf_nodes": {"type": "int", "low": 4, "high": 16},
        },
    }
    result = Sweep.from_dict(spec, base_dir=workdir, workdir=workdir).run()
    assert [t.state for t in result.trials] == ["COMPLETE"] * 3
    best = result.best
    assert best is not None
    assert best.model_uri
    assert best.run_id

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(best.run_id, "val_roc_auc")
    assert [m.step for m in history] == [10, 20, 30]
    assert set(known_metrics("classification")) <= set(client.get_run(best.run_id).data.metrics)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(best.model_uri)
    raw = pd.read_csv(workdir / "table.csv")
    rows = raw.drop(columns="label").head(60).copy()
    rows.loc[0, "color"] = "purple"  # a category the model never saw
    rows.loc[1, ["x2", "size"]] = [np.nan, None]
    pred = np.asarray(model.predict(rows))
    assert set(pred) <= {"yes", "no"}
    assert (pred == raw["label"].head(60).to_numpy()).mean() > 0.8
