"""The sweep's decisions: what to launch, what a report means, when to stop a trial, how a trial ends, what to
tell the sampler. No Ray, no MLflow: the engine feeds it events and carries out what it asks through two small
ports (``SweepOps`` for the executor, ``SweepHooks`` for what is recorded), so it is unit-tested with fakes
(``automl.testing``).

Optuna is the search state: ``study.ask()`` proposes every configuration, ``trial.report``/``should_prune`` is early
stopping, ``study.tell`` records the outcome. The core is driven from one thread (the engine's loop).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from automl.engine.records import TrialRecord, TrialState
from automl.errors import AutoMLError

if TYPE_CHECKING:
    import optuna

    from automl.bundle import PackedModel
    from automl.engine.executor import Segment, TrialEnd
    from automl.space import SearchSpace
    from automl.spec import Spec


# Seconds a trial may run on past budget.time (it stops at its next report) before it is killed.
DEADLINE_GRACE = 2.0
# Ensemble candidates whose predictions are kept (see SweepCore._keep_predictions).
KEPT_PREDICTIONS = 25


class SweepOps(Protocol):
    """What the core asks of the executor, by trial number (the engine adds the sweep id)."""

    def launch(self, number: int, params: dict[str, Any], seed: int, segment: Segment | None = None) -> None:
        """Start trial ``number``; ``segment``: one stretch of a PBT member's training (automl.engine.pbt)."""
        ...

    def stop(self, number: int) -> None: ...

    def kill(self, number: int) -> None: ...


class SweepHooks(Protocol):
    """What the core tells the rest of the world: the record (MLflow), the best model store, the user."""

    def trial_started(self, record: TrialRecord) -> None: ...

    def trial_reported(self, record: TrialRecord, step: int, metrics: dict[str, float]) -> None: ...

    def trial_finished(self, record: TrialRecord, tags: dict[str, str], artifacts: list[tuple[str, str]]) -> None:
        ...

    def save_best(self, record: TrialRecord, model: PackedModel) -> None:
        """Keep the model of a new best trial; called *before* the trial is told to Optuna."""
        ...

    def best_told(self, record: TrialRecord) -> None:
        """The new best is in the search state: the previous best's model may go."""
        ...

    def note(self, text: str) -> None: ...


@dataclass(frozen=True)
class Budget:
    """The budget in effect: what ``SweepHandle.update`` answers with."""

    trials: int
    max_concurrent: int  # in effect: never more than the cluster runs at once
    time: float | None  # seconds from the sweep's start
    requested_concurrency: int | None = None  # what the spec or the last update asked for

    def as_dict(self) -> dict[str, Any]:
        return {"trials": self.trials, "max_concurrent": self.max_concurrent, "time": self.time}


