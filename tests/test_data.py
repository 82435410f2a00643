"""Data: files, bundled datasets and image folders -> preprocessed splits or k folds; the bad-data errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automl.data import infer_task, prepare
from automl.engine.worker import fit_folds
from automl.errors import DataError, ExportError, SpecError
from automl.spec import DataSpec, spec_from_dict
from automl.trainer import Dataset, StopTrial

STORE = ("mlflow.db", "mlartifacts", ".automl", "mlruns")


def data_spec(**fields: Any) -> DataSpec:
    return DataSpec.model_validate(fields)


def mixed_frame(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Numbers with gaps, a text column with a gap, and a text target that depends on both."""
    rng = np.random.default_rng(seed)
    x = rng.normal(10.0, 3.0, n)
    colour = rng.choice(["red", "green", "blue"], n).astype(object)
    x[::7] = np.nan
    colour[::11] = None
    label = np.where((np.nan_to_num(x, nan=10.0) > 10) ^ (colour == "red"), "yes", "no")
    return pd.DataFrame({"x": x, "colour": colour, "label": label})


# --------------------------------------------------------------------------------------------- tables


def test_csv_and_parquet_give_the_same_data_and_preprocessing_is_fitted_on_the_training_rows(tmp_path: Path) -> None:
    frame = mixed_frame()
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet", index=False)
    csv = prepare(data_spec(source="d.csv", target="label"), base_dir=tmp_path, seed=1)
    pq = prepare(data_spec(source=str(tmp_path / "d.parquet"), target="label"), seed=1)
    assert np.array_equal(csv.dataset.X_train, pq.dataset.X_train)
    assert np.array_equal(csv.dataset.y_val, pq.dataset.y_val)

    ds = csv.dataset
    assert ds.task == "classification"
    assert ds.classes == ["no", "yes"]
    assert csv.columns == ["x", "colour"]
    assert ds.feature_names == ["x", "colour_blue", "colour_green", "colour_red"]
    assert ds.X_train.dtype == np.float32
    assert not np.isnan(ds.X_train).any()
    # Imputation and scaling learnt from the training rows only, never from the validation rows.
    train_rows = frame.drop(index=csv.raw_val.index)
    num = csv.preprocessor.named_transformers_["num"]
    assert num.named_steps["impute"].statistics_[0] == pytest.approx(train_rows["x"].median())
    assert num.named_steps["scale"].mean_[0] == pytest.approx(train_rows["x"].fillna(train_rows["x"].median()).mean())
    assert csv.preprocessor.transform(csv.raw_val) == pytest.approx(ds.X_val)
    # A category never seen in training is tolerated at predict time: all its one-hot columns are 0.
    unseen = csv.preprocessor.transform(pd.DataFrame({"x": [1.0], "colour": ["purple"]}))
    assert unseen[0, 1:].tolist() == [0.0, 0.0, 0.0]


def test_validation_split_is_stratified_and_follows_the_seed() -> None:
    spec = data_spec(source="sklearn:iris", validation={"fraction": 0.2})
    first = prepare(spec, seed=0)
    assert np.bincount(first.dataset.y_val).tolist() == [10, 10, 10]
    assert len(first.dataset.y_train) == 120
    assert first.folds is None
    assert np.array_equal(prepare(spec, seed=0).dataset.X_val, first.dataset.X_val)
    assert not np.array_equal(prepare(spec, seed=1).dataset.X_val, first.dataset.X_val)


def test_bundled_datasets_name_their_target_and_digits_rows_are_images() -> None:
    digits = prepare(data_spec(source="sklearn:digits"))
    assert digits.dataset.image_shape == (1, 8, 8)
    assert digits.dataset.n_features == 64
    assert digits.dataset.n_classes == 10
    assert digits.dataset.X_train.mean(axis=0) == pytest.approx(0.0, abs=1e-5)  # standardised, as before
    diabetes = prepare(data_spec(source="sklearn:diabetes"))
    assert diabetes.dataset.task == "regression"
    assert diabetes.dataset.image_shape is None
    assert diabetes.dataset.y_train.dtype == np.float32


