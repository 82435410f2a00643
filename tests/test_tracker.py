"""The driver's side of the MLflow writer process: what happens when that process dies under a sweep."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from automl.errors import AutoMLError
from automl.tracking import SweepTracker


def test_a_dead_writer_fails_the_flush_at_once_and_what_it_wrote_stays(workdir: Path) -> None:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    tracker = SweepTracker(uri)
    tracker.open(experiment="dies", artifact_location=None, run_name="dies", tags={}, params={"p": 1})
    tracker.trial_started(0, {"x": 0.5}, {})
    tracker.trial_finished(0, "COMPLETE", {})
    tracker.flush()
    first = tracker.run_id_of(0)
    assert first is not None

    # The writer dies (killed, out of memory) while the driver waits on it: stopped first so that it cannot
    # answer the flush, then killed while the flush waits.
    os.kill(tracker._proc.pid, signal.SIGSTOP)
    tracker.trial_started(1, {"x": 0.1}, {})
    threading.Timer(1.0, tracker._proc.kill).start()
    started = time.monotonic()
    with pytest.raises(AutoMLError, match="MLflow writer stopped"):
        tracker.flush(timeout=60)
    assert time.monotonic() - started < 5  # a clear error at once, not a sweep hung for the flush timeout

    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first).info.status == "FINISHED"  # written before the death: kept
    assert client.get_run(tracker.parent_run_id).data.params == {"p": "1"}
