"""MLflow as the record of a sweep: one parent run per sweep, one child run per trial, the best model.

Written only from the driver, through ``MlflowClient`` with explicit run ids (never the fluent "active run").
Trial events go through a queue to one writer thread, off the sweep's hot path; the writer coalesces what is
queued so that a trial costs at most one MLflow write per report (usually: create, one batch, terminate).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
TAG_ROLE = "automl.role"
TAG_SWEEP = "automl.sweep"
TAG_SWEEP_ID = "automl.sweep_id"
TAG_TRIAL = "automl.trial"
TAG_STATE = "automl.state"
TAG_BEST_URI = "automl.best_model_uri"
TAG_BEST_RUN = "automl.best_run_id"
PARENT_TAG = "mlflow.parentRunId"
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "STOPPED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED"}
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits


def resolve_tracking_uri(explicit: str | None = None, workdir: Path | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    base = (workdir or Path.cwd()).resolve()
    return f"sqlite:///{base / DEFAULT_DB}"


def default_artifact_location(tracking_uri: str, experiment: str, workdir: Path | None = None) -> str | None:
    """For the embedded SQLite store: ``./mlartifacts``, where a plain ``mlflow ui`` in that directory looks."""
    if not tracking_uri.startswith("sqlite:"):
        return None  # a tracking server decides its own artifact root
    base = (workdir or Path.cwd()).resolve()
    return (base / DEFAULT_ARTIFACTS).as_uri()


def make_client(tracking_uri: str) -> MlflowClient:
    _quiet_mlflow()
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:"):
        _sqlite_wal()
    return MlflowClient(tracking_uri=tracking_uri)


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


_WAL_INSTALLED = False


def _sqlite_wal() -> None:
    """Use SQLite's write-ahead log: the MLflow UI can read while the sweep writes, and commits are ~2x
    cheaper. Durable against a killed process (only a power cut can lose the last commits)."""
    global _WAL_INSTALLED
    if _WAL_INSTALLED:
        return
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        if isinstance(dbapi_conn, sqlite3.Connection):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    _WAL_INSTALLED = True


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except Exception:
        exp = client.get_experiment_by_name(name)  # created concurrently by another sweep
        if exp is None:
            raise
        return str(exp.experiment_id)


@dataclass
class _TrialLog:
    run_id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # not yet written
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, ts, step
    status: str | None = None
    start_ms: int = 0
    end_ms: int | None = None
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (file name, text)


class SweepTracker:
    """The MLflow side of one sweep; trial methods are non-blocking, ``flush`` waits for the writer."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self._queue: queue.SimpleQueue[tuple[str, int, Any] | None] = queue.SimpleQueue()
        self._trials: dict[int, _TrialLog] = {}
        self._error: BaseException | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- the sweep (driver thread)

    @classmethod
    def start(
        cls,
        client: MlflowClient,
        *,
        experiment: str,
        artifact_location: str | None,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        spec_text: str | None = None,
        run_id: str | None = None,
    ) -> SweepTracker:
        """Create (or, resuming, reopen) the sweep's parent run."""
        experiment_id = get_or_create_experiment(client, experiment, artifact_location)
        if run_id is None:
            run = client.create_run(experiment_id, run_name=run_name, tags={**tags, TAG_ROLE: "sweep"})
            run_id = run.info.run_id
            _log_batch(client, run_id, params=params)
            if spec_text is not None:
                client.log_text(run_id, spec_text, "spec.yaml")
        else:
            client.update_run(run_id, status="RUNNING")
        return cls(client, experiment_id, run_id)

    def finish(
        self,
        status: str,
        *,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Flush every trial, then write the sweep's summary and close the parent run."""
        self.close()
        now = _now_ms()
        _log_batch(
            self.client, self.parent_run_id,
            params=params or {},
            metrics=[(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            tags=tags or {},
        )
        self.client.set_terminated(self.parent_run_id, status=status, end_time=now)

    # -------------------------------------------------------------- trials (non-blocking)

    def trial_started(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> None:
        self._put("start", number, (params, tags, _now_ms()))

    def trial_reported(self, number: int, step: int, metrics: dict[str, float]) -> None:
        self._put("report", number, (step, metrics, _now_ms()))

    def trial_finished(self, number: int, state: str, tags: dict[str, str],
                       artifacts: Iterable[tuple[str, str]] = ()) -> None:
        self._put("end", number, (state, tags, list(artifacts), _now_ms()))

    def run_id_of(self, number: int) -> str | None:
        """The child run id of a trial (after ``flush``)."""
        log_ = self._trials.get(number)
        return log_.run_id if log_ else None

    def flush(self, timeout: float = 300.0) -> None:
        self._queue.put(("flush", -1, None))
        deadline = time.monotonic() + timeout
        while not self._idle.wait(0.05) or not self._queue.empty():
            if time.monotonic() > deadline or not self._thread.is_alive():
                break
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _put(self, kind: str, number: int, payload: Any) -> None:
        self._idle.clear()
        self._queue.put((kind, number, payload))

    # -------------------------------------------------------------- writer thread

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch = [item]
            # Coalesce whatever else is already queued into the same round of writes.
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            dirty: dict[int, _TrialLog] = {}
            for entry in batch:
                if entry is None:
                    stopping = True
                    continue
                kind, number, payload = entry
                if kind == "flush":
                    continue
                t = self._trials.setdefault(number, _TrialLog())
                dirty[number] = t
                if kind == "start":
                    t.params, t.start_ms = dict(payload[0]), payload[2]
                    t.tags.update(payload[1])
                elif kind == "report":
                    step, metrics, ts = payload
                    t.metrics.extend((k, v, ts, step) for k, v in metrics.items())
                else:
                    state, tags, artifacts, ts = payload
                    t.status = MLFLOW_STATUS.get(state, "FINISHED")
                    t.tags.update(tags)
                    t.end_ms = ts
                    t.artifacts.extend(artifacts)
            for number, t in dirty.items():
                try:
                    self._write(number, t)
                except Exception as exc:  # keep the sweep alive; report at flush
                    log.warning("MLflow write for trial %s failed: %s", number, exc)
                    self._error = exc
            if self._queue.empty():
                self._idle.set()

    def _write(self, number: int, t: _TrialLog) -> None:
        params: dict[str, Any] = {}
        if t.run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                start_time=t.start_ms or None,
                run_name=f"trial-{number:04d}",
                tags={PARENT_TAG: self.parent_run_id, TAG_TRIAL: str(number), **t.tags},
            )
            t.run_id = run.info.run_id
            params, t.params, t.tags = t.params, {}, {}
        _log_batch(self.client, t.run_id, params=params, metrics=t.metrics, tags=t.tags)
        t.metrics, t.tags = [], {}
        for name, text in t.artifacts:
            self.client.log_text(t.run_id, text, name)
        t.artifacts = []
        if t.status is not None:
            self.client.set_terminated(t.run_id, status=t.status, end_time=t.end_ms)


def _log_batch(
    client: MlflowClient,
    run_id: str,
    *,
    params: dict[str, Any] | None = None,
    metrics: list[tuple[str, float, int, int]] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    p = [Param(k, _param_text(v)) for k, v in (params or {}).items()]
    m = [Metric(k, v, ts, step) for k, v, ts, step in (metrics or []) if v == v]  # NaN: not logged
    t = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
    while p or m or t:
        client.log_batch(run_id, metrics=m[:_MAX_METRICS], params=p[:_MAX_PARAMS], tags=t[:_MAX_TAGS])
        p, m, t = p[_MAX_PARAMS:], m[_MAX_METRICS:], t[_MAX_TAGS:]


def _param_text(value: Any) -> str:
    return str(value)[:6000]


def _now_ms() -> int:
    return int(time.time() * 1000)

