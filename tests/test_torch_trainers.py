"""The torch trainers (mlp, cnn) trained for real on small datasets, called directly and through a sweep."""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from automl.data import prepare
from automl.metrics import known_metrics
from automl.spec import DataSpec
from automl.trainer import Dataset
from trainers.cnn import CNNModel, CNNTrainer, make_augment
from trainers.mlp import MLPTrainer

FAST = {"width": 32, "lr": 1e-2}  # a small MLP that learns digits in a few epochs


class Recorder:
    """A ``report`` that keeps what the trainer reported."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.metrics: list[dict[str, float]] = []

    def __call__(self, step: int, metrics: Any) -> None:
        self.steps.append(step)
        self.metrics.append(dict(metrics))


def fit(trainer: Any, params: dict[str, Any], data: Dataset, seed: int = 0) -> tuple[Any, Recorder]:
    torch.manual_seed(seed)
    rec = Recorder()
    return trainer.fit(params, data, rec), rec


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Train on one thread, as trials in Ray workers do: these networks are too small to gain from more, and on
    a busy machine idle threads spinning for work slow small steps down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return prepare(DataSpec(source="sklearn:digits")).dataset


@pytest.fixture(scope="module")
def diabetes() -> Dataset:
    return prepare(DataSpec(source="sklearn:diabetes")).dataset


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """Two classes, 9 to 1, written to a CSV with text labels as a user's file would be."""
    import pandas as pd
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=1000, n_features=8, n_informative=4, weights=[0.9, 0.1],
                               class_sep=0.6, flip_y=0.02, random_state=0)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(8)])
    frame["label"] = np.where(y == 1, "rare", "common")
    path = tmp_path_factory.mktemp("imbalanced") / "imbalanced.csv"
    frame.to_csv(path, index=False)
    return prepare(DataSpec(source=str(path), target="label")).dataset


