"""Greedy ensemble selection (automl.ensemble), the small-table rule and the column rules: pure, no Ray, no MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from automl.bundle import ModelBundle, pack_model, write_bundle
from automl.data import screen_columns
from automl.ensemble import EnsembleModel, blend, choose, greedy_weights, holdout_groups
from automl.final_model import refit_params, scorer
from automl.quick import SMALL_TABLE_ROWS, automl_spec, validation_rule


def accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    return float((proba.argmax(axis=1) == y).mean())


def neg_mse(y: np.ndarray, pred: np.ndarray) -> float:
    return -float(np.mean((pred - y) ** 2))


def test_greedy_selection_averages_models_whose_errors_cancel() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=400)
    a = y + 0.5 + rng.normal(scale=0.1, size=400)  # biased up
    b = y - 0.5 + rng.normal(scale=0.1, size=400)  # biased down
    c = y + rng.normal(scale=0.8, size=400)  # unbiased but noisy
    weights = greedy_weights([a, b, c], y, neg_mse)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[0] == pytest.approx(weights[1], abs=0.1)  # the two biases cancel
    assert neg_mse(y, blend([a, b, c], weights)) > max(neg_mse(y, p) for p in (a, b, c))


def test_greedy_selection_never_scores_below_the_best_single_on_its_rows() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=200)
    candidates = [rng.dirichlet(np.ones(3), size=200) for _ in range(5)]
    weights = greedy_weights(candidates, y, accuracy)
    assert accuracy(y, blend(candidates, weights)) >= max(accuracy(y, p) for p in candidates)


def test_choose_keeps_the_single_best_when_the_others_add_nothing() -> None:
    rng = np.random.default_rng(2)
    y = rng.normal(size=300)
    good = y + rng.normal(scale=0.1, size=300)
    bad = [y + rng.normal(scale=3.0, size=300) for _ in range(3)]
    choice = choose([good, *bad], y, holdout_groups(300, seed=0), neg_mse)
    assert not choice.ensemble
    assert list(choice.weights) == [1.0, 0.0, 0.0, 0.0]
    assert choice.held_out == choice.single_held_out


def test_choose_takes_the_ensemble_when_it_wins_on_held_out_groups() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=500)
    a = y + 0.6 + rng.normal(scale=0.2, size=500)
    b = y - 0.6 + rng.normal(scale=0.2, size=500)
    groups = np.repeat(np.arange(5), 100)  # k-fold predictions: each row's fold
    choice = choose([a, b], y, groups, neg_mse)
    assert choice.ensemble
    assert choice.ensemble_held_out > choice.single_held_out
    assert choice.weights[0] > 0
    assert choice.weights[1] > 0


def test_scorer_follows_the_metric_and_its_goal() -> None:
    y = np.array([0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    acc = scorer("val_accuracy", "maximize", "classification", 2)
    loss = scorer("val_log_loss", "minimize", "classification", 2)
    assert acc is not None
    assert loss is not None
    assert acc(y, proba) == pytest.approx(2 / 3)
    assert loss(y, proba) < 0  # a loss, negated: higher is better
    assert scorer("my_own_metric", "maximize", "classification", 2) is None


def test_a_refit_trains_for_the_epochs_patience_chose() -> None:
    from automl.engine.records import TrialRecord

    record = TrialRecord(number=3, params={"model": "mlp", "mlp__lr": 0.01})
    record.metrics = {"val_accuracy": 0.9, "best_epoch": 11.6}
    params = refit_params(record, {"mlp__epochs": 60, "mlp__patience": 8, "svm__C": 1.0})
    assert params["mlp__epochs"] == 12
    assert params["mlp__patience"] == 0
    assert params["mlp__lr"] == 0.01


def test_an_ensemble_bundle_round_trips_through_safe_formats(tmp_path: Path) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    X = rng.normal(size=(120, 3)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    members = [LogisticRegression().fit(X, y), HistGradientBoostingClassifier(max_iter=10).fit(X, y)]
    model = EnsembleModel(members, [0.75, 0.25], task="classification", n_classes=2, names=["a", "b"])
    expected = 0.75 * members[0].predict_proba(X) + 0.25 * members[1].predict_proba(X)
    np.testing.assert_allclose(model.predict_proba(X), expected)
    packed = pack_model(model)
    assert packed is not None
    assert packed.loader == "ensemble"
    write_bundle(tmp_path / "b", packed, None, info={})
    bundle = ModelBundle(tmp_path / "b")
    loaded = bundle.model
    assert isinstance(loaded, EnsembleModel)
    np.testing.assert_allclose(loaded.predict_proba(X), expected)
    # ONNX and TorchScript hold one network: an ensemble is refused in one line (the CLI's exit 2)
    from automl.errors import ExportError
    from automl.portable import torch_network

    with pytest.raises(ExportError, match=r"^--format onnx holds one network; the best model is an ensemble of 2 "
                                          r"models \(a, b\); use --format mlflow$"):
        torch_network(bundle, "onnx")


def test_the_small_table_rule_cross_validates_small_tables_only(tmp_path: Path) -> None:
    small = pd.Series(np.arange(300) % 2)
    assert validation_rule("classification", small) == {"validation": {"folds": 5}}
    assert validation_rule("classification", pd.Series([0] * 297 + [1] * 3)) == {"validation": {"folds": 3}}
    assert validation_rule("regression", pd.Series(np.arange(SMALL_TABLE_ROWS + 1.0))) == {}
    frame = pd.DataFrame({"x": np.arange(200.0), "y": np.arange(200) % 2})
    frame.to_csv(tmp_path / "t.csv", index=False)
    raw = automl_spec("t.csv", "y", base_dir=tmp_path)
    assert raw["data"]["validation"] == {"folds": 5}
    assert raw["final_model"] == {"refit": True, "ensemble": True}


def test_free_text_and_named_ids_are_left_out_with_a_readable_reason() -> None:
    rng = np.random.default_rng(5)
    rows = 400
    words = ["good", "bad", "service", "slow", "fast", "friendly", "late", "again", "never", "great"]
    frame = pd.DataFrame({
        "PassengerId": rng.permutation(rows) * 7 + 100,  # distinct, not consecutive, named as an ID
        "comment": [" ".join(rng.choice(words, size=6)) for _ in range(rows)],
        "paid": rng.permutation(rows) * 3 + 1,  # distinct integers, not 1..n, no ID name: kept
        "city": rng.choice([f"c{i}" for i in range(40)], size=rows),  # a category of 40 values: capped, kept
    })
    dropped, notes = screen_columns(frame)
    assert dropped == ["PassengerId", "comment"]
    assert "identifier" in notes[0]
    assert "free text" in notes[1]


def test_an_ensemble_without_refit_is_refused_with_the_field_path() -> None:
    from automl.errors import SpecError
    from automl.spec import spec_from_dict

    raw = {"trainer": "ridge", "data": {"source": "sklearn:diabetes"}, "metric": "val_r2",
           "parameters": {"alpha": {"type": "float", "low": 0.1, "high": 10.0}}}
    assert spec_from_dict({**raw, "final_model": {"refit": True, "ensemble": True}}).final_model.ensemble
    with pytest.raises(SpecError, match=r"final_model\.ensemble: .*refit: true"):
        spec_from_dict({**raw, "final_model": {"ensemble": True}})
    with pytest.raises(SpecError, match=r"final_model: .*data"):
        spec_from_dict({**{k: v for k, v in raw.items() if k != "data"}, "final_model": {"refit": True}})
