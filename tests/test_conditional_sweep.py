"""A Bayesian sweep over a conditional (``when:``) space, end to end: real Ray, real Optuna, real MLflow.

The trainer (assets/cond_trainers.py) fails any trial that receives a parameter its choices do not call for, or
misses one; MLflow's child runs must hold exactly the parameters each trial used, plus the fixed ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from automl import Sweep
from automl.tracking import PARENT_TAG, TAG_TRIAL

ASSETS = Path(__file__).parent / "assets"
pytestmark = pytest.mark.usefixtures("ray_session")

WIDTH = {"type": "int", "low": 4, "high": 64}
FIXED = {"epochs": 2, "label": "cond"}
SPEC: dict[str, Any] = {
    "name": "conditional",
    "trainer": "cond_trainers:conditional",
    "metric": {"name": "score", "goal": "maximize"},
    "method": "bayesian",
    "budget": {"trials": 12, "max_concurrent": 2},
    "seed": 3,
    "fixed": FIXED,
    "parameters": {
        "lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"],
                      "when": {"sgd": {"momentum": {"type": "float", "low": 0.0, "high": 0.99}}}},
        # width1 in both branches, with the same settings: one parameter, present whatever the depth.
        "depth": {"type": "categorical", "choices": [1, 2],
                  "when": {1: {"width1": dict(WIDTH)}, 2: {"width1": dict(WIDTH), "width2": dict(WIDTH)}}},
    },
}


def expected_names(params: dict[str, Any]) -> set[str]:
    names = {"lr", "optimizer", "depth", "width1"}
    if params["optimizer"] == "sgd":
        names.add("momentum")
    if params["depth"] == 2:
        names.add("width2")
    return names


def test_bayesian_sweep_over_a_conditional_space(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOML_STORAGE", raising=False)
    result = Sweep.from_dict(SPEC, base_dir=ASSETS, workdir=workdir).run()

    assert len(result.trials) == 12
    failures = {t.number: t.error for t in result.trials if t.state != "COMPLETE"}
    assert not failures, failures
    for t in result.trials:
        assert set(t.params) == expected_names(t.params), t.params
    # Both branches of both conditionals were explored (else the test would prove little).
    assert {t.params["optimizer"] for t in result.trials} == {"adam", "sgd"}
    assert {t.params["depth"] for t in result.trials} == {1, 2}

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_run(result.parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'",
                              max_results=100)
    by_trial = {int(r.data.tags[TAG_TRIAL]): r for r in runs}
    assert sorted(by_trial) == [t.number for t in result.trials]
    for t in result.trials:
        run = by_trial[t.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags.get("automl.state") == "COMPLETE"
        expected = {k: str(v) for k, v in {**t.params, **FIXED}.items()}
        assert run.data.params == expected, (t.number, run.data.params, expected)

    # The parent holds the best trial's own parameters (no other branch's) next to the sweep's settings.
    assert result.best is not None
    parent = client.get_run(result.parent_run_id)
    searched = {k: v for k, v in parent.data.params.items() if not k.startswith("sweep.")}
    assert searched == {k: str(v) for k, v in result.best.params.items()}


@pytest.mark.parametrize("params", [
    {"lr": 0.01, "optimizer": "adam", "momentum": 0.5, "depth": 1, "width1": 8},  # momentum without sgd
    {"lr": 0.01, "optimizer": "sgd", "depth": 1, "width1": 8},  # sgd without momentum
    {"lr": 0.01, "optimizer": "adam", "depth": 1, "width1": 8, "width2": 8},  # width2 at depth 1
    {"lr": 0.01, "optimizer": "adam", "depth": 2, "width1": 8},  # depth 2 without width2
    {"lr": 0.01, "optimizer": "adam", "depth": "2", "width1": 8, "width2": 8},  # depth as text
])
def test_the_trainer_refuses_parameters_its_choices_do_not_call_for(params: dict[str, Any]) -> None:
    import sys

    sys.path.insert(0, str(ASSETS))
    try:
        from cond_trainers import conditional
    finally:
        sys.path.remove(str(ASSETS))
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the case
        conditional({**params, **FIXED}, None, lambda step, metrics: None)
    conditional({"lr": 0.01, "optimizer": "sgd", "momentum": 0.5, "depth": 2, "width1": 8, "width2": 8, **FIXED},
                None, lambda step, metrics: None)  # and accepts a right one
