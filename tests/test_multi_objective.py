"""Several metrics at once: Optuna's multi-objective samplers, the Pareto front in results and MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from automl import Sweep
from automl.errors import SpecError
from automl.spec import spec_from_dict

ASSETS = Path(__file__).parent / "assets"


def spec(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "pareto",
        "trainer": "toy_trainers:two_scores",
        "metric": [{"name": "gain", "goal": "maximize"}, {"name": "cost", "goal": "minimize"}],
        "method": "nsga2",
        "budget": {"trials": 10, "max_concurrent": 2},
        "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0},
                       "y": {"type": "float", "low": 0.0, "high": 1.0}},
    }
    raw.update(overrides)
    return raw


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("method", ["nsga2", "bayesian"])
def test_pareto_front_is_reported_and_recorded(workdir: Path, method: str) -> None:
    result = Sweep.from_dict(spec(method=method), base_dir=ASSETS, workdir=workdir).run()
    assert result.sampler == ("NSGAIISampler" if method == "nsga2" else "TPESampler")
    done = [t for t in result.trials if t.state == "COMPLETE"]
    assert len(done) == 10
    front = {t.number for t in done if t.pareto}
    assert front
    assert front == set(result.pareto_front)
    # Pareto-optimal: no trial is at least as good on both metrics and better on one.
    for t in done:
        gain, cost = t.values or []
        dominated = any(o.values and o.values[0] >= gain and o.values[1] <= cost and o.values != t.values
                        for o in done)
        assert (t.number in front) == (not dominated)
    board = result.leaderboard()
    assert {"gain", "cost", "pareto"} <= set(board.columns)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["automl.pareto_front"] == ",".join(map(str, sorted(front)))
    csv = Path(client.download_artifacts(result.parent_run_id, "pareto_front.csv", str(workdir))).read_text()
    assert csv.splitlines()[0] == "trial,gain,cost,run_id"
    assert len(csv.splitlines()) == len(front) + 1


@pytest.mark.parametrize("method", ["cmaes", "gp"])
def test_single_objective_methods_refuse_several_metrics(method: str) -> None:
    with pytest.raises(SpecError, match="optimises a single metric") as err:
        spec_from_dict(spec(method=method))
    assert err.value.path == "method"


def test_early_stopping_needs_a_single_metric() -> None:
    with pytest.raises(SpecError, match="single metric") as err:
        spec_from_dict(spec(early_stopping="asha"))
    assert err.value.path == "early_stopping"


def test_bayesian_picks_gp_for_small_numeric_spaces_and_tpe_otherwise() -> None:
    from automl.samplers import sampler_name
    from automl.space import SearchSpace

    numeric = spec_from_dict(spec(metric={"name": "gain"}))
    space = SearchSpace(numeric.parameters)
    assert sampler_name("bayesian", space, trials=20) == "GPSampler"
    assert sampler_name("bayesian", space, trials=500) == "TPESampler"
    assert sampler_name("bayesian", space, objectives=2, trials=20) == "TPESampler"
    with_choice = spec_from_dict(spec(metric={"name": "gain"}, parameters={
        "x": {"type": "float", "low": 0.0, "high": 1.0},
        "kind": {"type": "categorical", "choices": ["a", "b"]}}))
    assert sampler_name("bayesian", SearchSpace(with_choice.parameters), trials=20) == "TPESampler"
