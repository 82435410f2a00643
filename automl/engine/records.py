"""The result types of a sweep: trial states, the trial record (the leaderboard's row), the best trial, the result.

Every trial is keyed by ``TrialKey(sweep_id, number)``: two sweeps' trial 0 never collide in the engine, the
executor or the recorder.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from automl.errors import AutoMLError

if TYPE_CHECKING:
    import pandas as pd


class TrialState(StrEnum):
    """A trial's state as automl records it (MLflow's run status is derived: COMPLETE and STOPPED are FINISHED)."""

    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"  # trained to the end, its metric recorded
    STOPPED = "STOPPED"  # stopped early (a pruner): FINISHED in MLflow with automl.early_stopped=true
    FAILED = "FAILED"  # raised, returned NaN, ran past budget.trial_time, never reported its metric
    KILLED = "KILLED"  # cut short by the sweep (budget.time, cancel, an interruption)

    @property
    def finished(self) -> bool:
        return self is not TrialState.RUNNING


# Leaderboard order: finished trials first, then stopped, killed, failed.
STATE_RANK = {TrialState.COMPLETE: 0, TrialState.STOPPED: 1, TrialState.KILLED: 2, TrialState.FAILED: 3,
              TrialState.RUNNING: 4}


class TrialKey(NamedTuple):
    sweep_id: str
    number: int

    def __str__(self) -> str:
        return f"{self.sweep_id}#{self.number}"


@dataclass
class TrialRecord:
    """One trial as the user sees it (the leaderboard's row)."""

    number: int
    params: dict[str, Any]
    state: TrialState = TrialState.RUNNING
    value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    seconds: float = 0.0
    error: str | None = None
    run_id: str | None = None
    values: list[float] | None = None  # one per metric when the spec optimises several
    pareto: bool = False  # on the Pareto front (several metrics only)
    attempts: int = 1  # more than one when its Ray worker died and the trial was retried
    node: str | None = None  # the Ray node that ran it
    gpus: list[str] | None = None  # the GPU ids Ray assigned to it
    stop_reason: str | None = None  # why the sweep stopped it: budget.time, budget.trial_time, failures, cancel
    started: float | None = None  # time.time() when its worker started it


@dataclass
class BestTrial:
    number: int
    params: dict[str, Any]
    metrics: dict[str, float]
    value: float
    run_id: str | None
    model_uri: str | None


class SweepFailed(AutoMLError):
    """The sweep stopped because too many trials failed (``budget.max_failures``); ``result`` holds it."""

    def __init__(self, message: str, result: SweepResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class SweepResult:
    sweep_id: str
    name: str
    metric: str
    goal: str
    trials: list[TrialRecord]
    best: BestTrial | None
    experiment_id: str | None
    parent_run_id: str | None
    tracking_uri: str
    sampler: str
    wall_seconds: float
    state_dir: Path
    objectives: list[tuple[str, str]] = field(default_factory=list)  # (metric, goal), the first one ranks
    pareto_front: list[int] = field(default_factory=list)  # trial numbers, several metrics only
    # Modules the best model's loader may come from besides registered trainers: a module:function trainer's own
    trusted_modules: list[str] = field(default_factory=list)
    status: str = "FINISHED"  # FINISHED | FAILED | KILLED (cancelled: resumable)
    warm_start_trials: int = 0  # earlier trials that seeded the sampler (not run, not in ``trials``)
    # The summary plots on the parent run are drawn after the result is known (they take about a second and
    # nothing waits on them); done when they are on the run. The engine waits for them when it shuts down (up to 60 s).
    summary: Future[None] | None = field(default=None, repr=False, compare=False)

    def wait_for_summary(self, timeout: float | None = None) -> None:
        """Wait until the summary plots are on the parent run (they follow the result by about a second)."""
        if self.summary is not None:
            self.summary.result(timeout=timeout)

    def leaderboard(self, top: int | None = None) -> pd.DataFrame:
        """Trials sorted best first (finished trials first, then stopped, killed, failed)."""
        return leaderboard(self.trials, self.metric, self.goal, self.objectives, top=top)

    def export(self, out: str | Path, format: str = "mlflow") -> Path:
        from automl.export import export_model

        if self.best is None or self.best.model_uri is None:
            raise AutoMLError(f"sweep {self.sweep_id} has no exportable best model")
        return export_model(self.best.model_uri, Path(out), format=format, tracking_uri=self.tracking_uri,
                            trusted_modules=self.trusted_modules)


def leaderboard(trials: list[TrialRecord], metric: str, goal: str, objectives: list[tuple[str, str]],
                top: int | None = None) -> pd.DataFrame:
    """A sweep's trials as a pandas frame, best first: finished, then stopped, killed, failed."""
    import pandas as pd

    rows = []
    multi = len(objectives) > 1
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "state": str(t.state)}
        if multi:
            for i, (name, _) in enumerate(objectives):
                row[name] = t.values[i] if t.values else t.metrics.get(name)
            row["pareto"] = t.pareto
        else:
            row[metric] = t.value
        rows.append({**row, "epochs": t.epochs, "seconds": round(t.seconds, 2), **t.params, "run_id": t.run_id})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["_rank"] = frame["state"].map({str(k): v for k, v in STATE_RANK.items()})
    frame = frame.sort_values(["_rank", metric], ascending=[True, goal == "minimize"],
                              na_position="last").drop(columns="_rank")
    return frame.head(top) if top else frame.reset_index(drop=True)