@pytest.mark.parametrize(("values", "task"), [
    (["a", "b"] * 10, "classification"),
    ([True, False] * 10, "classification"),
    (list(range(20)) * 2, "classification"),  # 20 distinct whole numbers: class labels
    ([float(v) for v in range(3)] * 5, "classification"),  # 0.0, 1.0, 2.0 are whole numbers too
    (list(range(21)) * 2, "regression"),  # 21 distinct: a count, not labels
    ([0.5, 1.5, 2.0] * 5, "regression"),
])
def test_task_inference_rule(values: list[Any], task: str) -> None:
    assert infer_task(pd.Series(values)) == task


def test_data_task_overrides_the_inferred_task(tmp_path: Path) -> None:
    frame = pd.DataFrame({"f": np.arange(40.0), "y": np.arange(40) % 5})
    frame.to_csv(tmp_path / "d.csv", index=False)
    assert prepare(data_spec(source="d.csv", target="y"), base_dir=tmp_path).dataset.task == "classification"
    regression = prepare(data_spec(source="d.csv", target="y", task="regression"), base_dir=tmp_path).dataset
    assert regression.task == "regression"
    assert regression.classes == []


# --------------------------------------------------------------------------------------------- wide text columns


def id_frame(n: int = 5000, seed: int = 0) -> pd.DataFrame:
    """A row number (in any order), a unique text ID, a code of 300 values, a colour and a number; the label
    depends on the code and the number only."""
    rng = np.random.default_rng(seed)
    code = rng.integers(0, 300, n)
    x = rng.normal(size=n)
    frame = pd.DataFrame({
        "row_id": np.arange(1, n + 1),
        "uid": [f"u{v:07d}" for v in rng.permutation(10**6)[:n]],
        "code": [f"c{v}" for v in code],
        "colour": rng.choice(["red", "green", "blue"], n),
        "x": x,
        "label": np.where(x + (code < 100) > 0.5, "yes", "no"),
    })
    return frame.sample(frac=1.0, random_state=seed)


def test_id_like_and_row_number_columns_are_dropped_and_wide_text_columns_capped(tmp_path: Path) -> None:
    from automl.bundle import ModelBundle, pack_model, write_bundle
    from automl.data import MAX_CATEGORIES
    from trainers.sklearn_models import LogisticRegressionTrainer

    id_frame().to_csv(tmp_path / "ids.csv", index=False)
    prepared = prepare(data_spec(source="ids.csv", target="label"), base_dir=tmp_path)
    ds = prepared.dataset
    # x, the 3 colours, and the code's most frequent values with one column shared by the rest: one-hot encoding
    # everything gave 1 + 5000 + 300 + 3 dense columns (200k IDs asked for 191 GiB).
    assert ds.n_features == 1 + 3 + MAX_CATEGORIES
    assert ds.X_train.shape == (4000, 34)
    assert "code_infrequent_sklearn" in ds.feature_names
    assert not [name for name in ds.feature_names if name.startswith(("uid", "row_id"))]
    assert prepared.notes == [
        "dropped 'row_id' (a row number: the integers 1 to 5000, each once)",
        "dropped 'uid' (ID-like: 5000 distinct values in 5000 rows)",
        f"one-hot capped at {MAX_CATEGORIES} categories: 'code' (300 distinct); the rarer values and values unseen "
        "in training share one column",
    ]
    # The input contract is unchanged: an exported model takes the file's raw rows, dropped columns included.
    assert prepared.columns == ["row_id", "uid", "code", "colour", "x"]

    model = LogisticRegressionTrainer().fit({}, ds, lambda step, metrics: None)
    packed = pack_model(model)
    assert packed is not None
    bundle = ModelBundle(write_bundle(tmp_path / "bundle", packed, prepared, info={}))
    assert list(bundle.predict(prepared.raw_val)) == [ds.classes[i] for i in model.predict(ds.X_val)]
    rows = prepared.raw_val.head(4).copy()
    renamed = rows.assign(uid=["new-1", "new-2", "new-3", "new-4"], row_id=[5001, 5002, 5003, -7])
    assert (bundle.predict(renamed) == bundle.predict(rows)).all()  # an ID, known or new, changes nothing
    unseen = rows.assign(code=["never-seen", "c-1", None, "c42"])
    features = bundle.features(unseen)
    rare = ds.feature_names.index("code_infrequent_sklearn")
    assert features[:2, rare].tolist() == [1.0, 1.0]  # unseen values share the rare values' column
    assert set(bundle.predict(unseen)) <= {"yes", "no"}


