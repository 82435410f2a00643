"""The Model Registry: each sweep with ``tracking.register_as`` adds a version; the alias ``champion`` moves only
to a better one (same metric and goal), or to any version scored on a new metric. Real sweeps, real registry."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.models import get_model_info
from typer.testing import CliRunner

from automl import Sweep
from automl.cli import app
from automl.data import prepare
from automl.errors import ExportError
from automl.spec import spec_from_dict

NAME = "iris-mlp"
CHAMPION = f"models:/{NAME}@champion"
pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(autouse=True)
def _keep_mlflow_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests set MLflow's process-wide tracking URI (as a user's script does); later tests must not
    inherit it."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)


def iris_spec(*, epochs: int, lr: tuple[float, float], metric: str = "val_loss", trials: int = 1) -> dict[str, Any]:
    return {
        "name": "iris-reg",
        "trainer": "mlp",
        "data": {"source": "sklearn:iris"},
        "metric": {"name": metric},  # the goal follows from the name: val_loss minimize, val_accuracy maximize
        "method": "random",
        "budget": {"trials": trials, "max_concurrent": 1},
        "seed": 0,
        "fixed": {"epochs": epochs, "width": 16, "depth": 1},
        "parameters": {"lr": {"type": "float", "low": lr[0], "high": lr[1], "log": True}},
        "tracking": {"experiment": "iris-registry", "register_as": NAME},
    }


# In the order they run. One trial each but the first: the rule does not depend on the trial count, and a
# one-trial sweep skips the summary plots (a second each).
SWEEPS = {
    "first": iris_spec(epochs=3, lr=(3e-3, 5e-3), trials=2),  # the best of two is registered
    "worse": iris_spec(epochs=1, lr=(1e-5, 2e-5)),  # one epoch at a tiny learning rate: a higher val_loss
    "better": iris_spec(epochs=25, lr=(2e-2, 3e-2)),
}
# (A sweep on another metric is register_champion's case below, on a logged model: a fourth sweep would cost
# ~5 s of fresh Ray actors for what the orchestrator already shows here, in test_serve and in the notebook.)


@dataclass
class Registry:
    workdir: Path
    tracking_uri: str
    results: dict[str, Any]  # sweep key -> SweepResult
    champion_after: dict[str, str]  # sweep key -> the champion's version once that sweep had finished

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Iterator[Registry]:
    workdir = tmp_path_factory.mktemp("registry")
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        client = MlflowClient(tracking_uri=tracking_uri)
        results, champion_after = {}, {}
        for key, spec in SWEEPS.items():
            results[key] = Sweep.from_dict(spec, workdir=workdir).run()
            champion_after[key] = str(client.get_model_version_by_alias(NAME, "champion").version)
        yield Registry(workdir, tracking_uri, results, champion_after)


def test_every_sweep_adds_a_version_tagged_with_its_score_and_run(registry: Registry) -> None:
    client = registry.client
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{NAME}'")}
    assert sorted(versions, key=int) == ["1", "2", "3"]
    for version, key in zip(["1", "2", "3"], SWEEPS, strict=True):
        result, mv = registry.results[key], client.get_model_version(NAME, version)
        assert result.best is not None
        assert mv.run_id == result.parent_run_id  # the sweep's parent run, where best_model is logged
        assert mv.source == client.get_run(result.parent_run_id).info.artifact_uri + "/best_model"
        assert mv.tags["automl.metric"] == result.metric
        assert mv.tags["automl.goal"] == result.goal
        assert float(mv.tags["automl.value"]) == result.best.value
    assert versions["1"].tags["automl.metric"] == "val_loss"
    assert versions["1"].tags["automl.goal"] == "minimize"


def test_champion_moves_only_to_a_better_model_on_the_same_metric(registry: Registry) -> None:
    value = {key: r.best.value for key, r in registry.results.items()}
    # The premises: the deliberately worse sweep is worse, the better one better (val_loss: lower is better).
    assert value["worse"] > value["first"] > value["better"]
    assert registry.champion_after == {"first": "1", "worse": "1", "better": "3"}


def test_the_edges_of_the_rule(registry: Registry) -> None:
    """register_champion directly, on models the sweeps logged: ties, another metric, unscored champions."""
    from automl.export import register_champion

    client = registry.client
    first = registry.results["first"]
    name = "iris-edges"
    args = {"run_id": first.parent_run_id, "metric": "val_loss", "goal": "minimize"}
    assert register_champion(client, name, first.best.model_uri, value=0.5, **args) == ("1", True)
    assert register_champion(client, name, first.best.model_uri, value=0.5, **args) == ("2", False)  # a tie
    assert register_champion(client, name, first.best.model_uri, value=np.float64(0.4), **args) == ("3", True)
    assert client.get_model_version(name, "3").tags["automl.value"] == "0.4"  # reads back as a number
    # A score on another metric cannot be compared: the sweep that changed the metric takes over, even with
    # a poor model (the worse sweep's: one epoch at a tiny learning rate).
    worse = registry.results["worse"]
    accuracy = worse.best.metrics["val_accuracy"]
    assert accuracy < 0.9
    assert register_champion(client, name, worse.best.model_uri, run_id=worse.parent_run_id,
                             metric="val_accuracy", goal="maximize", value=accuracy) == ("4", True)
    assert register_champion(client, name, worse.best.model_uri, run_id=worse.parent_run_id,
                             metric="val_accuracy", goal="maximize", value=accuracy - 0.1) == ("5", False)
    assert client.get_model_version(name, "4").tags["automl.goal"] == "maximize"
    # A champion set by hand on a version automl did not score is replaced by the next sweep.
    client.set_registered_model_alias(name, "champion", "2")
    client.delete_model_version_tag(name, "2", "automl.value")
    assert register_champion(client, name, first.best.model_uri, value=0.9, **args) == ("6", True)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "6"
    # A name the registry refuses is one line naming the field, not MLflow's traceback.
    with pytest.raises(ExportError, match=r"^tracking\.register_as: cannot register 'iris/edges': .*'/'"):
        register_champion(client, "iris/edges", first.best.model_uri, value=0.5, **args)


def validation_rows() -> pd.DataFrame:
    """Raw validation rows, as the sweeps split them (same data, same seed)."""
    spec = spec_from_dict(SWEEPS["first"])
    assert spec.data is not None
    return prepare(spec.data, seed=spec.seed).raw_val.head(20)


def test_champion_loads_with_pyfunc_and_predicts_as_the_sweeps_best_model(registry: Registry) -> None:
    mlflow.set_tracking_uri(registry.tracking_uri)
    rows = validation_rows()
    champion = mlflow.pyfunc.load_model(CHAMPION)
    logged = mlflow.pyfunc.load_model(f"runs:/{registry.results['better'].parent_run_id}/best_model")
    predicted = np.asarray(champion.predict(rows))
    assert predicted.tolist() == np.asarray(logged.predict(rows)).tolist()
    assert set(predicted.tolist()) <= {0, 1, 2}  # iris' own labels, not encoded indices
    proba = champion.predict(rows, params={"predict_method": "predict_proba"})
    assert list(proba.columns) == ["0", "1", "2"]
    assert np.allclose(proba.to_numpy().sum(axis=1), 1.0, atol=1e-5)

    # Signature and input example: the raw columns go in, as the model's users send them.
    info = get_model_info(CHAMPION)
    assert info.signature is not None
    assert info.signature.inputs.input_names() == list(rows.columns)
    assert info.saved_input_example_info is not None
    assert info.signature.params is not None
    assert [p.name for p in info.signature.params.params] == ["predict_method"]

    # The previous champions are still there, by version.
    older = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert len(older.predict(rows)) == len(rows)


def test_automl_predict_takes_the_champion_uri(registry: Registry, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rows = validation_rows()
    csv = tmp_path / "rows.csv"
    rows.to_csv(csv, index=False)
    mlflow.set_tracking_uri(registry.tracking_uri)
    expected = [str(v) for v in np.asarray(mlflow.pyfunc.load_model(CHAMPION).predict(rows)).tolist()]

    # MLflow's process-wide URI points at an empty store: only automl's own resolution can find the model.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'empty.db'}")
    runner = CliRunner()
    # As a user types it, in the directory of the store (the default mlflow.db; no MLFLOW_TRACKING_URI) ...
    monkeypatch.chdir(registry.workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = runner.invoke(app, ["predict", CHAMPION, str(csv)])
    assert out.exit_code == 0, out.output
    assert out.stdout.split() == ["prediction", *expected]
    # ... and from elsewhere, with --tracking-uri naming the store.
    monkeypatch.chdir(tmp_path)
    out = runner.invoke(app, ["predict", CHAMPION, str(csv), "--tracking-uri", registry.tracking_uri])
    assert out.exit_code == 0, out.output
    assert out.stdout.split() == ["prediction", *expected]

    missing = runner.invoke(app, ["predict", "models:/no-such-model@champion", str(csv),
                                  "--tracking-uri", registry.tracking_uri])
    assert missing.exit_code == 2
    message = missing.output.strip()
    assert "no-such-model" in message
    assert len(message.splitlines()) == 1