class SweepCore:
    """One sweep's decisions. ``planned`` trials at most, ``concurrency`` at once (both changeable live)."""

    def __init__(
        self,
        *,
        sweep_id: str,
        spec: Spec,
        space: SearchSpace,
        study: optuna.Study,
        ops: SweepOps,
        hooks: SweepHooks,
        planned: int,
        concurrency: int,
        capacity: int | None = None,
        records: dict[int, TrialRecord] | None = None,
        best: TrialRecord | None = None,
        offset: int = 0,
        sampler_name: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sweep_id = sweep_id
        self.spec = spec
        self.space = space
        self.study = study
        self.ops = ops
        self.hooks = hooks
        self.metric = spec.metric_name
        self.goal = spec.direction
        self.objectives = spec.objectives
        self.multi = len(self.objectives) > 1
        self.sampler_name = sampler_name
        self.records: dict[int, TrialRecord] = records if records is not None else {}
        self.best = best
        # Optuna numbers trials from 0 across the whole study; warm-start trials come first, so the sweep's own
        # trials are numbered from 0 by taking their count off.
        self.offset = offset
        self.planned = planned
        self.requested = concurrency
        self.capacity = capacity  # what the cluster runs at once for this sweep's resources (None: unknown)
        self.clock = clock
        self.trials: dict[int, optuna.trial.Trial] = {}  # running trials, by number
        self.failure_stop: str | None = None
        self.cancelled: str | None = None
        self.started = clock()
        self.deadline = self.started + spec.budget.time if spec.budget.time else None
        self._timed_out = False
        self._warned_device = False
        self._started_at: dict[int, float] = {}
        # Validation (k-fold: out-of-fold) predictions of completed trials, when the spec builds an ensemble
        # (final_model.ensemble): the candidates of automl.final_model. Only the best are kept (``_keep_predictions``).
        self.predictions: dict[int, Any] = {}
        # With a finishing step that refits (final_model.refit), the trials end early enough for it: at
        # ``finish_by`` (this core's clock) less the refit of the best trial so far (``finish_seconds``), never
        # before ``finish_floor``. Set by the engine's start-up; None: the deadline is budget.time's alone.
        self.finish_by: float | None = None
        self.finish_floor: float | None = None
        self.finish_seconds: Callable[[TrialRecord | None], float] | None = None

    # ------------------------------------------------------------------------------------------ budget

    @property
    def concurrency(self) -> int:
        """Trials at once in effect: what was asked, never more than the cluster holds."""
        return max(1, min(self.requested, self.capacity)) if self.capacity else max(1, self.requested)

    def budget(self) -> Budget:
        time_left = self.deadline - self.started if self.deadline is not None else None
        return Budget(self.planned, self.concurrency, time_left, self.requested)

    def update(self, *, trials: int | None = None, max_concurrent: int | None = None,
               time: float | None = None) -> Budget:
        """Change the budget of the running sweep; ``AutoMLError`` (one line, nothing changed) if it cannot be
        honoured. Fewer trials stop the newest running trials past the new number; less concurrency lets running
        trials finish and starts no new one until under the limit; ``time`` counts from the sweep's start."""
        if self.cancelled or self.done:
            raise AutoMLError(f"sweep {self.sweep_id} is no longer running; its budget cannot change")
        done = sum(1 for r in self.records.values() if r.state.finished)
        if trials is not None:
            if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
                raise AutoMLError(f"budget.trials must be a whole number >= 1 (got {trials!r})")
            if trials < done:
                raise AutoMLError(f"budget.trials: {trials} is fewer than the {done} trials already done in sweep "
                                  f"{self.sweep_id}; give at least {done}")
            if self.spec.method == "grid":
                size = self.space.grid_size()
                if trials > size:
                    raise AutoMLError(f"budget.trials: {trials} is more than the grid's {size} points")
        if max_concurrent is not None and (
                isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1):
            raise AutoMLError(f"budget.max_concurrent must be a whole number >= 1 (got {max_concurrent!r})")
        if time is not None:
            if not (isinstance(time, int | float) and math.isfinite(time) and time > 0):
                raise AutoMLError(f"budget.time must be a duration > 0 (got {time!r})")
            elapsed = self.clock() - self.started
            if time <= elapsed:
                raise AutoMLError(f"budget.time: {time:g}s has already passed (sweep {self.sweep_id} has run "
                                  f"{elapsed:.0f}s); give more, or cancel the sweep")
        if trials is not None:
            self.planned = trials
            launched = sorted(self.records)
            for number in reversed(launched[trials:]):  # the newest trials past the new budget
                if number in self.trials:
                    self._stop(number, f"budget.trials lowered to {trials}")
        if max_concurrent is not None:
            self.requested = max_concurrent
        if time is not None:
            self.deadline = self.started + time
            self.finish_by = None  # the user's new time is the trials' own
            self._timed_out = False
        return self.budget()

    # ------------------------------------------------------------------------------------------ launching

    def wanted(self) -> int:
        """How many more trials this sweep would start now."""
        if self.cancelled or self.failure_stop or self.out_of_time():
            return 0
        return max(0, min(self.concurrency - len(self.trials), self.planned - len(self.records)))

    def launch_next(self) -> int:
        """Ask the sampler for the next configuration and launch it; returns its trial number."""
        trial = self.study.ask()
        params = self.space.suggest(trial)
        number = trial.number - self.offset
        self.trials[number] = trial
        record = self.records[number] = TrialRecord(number=number, params=params)
        self.ops.launch(number, {**params, **self.spec.fixed}, self.spec.seed + number)
        self.hooks.trial_started(record)
        return number

    def on_started(self, number: int, at: float) -> None:
        self._started_at[number] = at
        if number in self.records:
            self.records[number].started = time.time()

    def started_at(self, number: int) -> float | None:
        return self._started_at.get(number)

    # ------------------------------------------------------------------------------------------ reports

    def on_report(self, number: int, step: int, metrics: dict[str, float]) -> None:
        if number not in self.trials:
            return  # a trial already ended by the sweep (cancelled, budget lowered): its late reports are dropped
        record, value = self._note_report(number, step, metrics)
        if value is not None:
            if not math.isfinite(value):
                self.ops.stop(number)  # diverged: no point in training on; recorded FAILED at its end
            elif not self.multi and record.stop_reason is None:  # Optuna prunes single-objective studies only
                trial = self.trials[number]
                if record.attempts > 1:
                    with warnings.catch_warnings():  # a retried trial reports its first steps again
                        warnings.simplefilter("ignore", UserWarning)
                        trial.report(value, step)
                else:
                    trial.report(value, step)
                if trial.should_prune():
                    self._stop(number, "early stopping")
        self.hooks.trial_reported(record, step, metrics)

    def _note_report(self, number: int, step: int, metrics: dict[str, float]) -> tuple[TrialRecord, float | None]:
        """A report on the trial's record (its metrics, epochs and value); returns the record and the value."""
        record = self.records[number]
        record.metrics.update(metrics)
        record.epochs = max(record.epochs, step)
        value = metrics.get(self.metric)
        if value is not None:
            record.value = value
        return record, value

    def tick(self) -> None:
        """Deadlines: ``budget.time`` stops every running trial; past ``budget.trial_time`` a trial is asked to
        stop (at its next report), and killed a grace period later if it has not (a trainer that never
        reports)."""
        if self.out_of_time() and not self._timed_out:
            self._timed_out = True
            for number in list(self.trials):
                self._stop(number, "budget.time reached")
        if self._timed_out and self.deadline is not None and self.clock() > self.deadline + DEADLINE_GRACE:
            # A trial that does not report (one long fit) would hold the sweep past its budget: --time is a
            # promise about when the command returns.
            for number in list(self.trials):
                self.ops.kill(number)
        limit = self.spec.budget.trial_time
        if limit is None:
            return
        grace = max(2.0, 0.1 * limit)
        now = self.clock()
        for number in list(self.trials):
            started = self._started_at.get(number)
            if started is None:
                continue
            if now - started > limit + grace:
                self.ops.kill(number)
            elif now - started > limit and self.records[number].stop_reason is None:
                self._stop(number, f"ran past budget.trial_time ({limit:g}s)")

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do (None: nothing timed)."""
        times = []
        if self.deadline is not None and not self._timed_out:
            times.append(self.deadline)
        if (self.spec.budget.trial_time is not None or self._timed_out) and self.trials:
            times.append(self.clock() + 0.5)
        return min(times) if times else None

    def out_of_time(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def _stop(self, number: int, reason: str) -> None:
        self.records[number].stop_reason = reason
        self.ops.stop(number)

    # ------------------------------------------------------------------------------------------ ends

    def on_end(self, end: TrialEnd) -> None:
        from optuna.trial import TrialState as OptunaState

        number = end.key.number
        trial = self.trials.get(number)
        if trial is None:
            return  # ended by the sweep already (cancel): its record is final
        record = self.records[number]
        record.seconds = end.seconds
        if end.worker_died and record.stop_reason is None and record.attempts <= self.spec.resources.retries:
            # The worker died under the trial (killed, out of memory, a node lost): run it again, same number.
            record.attempts += 1
            record.metrics, record.value, record.epochs = {}, None, 0
            self._started_at.pop(number, None)
            self.ops.launch(number, {**record.params, **self.spec.fixed}, self.spec.seed + number)
            return
        del self.trials[number]
        self._started_at.pop(number, None)
        state = TrialState(end.state)
        error = end.error
        reason = record.stop_reason
        if reason not in (None, "early stopping") and state in (TrialState.STOPPED, TrialState.FAILED):
            # Stopped by the sweep, not by early stopping: the time budget, a lowered budget or a failure limit
            # (KILLED), or the trial's own time limit (FAILED).
            state = TrialState.FAILED if "trial_time" in str(reason) else TrialState.KILLED
            error = reason
        if state in (TrialState.COMPLETE, TrialState.STOPPED):
            for name in [m.name for m in self.objectives]:
                value = record.metrics.get(name)
                if value is not None and not math.isfinite(value):
                    state, error = TrialState.FAILED, f"'{name}' is {value} at epoch {record.epochs}"
                    break
                if value is None and state == TrialState.COMPLETE:
                    state = TrialState.FAILED
                    error = (f"the trainer never reported '{name}' (it reported: "
                             f"{', '.join(sorted(record.metrics)) or 'nothing'})")
                    break
        record.state, record.error = state, error
        record.node, record.gpus = end.node, end.gpus
        if state == TrialState.FAILED:
            self._count_failure(record)
        if state == TrialState.COMPLETE and end.predictions is not None and record.value is not None:
            self.predictions[number] = end.predictions
            self._keep_predictions()
        new_best = state == TrialState.COMPLETE and self.is_better(record)
        if new_best and end.model is not None:
            # Saved before the trial is told to Optuna: after a crash at any point, the trial the search state
            # calls best has its model on disk (a trial cut short before its tell runs again on resume).
            self.hooks.save_best(record, end.model)
        trial.set_user_attr("automl", {"state": str(state), "metrics": record.metrics, "epochs": record.epochs,
                                       "seconds": round(end.seconds, 4), "error": (error or "")[:2000],
                                       "attempts": record.attempts, "interrupted": False})
        if state == TrialState.COMPLETE and self.multi:
            record.values = [record.metrics[m.name] for m in self.objectives]
            self.study.tell(trial, record.values)
        elif state == TrialState.COMPLETE:
            self.study.tell(trial, record.value)
        elif state == TrialState.STOPPED:
            self.study.tell(trial, state=OptunaState.PRUNED)
        else:
            self.study.tell(trial, state=OptunaState.FAIL)
        tags = {"automl.state": str(state), "automl.epochs": str(record.epochs),
                "automl.seconds": f"{end.seconds:.3f}", "automl.attempts": str(record.attempts)}
        if state == TrialState.STOPPED:
            tags["automl.early_stopped"] = "true"
        artifacts: list[tuple[str, str]] = []
        if error:
            tags["automl.error"] = error[:5000]
            if end.traceback:
                artifacts.append(("traceback.txt", end.traceback))
        if end.model_note:
            tags["automl.model_note"] = end.model_note
        if end.node:
            tags["automl.node"] = end.node
        if end.gpus:
            tags["automl.gpus"] = ",".join(end.gpus)
        if end.device_note:
            tags["automl.device"] = end.device_note
            if not self._warned_device:
                self._warned_device = True
                self.hooks.note(f"trial {number}: {end.device_note}")
        if new_best:
            self.best = record
            self.plan_finish()
            tags["automl.best_so_far"] = "true"
            self.hooks.best_told(record)
        self.hooks.trial_finished(record, tags, artifacts)

    def plan_finish(self) -> None:
        """Move the trials' deadline so that the finishing step (its refit of the best so far) ends by
        ``finish_by``."""
        if self.finish_by is None or self.finish_seconds is None or self._timed_out:
            return
        deadline = self.finish_by - self.finish_seconds(self.best)
        self.deadline = max(deadline, self.finish_floor) if self.finish_floor is not None else deadline

    def _keep_predictions(self) -> None:
        """Bound the memory held for ensemble candidates: past twice ``KEPT_PREDICTIONS``, keep the best that many
        and the best trial of each model family (a diverse candidate is worth more to an ensemble than a tenth
        near-copy of the leader)."""
        if len(self.predictions) <= 2 * KEPT_PREDICTIONS:
            return
        sign = -1.0 if self.goal == "maximize" else 1.0
        ranked = sorted(self.predictions, key=lambda n: sign * (self.records[n].value or 0.0))
        keep = set(ranked[:KEPT_PREDICTIONS])
        families: set[Any] = set()
        for number in ranked:
            family = self.records[number].params.get("model")
            if family not in families:
                families.add(family)
                keep.add(number)
        self.predictions = {n: p for n, p in self.predictions.items() if n in keep}

    def _count_failure(self, record: TrialRecord) -> None:
        limit = self.spec.budget.max_failures
        failed = sum(1 for r in self.records.values() if r.state == TrialState.FAILED)
        if limit is not None and failed >= limit and not self.failure_stop:
            first = (record.error or "").splitlines()[0][:300] if record.error else "unknown"
            self.failure_stop = (f"sweep {self.sweep_id} stopped: {failed} trials failed (budget.max_failures: "
                                 f"{limit}); last error: {first}")
            for number in list(self.trials):
                self._stop(number, "budget.max_failures reached")

    def is_better(self, record: TrialRecord) -> bool:
        if record.value is None:
            return False
        if self.best is None or self.best.value is None:
            return True
        if self.goal == "maximize":
            return record.value > self.best.value
        return record.value < self.best.value

    # ------------------------------------------------------------------------------------------ the end

    def cancel(self, reason: str) -> list[int]:
        """End the sweep now: running trials are KILLED and queued to run again on resume (the sweep stays
        resumable); returns their numbers (the engine stops their workers)."""
        from optuna.trial import TrialState as OptunaState

        self.cancelled = reason
        cut = list(self.trials)
        for number in cut:
            record = self.records[number]
            record.state, record.error, record.stop_reason = TrialState.KILLED, reason, reason
            trial = self.trials.pop(number)
            # Cut short, not finished: a resume runs this configuration again from the start.
            trial.set_user_attr("automl", {"state": "KILLED", "interrupted": True, "error": reason})
            self.study.tell(trial, state=OptunaState.FAIL)
            self.study.enqueue_trial(record.params, skip_if_exists=False)
            self._started_at.pop(number, None)
            self.ops.stop(number)
            self.hooks.trial_finished(record, {"automl.state": "KILLED", "automl.error": reason}, [])
        return cut

    @property
    def done(self) -> bool:
        """Nothing runs and nothing more will start: the budget is spent, the time is up, too many trials failed,
        or the sweep was cancelled."""
        if self.trials:
            return False
        return bool(self.cancelled or self.failure_stop or self.out_of_time() or len(self.records) >= self.planned)

    @property
    def status(self) -> str:
        """The parent run's final status: KILLED when cancelled (resumable), FAILED past budget.max_failures."""
        if self.cancelled:
            return "KILLED"
        return "FAILED" if self.failure_stop else "FINISHED"

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for record in self.records.values():
            found[str(record.state)] = found.get(str(record.state), 0) + 1
        return found