def test_a_table_of_only_identifiers_is_refused_in_one_line(tmp_path: Path) -> None:
    frame = pd.DataFrame({"n": range(100), "name": [f"person {i}" for i in range(100)], "y": ["a", "b"] * 50})
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"^data\.source: every feature column is an identifier or a row number "
                       r"\(dropped 'n' \(a row number: the integers 0 to 99, each once\)\)"):
        prepare(data_spec(source="d.csv", target="y"), base_dir=tmp_path)


@pytest.mark.parametrize("name", ["digits", "iris", "wine", "breast_cancer", "diabetes"])
def test_bundled_datasets_keep_every_column(name: str) -> None:
    prepared = prepare(data_spec(source=f"sklearn:{name}"))
    assert prepared.notes == []  # no number taken for a row number, no text column
    assert prepared.dataset.feature_names == prepared.columns


def test_small_tables_and_few_categories_keep_their_columns(tmp_path: Path) -> None:
    frame = mixed_frame(120).assign(rank=np.arange(120), city=[f"city{i % 25}" for i in range(120)])
    frame.to_csv(tmp_path / "d.csv", index=False)
    prepared = prepare(data_spec(source="d.csv", target="label"), base_dir=tmp_path)
    assert "rank" not in prepared.dataset.feature_names  # 0..119 each once: a row number
    assert sum(name.startswith("city_") for name in prepared.dataset.feature_names) == 25
    assert prepared.notes == ["dropped 'rank' (a row number: the integers 0 to 119, each once)"]
    small = pd.DataFrame({"n": np.arange(30), "y": ["a", "b", "c"] * 10})  # 30 rows: may be a count, kept
    small.to_csv(tmp_path / "small.csv", index=False)
    assert prepare(data_spec(source="small.csv", target="y"), base_dir=tmp_path).notes == []


# --------------------------------------------------------------------------------------------- k-fold


def test_k_fold_partitions_the_rows_and_each_fold_has_its_own_preprocessing(tmp_path: Path) -> None:
    frame = mixed_frame(90)
    frame.to_csv(tmp_path / "d.csv", index=False)
    prepared = prepare(data_spec(source="d.csv", target="label", validation={"folds": 3}), base_dir=tmp_path,
                       seed=4)
    folds = prepared.folds
    assert folds is not None
    assert len(folds) == 3
    assert prepared.dataset is folds[0]
    assert prepared.trainer_data is folds
    # Every row is validated exactly once; class shares are kept in each fold (stratified).
    assert sum(len(f.y_val) for f in folds) == 90
    assert all(len(f.y_train) + len(f.y_val) == 90 for f in folds)
    share = (frame["label"] == "yes").mean()
    assert all(abs(f.y_val.mean() - share) < 0.05 for f in folds)
    # Each fold standardised with its own training part: its training features have mean 0, and the folds'
    # scalings differ; the exported preprocessor is fold 1's.
    for fold in folds:
        assert fold.X_train[:, 0].mean() == pytest.approx(0.0, abs=1e-5)
    assert len({round(float(f.X_val[:, 0].mean()), 6) for f in folds}) == 3
    assert prepared.preprocessor.transform(prepared.raw_val) == pytest.approx(folds[0].X_val)

    # Regression folds are plain (shuffled) k-fold; too many folds is a one-line DataError.
    reg = prepare(data_spec(source="sklearn:diabetes", validation={"folds": 4}), seed=0)
    assert reg.folds is not None
    assert sorted(len(f.y_val) for f in reg.folds) == [110, 110, 111, 111]
    with pytest.raises(DataError, match=r"data\.validation\.folds: cannot split 90 rows into 100 folds"):
        prepare(data_spec(source="d.csv", target="label", validation={"folds": 100, "stratify": False}),
                base_dir=tmp_path)


