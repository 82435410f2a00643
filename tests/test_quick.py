"""AutoML mode: `automl run --data FILE --target COL` with no spec (real CLI processes, real Ray and MLflow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from test_cli_validate import STORE, assert_one_line_error, cli

from automl.quick import automl_spec
from automl.spec import spec_from_dict


def mixed_table(path: Path, *, task: str, rows: int = 300, seed: int = 0) -> Path:
    """Numeric and categorical columns with missing values; the target depends on both."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=rows)
    x2 = rng.normal(size=rows)
    color = rng.choice(["red", "green", "blue"], size=rows)
    signal = 2 * x1 - x2 + np.where(color == "red", 1.5, 0.0)
    frame = pd.DataFrame({"x1": x1, "x2": x2, "color": color})
    if task == "classification":
        frame["label"] = np.where(signal + rng.normal(scale=0.5, size=rows) > 0.5, "yes", "no")
    else:
        frame["label"] = signal + rng.normal(scale=0.3, size=rows)
    frame.loc[rng.choice(rows, 20, replace=False), "x2"] = np.nan
    frame.loc[rng.choice(rows, 20, replace=False), "color"] = None
    frame.to_csv(path, index=False)
    return path


def test_print_spec_is_a_valid_editable_spec_and_writes_nothing(tmp_path: Path) -> None:
    mixed_table(tmp_path / "table.csv", task="classification")
    proc = cli("run", "--data", "table.csv", "--target", "label", "--time", "30s", "--print-spec", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    raw = yaml.safe_load(proc.stdout)
    assert raw["trainer"] == "auto"
    assert raw["data"] == {"source": "table.csv", "target": "label", "task": "classification"}
    assert raw["metric"] == "val_accuracy"
    assert raw["budget"]["time"] == "30s"
    models = raw["parameters"]["model"]["choices"]
    assert {"mlp", "hist_gradient_boosting", "random_forest", "logistic_regression"} <= set(models)
    assert "ridge" not in models  # a regression-only model is not offered for classification
    # each model's library defaults are tried first, one point per model
    assert [p["model"] for p in raw["points_to_evaluate"]] == models
    assert not [p for p in STORE if (tmp_path / p).exists()]
    # what it printed is a spec `automl validate` accepts, as saved by the user
    (tmp_path / "automl.yaml").write_text(proc.stdout)
    checked = cli("validate", "automl.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_regression_is_inferred_and_offers_regression_models(tmp_path: Path) -> None:
    mixed_table(tmp_path / "table.csv", task="regression")
    raw = automl_spec("table.csv", "label", base_dir=tmp_path)
    spec = spec_from_dict(raw)
    assert spec.data is not None
    assert spec.data.task == "regression"
    assert spec.metric_name == "val_r2"
    models = raw["parameters"]["model"]["choices"]
    assert "ridge" in models
    assert "logistic_regression" not in models


def test_a_missing_target_lists_the_columns(tmp_path: Path) -> None:
    mixed_table(tmp_path / "table.csv", task="classification")
    proc = cli("run", "--data", "table.csv", "--target", "nope", cwd=tmp_path)
    assert_one_line_error(proc, "nope", "x1, x2, color, label")
    assert not [p for p in STORE if (tmp_path / p).exists()]


def test_run_without_spec_or_data_says_what_to_give(tmp_path: Path) -> None:
    assert_one_line_error(cli("run", cwd=tmp_path), "--data")


@pytest.mark.timeout(240)
def test_automl_mode_searches_models_and_registers_the_best(tmp_path: Path) -> None:
    mixed_table(tmp_path / "table.csv", task="classification")
    proc = cli("run", "--data", "table.csv", "--target", "label", "--time", "7s", "--max-concurrent", "2",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "best trial per model" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("table-automl")
    assert exp is not None
    children = client.search_runs([exp.experiment_id], filter_string="tags.`automl.state` = 'COMPLETE'")
    tried = {int(r.data.tags["automl.trial"]): r.data.params["model"] for r in children}
    # each model's defaults come first, the cheapest models first, so a short --time still compares models
    assert len(set(tried.values())) >= 2, tried
    assert tried.get(0) == "logistic_regression"
    champion = client.get_model_version_by_alias("table-automl", "champion")
    assert str(champion.version) == "1"
    best = max(children, key=lambda r: r.data.metrics["val_accuracy"])
    assert champion.run_id == best.data.tags["mlflow.parentRunId"]
    # the registered champion takes raw rows, unseen category included
    rows = pd.DataFrame({"x1": [0.3, -1.0], "x2": [np.nan, 0.5], "color": ["purple", "red"]})
    rows.to_csv(tmp_path / "rows.csv", index=False)
    pred = cli("predict", "models:/table-automl@champion", "rows.csv", "--tracking-uri",
               f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert pred.returncode == 0, pred.stderr
    assert pred.stdout.count("yes") + pred.stdout.count("no") >= 2
