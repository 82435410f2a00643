"""The service's sweeps: the queue in front of the engine, the link from each to its engine handle, the events.

A submitted sweep is QUEUED; the scheduler starts queued sweeps first come first served while fewer than
``max_running`` run and their owner runs fewer than ``max_running_per_user``; the engine shares its workers fairly
between running sweeps. Trial events from the engine (its loop thread) are queued to one writer thread, which
stores them (the SSE stream reads them back, resumable by id), keeps each sweep's trials table and counts, and
notices a new best. A sweep's end (FINISHED, FAILED, CANCELLED) is recorded from its handle's result.

The service survives its own death: at start, sweeps the store says are RUNNING are resumed from their state
folders (the engine keeps completed trials and re-runs the cut ones), QUEUED ones stay queued. A clean stop
(SIGTERM) leaves running sweeps RUNNING in the store, so the next start resumes them too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.errors import AutoMLError, SweepNotFoundError

if TYPE_CHECKING:
    from automl.engine import Engine, SweepHandle
    from automl.engine.records import TrialRecord
    from automl.service.store import Principal, ServiceStore

log = logging.getLogger(__name__)

FINAL = ("FINISHED", "FAILED", "CANCELLED")
STATES = ("QUEUED", "RUNNING", *FINAL)


class Conflict(AutoMLError):
    """A change the sweep's state does not allow (HTTP 409)."""


class Forbidden(AutoMLError):
    """Another user's sweep, or a viewer asking for a change (HTTP 403)."""


@dataclass
class Settings:
    root: Path  # the service's working directory: .automl/ state folders, mlflow.db
    data_root: Path
    trainers_dir: Path | None
    tracking_uri: str
    storage: str | None  # the search state (Optuna) in a database; None: journal files
    max_running: int
    max_running_per_user: int
    mlflow_ui: str | None  # base URL of an MLflow UI on the tracking store, for links


@dataclass
class _Live:
    handle: SweepHandle
    owner: str
    goal: str
    best: float | None = None
    running: set[int] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)


