"""The MLflow writer process: ``python -P -m automl._mlflow_writer`` (started by ``automl.tracking.MlflowRecorder``).

It reads JSON-line messages on stdin, writes them to MLflow, and replies on stdout. One writer serves every sweep of
its engine: each message names its sweep (a number the engine gave it) and, for trials, the trial number; each
sweep's first message (``open``) names its tracking URI, so sweeps may write to different stores. A reader thread
empties stdin at once (the driver never blocks on a full pipe); the main thread writes to MLflow, coalescing
whatever has arrived since its last round. It exits when stdin closes (the engine shut down, or its process died),
after writing everything it was sent. Ctrl-C is the driver's: this process ignores SIGINT and lives to write the
KILLED states the driver sends when it stops.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

Reply = Callable[..., None]


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


@dataclass
class _Sweep:
    client: MlflowClient
    experiment_id: str
    parent_run_id: str
    trials: dict[int, _TrialLog] = field(default_factory=dict)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:
        for line in sys.stdin.buffer:
            inbox.put(json.loads(line))
        inbox.put(None)  # end-of-file: the engine closed the pipe or died

    threading.Thread(target=read, daemon=True).start()
    # What MLflow and its libraries print goes to the state folder's log file, named by the first sweep that opens
    # (it exists only once a sweep starts for real): until then, an anonymous temporary file holds it.
    early = tempfile.TemporaryFile()
    os.dup2(early.fileno(), 2)
    # Replies go to the original stdout; anything a library prints lands on stderr instead of in the protocol.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def reply(*message: Any) -> None:
        with lock:
            out.write(json.dumps(list(message)) + "\n")
            out.flush()

    import mlflow.tracking  # noqa: F401 - the slow import, done while the engine starts up

    writer = _Writer(reply, early)
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
    # handlers, module finalisation), which costs the engine ~0.5 s of waiting for this process to exit.
    out.flush()
    sys.stderr.flush()
    os._exit(0)


class _Writer:
    def __init__(self, reply: Reply, early: Any) -> None:
        self.reply = reply
        self.early = early
        self.sweeps: dict[int, _Sweep] = {}
        self.clients: dict[str, MlflowClient] = {}

    def _client(self, uri: str) -> MlflowClient:
        from automl.tracking import make_client

        if uri not in self.clients:
            self.clients[uri] = make_client(uri)
        return self.clients[uri]

    def _log_to(self, log_file: str | None) -> None:
        """Library output from now on to ``log_file`` (the first sweep's state folder log), with what came before."""
        if not log_file or self.early is None:
            return
        sys.stderr.flush()
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.early.seek(0)
        os.write(fd, self.early.read())
        self.early.close()
        self.early = None
        os.dup2(fd, 2)
        os.dup2(fd, 1)
        os.close(fd)

    def _open(self, sid: int, spec: dict[str, Any]) -> None:
        from automl.tracking import _log_batch, get_or_create_experiment

        self._log_to(spec.get("log_file"))
        client = self._client(spec["uri"])
        experiment_id = get_or_create_experiment(client, spec["experiment"], spec["artifact_location"])
        run_id = spec.get("run_id")
        if run_id is None:
            run = client.create_run(experiment_id, run_name=spec["run_name"], tags=spec["tags"])
            run_id = run.info.run_id
            _log_batch(client, run_id, params=spec["params"])
            if spec.get("spec_text") is not None:
                client.log_text(run_id, spec["spec_text"], "spec.yaml")
        else:
            client.update_run(run_id, status="RUNNING")
        self.sweeps[sid] = _Sweep(client, experiment_id, run_id)
        self.reply("opened", sid, [experiment_id, run_id])

    def apply(self, batch: list[Any]) -> bool:
        """Write one round; returns True when the engine closed the pipe."""
        from automl.tracking import MLFLOW_STATUS, _log_batch

        stopping = False
        flushes: list[int] = []
        dirty: dict[tuple[int, int], _TrialLog] = {}
        for entry in batch:
            if entry is None:
                stopping = True
                continue
            kind = entry[0]
            if kind == "flush":
                flushes.append(entry[1])
                continue
            sid = entry[1]
            if kind == "open":
                self._write_dirty(dirty)  # trials of other sweeps queued before it keep their order
                try:
                    self._open(sid, entry[2])
                except Exception as exc:
                    self.reply("error", sid, f"cannot create the sweep's run: {type(exc).__name__}: {exc}")
                continue
            sweep = self.sweeps.get(sid)
            if sweep is None:
                continue  # its open failed (already reported)
            if kind == "parent":
                params, metrics, tags = entry[2]
                try:
                    _log_batch(sweep.client, sweep.parent_run_id, params=params, tags=tags,
                               metrics=[(k, v, ts, 0) for k, v, ts in metrics])
                except Exception as exc:
                    self.reply("error", sid, f"the sweep's run: {type(exc).__name__}: {exc}")
                continue
            number = entry[2]
            t = sweep.trials.setdefault(number, _TrialLog())
            if kind == "adopt":  # resuming: this trial's run exists already
                t.run_id = entry[3]
                continue
            payload = entry[3]
            dirty[(sid, number)] = t
            if kind == "start":
                t.params, t.start_ms = dict(payload[0]), payload[2]
                t.tags.update(payload[1])
            elif kind == "report":
                step, metrics, ts = payload
                t.metrics.extend((k, v, ts, step) for k, v in metrics.items())
            elif kind == "note":  # tags and artifacts on a running trial (a PBT exploit)
                tags, artifacts = payload
                t.tags.update(tags)
                t.artifacts.extend((a[0], a[1]) for a in artifacts)
            else:
                state, tags, artifacts, ts = payload
                t.status = MLFLOW_STATUS.get(state, "FINISHED")
                t.tags.update(tags)
                t.end_ms = ts
                t.artifacts.extend((a[0], a[1]) for a in artifacts)
        self._write_dirty(dirty)
        for seq in flushes:
            self.reply("flushed", seq)
        return stopping

    def _write_dirty(self, dirty: dict[tuple[int, int], _TrialLog]) -> None:
        for (sid, number), t in dirty.items():
            sweep = self.sweeps[sid]
            try:
                created = t.run_id is None
                self._write(sweep, number, t)
                if created:
                    self.reply("run_id", sid, number, t.run_id)
            except Exception as exc:  # keep writing the other trials; the engine raises at flush
                self.reply("error", sid, f"trial {number}: {type(exc).__name__}: {exc}")
        dirty.clear()

    @staticmethod
    def _write(sweep: _Sweep, number: int, t: _TrialLog) -> None:
        from automl.tracking import PARENT_TAG, TAG_TRIAL, _log_batch

        params: dict[str, Any] = {}
        if t.run_id is None:
            run = sweep.client.create_run(
                sweep.experiment_id,
                start_time=t.start_ms or None,
                run_name=f"trial-{number:04d}",
                tags={PARENT_TAG: sweep.parent_run_id, TAG_TRIAL: str(number), **t.tags},
            )
            t.run_id = run.info.run_id
            params, t.params, t.tags = t.params, {}, {}
        _log_batch(sweep.client, t.run_id, params=params, metrics=t.metrics, tags=t.tags)
        t.metrics, t.tags = [], {}
        for name, text in t.artifacts:
            sweep.client.log_text(t.run_id, text, name)
        t.artifacts = []
        if t.status is not None:
            sweep.client.set_terminated(t.run_id, status=t.status, end_time=t.end_ms)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    main()