def _steps_trainer(steps_by_fold: dict[int, int]) -> Any:
    """Reports val_score = fold size + step/10 for as many steps as its fold is given: a real, checkable value."""
    def train(params: dict[str, Any], data: Dataset, report: Any) -> str:
        fold = len(calls) + 1
        calls.append(fold)
        for step in range(1, steps_by_fold.get(fold, 3) + 1):
            report(step, {"val_score": float(len(data.y_val)) + step / 10, "extra": 1.0})
        return f"model of fold {fold}"

    calls: list[int] = []
    return train


def test_fit_folds_reports_the_mean_per_common_step_and_fold_values_at_the_end() -> None:
    folds = prepare(data_spec(source="sklearn:diabetes", validation={"folds": 4}), seed=0).folds
    assert folds is not None
    sizes = [len(f.y_val) for f in folds]
    reports: list[tuple[int, dict[str, float]]] = []
    # Fold 3 stops after 2 steps: only the steps every fold reached are reported.
    model = fit_folds(_steps_trainer({3: 2}), {}, folds, lambda s, m: reports.append((s, dict(m))), 0,
                      lambda: False)
    assert model == "model of fold 1"
    assert [s for s, _ in reports] == [1, 2]
    assert reports[0][1] == {"val_score": pytest.approx(np.mean(sizes) + 0.1), "extra": 1.0}
    last = reports[-1][1]
    assert last["val_score"] == pytest.approx(np.mean(sizes) + 0.2)
    assert [last[f"val_score_fold{i}"] for i in (1, 2, 3, 4)] == pytest.approx([n + 0.2 for n in sizes])


def test_fit_folds_stops_on_request_without_reporting() -> None:
    folds = prepare(data_spec(source="sklearn:iris", validation={"folds": 3}), seed=0).folds
    assert folds is not None
    asked = []

    def stop_after_four() -> bool:  # the runner's stop set, seen from the trial: stop requested mid fold 2
        asked.append(1)
        return len(asked) > 4

    reports: list[Any] = []
    with pytest.raises(StopTrial):
        fit_folds(_steps_trainer({}), {}, folds, lambda s, m: reports.append(s), 0, stop_after_four)
    assert reports == []  # buffered reports of an unfinished k-fold trial are never sent


# --------------------------------------------------------------------------------------------- images


