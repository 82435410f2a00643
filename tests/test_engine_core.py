"""The engine's decisions without Ray or MLflow: ``automl.testing``'s in-process executor and memory recorder under
the real engine loop, sweep decisions (``SweepCore``) and the real Optuna journal. Fast: no process is started."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from automl import Sweep
from automl.engine import Engine
from automl.engine.records import TrialState
from automl.errors import AutoMLError
from automl.state import journal_path
from automl.testing import InProcessExecutor, MemoryRecorder

ASSETS = Path(__file__).parent / "assets"

TRAINERS = '''
import time


def sleepy(params, data, report):
    """Reports its x once per epoch, sleeping between reports (a trial that takes a while)."""
    for step in range(1, int(params.get("epochs", 3)) + 1):
        time.sleep(float(params.get("sleep", 0.05)))
        report(step, {"score": float(params["x"]) + 0.01 * step})


def hang_unless_stopped(params, data, report):
    """Reports every 20 ms until it is stopped (the engine's stop request takes effect at a report)."""
    step = 0
    while True:
        step += 1
        time.sleep(0.02)
        report(step, {"score": float(params["x"])})
'''


@pytest.fixture
def trainers(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "engine_trainers.py").write_text(TRAINERS)
    return folder


def spec(name: str, trainer: str = "engine_trainers:sleepy", **budget: Any) -> dict[str, Any]:
    return {"name": name, "trainer": trainer, "metric": {"name": "score", "goal": "maximize"}, "method": "random",
            "budget": {"trials": 6, "max_concurrent": 2, **budget}, "fixed": {"epochs": 3, "sleep": 0.05},
            "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0}}}


def plan(raw: dict[str, Any], trainers: Path, tmp_path: Path) -> Sweep:
    return Sweep.from_dict(raw, base_dir=trainers, workdir=tmp_path)


def overlap(executor: InProcessExecutor, sweep_id: str) -> int:
    """The most trials of one sweep that ran at the same time."""
    spans = [(executor.starts[k], executor.ends[k]) for k in executor.starts if k.sweep_id == sweep_id]
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def test_a_sweep_runs_its_budget_with_trials_numbered_from_zero_and_records_each(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, executor, recorder = engine
    result = eng.run(plan(spec("plain"), trainers, tmp_path))
    assert [t.number for t in result.trials] == list(range(6))
    assert all(t.state is TrialState.COMPLETE for t in result.trials)
    assert result.best is not None
    assert result.best.value == max(t.value for t in result.trials if t.value is not None)
    (log,) = recorder.logs
    assert log.parent["status"] == "FINISHED"
    assert sorted(log.trials) == list(range(6))
    assert {t["status"] for t in log.trials.values()} == {"FINISHED"}
    assert [r[0] for r in log.trials[0]["reports"]] == [1, 2, 3]
    assert overlap(executor, result.sweep_id) == 2
    # The journal is the search state: every trial told.
    study = optuna.load_study(study_name=result.sweep_id,
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(str(journal_path(result.state_dir)))))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6


def test_two_sweeps_wanting_more_than_the_slots_share_them_fairly(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, executor, _ = engine
    raw = spec("fair-a", max_concurrent=2, trials=6)
    a = eng.submit(plan(raw, trainers, tmp_path))
    b = eng.submit(plan({**raw, "name": "fair-b"}, trainers, tmp_path))
    ra, rb = a.result(timeout=60), b.result(timeout=60)
    # While both ran, each held one of the two slots: neither ran two trials at once.
    both = (max(min(executor.starts[k] for k in executor.starts if k.sweep_id == r.sweep_id) for r in (ra, rb)),
            min(max(executor.ends[k] for k in executor.ends if k.sweep_id == r.sweep_id) for r in (ra, rb)))
    for result in (ra, rb):
        spans = [(executor.starts[k], executor.ends[k]) for k in executor.starts if k.sweep_id == result.sweep_id]
        inside = [(s, e) for s, e in spans if both[0] <= s < both[1]]
        assert max(sum(1 for s, e in inside if s <= t < e) for t, _ in inside) == 1
    assert len(ra.trials) == len(rb.trials) == 6


def test_more_sweeps_than_slots_all_move_rather_than_the_oldest_first(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, executor, _ = engine
    raw = spec("many", max_concurrent=2, trials=6)
    handles = [eng.submit(plan({**raw, "name": f"many-{i}"}, trainers, tmp_path)) for i in range(4)]
    results = [h.result(timeout=60) for h in handles]
    firsts = [min(executor.starts[k] for k in executor.starts if k.sweep_id == r.sweep_id) for r in results]
    lasts = [max(executor.ends[k] for k in executor.ends if k.sweep_id == r.sweep_id) for r in results]
    # Every sweep started before any ended (the oldest did not take both slots until it was done), and while all
    # four ran each had its turns: trial time is shared, not handed out by age.
    assert max(firsts) < min(lasts)
    for r in results:
        inside = [k for k in executor.starts if k.sweep_id == r.sweep_id and max(firsts) <= executor.starts[k]
                  < min(lasts)]
        assert inside, r.sweep_id
    assert all(len(r.trials) == 6 for r in results)


def test_live_budget_changes_take_effect_and_impossible_ones_are_refused(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, executor, recorder = engine
    raw = spec("live", max_concurrent=1, trials=4)
    raw["fixed"] = {"epochs": 4, "sleep": 0.08}
    one_done, two_done = threading.Event(), threading.Event()
    finished: list[int] = []

    def on_event(kind: str, record: Any) -> None:
        if kind == "finished":
            finished.append(record.number)
            (one_done if len(finished) == 1 else two_done).set()

    handle = eng.submit(plan(raw, trainers, tmp_path), on_event=on_event)
    one_done.wait(30)
    changed = time.monotonic()
    assert handle.update(max_concurrent=2)["max_concurrent"] == 2
    assert handle.update(trials=6)["trials"] == 6
    two_done.wait(30)
    with pytest.raises(AutoMLError, match=r"budget\.trials: 1 is fewer than the \d trials already done"):
        handle.update(trials=1)
    with pytest.raises(AutoMLError, match=r"budget\.max_concurrent must be a whole number >= 1"):
        handle.update(max_concurrent=0)
    with pytest.raises(AutoMLError, match="has already passed"):
        handle.update(time="0.001s")
    result = handle.result(timeout=60)
    assert len(result.trials) == 6
    # One at a time before the change (each trial started after the one before had ended), two at once after.
    spans = sorted((executor.starts[k], executor.ends[k]) for k in executor.starts)
    before = [(s, e) for s, e in spans if s < changed]
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(before))
    assert overlap(executor, result.sweep_id) == 2
    (log,) = recorder.logs
    changes = [(k, v) for k, v, _ in log.parent["metrics"]]
    assert ("budget.max_concurrent", 2) in changes
    assert ("budget.trials", 6) in changes


def test_lowering_the_trial_budget_stops_the_sweep_at_the_new_number(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, _, _ = engine
    finished: list[int] = []
    done_two = threading.Event()

    def on_event(kind: str, record: Any) -> None:
        if kind == "finished":
            finished.append(record.number)
            if len(finished) >= 2:
                done_two.set()

    handle = eng.submit(plan(spec("lower", trials=40), trainers, tmp_path), on_event=on_event)
    done_two.wait(30)
    effect = handle.update(trials=4)
    assert effect["trials"] == 4
    result = handle.result(timeout=60)
    assert len(result.trials) == 4


def test_cancel_kills_running_trials_queues_them_again_and_leaves_the_sweep_resumable(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, executor, recorder = engine
    running = threading.Event()
    handle = eng.submit(plan(spec("cancel", trainer="engine_trainers:hang_unless_stopped"), trainers, tmp_path),
                        on_event=lambda kind, record: running.set() if kind == "reported" else None)
    running.wait(30)
    handle.cancel("enough")
    result = handle.result(timeout=30)
    assert result.status == "KILLED"
    assert {t.state for t in result.trials} == {TrialState.KILLED}
    assert all(t.error == "enough" for t in result.trials)
    (log,) = recorder.logs
    assert log.parent["status"] == "KILLED"
    assert {t["status"] for t in log.trials.values()} == {"KILLED"}
    deadline = time.monotonic() + 10
    while executor.running() and time.monotonic() < deadline:  # the stop reached the trials' next report
        time.sleep(0.05)
    assert executor.running() == []
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal_path(result.state_dir))))
    states = [t.state.name for t in optuna.load_study(study_name=result.sweep_id, storage=storage).trials]
    assert states.count("FAIL") == len(result.trials)  # cut short, not finished
    assert states.count("WAITING") == len(result.trials)  # and queued to run again on resume


def test_a_worker_that_dies_under_a_trial_is_retried_under_the_same_number(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, executor, _ = engine
    killed: list[Any] = []

    def kill_first(kind: str, record: Any) -> None:
        if kind == "reported" and not killed:
            killed.append(record.number)
            key = next(k for k in executor.running() if k.number == record.number)
            executor.kill(key)

    result = eng.run(plan(spec("retry", trials=2, max_concurrent=1), trainers, tmp_path), on_event=kill_first)
    assert [t.state for t in result.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert result.trials[killed[0]].attempts == 2
    assert [r.key.number for r in executor.launched] == [0, 0, 1]


def test_a_time_budget_stops_running_trials_as_killed(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, _, _ = engine
    result = eng.run(plan(spec("timed", trainer="engine_trainers:hang_unless_stopped", time=0.5),
                          trainers, tmp_path))
    assert {t.state for t in result.trials} == {TrialState.KILLED}
    assert all(t.error == "budget.time reached" for t in result.trials)
    assert result.status == "FINISHED"  # the budget was spent, not cancelled: nothing to resume


def test_bad_input_is_refused_at_submit_before_anything_is_written(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, executor, recorder = engine
    raw = {**spec("bad"), "data": {"source": "missing.csv", "target": "y"}}
    with pytest.raises(AutoMLError, match=r"data\.source: file not found"):
        eng.submit(plan(raw, trainers, tmp_path))
    assert not (tmp_path / ".automl").exists()
    assert executor.launched == []
    assert recorder.logs == []


def test_the_in_process_executor_never_starts_ray(tmp_path: Path, trainers: Path) -> None:
    # automl.testing is for a plain Python process: asking Ray where a trial ran would start a whole local Ray.
    import subprocess
    import sys

    script = f"""
import ray
from pathlib import Path
from automl import Sweep
from automl.engine import Engine
from automl.testing import InProcessExecutor, MemoryRecorder
spec = {{"name": "plain", "trainer": "engine_trainers:sleepy", "metric": {{"name": "score", "goal": "maximize"}},
         "method": "random", "budget": {{"trials": 3, "max_concurrent": 2}}, "fixed": {{"epochs": 1, "sleep": 0}},
         "parameters": {{"x": {{"type": "float", "low": 0, "high": 1}}}}}}
engine = Engine(executor=InProcessExecutor(slots=2), recorder=MemoryRecorder(), workdir=Path({str(tmp_path)!r}))
result = engine.run(Sweep.from_dict(spec, base_dir=Path({str(trainers)!r}), workdir=Path({str(tmp_path)!r})))
engine.shutdown()
print(len(result.trials), ray.is_initialized())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "False"]
