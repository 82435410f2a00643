"""The engine on real Ray and MLflow: several sweeps at once on one warm pool, live budget changes (from Python and
from `automl set` in another process), warm starts from MLflow history, cancel."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from automl import Sweep
from automl.engine import default_engine
from automl.state import journal_path
from automl.tracking import PARENT_TAG

ASSETS = Path(__file__).parent / "assets"
pytestmark = pytest.mark.usefixtures("ray_session")


def quadratic(name: str, **budget: Any) -> dict[str, Any]:
    return {"name": name, "trainer": "toy_trainers:quadratic", "metric": {"name": "score", "goal": "maximize"},
            "method": "random", "budget": {"trials": 6, "max_concurrent": 2, **budget}, "seed": 1,
            "fixed": {"epochs": 3, "sleep": 0.1},
            "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0},
                           "kind": {"type": "categorical", "choices": ["a", "b", "c"]}}}


def client(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def children(workdir: Path, parent: str | None) -> dict[int, Any]:
    c = client(workdir)
    runs = c.search_runs([c.get_run(parent or "").info.experiment_id],
                         filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    return {int(r.data.tags["automl.trial"]): r for r in runs}


def study_of(result: Any) -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal_path(result.state_dir))))
    return optuna.load_study(study_name=result.sweep_id, storage=storage)


def test_sweeps_with_different_trainers_run_at_once_and_a_loaded_trainer_is_not_imported_again(
    workdir: Path,
) -> None:
    logistic = {"name": "iris-logistic", "trainer": "toy_trainers:LogisticFitter", "data": {"source": "sklearn:iris"},
                "metric": {"name": "val_accuracy"}, "method": "random", "budget": {"trials": 4, "max_concurrent": 2},
                "parameters": {"C": {"type": "float", "low": 0.1, "high": 10, "log": True}}}
    spans: dict[str, list[tuple[float, float]]] = {"quad": [], "iris-logistic": []}
    begun: dict[tuple[str, int], float] = {}

    def timing(kind: str, record: Any, sweep: str) -> None:
        if kind == "started":
            begun[(sweep, record.number)] = time.monotonic()
        elif kind == "finished":
            spans[sweep].append((begun[(sweep, record.number)], time.monotonic()))

    a = Sweep.from_dict(quadratic("quad"), base_dir=ASSETS, workdir=workdir).submit(
        on_event=lambda k, r: timing(k, r, "quad"))
    b = Sweep.from_dict(logistic, base_dir=ASSETS, workdir=workdir).submit(
        on_event=lambda k, r: timing(k, r, "iris-logistic"))
    ra, rb = a.result(timeout=120), b.result(timeout=120)
    assert [t.state for t in ra.trials] == ["COMPLETE"] * 6
    assert [t.state for t in rb.trials] == ["COMPLETE"] * 4
    # At once: one sweep's trials ran while the other's did.
    assert min(s for s, _ in spans["iris-logistic"]) < max(e for _, e in spans["quad"])
    assert min(s for s, _ in spans["quad"]) < max(e for _, e in spans["iris-logistic"])
    # Separate records: each sweep its parent run, its trials 0..n-1 under it, each trial's own parameters.
    assert ra.parent_run_id != rb.parent_run_id
    runs_a, runs_b = children(workdir, ra.parent_run_id), children(workdir, rb.parent_run_id)
    assert sorted(runs_a) == list(range(6))
    assert sorted(runs_b) == list(range(4))
    assert {r.data.tags["automl.sweep_id"] for r in runs_a.values()} == {ra.sweep_id}
    assert all("C" in r.data.params and "x" not in r.data.params for r in runs_b.values())
    assert all(r.info.status == "FINISHED" for r in [*runs_a.values(), *runs_b.values()])
    assert rb.best is not None
    assert rb.best.model_uri is not None  # each finishing step logged its own best model

    # A third sweep with a trainer the workers already hold: no worker imports it again.
    pool = default_engine().executor
    target = "toy_trainers:quadratic"
    before = [counts.get(target, 0) for counts in pool.imports()]  # type: ignore[attr-defined]
    rc = Sweep.from_dict(quadratic("quad-again", trials=4), base_dir=ASSETS, workdir=workdir).run()
    after = [counts.get(target, 0) for counts in pool.imports()]  # type: ignore[attr-defined]
    assert [t.state for t in rc.trials] == ["COMPLETE"] * 4
    assert sum(after) == sum(before) > 0, (before, after)


def test_live_concurrency_and_trial_budget_take_effect_without_a_restart(workdir: Path) -> None:
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    first_done = threading.Event()

    def on_event(kind: str, record: Any) -> None:
        if kind == "started":
            starts[record.number] = time.monotonic()
        elif kind == "finished":
            ends[record.number] = time.monotonic()
            first_done.set()

    # Trials of about a second: long enough for a second worker to start (cold, if this test runs first) while
    # the first one still has trials to run.
    raw = quadratic("live", trials=40, max_concurrent=1)
    raw["fixed"] = {"epochs": 3, "sleep": 0.35}
    handle = Sweep.from_dict(raw, base_dir=ASSETS, workdir=workdir).submit(on_event=on_event)
    assert first_done.wait(60)
    changed = time.monotonic()
    effect = handle.update(max_concurrent=2, trials=8)
    assert effect == {"trials": 8, "max_concurrent": 2, "time": None}
    result = handle.result(timeout=120)
    assert len(result.trials) == 8  # the lowered budget: the sweep stopped at the new number
    before = sorted(n for n in starts if starts[n] < changed)
    after = sorted(n for n in starts if starts[n] >= changed)
    # One at a time before the change; after it, trials overlap (the second slot started one at once).
    assert all(starts[b] >= ends[a] for a, b in itertools.pairwise(before))
    assert any(starts[b] < ends[a] for a in after for b in after if a != b and starts[a] <= starts[b])
    history = client(workdir).get_metric_history(result.parent_run_id or "", "budget.max_concurrent")
    # The value and when it changed, on the parent run.
    assert [m.value for m in sorted(history, key=lambda m: m.timestamp)] == [1.0, 2.0]


def test_a_warm_started_sweep_begins_with_the_earlier_trials_in_its_study(workdir: Path) -> None:
    earlier = Sweep.from_dict(quadratic("warm", trials=5), base_dir=ASSETS, workdir=workdir).run()
    raw = {**quadratic("warm", trials=3), "method": "tpe", "warm_start": ["warm"]}
    notes: list[str] = []
    later = Sweep.from_dict(raw, base_dir=ASSETS, workdir=workdir).run(on_note=notes.append)
    assert later.warm_start_trials == 5
    assert [t.number for t in later.trials] == [0, 1, 2]  # its own trials, numbered from 0, three: the budget
    study = study_of(later)
    seeded = [t for t in study.trials if "warm_start" in t.user_attrs.get("automl", {})]
    assert sorted(t.value for t in seeded) == sorted(t.value for t in earlier.trials)  # not run again
    assert sorted(t.params["x"] for t in seeded) == sorted(t.params["x"] for t in earlier.trials)
    parent = client(workdir).get_run(later.parent_run_id or "")
    assert parent.data.params["warm_start.trials"] == "5"
    assert earlier.sweep_id in parent.data.params["warm_start.sweeps"]
    assert any("5 earlier trial(s)" in n for n in notes)
    # Another metric or goal cannot seed this one: refused in one line before anything runs.
    other = {**quadratic("other", trials=2), "metric": {"name": "score", "goal": "minimize"}, "warm_start": ["warm"]}
    from automl.errors import AutoMLError

    folders = sorted((workdir / ".automl").iterdir())
    with pytest.raises(AutoMLError, match="needs the same metric and goal"):
        Sweep.from_dict(other, base_dir=ASSETS, workdir=workdir).run()
    assert sorted((workdir / ".automl").iterdir()) == folders  # no state folder for it


def test_cancel_leaves_no_run_running_and_the_sweep_resumable(workdir: Path) -> None:
    reported = threading.Event()
    raw = quadratic("cancelled", trials=6)
    raw["fixed"] = {"epochs": 50, "sleep": 0.2}
    handle = Sweep.from_dict(raw, base_dir=ASSETS, workdir=workdir).submit(
        on_event=lambda kind, record: reported.set() if kind == "reported" else None)
    assert reported.wait(60)
    handle.cancel()
    result = handle.result(timeout=60)
    assert result.status == "KILLED"
    c = client(workdir)
    runs = c.search_runs([c.get_run(result.parent_run_id or "").info.experiment_id])
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    assert c.get_run(result.parent_run_id or "").info.status == "KILLED"
    assert {t.state for t in result.trials} == {"KILLED"}


def test_automl_set_changes_a_sweep_running_in_another_terminal(tmp_path: Path) -> None:
    (tmp_path / "toy_trainers.py").write_text((ASSETS / "toy_trainers.py").read_text())
    raw = quadratic("remote", trials=30, max_concurrent=1)
    raw["fixed"] = {"epochs": 3, "sleep": 0.15}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    automl = str(Path(sys.executable).with_name("automl"))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen([automl, "run", "spec.yaml"], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not list(tmp_path.glob(".automl/*/study.journal")) or b'"state":1' not in \
                next(tmp_path.glob(".automl/*/study.journal")).read_bytes():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        changed = subprocess.run([automl, "set", "remote", "--max-concurrent", "2", "--trials", "5"], cwd=tmp_path,
                                 env=env, text=True, capture_output=True, timeout=60)
        assert changed.returncode == 0, changed.stderr
        assert "trials 5, max_concurrent 2" in changed.stdout
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert "note: budget changed: trials 5, max_concurrent 2" in out
    assert "trials: 5 complete" in out
    refused = subprocess.run([automl, "set", "remote", "--trials", "9"], cwd=tmp_path, env=env, text=True,
                             capture_output=True, timeout=60)
    assert refused.returncode == 2
    assert "is not running" in refused.stderr
