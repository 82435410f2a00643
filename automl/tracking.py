"""MLflow as the record of a sweep: one parent run per sweep, one child run per trial, the best model.

Written only from the driver's side (its process and one writer process it owns; never from Ray workers),
through ``MlflowClient`` with explicit run ids (never the fluent "active run").
Trial events go through a queue to one writer process, off the sweep's hot path; the writer coalesces what is
queued so that a trial costs at most one MLflow write per report (usually: create, one batch, terminate).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
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
    # password, and the lines are not ours to show.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
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
    """The MLflow side of one sweep, seen from the driver.

    The parent run is written here, synchronously. Trial events go to a writer *process*
    (``python -m automl._mlflow_writer``) as JSON lines on its stdin: MLflow's client spends ~13 ms of Python
    per trial on SQLite, which in the driver's process would hold the GIL against the sweep loop; in its own
    process it runs beside it. If the driver is killed, the writer still drains what it was sent (its stdin
    reaches end-of-file) and exits. A plain subprocess rather than ``multiprocessing``: spawn would re-run a
    user's script that calls ``Sweep.run()`` without an ``if __name__ == "__main__"`` guard.
    """

    def __init__(self, tracking_uri: str, *, trials: bool = True, log_file: Path | None = None) -> None:
        """Start the writer process now (it imports MLflow, ~2 s of CPU, while the sweep starts up);
        it writes nothing until ``open`` names the parent run. ``trials=False`` writes no child runs.
        ``log_file`` receives what MLflow and its libraries print (default: this process's stderr)."""
        import subprocess
        import threading

        self.tracking_uri = tracking_uri
        self.trials = trials
        self.log_file = log_file
        self.experiment_id = ""
        self.parent_run_id = ""
        self._run_ids: dict[int, str] = {}
        self._errors: list[str] = []
        self._flushed = 0
        self._asked = 0
        self._unflushed = False  # something was sent since the last acknowledged flush
        self._cond = threading.Condition()
        env = writer_environment(tracking_uri)
        if log_file is not None:
            env["AUTOML_LOG_FILE"] = str(log_file)  # opened by the writer once the sweep has its state folder
        self._proc = subprocess.Popen(
            writer_command(), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            # Its own session: a terminal's Ctrl-C (SIGINT to the whole foreground process group) stops the driver,
            # which then records the stop through this process; the writer itself ends when its stdin closes.
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_replies, name="mlflow-writer-replies", daemon=True)
        self._reader.start()

    # -------------------------------------------------------------- the sweep (driver)

    def open(
        self,
        *,
        experiment: str,
        artifact_location: str | None,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        spec_text: str | None = None,
        run_id: str | None = None,
    ) -> None:
        """Create (or, resuming, reopen) the sweep's parent run; from now on trial events are written."""
        client = self.client = make_client(self.tracking_uri)
        experiment_id = get_or_create_experiment(client, experiment, artifact_location)
        if run_id is None:
            run = client.create_run(experiment_id, run_name=run_name, tags={**tags, TAG_ROLE: "sweep"})
            run_id = run.info.run_id
            _log_batch(client, run_id, params=params)
            if spec_text is not None:
                client.log_text(run_id, spec_text, "spec.yaml")
        else:
            client.update_run(run_id, status="RUNNING")
        self.experiment_id, self.parent_run_id = experiment_id, run_id
        self._send(["open", 0, [experiment_id, run_id]])

    def child_runs(self) -> dict[int, tuple[str, str]]:
        """Resuming: the trial runs the parent run already has, trial number -> (run id, MLflow status)."""
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
        self._send(["adopt", number, run_id])

    def finish(
        self,
        status: str,
        *,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Flush every trial, then write the sweep's summary and close the parent run.

        A writer that died with trial records unwritten still leaves the parent run closed (FAILED, the error in
        its ``automl.error`` tag: `automl resume` re-creates what is missing), and then raises ``AutoMLError``.
        """
        from automl.errors import AutoMLError

        lost: str | None = None
        try:
            self.close()
        except AutoMLError as exc:
            lost = str(exc)
        tags = dict(tags or {})
        if lost is not None:
            status, tags["automl.error"] = "FAILED", lost
        now = _now_ms()
        _log_batch(
            self.client, self.parent_run_id,
            params=params or {},
            metrics=[(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            tags=tags,
        )
        self.client.set_terminated(self.parent_run_id, status=status, end_time=now)
        if lost is not None:
            raise AutoMLError(lost)

    # -------------------------------------------------------------- trials (non-blocking)

    def trial_started(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> None:
        if not self.trials:
            return
        self._send(["start", number, [{k: _param_text(v) for k, v in params.items()}, tags, _now_ms()]])

    def trial_reported(self, number: int, step: int, metrics: dict[str, float]) -> None:
        if not self.trials:
            return
        self._send(["report", number, [step, metrics, _now_ms()]])

    def trial_finished(self, number: int, state: str, tags: dict[str, str],
                       artifacts: Iterable[tuple[str, str]] = ()) -> None:
        if not self.trials:
            return
        self._send(["end", number, [state, tags, [list(a) for a in artifacts], _now_ms()]])

    def run_id_of(self, number: int) -> str | None:
        """The child run id of a trial (known after ``flush``)."""
        return self._run_ids.get(number)

    def flush(self, timeout: float = 600.0) -> None:
        """Wait until the writer has written everything sent so far; ``AutoMLError`` if it died first."""
        self._asked += 1
        target = self._asked
        self._send(["flush", target, None])
        deadline = time.monotonic() + timeout
        with self._cond:
            # Short waits, not one long one: a writer that dies closes its stdout (the reader's last notify)
            # before the OS lets poll() see its exit, so a single wait could miss the death and sleep on.
            while not (self._flushed >= target or self._proc.poll() is not None) and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            if self._flushed < target and not self._errors:
                self._errors.append(self._stopped())
            if self._flushed >= target and not self._errors:
                self._unflushed = False
        self._raise_errors()

    def close(self) -> None:
        """Stop the writer; ``AutoMLError`` when it died with records not yet written (they are lost to MLflow
        until a resume writes them again from the search state)."""
        try:
            if not self.parent_run_id:
                # Never opened (bad data, a trainer that failed to load): the writer has written nothing and
                # would exit on a flush without replying; do not wait for its MLflow import either.
                self._proc.kill()
            elif self._proc.poll() is None or self._unflushed:
                self.flush()
        finally:
            if self._proc.stdin is not None and not self._proc.stdin.closed:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()  # end-of-file: the writer exits
            self._proc.wait(timeout=60)
            self._reader.join(timeout=5)

    def _stopped(self) -> str:
        where = f"; its output is in {self.log_file}" if self.log_file else ""
        return f"the MLflow writer stopped (exit code {self._proc.poll()}) before writing every trial{where}"

    def _send(self, message: list[Any]) -> None:
        stdin = self._proc.stdin
        if message[0] != "flush":
            self._unflushed = True
        try:
            if stdin is None:
                raise ValueError("no pipe")
            stdin.write(json.dumps(message).encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, ValueError):
            with self._cond:
                self._errors.append(self._stopped())

    def _read_replies(self) -> None:
        stdout = self._proc.stdout
        for line in stdout if stdout is not None else ():
            try:
                kind, number, payload = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                if kind == "run_id":
                    self._run_ids[number] = payload
                elif kind == "error":
                    self._errors.append(payload)
                elif kind == "flushed":
                    self._flushed = max(self._flushed, number)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _raise_errors(self) -> None:
        if self._errors:
            from automl.errors import AutoMLError

            raise AutoMLError("MLflow: " + self._errors[0])


def writer_command() -> list[str]:
    """The writer's command line: no tracking URI on it (``ps`` shows arguments to everyone), and ``-P`` so that
    the working directory is not on its import path (a ``./mlflow.py`` next to a spec must never be imported)."""
    import sys

    return [sys.executable, "-P", "-m", "automl._mlflow_writer"]


def writer_environment(tracking_uri: str) -> dict[str, str]:
    """The helper processes' environment: the tracking URI (which may hold a password) travels here."""
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "PYTHONSAFEPATH": "1"}


def writer_main(tracking_uri: str | None = None) -> None:
    """The writer process: read JSON-line events on stdin, apply them to MLflow, reply on stdout.

    A reader thread empties stdin at once (the driver never blocks on a full pipe); the main thread writes
    to MLflow, coalescing whatever has arrived since its last round.
    """
    import queue
    import signal
    import sys
    import tempfile
    import threading

    # Ctrl-C belongs to the driver: it records the interrupted trials through this process, which must live on to
    # write them. (The writer runs in its own session; this also covers a SIGINT sent to it by PID.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tracking_uri = tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:
        for line in sys.stdin.buffer:
            inbox.put(json.loads(line))
        inbox.put(None)  # end-of-file: the driver closed the pipe or died

    threading.Thread(target=read, daemon=True).start()
    # What MLflow and its libraries print goes to the state folder's log file (AUTOML_LOG_FILE), which exists only
    # once the sweep starts for real: until the "open" message, it is held in an anonymous temporary file.
    log_file = os.environ.get("AUTOML_LOG_FILE")
    early = tempfile.TemporaryFile() if log_file else None
    if early is not None:
        os.dup2(early.fileno(), 2)
    # Replies go to the original stdout; anything a library prints lands on stderr instead of in the protocol.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(kind: str, number: int, payload: Any) -> None:
        out.write(json.dumps([kind, number, payload]) + "\n")
        out.flush()

    import mlflow.tracking  # noqa: F401 - the slow import, done while the driver starts the sweep

    first = inbox.get()
    if first is None or first[0] != "open":
        return  # the sweep ended before it had a parent run (bad data, a trainer that failed to load)
    experiment_id, parent_run_id = first[2]
    if log_file and early is not None:
        sys.stderr.flush()
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        early.seek(0)
        os.write(fd, early.read())
        early.close()
        os.dup2(fd, 2)
        os.dup2(fd, 1)
        os.close(fd)
    writer = _TrialWriter(make_client(tracking_uri), experiment_id, parent_run_id, reply)
    stopping = False
    while not stopping:
        batch = [inbox.get()]
        while True:
            try:
                batch.append(inbox.get_nowait())
            except queue.Empty:
                break
        stopping = writer.apply(batch)
    # Every write is committed and acknowledged: skip the interpreter's teardown (MLflow's and SQLAlchemy's exit
    # handlers, module finalisation), which costs the sweep ~0.5 s of waiting for this process to exit.
    out.flush()
    sys.stderr.flush()
    os._exit(0)


class _TrialWriter:
    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str,
                 reply: Callable[[str, int, Any], None]) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.reply = reply
        self.trials: dict[int, _TrialLog] = {}

    def apply(self, batch: list[Any]) -> bool:
        """Write one round; returns True when the driver asked the writer to stop."""
        stopping = False
        flushes: list[int] = []
        dirty: dict[int, _TrialLog] = {}
        for entry in batch:
            if entry is None:
                stopping = True
                continue
            kind, number, payload = entry
            if kind == "flush":
                flushes.append(number)
                continue
            t = self.trials.setdefault(number, _TrialLog())
            if kind == "adopt":  # resuming: this trial's run exists already
                t.run_id = payload
                continue
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
                t.artifacts.extend((a[0], a[1]) for a in artifacts)
        for number, t in dirty.items():
            try:
                created = t.run_id is None
                self._write(number, t)
                if created:
                    self.reply("run_id", number, t.run_id)
            except Exception as exc:  # keep writing the other trials; the driver raises at flush
                self.reply("error", number, f"trial {number}: {type(exc).__name__}: {exc}")
        for seq in flushes:
            self.reply("flushed", seq, None)
        return stopping

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

