"""automl.metrics.evaluate gives scikit-learn's numbers (to 1e-9), under the names DESIGN.md section 2 uses."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from automl.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS, evaluate, known_metrics

TOL = 1e-9


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def classification_case(seed: int, n: int, k: int, n_true: int | None = None) -> tuple[np.ndarray, ...]:
    """Labels 0..n_true-1 in y_true (all present), predictions over 0..k-1, probabilities that sum to one."""
    rng = np.random.default_rng(seed)
    n_true = n_true or k
    y_true = np.concatenate([np.arange(n_true), rng.integers(0, n_true, n - n_true)])
    rng.shuffle(y_true)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y_true] += 1.5  # a model better than chance, with mistakes
    proba = softmax(logits)
    y_pred = proba.argmax(axis=1)
    return y_true, y_pred, proba


def sklearn_classification(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        return {
            "val_accuracy": skm.accuracy_score(y_true, y_pred),
            "val_balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
            "val_precision": skm.precision_score(y_true, y_pred, average="macro", zero_division=0),
            "val_recall": skm.recall_score(y_true, y_pred, average="macro", zero_division=0),
            "val_f1": skm.f1_score(y_true, y_pred, average="macro", zero_division=0),
        }


def assert_close(ours: dict[str, float], theirs: dict[str, float]) -> None:
    for name, expected in theirs.items():
        assert name in ours, f"{name} missing from {sorted(ours)}"
        assert isinstance(ours[name], float), name
        assert math.isclose(ours[name], float(expected), rel_tol=0, abs_tol=TOL), (name, ours[name], expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [3, 10])
def test_multiclass_matches_sklearn(seed: int, k: int) -> None:
    y_true, y_pred, proba = classification_case(seed, n=400, k=k)
    ours = evaluate("classification", y_true, y_pred, proba=proba, n_classes=k)
    expected = sklearn_classification(y_true, y_pred)
    expected["val_roc_auc"] = skm.roc_auc_score(y_true, proba, multi_class="ovr", average="macro")
    expected["val_log_loss"] = skm.log_loss(y_true, proba, labels=list(range(k)))
    assert_close(ours, expected)
    assert set(ours) == set(CLASSIFICATION_METRICS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_matches_sklearn(seed: int) -> None:
    y_true, y_pred, proba = classification_case(seed, n=300, k=2)
    ours = evaluate("classification", y_true, y_pred, proba=proba, n_classes=2)
    expected = sklearn_classification(y_true, y_pred)
    expected["val_roc_auc"] = skm.roc_auc_score(y_true, proba[:, 1])
    expected["val_log_loss"] = skm.log_loss(y_true, proba, labels=[0, 1])
    assert_close(ours, expected)


def test_binary_roc_auc_with_tied_scores_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 2, 500)
    p1 = np.clip(np.round(0.3 * y_true + 0.7 * rng.random(500), 1), 0.0, 1.0)  # many ties
    proba = np.column_stack([1.0 - p1, p1])
    ours = evaluate("classification", y_true, (p1 > 0.5).astype(int), proba=proba, n_classes=2)
    assert math.isclose(ours["val_roc_auc"], skm.roc_auc_score(y_true, p1), abs_tol=TOL)


def test_predicted_class_absent_from_y_true_follows_zero_division_0() -> None:
    # y_true uses classes 0..3 only; the model also predicts class 4 (no true rows): precision and recall
    # of class 4 are 0 and still count in the macro average, as scikit-learn does.
    y_true, _, proba = classification_case(3, n=300, k=5, n_true=4)
    y_pred = proba.argmax(axis=1)
    y_pred[:25] = 4
    ours = evaluate("classification", y_true, y_pred, proba=proba, n_classes=5)
    expected = sklearn_classification(y_true, y_pred)
    expected["val_log_loss"] = skm.log_loss(y_true, proba, labels=list(range(5)))
    assert_close(ours, expected)


def test_true_class_never_predicted_follows_zero_division_0() -> None:
    y_true, y_pred, proba = classification_case(4, n=200, k=4)
    y_pred = np.where(y_pred == 2, 1, y_pred)  # nothing predicted as class 2: its precision is 0/0
    ours = evaluate("classification", y_true, y_pred, proba=proba, n_classes=4)
    assert_close(ours, sklearn_classification(y_true, y_pred))


def test_without_probabilities_there_is_no_auc_or_log_loss() -> None:
    y_true, y_pred, _ = classification_case(5, n=100, k=3)
    ours = evaluate("classification", y_true, y_pred)
    assert_close(ours, sklearn_classification(y_true, y_pred))
    assert "val_roc_auc" not in ours
    assert "val_log_loss" not in ours


def test_roc_auc_absent_when_a_class_has_no_positive_example() -> None:
    y_true, y_pred, proba = classification_case(6, n=200, k=4, n_true=3)  # class 3 never true
    ours = evaluate("classification", y_true, y_pred, proba=proba, n_classes=4)
    assert "val_roc_auc" not in ours
    assert "val_log_loss" in ours
    assert "val_accuracy" in ours


def test_binary_roc_auc_absent_when_y_true_has_one_class() -> None:
    rng = np.random.default_rng(8)
    p1 = rng.random(50)
    y_true = np.zeros(50, dtype=int)
    ours = evaluate("classification", y_true, (p1 > 0.5).astype(int), proba=np.column_stack([1 - p1, p1]),
                    n_classes=2)
    assert "val_roc_auc" not in ours
    assert math.isclose(ours["val_accuracy"], skm.accuracy_score(y_true, p1 > 0.5), abs_tol=TOL)


def test_log_loss_survives_zero_probabilities() -> None:
    y_true = np.array([0, 1, 1])
    proba = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # one confident mistake
    ours = evaluate("classification", y_true, proba.argmax(axis=1), proba=proba, n_classes=2)
    assert math.isfinite(ours["val_log_loss"])
    assert ours["val_log_loss"] > 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.normal(3.0, 2.0, 500)
    y_pred = y_true + rng.normal(0.0, 0.7, 500)
    ours = evaluate("regression", y_true, y_pred)
    expected = {
        "val_rmse": math.sqrt(skm.mean_squared_error(y_true, y_pred)),
        "val_mae": skm.mean_absolute_error(y_true, y_pred),
        "val_r2": skm.r2_score(y_true, y_pred),
    }
    assert_close(ours, expected)
    assert set(ours) == set(REGRESSION_METRICS)


def test_regression_accepts_float32_and_lists() -> None:
    y_true = np.array([1.0, 2.0, 3.5, 4.0], dtype=np.float32)
    y_pred = [1.5, 2.0, 3.0, 5.0]
    ours = evaluate("regression", y_true, y_pred)  # type: ignore[arg-type]
    assert math.isclose(ours["val_mae"], skm.mean_absolute_error(y_true, y_pred), abs_tol=1e-6)
    assert math.isclose(ours["val_r2"], skm.r2_score(y_true, y_pred), abs_tol=1e-6)


def test_r2_absent_for_constant_targets() -> None:
    ours = evaluate("regression", np.full(10, 2.0), np.linspace(1, 3, 10))
    assert "val_r2" not in ours
    assert math.isclose(ours["val_mae"], skm.mean_absolute_error(np.full(10, 2.0), np.linspace(1, 3, 10)))


def test_known_metrics_names() -> None:
    assert known_metrics("classification") == (*CLASSIFICATION_METRICS, "train_loss", "val_loss")
    assert known_metrics("regression") == ("val_rmse", "val_mae", "val_r2", "train_loss", "val_loss")
    assert all(name.startswith(("val_", "train_")) for name in known_metrics("classification"))
