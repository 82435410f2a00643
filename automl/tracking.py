"""MLflow as the record of a sweep: one parent run per sweep, one child run per trial, the best model.

Written only from the driver's side (the engine's process and one writer process it owns; never from Ray workers),
through ``MlflowClient`` with explicit run ids (never the fluent "active run"). Every sweep of the engine writes
through the one writer process (``automl._mlflow_writer``), its trials keyed by (sweep, trial number): parent runs
are created there too, so a new sweep's first trial never waits for MLflow. The writer coalesces what is queued so
that a trial costs at most one MLflow write per report (usually: create, one batch, terminate). The finishing step
(the best model, plots, the registry) writes the parent run from the driver's side, in a thread of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
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

    if not tracking_uri.startswith("sqlite:"):
        return MlflowClient(tracking_uri=tracking_uri)
    _sqlite_wal()
    # MLflow creates a new store's tables with Alembic migrations when it first opens it (the client's
    # constructor does); two processes doing that at once break the file for good ("table
    # _alembic_tmp_metrics already exists"). Under the lock the second process waits, then finds the tables.
    with store_creation_lock(tracking_uri):
        return MlflowClient(tracking_uri=tracking_uri)


@contextlib.contextmanager
def store_creation_lock(tracking_uri: str) -> Iterator[None]:
    """An exclusive lock, across processes on this machine, around opening an embedded (SQLite) store.

    The lock is a separate hidden file beside the database: never the database itself, whose POSIX locks
    SQLite would lose when another descriptor of the file is closed.
    """
    import fcntl

    path = sqlite_path(tracking_uri)
    if path is None:
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # a read-only folder: nobody can create the store there either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for anything else, or an in-memory database)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    rest = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(rest).resolve() if rest and rest != ":memory:" else None


def _quiet_mlflow() -> None:
    # MLflow prints "View run ... at: <tracking URI>/#/..." on every run it ends over HTTP: the URI may hold a
    # password, and the lines are not ours to show; nor are its progress bars and notices.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401 - it configures its loggers when imported: set their levels after that

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


class MlflowRecorder:
    """The engine's MLflow side: one writer process for every sweep (``open`` gives each its ``SweepLog``).

    The writer is started at once (it imports MLflow, ~2 s of CPU, while the engine starts up) and lives until
    ``shutdown``; a writer that died is replaced for the sweeps opened after, and the sweeps it was writing for
    learn it at their next flush.
    """

    def __init__(self, log_file: Path | None = None) -> None:
        import threading

        self.log_file = log_file
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._next_sweep = 0
        self._logs: dict[int, SweepLog] = {}
        self._proc: Any = None
        self._flushed = 0
        self._asked = 0
        self._start()

    def _start(self) -> None:
        import subprocess
        import threading

        env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "PYTHONSAFEPATH": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)  # every message names its store; never a URI in the arguments
        self._proc = subprocess.Popen(
            writer_command(), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            # Its own session: a terminal's Ctrl-C (SIGINT to the whole foreground process group) stops the driver,
            # which then records the stop through this process; the writer itself ends when its stdin closes.
            start_new_session=True,
        )
        # Below the engine's own priority: at a cold start its 2 s import of MLflow would take CPU from Ray's start and
        # the workers' imports, which the first trial waits for; its writes wait for nothing.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, self._proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5))
        self._flushed = self._asked = 0
        self._reader = threading.Thread(target=self._read_replies, args=(self._proc,), name="mlflow-writer-replies",
                                        daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return int(self._proc.pid)

    def alive(self) -> bool:
        return self._proc.poll() is None

    def open(self, tracking_uri: str, *, trials: bool = True) -> SweepLog:
        """A new sweep's record (nothing written until ``SweepLog.open``)."""
        with self._cond:
            if not self.alive() and not self._logs:
                self._start()
            self._next_sweep += 1
            sweep_log = SweepLog(self, self._next_sweep, tracking_uri, trials=trials)
            self._logs[sweep_log.sid] = sweep_log
        return sweep_log

    def forget(self, sweep_log: SweepLog) -> None:
        with self._cond:
            self._logs.pop(sweep_log.sid, None)

    def send(self, message: list[Any]) -> None:
        stdin = self._proc.stdin
        try:
            with self._send_lock:
                if stdin is None:
                    raise ValueError("no pipe")
                stdin.write(json.dumps(message).encode() + b"\n")
                stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            with self._cond:
                for sweep_log in self._logs.values():
                    sweep_log.errors.append(self.stopped())
                self._cond.notify_all()

    def flush(self, timeout: float = 600.0) -> None:
        """Wait until the writer has written everything sent so far (by every sweep)."""
        with self._cond:
            self._asked += 1
            target = self._asked
            proc = self._proc
        self.send(["flush", target])
        deadline = time.monotonic() + timeout
        with self._cond:
            # Short waits, not one long one: a writer that dies closes its stdout (the reader's last notify)
            # before the OS lets poll() see its exit, so a single wait could miss the death and sleep on.
            while not (self._flushed >= target or proc.poll() is not None) and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            if self._flushed < target:
                for sweep_log in self._logs.values():
                    if not sweep_log.errors:
                        sweep_log.errors.append(self.stopped())

    def stopped(self) -> str:
        where = f"; its output is in {self.log_file}" if self.log_file else ""
        return f"the MLflow writer stopped (exit code {self._proc.poll()}) before writing every trial{where}"

    def _read_replies(self, proc: Any) -> None:
        stdout = proc.stdout
        for line in stdout if stdout is not None else ():
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                kind = reply[0]
                if kind == "flushed":
                    self._flushed = max(self._flushed, reply[1])
                else:
                    sweep_log = self._logs.get(reply[1])
                    if sweep_log is not None:
                        sweep_log.on_reply(kind, reply[2:])
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (on the replies) until ``predicate()`` or the writer died; False on a timeout or a death."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if self._proc.poll() is not None or time.monotonic() >= deadline:
                    return predicate()
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        return True

    def shutdown(self) -> None:
        """Let the writer finish what it was sent, then end it."""
        proc = self._proc
        if proc.stdin is not None and not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # end-of-file: the writer drains and exits
        try:
            proc.wait(timeout=60)
        except Exception:
            proc.kill()
        self._reader.join(timeout=5)


