"""Faults a real sweep meets: a worker killed mid-trial, a trial past its time limit, too many failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient

from automl import Sweep
from automl.orchestrator import SweepFailed
from automl.state import journal_path
from automl.tracking import PARENT_TAG

ASSETS = Path(__file__).parent / "assets"
pytestmark = pytest.mark.usefixtures("ray_session")


def spec(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "faults",
        "trainer": "toy_trainers:quadratic",
        "metric": {"name": "score", "goal": "maximize"},
        "method": "random",
        "budget": {"trials": 4, "max_concurrent": 2},
        "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
    }
    raw.update(overrides)
    return raw


def optuna_states(result: Any) -> dict[int, str]:
    """The sweep's own Optuna records (its journal), by trial number."""
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal_path(result.state_dir))))
    study = optuna.load_study(study_name=result.sweep_id, storage=storage)
    return {t.number: t.state.name for t in study.trials}


def child_runs(workdir: Path, parent: str) -> dict[int, Any]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    return {int(r.data.tags["automl.trial"]): r for r in runs}


def test_a_worker_killed_mid_trial_is_retried_and_the_sweep_completes(workdir: Path) -> None:
    markers = workdir / "markers"
    markers.mkdir()
    notes: list[str] = []
    # More trials at once than the 2 CPUs hold: the sweep runs what fits and says so (it used to wait 120 s for
    # actors that could never start, then fail).
    raw = spec(trainer="toy_trainers:dies_once", fixed={"marker_dir": str(markers)},
               budget={"trials": 4, "max_concurrent": 8})
    result = Sweep.from_dict(raw, base_dir=ASSETS, workdir=workdir).run(on_note=notes.append)
    assert notes == ["budget.max_concurrent: 8 asked for; 2 run at once (1 CPU per trial on 2 CPUs)"]
    assert [t.state for t in result.trials] == ["COMPLETE"] * 4
    assert all(t.attempts == 2 for t in result.trials)
    assert len(list(markers.iterdir())) == 4  # each trial's first worker really died
    runs = child_runs(workdir, result.parent_run_id)
    assert all(r.info.status == "FINISHED" and r.data.tags["automl.attempts"] == "2" for r in runs.values())
    assert optuna_states(result) == {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE", 3: "COMPLETE"}


def test_without_retries_a_dead_worker_fails_the_trial_with_the_reason(workdir: Path) -> None:
    markers = workdir / "markers"
    markers.mkdir()
    result = Sweep.from_dict(spec(trainer="toy_trainers:dies_once", fixed={"marker_dir": str(markers)},
                                  resources={"retries": 0}, budget={"trials": 2, "max_concurrent": 2}),
                             base_dir=ASSETS, workdir=workdir).run()
    assert [t.state for t in result.trials] == ["FAILED"] * 2
    assert all("worker" in (t.error or "") and "died" in (t.error or "") for t in result.trials)
    assert set(optuna_states(result).values()) == {"FAIL"}


def test_a_trial_past_its_time_limit_fails_and_the_sweep_goes_on(workdir: Path) -> None:
    result = Sweep.from_dict(spec(trainer="toy_trainers:never_reports", budget={
        "trials": 6, "max_concurrent": 2, "trial_time": "1s"}), base_dir=ASSETS, workdir=workdir).run()
    slow = [t for t in result.trials if t.params["x"] > 0.5]
    fast = [t for t in result.trials if t.params["x"] <= 0.5]
    assert slow
    assert fast
    assert all(t.state == "FAILED" and "trial_time" in (t.error or "") for t in slow)
    assert all(t.state == "COMPLETE" for t in fast)
    states = optuna_states(result)
    assert all(states[t.number] == "FAIL" for t in slow)
    assert all(states[t.number] == "COMPLETE" for t in fast)
    runs = child_runs(workdir, result.parent_run_id)
    for t in slow:
        assert runs[t.number].info.status == "FAILED"
        assert "trial_time" in runs[t.number].data.tags["automl.error"]


def test_max_failures_stops_a_failing_sweep_with_a_clear_message(workdir: Path) -> None:
    with pytest.raises(SweepFailed, match=r"3 trials failed \(budget.max_failures: 3\); last error: ValueError"):
        Sweep.from_dict(spec(trainer="toy_trainers:flaky", budget={"trials": 30, "max_concurrent": 2,
                                                                    "max_failures": 3},
                             parameters={"x": {"type": "float", "low": 0.6, "high": 1.0}}),
                        base_dir=ASSETS, workdir=workdir).run()
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   filter_string="tags.`automl.role` = 'sweep'")
    assert parent.info.status == "FAILED"
    assert len(child_runs(workdir, parent.info.run_id)) < 30


def test_slots_never_exceed_what_the_cluster_runs_at_once() -> None:
    from automl.engine.executor import Shape
    from automl.engine.pool import MAX_ACTORS_PER_CPU, capacity_for

    # resources.cpu: 0.001 would ask Ray for 2,000 actors (processes) on 2 CPUs: capped per CPU.
    assert capacity_for(Shape(cpu=0.001), {"CPU": 2.0}) == MAX_ACTORS_PER_CPU * 2
    assert capacity_for(Shape(cpu=1.0), {"CPU": 2.0}) == 2
    # GPUs bound it too: four quarter-GPU trials on one GPU; none where a GPU is asked for and there is none.
    assert capacity_for(Shape(cpu=0.5, gpu=0.25), {"CPU": 2.0, "GPU": 1.0}) == 4
    assert capacity_for(Shape(cpu=1.0, gpu=1.0), {"CPU": 8.0}) == 0
