"""Run automl's engine without Ray or MLflow: for unit tests of the engine's decisions, and for trainer authors who
want to try a trainer through automl's contract (reports, early stopping, model packing) in a plain Python process.

    from automl.engine import Engine
    from automl.testing import InProcessExecutor, MemoryRecorder

    engine = Engine(executor=InProcessExecutor(slots=2), recorder=MemoryRecorder(), workdir=tmp_path)
    result = engine.run(Sweep.from_dict(spec, workdir=tmp_path))

``InProcessExecutor`` runs each trial in a thread of this process with automl's own worker code (the same
``TrialRunner`` the Ray actors run); ``MemoryRecorder`` keeps what would go to MLflow in lists. No model is logged
and no plot drawn (there is no MLflow to hold them); the state folder and its Optuna journal are real.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from automl.engine.executor import Event, Shape, Started, TrialEnd, TrialRequest
from automl.engine.records import TrialKey

__all__ = ["InProcessExecutor", "MemoryRecorder", "MemorySweepLog"]


class InProcessExecutor:
    """An ``automl.engine.executor.Executor`` that runs trials in threads of this process, ``slots`` at a time.

    ``launched`` lists every request in order and ``starts``/``ends`` the ``time.monotonic()`` of each trial's start
    and end by key, for tests to assert on. ``kill`` ends a trial at once as a dead worker would (FAILED,
    ``worker_died``); its thread's later events are dropped.
    """

    def __init__(self, slots: int = 2) -> None:
        from automl.engine.worker import TrialRunner

        self.slots = slots
        self.runner = TrialRunner(threads=1)  # one set of loaded trainers, as one warm worker per slot would share
        self.launched: list[TrialRequest] = []
        self.starts: dict[TrialKey, float] = {}
        self.ends: dict[TrialKey, float] = {}
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._running: dict[TrialKey, int] = {}  # key -> attempt id
        self._attempts = itertools.count()
        self._lock = threading.Lock()

    def capacity(self, shape: Shape) -> int:
        return self.slots

    def can_start(self, shape: Shape) -> bool:
        with self._lock:
            return len(self._running) < self.slots

    def put_data(self, data: Any) -> Any:
        return data

    def drop_data(self, handle: Any) -> None:
        pass

    def prepare(self, shape: Shape, trainer: Any, count: int) -> Callable[[], None]:
        return lambda: None

    def launch(self, request: TrialRequest) -> None:
        attempt = next(self._attempts)
        with self._lock:
            self._running[request.key] = attempt
        self.launched.append(request)
        threading.Thread(target=self._run, args=(request, attempt), name=f"trial-{request.key}", daemon=True).start()

    def _run(self, request: TrialRequest, attempt: int) -> None:
        for batch in self.runner.run(request.key, request.trainer, request.params, request.data, request.seed,
                                     request.segment, request.predictions):
            with self._lock:
                if self._running.get(request.key) != attempt:
                    return  # killed: what it still says is not heard
            for event in batch:
                self._events.put(event)

    def stop(self, key: TrialKey) -> None:
        self.runner.stop(key)

    def kill(self, key: TrialKey) -> None:
        with self._lock:
            if self._running.pop(key, None) is None:
                return
        # The "dead" thread runs on unheard (a thread cannot be killed); a retry of the trial has the same key, so
        # no stop request is left behind for it.
        self._events.put(TrialEnd(key, "FAILED", 0.0, worker_died=True, error="the worker was killed"))

    def running(self) -> list[TrialKey]:
        with self._lock:
            return list(self._running)

    def poll(self, timeout: float | None) -> list[Event]:
        events: list[Event] = []
        try:
            events.append(self._events.get(timeout=timeout) if timeout else self._events.get_nowait())
        except queue.Empty:
            return events
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        for event in events:
            if isinstance(event, Started):
                event.at = now
                self.starts[event.key] = now
            elif isinstance(event, TrialEnd):
                self.ends[event.key] = now
                with self._lock:
                    self._running.pop(event.key, None)
        return events

    def shutdown(self) -> None:
        for key in self.running():
            self.runner.stop(key)


@dataclass
class MemorySweepLog:
    """What one sweep would write to MLflow, kept in memory: ``trials[number]`` holds params, reports, state, tags."""

    tracking_uri: str
    trials_enabled: bool = True
    experiment_id: str = "memory"
    parent_run_id: str = ""
    open_sent: bool = False
    parent: dict[str, Any] = field(default_factory=lambda: {"params": {}, "metrics": [], "tags": {}, "status": None})
    trials: dict[int, dict[str, Any]] = field(default_factory=dict)
    client: Any = None  # no MLflow client: the finishing step logs no model and draws no plot

    def open(self, **parent: Any) -> None:
        self.open_sent = True
        self.parent_run_id = f"memory-{parent.get('run_name', '')}"
        self.parent["params"].update(parent.get("params") or {})
        self.parent["tags"].update(parent.get("tags") or {})

    def ready(self, timeout: float = 0.0) -> None:
        pass

    def log_parent(self, *, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        self.parent["params"].update(params or {})
        self.parent["metrics"].extend((k, v, time.monotonic()) for k, v in (metrics or {}).items())
        self.parent["tags"].update(tags or {})

    def child_runs(self) -> dict[int, tuple[str, str]]:
        return {n: (t["run_id"], t["status"]) for n, t in self.trials.items()}

    def kill_run(self, run_id: str, reason: str) -> None:
        for t in self.trials.values():
            if t["run_id"] == run_id:
                t["status"] = "KILLED"

    def trial_adopted(self, number: int, run_id: str) -> None:
        self.trials.setdefault(number, self._new(number))["run_id"] = run_id

    def _new(self, number: int) -> dict[str, Any]:
        return {"run_id": f"{self.parent_run_id}/{number}", "params": {}, "reports": [], "status": "RUNNING",
                "tags": {}}

    def trial_started(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> None:
        trial = self.trials.setdefault(number, self._new(number))
        trial["params"].update(params)
        trial["tags"].update(tags)

    def trial_reported(self, number: int, step: int, metrics: dict[str, float]) -> None:
        self.trials.setdefault(number, self._new(number))["reports"].append((step, dict(metrics)))

    def trial_finished(self, number: int, state: str, tags: dict[str, str], artifacts: Any = ()) -> None:
        from automl.tracking import MLFLOW_STATUS

        trial = self.trials.setdefault(number, self._new(number))
        trial["status"] = MLFLOW_STATUS.get(state, "FINISHED")
        trial["tags"].update(tags)

    def trial_annotated(self, number: int, tags: dict[str, str], artifacts: Any = ()) -> None:
        trial = self.trials.setdefault(number, self._new(number))
        trial["tags"].update(tags)
        trial.setdefault("artifacts", {}).update({name: text for name, text in artifacts})

    def run_id_of(self, number: int) -> str | None:
        trial = self.trials.get(number)
        return None if trial is None else str(trial["run_id"])

    def flush(self, timeout: float = 0.0) -> None:
        pass

    def finish(self, status: str, *, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
               tags: dict[str, str] | None = None) -> None:
        self.log_parent(params=params, metrics=metrics, tags=tags)
        self.parent["status"] = status

    def abandon(self) -> None:
        pass


class MemoryRecorder:
    """A recorder that keeps every sweep's record in memory (``logs``, in the order the sweeps opened)."""

    def __init__(self) -> None:
        self.logs: list[MemorySweepLog] = []

    def open(self, tracking_uri: str, *, trials: bool = True) -> MemorySweepLog:
        sweep_log = MemorySweepLog(tracking_uri, trials_enabled=trials)
        self.logs.append(sweep_log)
        return sweep_log

    def shutdown(self) -> None:
        pass
