"""A sweep killed at any moment (SIGKILL, Ctrl-C) resumes: completed trials kept, none run twice, the whole budget
spent, nothing left RUNNING in MLflow or in Optuna, the exported model is the best trial's. Real processes, started
as a user starts them (the `automl` command) and killed by PID or by process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from automl.state import journal_path

ASSETS = Path(__file__).parent / "assets"
TRIALS = 10
AUTOML = Path(sys.executable).with_name("automl")  # the console script: what a user's shell runs


def write_spec(workdir: Path, name: str, marker: Path) -> Path:
    (workdir / "toy_trainers.py").write_text((ASSETS / "toy_trainers.py").read_text())
    # A stray mlflow.py where the user works: no process automl starts may import it in place of MLflow.
    (workdir / "mlflow.py").write_text(f"open({str(marker)!r}, 'w').write('executed')\n")
    spec = {
        "name": name,
        "trainer": "toy_trainers:quadratic",
        "metric": {"name": "score", "goal": "maximize"},
        "method": "random",
        "budget": {"trials": TRIALS, "max_concurrent": 2},
        "seed": 3,
        "fixed": {"epochs": 4, "sleep": 0.15, "model": True},
        "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0},
                       "kind": {"type": "categorical", "choices": ["a", "b", "c"]}},
    }
    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def automl(*args: str, cwd: Path, **env_extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_extra}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([str(AUTOML), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finished_trials(state_dir: Path) -> int:
    journals = list(state_dir.glob("*/study.journal"))
    if not journals:
        return 0
    lines = journals[0].read_bytes().splitlines()
    return sum(1 for line in lines if b'"op_code":6' in line and b'"state":1' in line)


def study_of(workdir: Path) -> optuna.Study:
    (folder,) = [p for p in (workdir / ".automl").iterdir() if p.is_dir()]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal_path(folder))))
    return optuna.load_study(study_name=folder.name, storage=storage)


def wait_for(condition: object, proc: subprocess.Popen[str], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, f"the sweep never {what}"
        time.sleep(0.1)


def all_runs(workdir: Path) -> list:  # type: ignore[type-arg]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def kill_group(pid: int) -> None:
    """What the killed driver started (its own local Ray) goes with it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("how", ["sigkill", "ctrl-c"])
def test_killed_sweep_resumes_without_losing_or_repeating_trials(tmp_path: Path, how: str) -> None:
    marker = tmp_path.parent / f"{tmp_path.name}-mlflow-py-imported"
    spec = write_spec(tmp_path, "resumable", marker)
    state = tmp_path / ".automl"
    if how == "sigkill":
        # The driver stops where a crash hurts most: the second-best trial's model saved, the trial not yet told to
        # Optuna. Meanwhile a second driver on the same sweep is refused, naming the one running it.
        proc = automl("run", str(spec), cwd=tmp_path, AUTOML_DEBUG_PAUSE_AT="best-saved#2")
        try:
            wait_for(lambda: (state / "best-saved.paused").exists(), proc, "saved its second best model")
            second = automl("resume", "resumable", cwd=tmp_path)
            out, _ = second.communicate(timeout=60)
            assert second.returncode == 2, out
            assert f"is already running in process {proc.pid}" in out
            assert len(out.strip().splitlines()) == 1, out
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            kill_group(proc.pid)
    else:
        # Ctrl-C in a terminal: SIGINT to the whole foreground process group, MLflow's writer included.
        proc = automl("run", str(spec), cwd=tmp_path)
        try:
            wait_for(lambda: finished_trials(state) >= 3, proc, "completed 3 trials")
            os.killpg(proc.pid, signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        finally:
            kill_group(proc.pid)
        assert proc.returncode != 0
        # What the user saw is automl's own output: Ray's and MLflow's start-up lines went to .automl/automl.log.
        assert "Token authentication" not in out
        assert not [line for line in out.splitlines() if "WARNING" in line or "INFO" in line], out
        runs = all_runs(tmp_path)
        assert [r.info.status for r in runs if r.info.status == "RUNNING"] == [], out[-3000:]
        assert [r.info.status for r in runs if r.data.tags.get("automl.role") == "sweep"] == ["KILLED"]
        # A child run the journal has and MLflow lacks (a writer killed before writing it) is written again.
        lost = next(r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("automl.trial"))
        MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").delete_run(lost.info.run_id)
    before = {t.number: (t.params, t.value) for t in study_of(tmp_path).trials
              if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(before) >= 1

    resumed = automl("resume", "resumable", cwd=tmp_path)
    out, _ = resumed.communicate(timeout=180)
    kill_group(resumed.pid)
    assert resumed.returncode == 0, out[-3000:]

    study = study_of(tmp_path)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.WAITING not in states
    complete = {t.number: (t.params, t.value) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(complete) == TRIALS  # the whole budget, interrupted trials re-run
    for number, kept in before.items():
        assert complete[number] == kept  # kept with its result, not run again
    # No configuration ran to completion twice.
    configs = [json.dumps(p, sort_keys=True) for p, _ in complete.values()]
    assert len(set(configs)) == len(configs)

    runs = all_runs(tmp_path)
    assert all(r.info.status != "RUNNING" for r in runs)
    parents = [r for r in runs if r.data.tags.get("automl.role") == "sweep"]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["automl.trial"]) for r in finished) == sorted(complete)

    # The model logged as the sweep's best is the best trial's: the bundle in the logged MLflow model names that
    # trial, and so does the best model kept in the state folder.
    best = max(complete, key=lambda n: complete[n][1] or float("-inf"))
    assert parents[0].data.tags["automl.best_trial"] == str(best)
    (folder,) = [p for p in state.iterdir() if p.is_dir()]
    assert json.loads((folder / "best_model" / "manifest.json").read_text())["trial"] == best
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = Path(client.download_artifacts(parents[0].info.run_id, "best_model", str(tmp_path / "logged")))
    (manifest,) = logged.glob("artifacts/*/manifest.json")
    assert json.loads(manifest.read_text())["trial"] == best
    assert not marker.exists()  # neither driver nor the MLflow writer imported ./mlflow.py