def assert_full_reports(rec: Recorder, task: str) -> None:
    assert rec.steps == list(range(1, len(rec.steps) + 1))
    for metrics in rec.metrics:
        assert set(known_metrics(task)) <= set(metrics)
        assert all(math.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------- mlp


@pytest.mark.parametrize("options", [
    {},
    {"batch_norm": True, "batch_size": 57},  # 1437 rows: a last batch of one row, which batch norm cannot take
    {"lr_schedule": "step"},
    {"lr_schedule": "cosine"},
    {"lr_schedule": "plateau", "lr_patience": 0},
    {"grad_clip": 0.5},
    {"l1": 1e-5, "l2": 1e-4},
    {"label_smoothing": 0.1},
    {"class_weight": "balanced"},
    {"loss": "cross_entropy", "optimizer": "sgd", "lr_schedule": "cosine", "batch_norm": True, "dropout": 0.1},
])
def test_each_mlp_option_trains_on_digits_and_reports_every_metric(digits: Dataset, options: dict) -> None:
    model, rec = fit(MLPTrainer(), {**FAST, "epochs": 4, **options}, digits)
    assert_full_reports(rec, "classification")
    assert len(rec.steps) == 4
    assert rec.metrics[-1]["val_accuracy"] >= 0.8
    assert np.mean(model.predict(digits.X_val) == digits.y_val) == pytest.approx(rec.metrics[-1]["val_accuracy"])


@pytest.mark.parametrize("options", [
    {},
    {"loss": "huber"},
    {"loss": "huber", "huber_delta": 0.5, "l2": 1e-3, "lr_schedule": "step", "batch_norm": True},
])
def test_mlp_regression_losses_train_and_report_every_metric(diabetes: Dataset, options: dict) -> None:
    model, rec = fit(MLPTrainer(), {**FAST, "epochs": 4, **options}, diabetes)
    assert_full_reports(rec, "regression")
    assert rec.metrics[-1]["val_r2"] > 0.2  # predicting the mean scores 0
    rmse = float(np.sqrt(np.mean((model.predict(diabetes.X_val) - diabetes.y_val) ** 2)))
    assert rmse == pytest.approx(rec.metrics[-1]["val_rmse"], rel=1e-4)


def test_a_step_schedule_lowers_the_learning_rate(digits: Dataset) -> None:
    # Decayed to almost nothing after epoch 1, the network stops changing; without the schedule it goes on.
    params = {**FAST, "epochs": 3, "lr_step_size": 1, "lr_gamma": 1e-6}
    _, frozen = fit(MLPTrainer(), {**params, "lr_schedule": "step"}, digits)
    _, free = fit(MLPTrainer(), {**params, "lr_schedule": "none"}, digits)
    assert frozen.metrics[2]["val_loss"] == pytest.approx(frozen.metrics[1]["val_loss"], abs=1e-4)
    assert free.metrics[2]["val_loss"] < free.metrics[1]["val_loss"] - 0.01


def test_patience_stops_early_and_returns_the_best_epochs_model(digits: Dataset) -> None:
    # A high learning rate: val_loss bottoms out within a few epochs and then wobbles.
    model, rec = fit(MLPTrainer(), {"width": 64, "lr": 2e-2, "epochs": 40, "patience": 2}, digits)
    assert_full_reports(rec, "classification")
    per_epoch, final = rec.metrics[:-1], rec.metrics[-1]
    losses = [m["val_loss"] for m in per_epoch]
    best = int(np.argmin(losses)) + 1
    assert len(per_epoch) < 40  # stopped early
    assert len(per_epoch) == best + 2  # after `patience` epochs without a lower val_loss
    assert [m["best_epoch"] for m in per_epoch][-1] == best
    # The last report (what the sweep takes as the trial's value) repeats the best epoch's metrics.
    assert final == per_epoch[best - 1]
    assert final["best_epoch"] == best
    # The returned model is the best epoch's, not the last one's.
    proba = model.predict_proba(digits.X_val)
    again = digits.evaluate(proba.argmax(axis=1), proba=proba)
    assert again["val_accuracy"] == final["val_accuracy"]
    assert again["val_log_loss"] == pytest.approx(final["val_log_loss"], rel=1e-5)
    assert again["val_log_loss"] < per_epoch[-1]["val_log_loss"]


def test_label_smoothing_softens_the_probabilities(digits: Dataset) -> None:
    plain, _ = fit(MLPTrainer(), {**FAST, "epochs": 3}, digits)
    smooth, _ = fit(MLPTrainer(), {**FAST, "epochs": 3, "label_smoothing": 0.3}, digits)
    confidence = {name: m.predict_proba(digits.X_val).max(axis=1).mean() for name, m in
                  (("plain", plain), ("smooth", smooth))}
    assert confidence["smooth"] < confidence["plain"] - 0.1


def test_class_weight_balanced_raises_the_recall_of_the_rare_class(imbalanced: Dataset) -> None:
    rare = imbalanced.classes.index("rare")
    recall = {}
    for weight in (None, "balanced"):
        model, rec = fit(MLPTrainer(), {**FAST, "epochs": 5, "class_weight": weight}, imbalanced)
        assert_full_reports(rec, "classification")
        recall[weight] = float(np.mean(model.predict(imbalanced.X_val)[imbalanced.y_val == rare] == rare))
    assert recall["balanced"] > recall[None] + 0.2


@pytest.mark.parametrize(("trainer", "params", "data", "message"), [
    ("mlp", {"widht": 3}, "digits", "unknown parameter 'widht'"),
    ("mlp", {"loss": "mse"}, "digits", "loss mse is for regression"),
    ("mlp", {"loss": "cross_entropy"}, "diabetes", "loss cross_entropy is for classification"),
    ("mlp", {"class_weight": "balanced"}, "diabetes", "class_weight balanced needs a classification task"),
    ("mlp", {"lr_schedule": "exponential"}, "digits", "lr_schedule must be one of"),
    ("mlp", {"patience": -1}, "digits", "patience must be an integer >= 0"),
    ("cnn", {"kernel_size": 4}, "digits", "kernel_size must be odd"),
    ("cnn", {"pooling": "mean"}, "digits", "pooling must be one of"),
    ("cnn", {}, "diabetes", "the data are not images"),
])
def test_bad_parameters_fail_with_one_line_naming_the_parameter(
    trainer: str, params: dict, data: str, message: str, request: pytest.FixtureRequest
) -> None:
    cls = MLPTrainer if trainer == "mlp" else CNNTrainer
    with pytest.raises(ValueError, match=message) as info:
        cls().fit({"epochs": 1, **params}, request.getfixturevalue(data), Recorder())
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------- cnn

CNN_FAST = {"channels": 16, "depth": 2, "lr": 3e-3, "epochs": 4}


@pytest.fixture(scope="module")
def cnn_digits(digits: Dataset) -> tuple[CNNModel, Recorder]:
    return fit(CNNTrainer(), {**CNN_FAST, "augment_shift": 1}, digits)


@pytest.mark.parametrize("shift", [0, 1])
def test_cnn_learns_digits_as_images_with_and_without_augmentation(
    digits: Dataset, cnn_digits: tuple[CNNModel, Recorder], shift: int
) -> None:
    model, rec = cnn_digits if shift else fit(CNNTrainer(), CNN_FAST, digits)
    assert_full_reports(rec, "classification")
    assert rec.metrics[-1]["val_accuracy"] >= 0.9
    assert model.config["image_shape"] == [1, 8, 8]  # digits' 64 pixels, read as one square channel


def test_augmentation_shifts_and_flips_each_image_on_its_own() -> None:
    flat = torch.arange(6 * 4 * 5, dtype=torch.float32).reshape(6, 20)  # six 1x4x5 images, every pixel distinct
    torch.manual_seed(0)
    flipped = make_augment((1, 4, 5), shift=0, flip=True)(flat).reshape(6, 4, 5)
    original = flat.reshape(6, 4, 5)
    mirrored = [bool(torch.equal(flipped[i], original[i].flip(1))) for i in range(6)]
    assert all(mirrored[i] or torch.equal(flipped[i], original[i]) for i in range(6))
    assert 0 < sum(mirrored) < 6
    shifted = make_augment((1, 4, 5), shift=1, flip=False)(flat).reshape(6, 4, 5)
    padded = torch.nn.functional.pad(original[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    offsets = []
    for i in range(6):
        found = [(dy, dx) for dy in range(3) for dx in range(3)
                 if torch.equal(shifted[i], padded[i, dy:dy + 4, dx:dx + 5])]
        assert found, f"image {i} is not a shift of its original"
        offsets.append(found[0])
    assert len(set(offsets)) > 1
    assert make_augment((1, 4, 5), shift=0, flip=False) is None


def test_cnn_uses_the_datasets_image_shape(digits: Dataset) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3 * 4 * 6)).astype(np.float32)
    colour = dataclasses.replace(digits, X_train=x[:30], y_train=np.arange(30) % 2, X_val=x[30:],
                                 y_val=np.arange(10) % 2, feature_names=[f"p{i}" for i in range(72)],
                                 classes=[0, 1], image_shape=(3, 4, 6))
    model, _ = fit(CNNTrainer(), {"channels": 4, "epochs": 1, "augment_flip": True, "augment_shift": 1}, colour)
    assert model.config["image_shape"] == [3, 4, 6]
    assert model.predict_proba(x[30:]).shape == (10, 2)
    with pytest.raises(ValueError, match="does not match the 72 features"):
        CNNTrainer().fit({"epochs": 1}, dataclasses.replace(colour, image_shape=(1, 8, 8)), Recorder())


def test_cnn_torch_module_saves_scripts_and_exports_like_the_model(
    cnn_digits: tuple[CNNModel, Recorder], digits: Dataset, tmp_path: Path
) -> None:
    import onnxruntime

    model = cnn_digits[0]
    X = digits.X_val[:9]
    expected = model.predict_proba(X)
    module = model.torch_module()
    with torch.no_grad():
        assert np.allclose(module(torch.from_numpy(X)).numpy(), expected, atol=1e-6)
        assert np.allclose(torch.jit.script(module)(torch.from_numpy(X)).numpy(), expected, atol=1e-6)
    # ONNX with a dynamic batch axis: traced on 2 rows, run on 9.
    onnx_file = tmp_path / "cnn.onnx"
    torch.onnx.export(module, (torch.from_numpy(X[:2]),), str(onnx_file), input_names=["x"], output_names=["p"],
                      dynamic_axes={"x": {0: "n"}, "p": {0: "n"}}, dynamo=False)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"x": X})[0], expected, atol=1e-5)
    # The saved model (safetensors + JSON) predicts the same.
    (tmp_path / "model").mkdir()
    model.save(tmp_path / "model")
    assert np.array_equal(CNNModel.load(tmp_path / "model").predict_proba(X), expected)


