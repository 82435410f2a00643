"""The engine's side of the MLflow writer process (one for every sweep): what happens when it dies under a sweep,
or gets a terminal's Ctrl-C; what it keeps off command lines; stores created by several processes at once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from automl.errors import AutoMLError
from automl.tracking import MlflowRecorder, SweepLog


def opened(recorder: MlflowRecorder, uri: str, name: str) -> SweepLog:
    sweep_log = recorder.open(uri)
    sweep_log.open(experiment=name, artifact_location=None, run_name=name, tags={}, params={"p": 1})
    sweep_log.ready()
    return sweep_log


def test_a_dead_writer_fails_the_flush_at_once_and_what_it_wrote_stays(workdir: Path) -> None:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    recorder = MlflowRecorder()
    sweep_log = opened(recorder, uri, "dies")
    sweep_log.trial_started(0, {"x": 0.5}, {})
    sweep_log.trial_finished(0, "COMPLETE", {})
    sweep_log.flush()
    first = sweep_log.run_id_of(0)
    assert first is not None

    # The writer dies (killed, out of memory) while the engine waits on it: stopped first so that it cannot
    # answer the flush, then killed while the flush waits.
    os.kill(recorder.pid, signal.SIGSTOP)
    sweep_log.trial_started(1, {"x": 0.1}, {})
    threading.Timer(1.0, recorder._proc.kill).start()
    started = time.monotonic()
    with pytest.raises(AutoMLError, match="MLflow writer stopped"):
        sweep_log.flush(timeout=60)
    assert time.monotonic() - started < 5  # a clear error at once, not a sweep hung for the flush timeout

    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first).info.status == "FINISHED"  # written before the death: kept
    assert client.get_run(sweep_log.parent_run_id).data.params == {"p": "1"}


def test_a_writer_that_died_with_records_unwritten_is_reported_and_the_parent_run_is_still_closed(
    workdir: Path,
) -> None:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    recorder = MlflowRecorder(log_file=workdir / ".automl" / "automl.log")
    sweep_log = opened(recorder, uri, "lost")
    sweep_log.flush()
    recorder._proc.kill()
    recorder._proc.wait()
    sweep_log.trial_started(0, {"x": 0.5}, {})  # never written: the writer is gone
    with pytest.raises(AutoMLError, match=r"MLflow writer stopped .* before writing every trial; its output is in"):
        sweep_log.finish("FINISHED")
    parent = MlflowClient(tracking_uri=uri).get_run(sweep_log.parent_run_id)
    assert parent.info.status == "FAILED"  # closed, never left RUNNING, and says why
    assert "MLflow writer stopped" in parent.data.tags["automl.error"]


def test_one_writer_serves_sweeps_of_different_stores_keyed_by_sweep(workdir: Path, tmp_path_factory) -> None:
    other = tmp_path_factory.mktemp("other") / "mlflow.db"
    recorder = MlflowRecorder()
    a = opened(recorder, f"sqlite:///{workdir / 'mlflow.db'}", "a")
    b = opened(recorder, f"sqlite:///{other}", "b")
    for sweep_log in (a, b):  # both sweeps have a trial 0: they never collide
        sweep_log.trial_started(0, {"x": 0.5}, {})
        sweep_log.trial_finished(0, "COMPLETE", {"automl.state": "COMPLETE"})
    a.finish("FINISHED")
    b.finish("FINISHED")
    for sweep_log in (a, b):
        run = sweep_log.client.get_run(sweep_log.run_id_of(0) or "")
        assert run.data.tags["mlflow.parentRunId"] == sweep_log.parent_run_id
    assert a.run_id_of(0) != b.run_id_of(0)
    recorder.shutdown()


def test_the_writer_survives_sigint_and_keeps_secrets_and_the_working_directory_out_of_its_way(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A ./mlflow.py in the working directory would shadow MLflow if the writer put the directory on its path.
    marker = tmp_path_factory.mktemp("marker") / "imported"
    (workdir / "mlflow.py").write_text(f"open({str(marker)!r}, 'w').write('executed')\n")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    recorder = MlflowRecorder()
    sweep_log = opened(recorder, uri, "calm")
    args = Path(f"/proc/{recorder.pid}/cmdline").read_bytes().decode()
    assert "mlflow.db" not in args  # the tracking URI (it may hold a password) is not on the command line
    os.kill(recorder.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to its whole process group
    sweep_log.trial_started(0, {"x": 0.5}, {})
    sweep_log.trial_finished(0, "KILLED", {"automl.state": "KILLED"})
    sweep_log.finish("KILLED")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(sweep_log.run_id_of(0) or "").info.status == "KILLED"
    assert not marker.exists()
    recorder.shutdown()


def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    """MLflow's schema migrations race when two processes open a new SQLite store together ("table
    _alembic_tmp_metrics already exists"); automl takes a lock around it."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = ("import sys; from automl.tracking import make_client; c = make_client(sys.argv[1]); "
            "c.search_experiments(); c.search_registered_models(); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    client = MlflowClient(tracking_uri=uri)
    assert [e.name for e in client.search_experiments()] == ["Default"]
