"""One sweep inside the engine: its plan, its state folder, its record, its decisions, and the two ports that
connect the decisions (``SweepCore``) to the executor and to the record."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.engine.executor import Segment, Shape, TrialRequest
from automl.engine.records import SweepResult, TrialKey, TrialRecord

if TYPE_CHECKING:
    from automl.bundle import PackedModel
    from automl.data import PreparedData
    from automl.engine.core import SweepCore
    from automl.engine.driver import Engine
    from automl.orchestrator import Sweep
    from automl.state import SweepLock, SweepState
    from automl.tracking import SweepLog

EventCallback = Callable[[str, TrialRecord], None]
NoteCallback = Callable[[str], None]


class Phase:
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    FINISHING = "FINISHING"
    DONE = "DONE"


@dataclass
class SweepRun:
    """Everything the engine holds for one sweep, from ``submit`` to its result."""

    plan: Sweep
    on_event: EventCallback
    on_note: NoteCallback
    resume: SweepState | None = None
    lock: SweepLock | None = None
    requested_id: str | None = None  # the id a caller chose (the service's); default: the name and the time
    sweep_id: str = ""
    phase: str = Phase.STARTING
    submitted: float = field(default_factory=time.perf_counter)
    future: Future[SweepResult] = field(default_factory=Future)
    summary: Future[None] = field(default_factory=Future)  # the plots, drawn after the result (engine.finish)
    plots_due: bool = False
    started_event: threading.Event = field(default_factory=threading.Event)
    # Filled by the start-up
    folder: Path | None = None
    state: SweepState | None = None
    prepared: PreparedData | None = None
    data_handle: Any = None
    log: SweepLog | Any = None
    core: SweepCore | None = None
    sampler_name: str = ""
    shape: Shape = field(default_factory=Shape)
    history: dict[int, dict[int, float]] = field(default_factory=dict)  # resuming: restored trials' values
    warm_start: int = 0
    attained: float = 0.0  # trial seconds this sweep has had since it started running (the engine's fair share)
    warm_sources: list[str] = field(default_factory=list)
    model_uri: str | None = None
    error: BaseException | None = None
    cancel_requested: str | None = None
    cut: dict[int, float] = field(default_factory=dict)  # cancelled trials still on a worker -> when cut
    notes: list[str] = field(default_factory=list)
    deadline: float | None = None  # wall-clock end of the whole run (budget.time), finishing step included

    @property
    def spec(self) -> Any:
        return self.plan.spec

    def key(self, number: int) -> TrialKey:
        return TrialKey(self.sweep_id, number)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.on_note(text)


class RunOps:
    """``SweepOps`` for one sweep: trial numbers become keys; the executor does the rest."""

    def __init__(self, engine: Engine, run: SweepRun) -> None:
        self.engine = engine
        self.run = run

    def launch(self, number: int, params: dict[str, Any], seed: int, segment: Segment | None = None) -> None:
        run = self.run
        self.engine.executor.launch(TrialRequest(key=run.key(number), trainer=run.plan.trainer, params=params,
                                                 seed=seed, data=run.data_handle, shape=run.shape, segment=segment,
                                                 predictions=run.spec.final_model.ensemble))

    def stop(self, number: int) -> None:
        self.engine.executor.stop(self.run.key(number))

    def kill(self, number: int) -> None:
        self.engine.executor.kill(self.run.key(number))


class RunHooks:
    """``SweepHooks`` for one sweep: the record (MLflow), the best model in the state folder, the user's callbacks."""

    def __init__(self, run: SweepRun) -> None:
        self.run = run

    def trial_started(self, record: TrialRecord) -> None:
        run = self.run
        run.log.trial_started(record.number, {**record.params, **run.spec.fixed},
                              {"automl.state": "RUNNING", "automl.sampler": run.sampler_name,
                               "automl.sweep_id": run.sweep_id})
        run.on_event("started", record)

    def trial_reported(self, record: TrialRecord, step: int, metrics: dict[str, float]) -> None:
        self.run.log.trial_reported(record.number, step, metrics)
        self.run.on_event("reported", record)

    def trial_finished(self, record: TrialRecord, tags: dict[str, str], artifacts: list[tuple[str, str]]) -> None:
        self.run.log.trial_finished(record.number, str(record.state), tags, artifacts)
        self.run.on_event("finished", record)

    def save_best(self, record: TrialRecord, model: PackedModel) -> None:
        from automl.engine.driver import debug_pause
        from automl.state import save_best_bundle

        run = self.run
        assert run.folder is not None  # the state folder exists once the sweep runs
        spec = run.spec
        info = {"trainer": spec.trainer, "trial": record.number, "params": record.params, "fixed": spec.fixed,
                "metric": {"name": spec.metric_name, "goal": spec.direction, "value": record.value},
                "metrics": record.metrics, "sweep_id": run.sweep_id}
        save_best_bundle(run.folder, record.number, model, run.prepared, info)
        debug_pause("best-saved", run.folder.parent)

    def best_told(self, record: TrialRecord) -> None:
        from automl.state import drop_other_bundles

        if self.run.folder is not None:
            drop_other_bundles(self.run.folder, record.number)

    def note(self, text: str) -> None:
        self.run.note(text)

    def member_exploited(self, record: TrialRecord, exploit: dict[str, Any], history: list[dict[str, Any]]
                         ) -> None:
        """method: pbt: the exploit on the member's run: a tag per exploit (source, step, values before and
        after) and ``exploits.json`` with them all (MLflow params cannot change, so the new values are tags)."""
        import json

        index = len(history)
        tags = {f"automl.pbt.exploit.{index:03d}": json.dumps(exploit, default=str)[:5000],
                "automl.pbt.exploits": str(index), "automl.pbt.source": str(exploit["source"]),
                "automl.pbt.params": json.dumps(exploit["after"], default=str)[:5000]}
        self.run.log.trial_annotated(record.number, tags, [("exploits.json", json.dumps(history, indent=1,
                                                                                         default=str))])
        self.run.on_event("exploited", record)
