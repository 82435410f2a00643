"""The "where" seam of the engine: an executor runs trials somewhere and streams their events back.

``automl.engine.pool.RayPool`` runs them on a warm pool of Ray actors (local or a cluster);
``automl.testing.InProcessExecutor`` runs them in threads of this process (unit tests of the engine's decisions,
and trainer authors trying their trainer without Ray). The engine sees only this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from automl.engine.records import TrialKey

if TYPE_CHECKING:
    from automl.bundle import PackedModel
    from automl.trainer import TrainerRef


@dataclass(frozen=True)
class Shape:
    """What one trial of a sweep asks for (``resources``): Ray places each trial on a worker holding this much."""

    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class TrialRequest:
    key: TrialKey
    trainer: TrainerRef
    params: dict[str, Any]  # searched and fixed
    seed: int
    data: Any  # what ``Executor.put_data`` returned for this sweep (None: the spec has no data)
    shape: Shape
    segment: Segment | None = None  # method: pbt: one stretch of a member's training
    # Send back the model's validation (k-fold: out-of-fold) predictions, for ensemble selection (final_model).
    predictions: bool = False


@dataclass(frozen=True)
class Segment:
    """One stretch of a PBT member's training: from ``checkpoint`` (None: from scratch) until the report of step
    ``until``, where the trainer's checkpoint is taken and the trial ends PAUSED (None: to the end of training)."""

    checkpoint: bytes | None = None
    until: int | None = None


@dataclass
class Started:
    """The trial's worker began it: its clock (``budget.trial_time``) starts now, not when it was queued."""

    key: TrialKey
    at: float  # time.monotonic() of the driver when the event arrived
    imported: bool = False  # the worker imported the trainer for this trial (it had not loaded it before)


@dataclass
class Report:
    key: TrialKey
    step: int
    metrics: dict[str, float]


@dataclass
class TrialEnd:
    key: TrialKey
    state: str  # COMPLETE | STOPPED | FAILED | PAUSED (a PBT segment reached its end: ``checkpoint`` holds it)
    seconds: float = 0.0  # time inside the trainer: the trial's own compute
    error: str | None = None
    traceback: str | None = None
    model: PackedModel | None = None
    model_note: str | None = None
    predictions: Any = None  # numpy array, when the request asked for them (automl.ensemble.validation_predictions)
    worker_died: bool = False  # the worker process died under the trial (it may be retried)
    node: str | None = None  # the Ray node that ran it
    gpus: list[str] | None = field(default=None)  # the GPU ids Ray assigned (fractional GPUs share an id)
    device_note: str | None = None  # set when a GPU was assigned but the trial fell back to the CPU
    checkpoint: bytes | None = None  # PAUSED: the trainer's checkpoint at ``step``
    step: int | None = None


Event = Started | Report | TrialEnd


class Executor(Protocol):
    """Runs trials. Called from the engine's loop thread only, except ``put_data``/``drop_data``/``prepare``."""

    def capacity(self, shape: Shape) -> int:
        """How many trials of ``shape`` the cluster can run at once (for planning and the run header)."""
        ...

    def can_start(self, shape: Shape) -> bool:
        """Whether a trial of ``shape`` can start now (a free worker, or room to start one)."""
        ...

    def put_data(self, data: Any) -> Any:
        """Make a sweep's data available to its trials; returns the handle to pass in ``TrialRequest.data``."""
        ...

    def drop_data(self, handle: Any) -> None: ...

    def prepare(self, shape: Shape, trainer: TrainerRef, count: int) -> Callable[[], None]:
        """Warm-up: start up to ``count`` workers of ``shape`` and load ``trainer`` in them ahead of the first trial
        (a new sweep's start-up overlaps their imports). Returns a wait for the first load, which raises
        ``TrainerError`` if the trainer fails to import there."""
        ...

    def launch(self, request: TrialRequest) -> None: ...

    def stop(self, key: TrialKey) -> None:
        """Ask a trial to stop; it does at its next report (``StopTrial``) and ends STOPPED."""
        ...

    def kill(self, key: TrialKey) -> None:
        """End a trial that does not stop by itself (its worker is replaced); it ends FAILED, worker_died."""
        ...

    def running(self) -> list[TrialKey]: ...

    def poll(self, timeout: float | None) -> list[Event]:
        """Events of running trials: waits up to ``timeout`` seconds for the first, then takes all ready."""
        ...

    def shutdown(self) -> None: ...
