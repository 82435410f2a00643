"""The engine: many sweeps at once in one process, on one warm pool of workers and one MLflow writer.

- ``records``: the result types (``TrialState``, ``TrialKey``, ``TrialRecord``, ``SweepResult``);
- ``core``: a sweep's decisions (launch, report, prune, end, retry, tell), with no Ray and no MLflow;
- ``executor``: the seam to where trials run; ``pool`` runs them on warm Ray actors, ``worker`` is the actor;
- ``driver``: the loop that drives every sweep (``Engine``, ``SweepHandle``), fair shares, live control;
- ``startup`` and ``finish``: a sweep's start-up and its finishing step, each in a thread of its own;
- ``warmstart``: earlier trials from MLflow that seed a new sweep's sampler; ``control``: ``automl set``.
"""

from __future__ import annotations

from automl.engine.driver import Engine, SweepHandle, default_engine, release_idle_workers, shutdown
from automl.engine.records import SweepResult, TrialKey, TrialRecord, TrialState

__all__ = ["Engine", "SweepHandle", "SweepResult", "TrialKey", "TrialRecord", "TrialState", "default_engine",
           "release_idle_workers", "shutdown"]