class SweepManager:
    def __init__(self, store: ServiceStore, engine: Engine, settings: Settings) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings
        self._live: dict[str, _Live] = {}
        self._starting: set[str] = set()
        self._lock = threading.RLock()
        self._kick = threading.Event()
        self._plans: dict[str, Any] = {}  # sweep id -> the Sweep its submit built, until it starts
        self._stopping = False
        self._events: queue.SimpleQueue[tuple[str, str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_events, name="automl-service-events", daemon=True)
        self._writer.start()
        self._scheduler = threading.Thread(target=self._schedule_loop, name="automl-service-queue", daemon=True)

    # ------------------------------------------------------------------------------------------ life

    def start(self) -> None:
        """Recover what a previous service left RUNNING, then start taking sweeps off the queue."""
        for record in reversed(self.store.list_sweeps(state="RUNNING")):
            self.store.update_sweep(record["id"], info={"resume": True})
            self._start(record, resume=True)
        self._scheduler.start()
        self._kick.set()

    def stop(self) -> None:
        """A clean stop: running sweeps are stopped (trials KILLED) but stay RUNNING here, to resume at next start."""
        self._stopping = True
        self._kick.set()
        with contextlib.suppress(Exception):
            self.engine.shutdown()
        self._events.put(None)
        self._writer.join(timeout=30)

    # ------------------------------------------------------------------------------------------ requests

    def submit(self, principal: Principal, body_spec: Any, overrides: dict[str, Any] | None) -> dict[str, Any]:
        from automl.orchestrator import Sweep
        from automl.samplers import sampler_name
        from automl.service import policy

        if not principal.can_change:
            raise Forbidden("a viewer token cannot submit sweeps")
        settings = self.settings
        resolved = policy.resolve(body_spec, overrides, data_root=settings.data_root,
                                  trainers_dir=settings.trainers_dir, store=self.store, principal=principal)
        plan = Sweep(resolved.spec, base_dir=resolved.base_dir, workdir=settings.root,
                     tracking_uri=settings.tracking_uri, storage=settings.storage, spec_text=resolved.text,
                     source="spec")
        plan.check()  # data file and header, trainer source: the same one-line refusals as `automl validate`
        spec = resolved.spec
        planned = plan.planned_trials()
        sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        info = {"method": spec.method, "metric": spec.metric_name, "goal": spec.direction,
                "sampler": sampler_name(spec.method, plan.space, objectives=len(spec.objectives), trials=planned),
                "budget": {"trials": planned, "max_concurrent": spec.budget.max_concurrent, "time": spec.budget.time},
                "base_dir": str(resolved.base_dir), "text": resolved.text, "counts": {}}
        self._plans[sweep_id] = plan  # checked already: its start need not parse and check it again
        self.store.add_sweep({"id": sweep_id, "name": spec.name, "owner": principal.name, "state": "QUEUED",
                              "created": time.time(), "spec": resolved.raw, "info": info})
        self._event(sweep_id, "sweep_state", {"state": "QUEUED", "error": None})
        self._kick.set()
        return self.view(sweep_id)

    def record(self, sweep_id: str, principal: Principal, *, change: bool = False) -> dict[str, Any]:
        record = self.store.get_sweep(sweep_id)
        if record is None:
            raise SweepNotFoundError(f"no sweep '{sweep_id}'")
        if not principal.may_see(record["owner"]):
            raise Forbidden(f"sweep '{sweep_id}' belongs to another user")
        if change and not principal.may_change(record["owner"]):
            raise Forbidden(f"this token may not change sweep '{sweep_id}' ({principal.role})")
        return record

    def cancel(self, sweep_id: str) -> dict[str, Any]:
        with self._lock:
            record = self.store.get_sweep(sweep_id)
            assert record is not None  # checked by the caller
            if record["state"] == "QUEUED":
                self._plans.pop(sweep_id, None)
                self.store.update_sweep(sweep_id, state="CANCELLED", finished=time.time())
                self._event(sweep_id, "sweep_state", {"state": "CANCELLED", "error": None})
                return self.view(sweep_id)
            live = self._live.get(sweep_id)
            if record["state"] != "RUNNING" or live is None:
                raise Conflict(f"sweep '{sweep_id}' is {record['state']}; only a QUEUED or RUNNING sweep can be "
                               "cancelled")
            self.store.update_sweep(sweep_id, info={"cancel_requested": True})
        live.handle.cancel("cancelled through the service")
        with contextlib.suppress(Exception):
            live.handle.future.exception(timeout=30)  # its record closed: the answer shows CANCELLED
        deadline = time.monotonic() + 10
        while self.store.get_sweep(sweep_id)["state"] == "RUNNING" and time.monotonic() < deadline:  # type: ignore[index]
            time.sleep(0.05)
        return self.view(sweep_id)

    def resume(self, sweep_id: str) -> dict[str, Any]:
        with self._lock:
            record = self.store.get_sweep(sweep_id)
            assert record is not None
            if record["state"] not in ("CANCELLED", "FAILED"):
                raise Conflict(f"sweep '{sweep_id}' is {record['state']}; only a CANCELLED or FAILED sweep can be "
                               "resumed")
            self.store.update_sweep(sweep_id, state="QUEUED", finished=None, error=None,
                                    info={"resume": record.get("started") is not None, "cancel_requested": False})
        self._event(sweep_id, "sweep_state", {"state": "QUEUED", "error": None})
        self._kick.set()
        return self.view(sweep_id)

    def update(self, sweep_id: str, budget: dict[str, Any]) -> dict[str, Any]:
        from automl.spec import parse_duration

        unknown = sorted(set(budget) - {"trials", "max_concurrent", "time"})
        if unknown:
            raise Conflict(f"budget.{unknown[0]}: cannot change; a running sweep's trials, max_concurrent and time "
                           "can")
        seconds = None
        if budget.get("time") is not None:
            try:
                seconds = parse_duration(budget["time"])
            except ValueError as exc:
                raise Conflict(f"budget.time {exc}") from None
        with self._lock:
            record = self.store.get_sweep(sweep_id)
            assert record is not None
            live = self._live.get(sweep_id)
            if record["state"] == "QUEUED":
                return self._update_queued(record, budget, seconds)
            if record["state"] != "RUNNING" or live is None:
                raise Conflict(f"sweep '{sweep_id}' is {record['state']}; its budget cannot change")
        try:
            effect = live.handle.update(trials=budget.get("trials"), max_concurrent=budget.get("max_concurrent"),
                                        time=seconds)
        except AutoMLError as exc:
            raise Conflict(str(exc)) from None
        self.store.update_sweep(sweep_id, info={"budget": effect})
        return self.view(sweep_id)

    def _update_queued(self, record: dict[str, Any], budget: dict[str, Any], seconds: float | None) -> dict[str, Any]:
        from automl.spec import spec_from_dict

        raw = dict(record["spec"])
        raw["budget"] = {**raw.get("budget", {}), **{k: v for k, v in budget.items() if v is not None}}
        if seconds is not None:
            raw["budget"]["time"] = seconds
        try:
            spec = spec_from_dict(raw, source="spec")
        except AutoMLError as exc:
            raise Conflict(str(exc)) from None
        info = {"budget": {"trials": spec.budget.trials or record["info"]["budget"]["trials"],
                           "max_concurrent": spec.budget.max_concurrent, "time": spec.budget.time}}
        self._plans.pop(record["id"], None)  # its start builds the plan from the changed spec
        self.store.update_sweep(record["id"], spec=spec.model_dump(mode="json"), info=info)
        return self.view(record["id"])

    # ------------------------------------------------------------------------------------------ views

    def view(self, sweep_id: str) -> dict[str, Any]:
        """The sweep object of DESIGN.md section 9."""
        record = self.store.get_sweep(sweep_id)
        if record is None:
            raise SweepNotFoundError(f"no sweep '{sweep_id}'")
        info = record["info"]
        live = self._live.get(sweep_id)
        budget = dict(info.get("budget") or {})
        counts = dict(info.get("counts") or {})
        mlflow = dict(info.get("mlflow") or {})
        if live is not None:
            with contextlib.suppress(Exception):
                status = live.handle.status()
                budget = status.get("budget", budget)
                counts = dict(status.get("counts", counts))
                counts["RUNNING"] = len(status.get("running", []))
            mlflow = {**mlflow, **{k: v for k, v in live.handle.mlflow.items() if v}}
        done = {k.lower(): int(counts.get(k, 0)) for k in ("COMPLETE", "STOPPED", "FAILED", "RUNNING")}
        total = sum(int(v) for k, v in counts.items())
        url = None
        if mlflow.get("experiment_id") and mlflow.get("run_id") and self.settings.mlflow_ui:
            url = (f"{self.settings.mlflow_ui.rstrip('/')}/#/experiments/{mlflow['experiment_id']}/runs/"
                   f"{mlflow['run_id']}?workflowType=machine_learning")
        return {
            "id": record["id"], "name": record["name"], "owner": record["owner"], "state": record["state"],
            "created": _iso(record["created"]), "started": _iso(record["started"]),
            "finished": _iso(record["finished"]), "method": info.get("method"), "sampler": info.get("sampler"),
            "metric": info.get("metric"), "goal": info.get("goal"),
            "budget": {"trials": budget.get("trials"), "max_concurrent": budget.get("max_concurrent"),
                       "time": budget.get("time")},
            "trials": {**{k: v for k, v in done.items()}, "total": total},
            "best": info.get("best"),
            "mlflow": {"experiment_id": mlflow.get("experiment_id"), "run_id": mlflow.get("run_id"), "url": url},
            "error": record["error"],
        }

    def trials(self, sweep_id: str) -> list[dict[str, Any]]:
        record = self.store.get_sweep(sweep_id)
        assert record is not None
        rows = self.store.get_trials(sweep_id)
        maximize = record["info"].get("goal") != "minimize"
        rank = {"COMPLETE": 0, "STOPPED": 1, "KILLED": 2, "FAILED": 3, "RUNNING": 4}

        def order(row: dict[str, Any]) -> tuple[Any, ...]:
            value = row["value"]
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            return (rank.get(row["state"], 5), missing, 0 if missing else (-value if maximize else value))

        return sorted(rows, key=order)

    def sweeps(self, principal: Principal, state: str | None, owner: str | None) -> list[dict[str, Any]]:
        if principal.role == "user":
            if owner and owner != principal.name:
                raise Forbidden("a user token sees only its own sweeps")
            owner = principal.name
        return [self.view(r["id"]) for r in self.store.list_sweeps(state=state, owner=owner)]

    # ------------------------------------------------------------------------------------------ the queue

    def _schedule_loop(self) -> None:
        while not self._stopping:
            self._kick.wait(timeout=1.0)
            self._kick.clear()
            if self._stopping:
                return
            try:
                self._schedule()
            except Exception:
                log.exception("the service's scheduler failed a round")

    def _schedule(self) -> None:
        for record in reversed(self.store.list_sweeps(state="QUEUED")):  # oldest first
            with self._lock:
                running = [live.owner for live in self._live.values()] + [
                    self.store.get_sweep(s)["owner"] for s in self._starting]  # type: ignore[index]
                if len(running) >= self.settings.max_running:
                    return
                if running.count(record["owner"]) >= self.settings.max_running_per_user:
                    continue
                self._start(record, resume=bool(record["info"].get("resume")))

    def _start(self, record: dict[str, Any], *, resume: bool) -> None:
        from automl.orchestrator import Sweep
        from automl.spec import spec_from_dict
        from automl.state import SweepLock, SweepState, find_unfinished, state_root

        sweep_id = record["id"]
        settings = self.settings
        state = lock = None
        try:
            plan = self._plans.pop(sweep_id, None) if not resume else None
            if plan is None:  # resumed, or queued by a service before this one
                plan = Sweep(spec_from_dict(record["spec"], source="spec"), base_dir=Path(record["info"]["base_dir"]),
                             workdir=settings.root, tracking_uri=settings.tracking_uri, storage=settings.storage,
                             spec_text=record["info"].get("text"), source="spec")
            if resume:
                folder = SweepState.folder(state_root(settings.root), sweep_id)
                try:
                    state = find_unfinished(sweep_id, settings.root)
                except AutoMLError:
                    # It never got as far as its MLflow run (the service died in its start-up): start it afresh.
                    shutil.rmtree(folder, ignore_errors=True)
                    state = None
                if state is not None:
                    lock = SweepLock(folder).acquire(sweep_id)
            live = _Live(handle=None, owner=record["owner"], goal=record["info"].get("goal", "maximize"))  # type: ignore[arg-type]
            best = record["info"].get("best")
            live.best = best["value"] if best else None
            handle = self.engine.submit(plan, on_event=lambda kind, rec: self._on_trial(sweep_id, live, kind, rec),
                                        on_note=lambda text: self._event(sweep_id, "note", {"text": text}),
                                        resume=state, lock=lock, sweep_id=None if state else sweep_id)
            live.handle = handle
        except AutoMLError as exc:
            if lock is not None:
                lock.release()
            self._fail(sweep_id, str(exc))
            return
        with self._lock:
            self._live[sweep_id] = live
        now = time.time()
        self.store.update_sweep(sweep_id, state="RUNNING", started=record["started"] or now, finished=None,
                                error=None)
        self._event(sweep_id, "sweep_state", {"state": "RUNNING", "error": None})
        handle.future.add_done_callback(lambda _: self._ended(sweep_id, live, lock))

    def _fail(self, sweep_id: str, error: str) -> None:
        line = error.splitlines()[0] if error else "failed"
        self.store.update_sweep(sweep_id, state="FAILED", finished=time.time(), error=line)
        self._event(sweep_id, "sweep_state", {"state": "FAILED", "error": line})

    def _ended(self, sweep_id: str, live: _Live, lock: Any) -> None:
        from automl.engine.records import SweepFailed

        if lock is not None:
            lock.release()
        future = live.handle.future
        exc = future.exception()
        result = exc.result if isinstance(exc, SweepFailed) else (future.result() if exc is None else None)
        with self._lock:
            self._live.pop(sweep_id, None)
        if self._stopping:
            return  # a clean stop: the sweep stays RUNNING here and resumes when the service starts again
        record = self.store.get_sweep(sweep_id) or {}
        info: dict[str, Any] = {"resume": False}
        if result is not None:
            rows = [_trial_row(t) for t in result.trials]
            self.store.put_trials(sweep_id, rows)
            info["counts"] = _counts(rows)
            info["mlflow"] = {"experiment_id": result.experiment_id, "run_id": result.parent_run_id}
            if result.best is not None:
                info["best"] = {"number": result.best.number, "value": result.best.value,
                                "params": result.best.params, "run_id": result.best.run_id,
                                "model_uri": result.best.model_uri}
        if exc is not None and not isinstance(exc, SweepFailed):
            self.store.update_sweep(sweep_id, info=info)
            self._fail(sweep_id, str(exc) or type(exc).__name__)
        else:
            if isinstance(exc, SweepFailed):
                state, error = "FAILED", str(exc).splitlines()[0]
            elif result is not None and result.status == "KILLED":
                state, error = "CANCELLED", None
            else:
                state, error = "FINISHED", None
            self.store.update_sweep(sweep_id, state=state, finished=time.time(), error=error, info=info)
            self._event(sweep_id, "sweep_state", {"state": state, "error": error})
        del record
        self._kick.set()

    # ------------------------------------------------------------------------------------------ events

    def _on_trial(self, sweep_id: str, live: _Live, kind: str, record: TrialRecord) -> None:
        """From the engine's loop thread: keep it short, queue the rest."""
        if kind == "started":
            live.running.add(record.number)
            self._event(sweep_id, "trial_started", {"number": record.number, "params": dict(record.params)})
        elif kind == "reported":
            self._event(sweep_id, "trial_reported", {"number": record.number, "step": record.epochs,
                                                     "metrics": dict(record.metrics)})
        elif kind == "exploited":  # method: pbt: the member copied another and took new values
            self._event(sweep_id, "trial_exploited", {"number": record.number, "params": dict(record.params)})
        elif kind == "finished":
            live.running.discard(record.number)
            state = str(record.state)
            live.counts[state] = live.counts.get(state, 0) + 1
            self._event(sweep_id, "trial_finished", {"number": record.number, "state": state,
                                                     "value": record.value, "error": record.error,
                                                     "row": _trial_row(record)})
            value = record.value
            if state == "COMPLETE" and value is not None and math.isfinite(value) and (
                    live.best is None or (value > live.best if live.goal == "maximize" else value < live.best)):
                live.best = value
                self._event(sweep_id, "best_changed", {"number": record.number, "value": value,
                                                       "params": dict(record.params)})

    def _event(self, sweep_id: str, kind: str, data: dict[str, Any]) -> None:
        self._events.put((sweep_id, kind, data))

    def _write_events(self) -> None:
        """Batches of events into the store; the trials table and counts follow the trial ends."""
        done = False
        while not done:
            first = self._events.get()
            batch = [first]
            time.sleep(0.02)  # let a burst of reports gather into one transaction
            while True:
                try:
                    batch.append(self._events.get_nowait())
                except queue.Empty:
                    break
            done = None in batch
            items = [b for b in batch if b is not None]
            try:
                self._store_events(items)
            except Exception:
                log.exception("storing %d service events failed", len(items))

    def _store_events(self, items: list[tuple[str, str, dict[str, Any]]]) -> None:
        rows: dict[str, list[dict[str, Any]]] = {}
        out = []
        for sweep_id, kind, data in items:
            if kind == "trial_finished":
                rows.setdefault(sweep_id, []).append(data["row"])
                data = {k: v for k, v in data.items() if k != "row"}
            out.append((sweep_id, kind, data))
            if kind == "best_changed":
                self.store.update_sweep(sweep_id, info={"best": {**data, "run_id": None, "model_uri": None}})
        for sweep_id, trial_rows in rows.items():
            self.store.put_trials(sweep_id, trial_rows)
            self.store.update_sweep(sweep_id, info={"counts": _counts(self.store.get_trials(sweep_id))})
        self.store.add_events(out)

    def flush_events(self, timeout: float = 5.0) -> None:
        """Wait until queued events are stored (tests, and a clean stop)."""
        deadline = time.monotonic() + timeout
        while not self._events.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)


def _trial_row(t: Any) -> dict[str, Any]:
    value = t.value
    if value is not None and not math.isfinite(value):
        value = None
    return {"number": t.number, "state": str(t.state), "value": value, "params": dict(t.params),
            "metrics": {k: v for k, v in t.metrics.items() if math.isfinite(v)}, "run_id": t.run_id}


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return counts


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    from datetime import UTC, datetime

    # Milliseconds: a sweep of small trials starts and ends within one second.
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