def write_images(root: Path, classes: dict[str, tuple[int, int]], n: int = 6, size: int = 8, seed: int = 0) -> None:
    """One subfolder per class of grayscale PNGs whose pixels lie in the class's own range."""
    rng = np.random.default_rng(seed)
    for name, (low, high) in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(low, high, (size, size), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")


def test_image_folder_loads_grayscale_pixels_as_passthrough_columns(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", {"dark": (0, 100), "light": (150, 256)})
    (tmp_path / "imgs" / "light" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    prepared = prepare(data_spec(source="imgs"), base_dir=tmp_path, seed=0)
    ds = prepared.dataset
    assert ds.task == "classification"
    assert ds.classes == ["dark", "light"]
    assert ds.image_shape == (1, 8, 8)
    assert prepared.columns[:2] == ["px_0", "px_1"]
    assert len(prepared.columns) == 64
    assert ds.feature_names == prepared.columns
    X = np.vstack([ds.X_train, ds.X_val])
    y = np.concatenate([ds.y_train, ds.y_val])
    assert len(y) == 12
    assert X.min() >= 0.0
    assert X.max() <= 1.0
    assert X[y == 0].max() < 100 / 255 + 1e-6
    assert X[y == 1].min() >= 150 / 255 - 1e-6
    # The exported preprocessor passes raw pixel columns through unchanged.
    assert prepared.preprocessor.transform(prepared.raw_val) == pytest.approx(ds.X_val)
    first = np.asarray(Image.open(tmp_path / "imgs" / "dark" / "0.png"), dtype=np.float32).ravel() / 255
    assert any(np.allclose(row, first) for row in X)


def test_image_folder_with_colour_and_mixed_sizes_is_rgb_chw_at_the_common_size(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", {"a": (0, 100), "b": (150, 256)}, n=3)
    Image.new("RGB", (8, 8), (255, 0, 51)).save(tmp_path / "imgs" / "a" / "red.png")
    Image.new("L", (16, 16), 200).save(tmp_path / "imgs" / "b" / "big.png")  # resized to 8x8
    prepared = prepare(data_spec(source="imgs", validation={"folds": 2}), base_dir=tmp_path, seed=0)
    assert prepared.folds is not None
    ds = prepared.dataset
    assert ds.image_shape == (3, 8, 8)
    assert ds.n_features == 192
    X = np.vstack([ds.X_train, ds.X_val])
    red = [row for row in X if np.allclose(row[:64], 1.0)]
    assert len(red) == 1  # C-H-W: all red values, then all green, then all blue
    assert np.allclose(red[0][64:128], 0.0)
    assert np.allclose(red[0][128:], 51 / 255)
    assert sum(np.allclose(row, 200 / 255) for row in X) == 1


def test_image_folder_errors(tmp_path: Path) -> None:
    write_images(tmp_path / "one", {"cat": (0, 10)}, n=2)
    with pytest.raises(DataError, match=r"1 class subfolder \(cat\).*at least two"):
        prepare(data_spec(source="one"), base_dir=tmp_path)
    write_images(tmp_path / "broken", {"cat": (0, 10)}, n=2)
    (tmp_path / "broken" / "dog").mkdir()
    (tmp_path / "broken" / "dog" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken/dog has no readable images"):
        prepare(data_spec(source="broken"), base_dir=tmp_path)
    write_images(tmp_path / "two", {"cat": (0, 10), "dog": (0, 10)}, n=2)
    with pytest.raises(DataError, match=r"data\.task: an image folder is a classification task"):
        prepare(data_spec(source="two", task="regression"), base_dir=tmp_path)


# --------------------------------------------------------------------------------------------- the spec


def test_folds_must_be_at_least_two_and_exclude_early_stopping() -> None:
    base = {"trainer": "mlp", "metric": "val_accuracy", "parameters": {"lr": {"type": "float", "low": 0.1,
                                                                              "high": 0.2}}}
    with pytest.raises(SpecError, match=r"data\.validation\.folds"):
        spec_from_dict({**base, "data": {"source": "sklearn:iris", "validation": {"folds": 1}}})
    with pytest.raises(SpecError, match=r"early_stopping: .*data\.validation\.folds.*early_stopping: none"):
        spec_from_dict({**base, "data": {"source": "sklearn:iris", "validation": {"folds": 3}},
                        "early_stopping": "asha"})
    spec = spec_from_dict({**base, "data": {"source": "sklearn:iris", "validation": {"folds": 3}}})
    assert spec.data is not None
    assert spec.data.validation.folds == 3


# --------------------------------------------------------------------------------------------- the CLI

SPEC = """\
trainer: mlp
metric: val_accuracy
data: {DATA}
parameters:
  lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
"""


def _write_files(root: Path, case: str) -> str:
    """The case's data files in ``root``; returns the spec's ``data`` mapping."""
    if case == "not-csv-nor-parquet":
        (root / "d.txt").write_text("a,b\n1,2\n")
        return "{source: d.txt, target: b}"
    if case == "empty-file":
        (root / "d.csv").write_text("")
        return "{source: d.csv, target: b}"
    if case == "image-folder-one-class":
        write_images(root / "imgs", {"cat": (0, 50)}, n=2)
        return "{source: imgs}"
    if case == "early-stopping-with-folds":
        return "{source: sklearn:iris, validation: {folds: 3}}\nearly_stopping: asha"
    frames = {
        "missing-target": pd.DataFrame({"a": [1, 2], "b": [3, 4]}),
        "one-class": pd.DataFrame({"a": [1, 2, 3], "y": ["x", "x", "x"]}),
        "text-regression-target": pd.DataFrame({"a": [1, 2, 3], "y": ["p", "q", "r"]}),
    }
    if case in frames:
        frames[case].to_csv(root / "d.csv", index=False)
        task = ", task: regression" if case == "text-regression-target" else ""
        return f"{{source: d.csv, target: y{task}}}"
    return "{source: nope.csv, target: y}"  # file-not-found


BAD_DATA = {
    "file-not-found": ("data.source", "file not found", "nope.csv", "check the path"),
    "not-csv-nor-parquet": ("data.source", "d.txt is neither CSV nor Parquet", ".csv, .parquet"),
    "empty-file": ("data.source", "d.csv is empty", "header"),
    "missing-target": ("data.target", "'y' not found", "use one of: a, b"),
    "one-class": ("data.target", "single class ('x')", "at least two"),
    "text-regression-target": ("data.target", "regression needs a numeric target", "data.task: classification"),
    "image-folder-one-class": ("data.source", "imgs has 1 class subfolder (cat)", "at least two"),
    "early-stopping-with-folds": ("spec.yaml: early_stopping", "data.validation.folds: 3", "early_stopping: none"),
}


@pytest.mark.usefixtures("ray_session")  # `automl run` joins the session's Ray instead of starting one
@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_exit_2_and_nothing_written(bare_workdir: Path, case: str) -> None:
    workdir = bare_workdir
    from typer.testing import CliRunner

    from automl.cli import app

    (workdir / "spec.yaml").write_text(SPEC.replace("{DATA}", _write_files(workdir, case)))
    before = {p.name for p in workdir.iterdir()}
    commands = [["run", "spec.yaml"]] + ([["validate", "spec.yaml"]] if case == "early-stopping-with-folds" else [])
    for command in commands:
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        for needle in BAD_DATA[case]:
            assert needle in lines[0], lines[0]
    assert {p.name for p in workdir.iterdir()} == before
    assert not any((workdir / name).exists() for name in STORE)


# --------------------------------------------------------------------------------------------- a k-fold sweep

TRAINER = '''
"""A numpy-only trainer (nothing heavy to import in the Ray workers): nearest class centroid."""
import json

import numpy as np

from automl.trainer import SavableModel


class Centroids(SavableModel):
    def __init__(self, centres, temperature):
        self.centres, self.temperature = np.asarray(centres, dtype=np.float64), float(temperature)

    def predict_proba(self, X):
        d = ((np.asarray(X, dtype=np.float64)[:, None, :] - self.centres[None]) ** 2).sum(axis=2)
        z = np.exp(-(d - d.min(axis=1, keepdims=True)) / self.temperature)
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)

    def save(self, path):
        (path / "centroids.json").write_text(json.dumps([self.centres.tolist(), self.temperature]))

    @classmethod
    def load(cls, path):
        return cls(*json.loads((path / "centroids.json").read_text()))


def centroids(params, data, report):
    """Two reports: centroids of the first half of the training rows, then of all of them."""
    for step, rows in ((1, len(data.y_train) // 2), (2, len(data.y_train))):
        X, y = data.X_train[:rows], data.y_train[:rows]
        model = Centroids([X[y == k].mean(axis=0) for k in range(data.n_classes)], params["temperature"])
        proba = model.predict_proba(data.X_val)
        report(step, data.evaluate(proba.argmax(axis=1), proba=proba))
    return model
'''


@pytest.mark.usefixtures("ray_session")
def test_k_fold_sweep_logs_the_mean_and_per_fold_metrics_and_exports_fold_1s_model(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from automl import Sweep
    from automl.bundle import ModelBundle
    from automl.state import best_bundle_path
    from automl.tracking import PARENT_TAG

    code = tmp_path_factory.mktemp("kfold_code")
    (code / "kfold_trainers.py").write_text(TRAINER)
    frame = mixed_frame(150, seed=3)
    frame.to_csv(code / "d.csv", index=False)
    data = {"source": "d.csv", "target": "label", "validation": {"folds": 3}}
    spec = {"name": "kfold", "trainer": "kfold_trainers:centroids", "data": data, "metric": "val_log_loss",
            "method": "random", "budget": {"trials": 2, "max_concurrent": 2}, "seed": 5,
            "parameters": {"temperature": {"type": "float", "low": 0.1, "high": 10.0, "log": True}}}
    result = Sweep.from_dict(spec, base_dir=code, workdir=workdir).run()
    assert [t.state for t in result.trials] == ["COMPLETE", "COMPLETE"]

    # Each fold trained here with the same trainer on the same folds (same seed): what the sweep must have logged.
    monkeypatch.syspath_prepend(str(code))
    import kfold_trainers

    prepared = prepare(data_spec(**data), base_dir=code, seed=5)
    assert prepared.folds is not None

    def train_fold(temperature: float, fold: Dataset) -> tuple[Any, dict[str, float]]:
        reports: dict[str, float] = {}
        model = kfold_trainers.centroids({"temperature": temperature}, fold, lambda s, m: reports.update(m))
        return model, reports

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    assert result.parent_run_id is not None
    exp = client.get_run(result.parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")
    assert len(runs) == 2
    for run in runs:
        per_fold = [train_fold(float(run.data.params["temperature"]), f)[1] for f in prepared.folds]
        metrics = run.data.metrics
        for name in ("val_log_loss", "val_accuracy"):
            expected = [m[name] for m in per_fold]
            assert [metrics[f"{name}_fold{i}"] for i in (1, 2, 3)] == pytest.approx(expected)
            assert metrics[name] == pytest.approx(np.mean(expected))
        assert len({round(m["val_log_loss"], 9) for m in per_fold}) == 3  # three different folds
        history = client.get_metric_history(run.info.run_id, "val_log_loss")
        assert [m.step for m in history] == [1, 2]  # one mean per step every fold reached
    assert result.best is not None
    assert result.best.value == pytest.approx(min(t.value for t in result.trials if t.value is not None))

    # The exported model is fold 1's, with fold 1's preprocessing: it predicts raw rows as fold 1's model does.
    # Its loader is the user's own module: the sweep trusted it to log the model (result.best.model_uri); anyone
    # opening the bundle later names it (the CLI's --trust-module), as it is not a registered trainer's package.
    assert result.best.model_uri
    with pytest.raises(ExportError, match="pass --trust-module kfold_trainers if you wrote it"):
        ModelBundle(best_bundle_path(result.state_dir))
    bundle = ModelBundle(best_bundle_path(result.state_dir), trusted_modules=["kfold_trainers"])
    raw = frame.drop(columns="label")
    mine, _ = train_fold(result.best.params["temperature"], prepared.folds[0])
    expected_labels = np.asarray(prepared.dataset.classes)[mine.predict(prepared.preprocessor.transform(raw))]
    assert (bundle.predict(raw) == expected_labels).all()
