"""Shared fixtures: one real local Ray per test session, and a fresh working directory per test."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(autouse=True)
def _no_leaked_mlflow_uri() -> Iterator[None]:
    """mlflow.set_tracking_uri is process-wide (and exported to the environment): a test that sets it must not
    leave later tests talking to a store, or a server, that is gone."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None is mlflow's documented "unset"
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray (2 CPUs), started once: Ray takes ~2.5 s to start."""
    import ray

    if not ray.is_initialized():
        # address="local": never join another Ray that happens to run on this machine.
        # num_gpus=1 declares one GPU to Ray's scheduler (there is none on a CPU machine): the scheduling of
        # fractional GPUs is tested for real, and trainers fall back to the CPU as they must without CUDA.
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    yield
    import automl.engine

    automl.engine.shutdown()  # the process's warm engine (its workers, its MLflow writer) goes before its Ray
    ray.shutdown()


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded MLflow store (SQLite) with its schema made. MLflow builds a new store's tables by running its
    Alembic migrations, about 1.4 s; copying a made one takes milliseconds. The first-run path stays tested: every
    test that runs the CLI in a fresh directory (test_resume, test_spec_corpus, ...) starts without a store."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def bare_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean, empty working directory: the embedded store (mlflow.db, mlartifacts/, .automl/) lands here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


@pytest.fixture
def workdir(bare_workdir: Path, _empty_store: Path) -> Path:
    """A clean working directory whose embedded store (an empty ``mlflow.db``) already exists."""
    shutil.copyfile(_empty_store, bare_workdir / "mlflow.db")
    return bare_workdir


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[Any, Any, Any]]:
    """An engine on ``automl.testing``'s in-process executor (2 slots) and memory recorder: no Ray, no MLflow.
    Yields (engine, executor, recorder)."""
    from automl.engine import Engine
    from automl.testing import InProcessExecutor, MemoryRecorder

    executor, recorder = InProcessExecutor(slots=2), MemoryRecorder()
    engine = Engine(executor=executor, recorder=recorder, workdir=tmp_path)
    yield engine, executor, recorder
    engine.shutdown()