class SweepLog:
    """One sweep's record in MLflow, written through the engine's writer process (trials) and, for the parent
    run's summary and model, from the driver's side (``client``)."""

    def __init__(self, recorder: MlflowRecorder, sid: int, tracking_uri: str, *, trials: bool = True) -> None:
        self.recorder = recorder
        self.sid = sid
        self.tracking_uri = tracking_uri
        self.trials = trials
        self.experiment_id = ""
        self.parent_run_id = ""
        self.errors: list[str] = []
        self._run_ids: dict[int, str] = {}
        self._opened = False
        self.open_sent = False  # the parent run was asked for: a failed start-up must close it
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = make_client(self.tracking_uri)
        return self._client

    # -------------------------------------------------------------- the parent run

    def open(self, *, experiment: str, artifact_location: str | None, run_name: str, tags: dict[str, str],
             params: dict[str, Any], spec_text: str | None = None, run_id: str | None = None,
             log_file: Path | None = None) -> None:
        """Create (or, resuming, reopen) the sweep's parent run, in the writer: this returns at once, and trial
        events may follow straight away. ``ready()`` waits for the run's id."""
        self.open_sent = True
        self.recorder.send(["open", self.sid, {
            "uri": self.tracking_uri, "experiment": experiment, "artifact_location": artifact_location,
            "run_name": run_name, "tags": {**tags, TAG_ROLE: "sweep"},
            "params": {k: _param_text(v) for k, v in params.items()}, "spec_text": spec_text, "run_id": run_id,
            "log_file": str(log_file) if log_file else None}])

    def ready(self, timeout: float = 120.0) -> None:
        """Wait until the parent run exists; ``AutoMLError`` if the writer could not create it."""
        from automl.errors import AutoMLError

        if not self.recorder.wait_for(lambda: self._opened or bool(self.errors), timeout):
            self.errors.append(self.recorder.stopped() if not self.recorder.alive()
                               else f"MLflow did not answer within {timeout:.0f}s")
        if self.errors and not self._opened:
            raise AutoMLError("MLflow: " + self.errors[0])

    def on_reply(self, kind: str, payload: list[Any]) -> None:
        """A reply of the writer for this sweep (called on the reader thread, under the recorder's lock)."""
        if kind == "opened":
            self.experiment_id, self.parent_run_id = payload[0]
            self._opened = True
        elif kind == "run_id":
            self._run_ids[payload[0]] = payload[1]
        elif kind == "error":
            self.errors.append(payload[0])

    def log_parent(self, *, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        """Params, metrics (logged at this moment) and tags on the parent run, through the writer."""
        now = _now_ms()
        self.recorder.send(["parent", self.sid, [{k: _param_text(v) for k, v in (params or {}).items()},
                                                 [[k, float(v), now] for k, v in (metrics or {}).items()],
                                                 {k: str(v) for k, v in (tags or {}).items()}]])

    def child_runs(self) -> dict[int, tuple[str, str]]:
        """Resuming: the trial runs the parent run already has, trial number -> (run id, MLflow status)."""
        self.ready()
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
            max_results=50_000, order_by=["attributes.start_time ASC"],
        )
        found: dict[int, tuple[str, str]] = {}
        for run in runs:
            trial = run.data.tags.get(TAG_TRIAL)
            if trial is not None and trial.isdigit():
                found[int(trial)] = (run.info.run_id, run.info.status)
        return found

    def kill_run(self, run_id: str, reason: str) -> None:
        """Close a child run left RUNNING by a killed driver whose trial will run again under a new number."""
        _log_batch(self.client, run_id, tags={TAG_STATE: "KILLED", "automl.error": reason})
        self.client.set_terminated(run_id, status="KILLED")

    def trial_adopted(self, number: int, run_id: str) -> None:
        """Resuming: trial ``number``'s events go to its existing child run ``run_id`` (not a new one)."""
        self._run_ids[number] = run_id
        self.recorder.send(["adopt", self.sid, number, run_id])

    # -------------------------------------------------------------- trials (non-blocking)

    def trial_started(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> None:
        if self.trials:
            self.recorder.send(["start", self.sid, number,
                                [{k: _param_text(v) for k, v in params.items()}, tags, _now_ms()]])

    def trial_reported(self, number: int, step: int, metrics: dict[str, float]) -> None:
        if self.trials:
            self.recorder.send(["report", self.sid, number, [step, metrics, _now_ms()]])

    def trial_finished(self, number: int, state: str, tags: dict[str, str],
                       artifacts: Iterable[tuple[str, str]] = ()) -> None:
        if self.trials:
            self.recorder.send(["end", self.sid, number, [state, tags, [list(a) for a in artifacts], _now_ms()]])

    def trial_annotated(self, number: int, tags: dict[str, str], artifacts: Iterable[tuple[str, str]] = ()) -> None:
        """Tags and text artifacts on a running trial's run (a PBT exploit); an artifact of the same name is
        replaced."""
        if self.trials:
            self.recorder.send(["note", self.sid, number, [tags, [list(a) for a in artifacts]]])

    def run_id_of(self, number: int) -> str | None:
        """The child run id of a trial (known after ``flush``)."""
        return self._run_ids.get(number)

    def flush(self, timeout: float = 600.0) -> None:
        """Wait until the writer has written everything this sweep sent; ``AutoMLError`` if it died first."""
        self.recorder.flush(timeout)
        self._raise_errors()

    def finish(self, status: str, *, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
               tags: dict[str, str] | None = None) -> None:
        """Flush every trial, then write the sweep's summary and close the parent run.

        A writer that died with trial records unwritten still leaves the parent run closed (FAILED, the error in
        its ``automl.error`` tag: `automl resume` re-creates what is missing), and then raises ``AutoMLError``.
        """
        from automl.errors import AutoMLError

        lost: str | None = None
        try:
            self.flush()
        except AutoMLError as exc:
            lost = str(exc)
        finally:
            self.recorder.forget(self)
        tags = dict(tags or {})
        if lost is not None:
            status, tags["automl.error"] = "FAILED", lost
        now = _now_ms()
        _log_batch(self.client, self.parent_run_id, params=params or {},
                   metrics=[(k, float(v), now, 0) for k, v in (metrics or {}).items()], tags=tags)
        self.client.set_terminated(self.parent_run_id, status=status, end_time=now)
        if lost is not None:
            raise AutoMLError(lost)

    def abandon(self) -> None:
        """The sweep never opened its parent run (refused at start-up): nothing to write."""
        self.recorder.forget(self)

    def _raise_errors(self) -> None:
        if self.errors:
            from automl.errors import AutoMLError

            raise AutoMLError("MLflow: " + self.errors[0])


def writer_command() -> list[str]:
    """The writer's command line: no tracking URI on it (``ps`` shows arguments to everyone), and ``-P`` so that
    the working directory is not on its import path (a ``./mlflow.py`` next to a spec must never be imported)."""
    import sys

    return [sys.executable, "-P", "-m", "automl._mlflow_writer"]


def writer_environment(tracking_uri: str) -> dict[str, str]:
    """A helper process's environment: the tracking URI (which may hold a password) travels here."""
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "PYTHONSAFEPATH": "1"}


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

