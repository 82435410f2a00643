"""A sweep killed at any moment (SIGKILL, SIGTERM) resumes: completed trials kept, none run twice,
the whole budget spent, nothing left RUNNING in MLflow or in Optuna. Real processes, killed by PID."""

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


def write_spec(workdir: Path, name: str) -> Path:
    (workdir / "toy_trainers.py").write_text((ASSETS / "toy_trainers.py").read_text())
    spec = {
        "name": name,
        "trainer": "toy_trainers:quadratic",
        "metric": {"name": "score", "goal": "maximize"},
        "method": "random",
        "budget": {"trials": TRIALS, "max_concurrent": 2},
        "seed": 3,
        "fixed": {"epochs": 4, "sleep": 0.15},
        "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0},
                       "kind": {"type": "categorical", "choices": ["a", "b", "c"]}},
    }
    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def automl(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "automl.cli", *args], cwd=cwd, env=env, text=True,
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


def kill_group(proc: subprocess.Popen[str], sig: int) -> None:
    """Signal the driver by its PID; afterwards clean up what it started (its own local Ray) by group."""
    os.kill(proc.pid, sig)


# SIGINT (Ctrl-C) is not a case of its own: the driver turns SIGTERM into the KeyboardInterrupt that SIGINT raises
# (orchestrator._on_sigterm_raise_interrupt), so both take the same path from there, and sent to the process
# group SIGTERM reaches the same processes a terminal's Ctrl-C does.
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_sweep_resumes_without_losing_or_repeating_trials(tmp_path: Path, sig: int) -> None:
    spec = write_spec(tmp_path, "resumable")
    proc = automl("run", str(spec), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while finished_trials(tmp_path / ".automl") < 3:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the sweep never completed 3 trials"
            time.sleep(0.1)
        kill_group(proc, sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the killed driver's own local Ray processes
        except ProcessLookupError:
            pass
    if sig != signal.SIGKILL:  # a clean stop: running trials KILLED, the sweep resumable
        assert proc.returncode != 0
        stopped = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        runs = stopped.search_runs([e.experiment_id for e in stopped.search_experiments()], max_results=1000)
        assert all(r.info.status != "RUNNING" for r in runs)
        assert [r.info.status for r in runs if r.data.tags.get("automl.role") == "sweep"] == ["KILLED"]
    before = {t.number: (t.params, t.value) for t in study_of(tmp_path).trials
              if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(before) >= 3

    resumed = automl("resume", "resumable", cwd=tmp_path)
    out, _ = resumed.communicate(timeout=180)
    try:
        os.killpg(resumed.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
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

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert all(r.info.status != "RUNNING" for r in runs)
    parents = [r for r in runs if r.data.tags.get("automl.role") == "sweep"]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["automl.trial"]) for r in finished) == sorted(complete)
