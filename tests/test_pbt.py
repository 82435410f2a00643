"""Population-based training for real: the mlp trainer on digits, members on warm Ray workers, the record in MLflow,
the best model exported; a trainer without checkpoints refused by `automl validate`; a population killed with
SIGKILL and resumed by `automl resume`. One shared sweep holds most assertions (a module fixture): small on purpose
(4 members, 6 epochs, a 16-unit layer)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from automl import Sweep
from automl.engine.records import SweepResult, TrialState

AUTOML = Path(sys.executable).with_name("automl")
EPOCHS, INTERVAL, POPULATION = 6, 2, 4


def pbt_spec(name: str, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": name, "trainer": "mlp", "data": {"source": "sklearn:digits"},
        "metric": {"name": "val_accuracy", "goal": "maximize"}, "method": "pbt", "seed": 2,
        "pbt": {"population": POPULATION, "interval": INTERVAL, "quantile": 0.25, "resample_probability": 0.25},
        "budget": {"max_concurrent": 2},
        "fixed": {"epochs": EPOCHS, "depth": 1, "width": 16, "optimizer": "sgd"},
        "parameters": {"lr": {"type": "float", "low": 1.0e-3, "high": 0.5, "log": True, "mutable": True},
                       "momentum": {"type": "float", "low": 0.0, "high": 0.95, "mutable": True},
                       "batch_size": {"type": "categorical", "choices": [32, 64, 128], "mutable": True}},
        "tracking": {"register_as": "pbt-digits"},
    }
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def sweep(ray_session: None, tmp_path_factory: pytest.TempPathFactory, _empty_store: Path
          ) -> tuple[SweepResult, MlflowClient, Path]:
    folder = tmp_path_factory.mktemp("pbt")
    shutil.copyfile(_empty_store, folder / "mlflow.db")
    result = Sweep.from_dict(pbt_spec("pbt-digits"), workdir=folder, base_dir=folder).run()
    result.wait_for_summary(timeout=120)
    return result, MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}"), folder


def children(client: MlflowClient, result: SweepResult) -> dict[int, Any]:
    runs = client.search_runs([result.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                                                    f"'{result.parent_run_id}'")
    return {int(r.data.tags["automl.trial"]): r for r in runs}


def test_a_population_trains_exploits_and_each_member_is_a_child_run(
        sweep: tuple[SweepResult, MlflowClient, Path]) -> None:
    result, client, _ = sweep
    assert [t.state for t in result.trials] == [TrialState.COMPLETE] * POPULATION
    runs = children(client, result)
    assert sorted(runs) == list(range(POPULATION))
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    # One exploit per boundary (steps 2 and 4): the bottom quarter of 4 is one member.
    exploits = sum(int(r.data.tags.get("automl.pbt.exploits", "0")) for r in runs.values())
    assert exploits == EPOCHS // INTERVAL - 1


def test_each_exploit_is_recorded_with_its_source_and_new_values(
        sweep: tuple[SweepResult, MlflowClient, Path], tmp_path: Path) -> None:
    result, client, _ = sweep
    for number, run in children(client, result).items():
        count = int(run.data.tags.get("automl.pbt.exploits", "0"))
        if not count:
            continue
        path = client.download_artifacts(run.info.run_id, "exploits.json", str(tmp_path / str(number)))
        history = json.loads(Path(path).read_text())
        assert len(history) == count
        for i, entry in enumerate(history, start=1):
            assert json.loads(run.data.tags[f"automl.pbt.exploit.{i:03d}"]) == json.loads(json.dumps(entry))
            assert entry["source"] != number
            assert entry["step"] in range(INTERVAL, EPOCHS, INTERVAL)
            assert set(entry["before"]) == set(entry["after"]) == {"lr", "momentum", "batch_size"}
            assert 1e-3 <= entry["after"]["lr"] <= 0.5
            assert entry["after"]["batch_size"] in (32, 64, 128)


def test_a_restored_member_continues_from_the_checkpoint_step_and_logs_its_schedule(
        sweep: tuple[SweepResult, MlflowClient, Path], tmp_path: Path) -> None:
    result, client, _ = sweep
    exploited = [(n, r) for n, r in children(client, result).items() if r.data.tags.get("automl.pbt.exploits")]
    assert exploited
    for number, run in exploited:
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        # Steps 1..EPOCHS, each once: after the copy the member trains on from the copied step, not from step 0.
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
        path = client.download_artifacts(run.info.run_id, "exploits.json", str(tmp_path / str(number)))
        first = json.loads(Path(path).read_text())[0]
        source = children(client, result)[first["source"]]
        source_at = {m.step: m.value for m in client.get_metric_history(source.info.run_id, "val_accuracy")}
        mine = {m.step: m.value for m in history}
        assert first["source_score"] == pytest.approx(source_at[first["step"]])
        # The copied weights are good weights: one epoch later the member is near the source's score, not at an
        # untrained network's (digits: 10 classes, ~0.1).
        assert mine[first["step"] + 1] > 0.5
        # The mutable values are metrics at every step, the new ones from the step after the exploit.
        lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "hp.lr")}
        assert sorted(lrs) == list(range(1, EPOCHS + 1))
        assert lrs[first["step"] + 1] == pytest.approx(first["after"]["lr"])
        assert lrs[first["step"]] == pytest.approx(first["before"]["lr"])
        assert len(client.get_metric_history(run.info.run_id, "hp.batch_size")) == EPOCHS


def test_the_parent_run_holds_the_schedules_and_the_best_model_predicts(
        sweep: tuple[SweepResult, MlflowClient, Path]) -> None:
    result, client, folder = sweep
    names = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert "plots/pbt_schedules.png" in names
    lineage = json.loads(Path(client.download_artifacts(result.parent_run_id, "pbt_lineage.json",
                                                        str(folder / "lineage"))).read_text())
    assert result.best is not None
    assert lineage["best"] == result.best.number
    assert lineage["best_schedule"][0][0] == 0  # the best weights' whole history, from step 0
    assert set(lineage["members"]) == {str(n) for n in range(POPULATION)}
    # Checkpoints are gone once no member needs them; the exported model is the best member's own.
    assert not list(result.state_dir.glob("pbt/*.ckpt"))
    assert client.get_model_version_by_alias("pbt-digits", "champion").run_id == result.parent_run_id
    out = result.export(folder / "exported", format="mlflow")
    import mlflow.pyfunc
    import sklearn.datasets

    frame = sklearn.datasets.load_digits(as_frame=True).frame
    predictions = mlflow.pyfunc.load_model(str(out)).predict(frame.drop(columns="target"))
    assert (predictions == frame["target"].to_numpy()).mean() > 0.8


def test_a_trainer_without_checkpoints_is_refused_by_validate(tmp_path: Path) -> None:
    raw = pbt_spec("no-checkpoints", trainer="random_forest", fixed={"epochs": EPOCHS},
                   parameters={"max_depth": {"type": "int", "low": 2, "high": 8, "mutable": True}})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([str(AUTOML), "validate", "spec.yaml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: spec.yaml: trainer: 'random_forest' cannot save and restore checkpoints, which method: pbt needs; "
        "use mlp or cnn, or a trainer that sets checkpoints = True (see automl.trainer)"]


def test_a_population_killed_with_sigkill_resumes_from_its_checkpoints(ray_session: None, tmp_path: Path) -> None:
    import ray

    raw = pbt_spec("pbt-resume", fixed={"epochs": EPOCHS, "depth": 1, "width": 16, "optimizer": "sgd"},
                   tracking={})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # Both drivers join the test session's Ray (as on a cluster) rather than each starting one: the kill takes the
    # driver, its MLflow writer and its workers (actors of its job), and the resume starts in seconds.
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    import automl.engine

    automl.engine.release_idle_workers()  # this process's warm workers would hold the CPUs the drivers need
    proc = subprocess.Popen([str(AUTOML), "run", "spec.yaml"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:  # killed once the population is past its first exploit
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            files = list(tmp_path.glob(".automl/*/pbt/population.json"))
            if files:
                try:
                    state = json.loads(files[0].read_text())
                except ValueError:
                    state = {}
                if state.get("round", 1) >= 2:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the population never passed its first boundary")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    (folder,) = [p for p in (tmp_path / ".automl").iterdir() if p.is_dir()]
    assert list(folder.glob("pbt/*.ckpt"))  # the population's checkpoints survived the kill
    resumed = subprocess.run([str(AUTOML), "resume", folder.name], cwd=tmp_path, env=env, text=True,
                             capture_output=True, timeout=300, start_new_session=True)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    assert [r for r in runs if r.info.status == "RUNNING"] == []
    members = [r for r in runs if r.data.tags.get("automl.trial") is not None]
    assert sorted(int(r.data.tags["automl.trial"]) for r in members) == list(range(POPULATION))
    assert {r.data.tags["automl.state"] for r in members} == {"COMPLETE"}
    for run in members:
        # Each member's history reaches the last epoch; no member started over at step 1 after the resume.
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert max(steps) == EPOCHS
        assert steps.count(1) == 1
    final = json.loads((folder / "pbt" / "population.json").read_text())
    assert [m["state"] for m in final["members"]] == ["DONE"] * POPULATION
    assert not list(folder.glob("pbt/*.ckpt"))