@pytest.mark.parametrize("spec_name", ["digits_mlp", "digits_cnn"])
def test_ready_specs_name_only_real_parameters_and_their_configurations_train(spec_name: str) -> None:
    import optuna

    from automl.space import SearchSpace
    from automl.spec import load_spec
    from automl.trainer import resolve_trainer

    path = Path(__file__).resolve().parents[1] / "search_spaces" / f"{spec_name}.yaml"
    spec = load_spec(path)
    cls = resolve_trainer(spec.trainer).load_object()
    space = SearchSpace(spec.parameters)
    assert set(space.all_names()) | set(spec.fixed) <= set(importlib.import_module(cls.__module__).DEFAULTS)
    assert spec.data is not None
    data = prepare(spec.data, base_dir=path.parent, seed=spec.seed).dataset
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    params = {**space.suggest(study.ask()), **spec.fixed, "epochs": 1}
    _, rec = fit(cls(), params, data)
    assert spec.metric_name in rec.metrics[-1]


# --------------------------------------------------------------------------------------------- sweep


@pytest.mark.usefixtures("ray_session")
def test_cnn_sweep_runs_end_to_end_and_its_best_model_predicts_raw_rows(workdir: Path) -> None:
    import sklearn.datasets

    from automl import Sweep
    from automl.export import predict

    spec = {
        "name": "digits-cnn-small",
        "trainer": "cnn",
        "data": {"source": "sklearn:digits"},
        "metric": {"name": "val_accuracy", "goal": "maximize"},
        "method": "random",
        "budget": {"trials": 2, "max_concurrent": 2},
        "seed": 0,
        "fixed": {"epochs": 3, "channels": 8, "patience": 2},
        "parameters": {
            "lr": {"type": "float", "low": 2e-3, "high": 1e-2, "log": True},
            "augment_shift": {"type": "int", "low": 0, "high": 1},
        },
    }
    result = Sweep.from_dict(spec, workdir=workdir).run()
    assert [t.state for t in result.trials] == ["COMPLETE"] * 2
    assert result.best is not None
    assert result.best.value > 0.8
    assert {"val_roc_auc", "train_loss", "val_loss", "best_epoch"} <= set(result.best.metrics)
    out = result.export(workdir / "best", format="mlflow")
    frame = sklearn.datasets.load_digits(as_frame=True).frame.head(200)
    predicted = predict(str(out), frame.drop(columns="target"))["prediction"].to_numpy()
    assert np.mean(predicted == frame["target"].to_numpy()) > 0.8
