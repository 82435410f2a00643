"""End-to-end sweeps on real Ray, real Optuna, real MLflow (SQLite in a temp working directory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from automl import Sweep
from automl.tracking import PARENT_TAG, TAG_BEST_URI

ASSETS = Path(__file__).parent / "assets"
pytestmark = pytest.mark.usefixtures("ray_session")


def toy_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "toy",
        "trainer": "toy_trainers:quadratic",
        "metric": {"name": "score", "goal": "maximize"},
        "method": "random",
        "budget": {"trials": 6, "max_concurrent": 2},
        "seed": 7,
        "fixed": {"epochs": 3},
        "parameters": {
            "x": {"type": "float", "low": 0.0, "high": 1.0},
            "kind": {"type": "categorical", "choices": ["a", "b", "c"]},
        },
    }
    spec.update(overrides)
    return spec


def run_toy(workdir: Path, **overrides: Any) -> Any:
    return Sweep.from_dict(toy_spec(**overrides), base_dir=ASSETS, workdir=workdir).run()


def client_for(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def children(client: MlflowClient, parent_run_id: str) -> list[Any]:
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000)


def test_digits_mlp_sweep_is_recorded_in_mlflow_and_the_best_model_predicts(workdir: Path) -> None:
    spec = {
        "name": "digits-small",
        "trainer": "mlp",
        "data": {"source": "sklearn:digits"},
        "metric": {"name": "val_accuracy", "goal": "maximize"},
        "method": "bayesian",
        "budget": {"trials": 4, "max_concurrent": 2},
        "fixed": {"epochs": 4},
        "parameters": {
            "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "width": {"type": "int", "low": 32, "high": 64},
            "activation": {"type": "categorical", "choices": ["relu", "tanh"]},
        },
        "tracking": {"experiment": "digits-test"},
    }
    result = Sweep.from_dict(spec, workdir=workdir).run()
    assert [t.state for t in result.trials] == ["COMPLETE"] * 4
    assert result.best is not None
    assert result.best.value > 0.85

    client = client_for(workdir)
    names = [e.name for e in client.search_experiments()]
    assert "digits-test" in names
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    runs = children(client, result.parent_run_id)
    assert len(runs) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        assert set(run.data.params) >= {"lr", "width", "activation", "epochs"}
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert {"val_f1", "val_roc_auc", "val_log_loss", "train_loss", "val_loss"} <= set(run.data.metrics)
    # The parent holds the best trial's params and metric.
    best = result.best
    assert parent.data.params["width"] == str(best.params["width"])
    assert parent.data.metrics["val_accuracy"] == pytest.approx(best.value)
    assert parent.data.tags[TAG_BEST_URI] == best.model_uri
    assert {"automl.version.automl", "automl.version.torch", "automl.version.ray", "automl.version.optuna",
            "automl.version.mlflow"} <= set(parent.data.tags)
    assert parent.data.params["sweep.method"] == "bayesian"
    assert parent.data.params["sweep.seed"] == "0"
    # The sweep's summary: the leaderboard and the plots a user would otherwise make by hand (drawn just after the
    # result is returned).
    result.wait_for_summary(timeout=120)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"spec.yaml", "leaderboard.csv", "best_model", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/intermediate_values.png"} <= plots
    board = Path(client.download_artifacts(result.parent_run_id, "leaderboard.csv", str(workdir))).read_text()
    assert board.splitlines()[1].startswith(f"{best.number},COMPLETE,")

    # The best model loads in a fresh process with MLflow's own loader and predicts on raw rows.
    script = (
        "import sys, mlflow.pyfunc, sklearn.datasets as d\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "m = mlflow.pyfunc.load_model(sys.argv[2])\n"
        "f = d.load_digits(as_frame=True).frame\n"
        "p = m.predict(f.drop(columns='target'))\n"
        "print((p == f['target'].to_numpy()).mean())\n"
    )
    out = subprocess.run([sys.executable, "-c", script, f"sqlite:///{workdir / 'mlflow.db'}", best.model_uri],
                         capture_output=True, text=True, timeout=120, cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) > 0.85


def test_same_seed_gives_same_configurations_in_process_and_in_a_subprocess(workdir: Path) -> None:
    first = [t.params for t in run_toy(workdir).trials]
    second = [t.params for t in run_toy(workdir).trials]
    assert first == second
    assert len({json.dumps(p, sort_keys=True) for p in first}) == len(first)
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom automl import Sweep\n"
        "spec = json.loads(sys.argv[1])\n"
        "r = Sweep.from_dict(spec, base_dir=Path(sys.argv[2]), workdir=Path.cwd()).run()\n"
        "print(json.dumps([t.params for t in r.trials]))\n"
    )
    sub = workdir / "sub"
    sub.mkdir()
    out = subprocess.run([sys.executable, "-c", code, json.dumps(toy_spec()), str(ASSETS)],
                         capture_output=True, text=True, timeout=180, cwd=sub)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == first
    # A different seed proposes something else.
    assert [t.params for t in run_toy(workdir, seed=8).trials] != first


def test_bayesian_sequence_is_reproducible_with_one_trial_at_a_time(workdir: Path) -> None:
    spec = {"method": "bayesian", "budget": {"trials": 14, "max_concurrent": 1}}
    first = [t.params for t in run_toy(workdir, **spec).trials]
    assert [t.params for t in run_toy(workdir, **spec).trials] == first


def test_grid_runs_every_point_once(workdir: Path) -> None:
    params = {"x": {"type": "float", "low": 0.0, "high": 0.4, "step": 0.2},
              "kind": {"type": "categorical", "choices": ["a", "b"]}}
    result = run_toy(workdir, method="grid", parameters=params, budget={"max_concurrent": 2})
    points = sorted((t.params["x"], t.params["kind"]) for t in result.trials)
    assert points == sorted((x, k) for x in (0.0, 0.2, 0.4) for k in ("a", "b"))
    assert result.best is not None
    assert result.best.params == {"x": 0.2, "kind": "b"}


def test_failing_and_nan_trials_are_failed_with_their_reason_and_the_sweep_goes_on(workdir: Path) -> None:
    result = run_toy(workdir, trainer="toy_trainers:flaky", budget={"trials": 12, "max_concurrent": 2},
                     parameters={"x": {"type": "float", "low": 0.0, "high": 1.0}})
    assert len(result.trials) == 12
    by_state: dict[str, list[Any]] = {}
    for t in result.trials:
        by_state.setdefault(t.state, []).append(t)
    assert by_state.get("FAILED")
    assert by_state.get("COMPLETE")
    client = client_for(workdir)
    runs = {r.data.tags["automl.trial"]: r for r in children(client, result.parent_run_id)}
    for t in result.trials:
        run = runs[str(t.number)]
        if t.params["x"] > 0.5:
            assert run.info.status == "FAILED"
            assert "too large" in run.data.tags["automl.error"]
            tb = client.download_artifacts(run.info.run_id, "traceback.txt", str(workdir))
            assert "ValueError" in Path(tb).read_text()
        elif t.params["x"] < 0.1:
            assert run.info.status == "FAILED"
            assert "nan" in run.data.tags["automl.error"].lower()
        else:
            assert run.info.status == "FINISHED"
    assert result.best is not None
    assert 0.1 <= result.best.params["x"] <= 0.5


def test_early_stopped_trials_are_finished_with_a_tag(workdir: Path) -> None:
    result = run_toy(workdir, method="random", budget={"trials": 12, "max_concurrent": 2},
                     early_stopping={"method": "asha", "min_epochs": 1, "reduction_factor": 2},
                     fixed={"epochs": 4, "sleep": 0.05})
    stopped = [t for t in result.trials if t.state == "STOPPED"]
    assert stopped, "ASHA stopped no trial"
    client = client_for(workdir)
    runs = {r.data.tags["automl.trial"]: r for r in children(client, result.parent_run_id)}
    epochs = []
    for t in stopped:
        run = runs[str(t.number)]
        assert run.info.status == "FINISHED"
        assert run.data.tags["automl.early_stopped"] == "true"
        epochs.append(int(run.data.tags["automl.epochs"]))
    # A stop takes effect at the trial's next report: on a loaded machine one may land after the last epoch.
    assert min(epochs) < 4, epochs
    assert max(epochs) <= 4, epochs


def test_class_trainer_returning_a_sklearn_model_is_exported_and_predicts(workdir: Path) -> None:
    spec = toy_spec(trainer="toy_trainers:LogisticFitter", data={"source": "sklearn:iris"},
                    metric={"name": "val_accuracy"}, budget={"trials": 2, "max_concurrent": 2}, fixed={},
                    parameters={"C": {"type": "float", "low": 0.1, "high": 10, "log": True}})
    result = Sweep.from_dict(spec, base_dir=ASSETS, workdir=workdir).run()
    assert result.best is not None
    assert result.best.model_uri
    out = result.export(workdir / "exported", format="mlflow")
    import mlflow.pyfunc
    import sklearn.datasets

    frame = sklearn.datasets.load_iris(as_frame=True).frame
    model = mlflow.pyfunc.load_model(str(out))
    pred = model.predict(frame.drop(columns="target"))
    assert (pred == frame["target"].to_numpy()).mean() > 0.9


def test_tracking_trials_false_writes_the_parent_run_only(workdir: Path) -> None:
    result = run_toy(workdir, tracking={"trials": False})
    assert len(result.trials) == 6
    assert result.best is not None
    client = client_for(workdir)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert children(client, result.parent_run_id) == []
    assert parent.data.metrics[result.metric] == pytest.approx(result.best.value)  # the best trial's metrics
