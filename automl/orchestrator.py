"""The sweep loop: the only part that knows spec, space, sampler, scheduler, backend, tracker and trainer.

Optuna's ask/tell proposes each configuration and decides early stopping (its pruners); the Ray backend runs
trials in parallel; MLflow records them. The loop itself is small: launch while slots are free and budget
is left, turn each event from a trial into a report or a tell, and record everything.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.errors import AutoMLError, SweepNotFoundError, TrainerError
from automl.spec import Spec, load_spec, spec_from_dict

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from automl.backend import RayBackend, Report, TrialEnd
    from automl.data import PreparedData
    from automl.state import SweepState

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 20


@dataclass
class TrialRecord:
    """One trial as the user sees it (the leaderboard's row)."""

    number: int
    params: dict[str, Any]
    state: str = "RUNNING"  # RUNNING | COMPLETE | STOPPED | FAILED | KILLED
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
    stop_reason: str | None = None  # why the sweep stopped it: budget.time, budget.trial_time, failures


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

    def leaderboard(self, top: int | None = None) -> pd.DataFrame:
        """Trials sorted best first (finished trials first, then stopped, then failed)."""
        return leaderboard(self.trials, self.metric, self.goal, self.objectives, top=top)

    def export(self, out: str | Path, format: str = "mlflow") -> Path:
        from automl.export import export_model

        if self.best is None or self.best.model_uri is None:
            raise AutoMLError(f"sweep {self.sweep_id} has no exportable best model")
        return export_model(self.best.model_uri, Path(out), format=format, tracking_uri=self.tracking_uri)


def leaderboard(trials: list[TrialRecord], metric: str, goal: str, objectives: list[tuple[str, str]],
                top: int | None = None) -> pd.DataFrame:
    """A sweep's trials as a pandas frame, best first: finished, then stopped, killed, failed."""
    import pandas as pd

    rows = []
    multi = len(objectives) > 1
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state}
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
    order = {"COMPLETE": 0, "STOPPED": 1, "KILLED": 2, "FAILED": 3, "RUNNING": 4}
    frame["_rank"] = frame["state"].map(order)
    frame = frame.sort_values(["_rank", metric], ascending=[True, goal == "minimize"],
                              na_position="last").drop(columns="_rank")
    return frame.head(top) if top else frame.reset_index(drop=True)


EventCallback = Callable[[str, TrialRecord], None]


class Sweep:
    """A sweep defined by a spec: ``Sweep.from_yaml(path).run()``."""

    def __init__(
        self,
        spec: Spec,
        *,
        base_dir: Path | None = None,
        tracking_uri: str | None = None,
        address: str | None = None,
        workdir: Path | None = None,
        spec_text: str | None = None,
        storage: str | None = None,
    ) -> None:
        from automl.space import SearchSpace
        from automl.trainer import resolve_trainer

        self.spec = spec
        self.base_dir = (base_dir or Path.cwd()).resolve()
        self.workdir = (workdir or Path.cwd()).resolve()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        # Where the search state (the Optuna study) lives: a journal file in the state folder by default, or
        # a database (postgresql://...) for the scale-out profile.
        self.storage = storage or os.environ.get("AUTOML_STORAGE") or None
        from automl.tracking import resolve_tracking_uri

        self.tracking_uri = resolve_tracking_uri(tracking_uri, self.workdir)
        self.spec_text = spec_text
        self.space = SearchSpace(spec.parameters)  # the spec's validators already checked it against the method
        self.trainer = resolve_trainer(spec.trainer, self.base_dir)

    @classmethod
    def from_yaml(cls, path: str | Path, *, overrides: dict[str, Any] | None = None, **kwargs: Any) -> Sweep:
        path = Path(path)
        spec = load_spec(path, overrides=overrides)
        try:
            return cls(spec, base_dir=path.resolve().parent, spec_text=path.read_text(), **kwargs)
        except TrainerError as exc:
            raise TrainerError(f"{path.name}: {exc}") from None  # name the file, as spec errors do

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **kwargs: Any) -> Sweep:
        return cls(spec_from_dict(raw), **kwargs)

    # ------------------------------------------------------------------------------------------ planning

    def planned_trials(self) -> int:
        if self.spec.method == "grid":
            size = self.space.grid_size()
            return min(size, self.spec.budget.trials) if self.spec.budget.trials else size
        return self.spec.budget.trials or DEFAULT_TRIALS

    # ------------------------------------------------------------------------------------------ running

    def run(self, on_event: EventCallback | None = None) -> SweepResult:
        """Run the sweep to the end of its budget; returns the leaderboard and the best trial."""
        return _SweepRun(self, on_event).run()

    @classmethod
    def resume(
        cls,
        sweep: str,
        *,
        workdir: Path | None = None,
        tracking_uri: str | None = None,
        address: str | None = None,
        storage: str | None = None,
        on_event: EventCallback | None = None,
    ) -> SweepResult:
        """Finish an interrupted sweep (by id, or the latest unfinished one of that name).

        Completed trials are kept and never run again; trials the interruption cut short run again from
        the start; the sweep ends when its whole budget is spent, in the same MLflow parent run.
        """
        from automl.state import find_unfinished

        state = find_unfinished(sweep, workdir)
        stored = state.extra.get("storage")
        plan = cls(spec_from_dict(state.spec), base_dir=Path(state.base_dir), workdir=workdir,
                   tracking_uri=tracking_uri or state.tracking_uri, address=address,
                   storage=storage or os.environ.get("AUTOML_STORAGE") or stored)
        if plan.storage and "***" in plan.storage:
            raise AutoMLError("the sweep's search state is in a database with a password: pass it again with "
                              "--storage or AUTOML_STORAGE")
        return _SweepRun(plan, on_event, resume=state).run()


def connect_ray(address: str | None) -> None:
    """Join ``address`` (a running cluster) or start a local Ray; reuse a Ray this process already joined."""
    import ray

    if ray.is_initialized():
        return
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": False, "configure_logging": True}
    try:
        # No address: a Ray of our own. (Ray's own default would join any Ray already running on this
        # machine, such as another user's sweep; the embedded default is a local Ray for this sweep.)
        ray.init(address=address or "local", **kwargs)
    except ConnectionError as exc:
        raise AutoMLError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def _versions() -> dict[str, str]:
    """The versions a sweep ran with, for its parent run: results depend on them."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("automl", "torch", "ray", "optuna", "mlflow", "scikit-learn"):
        try:
            found[f"automl.version.{name}"] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _without_password(url: str | None) -> str | None:
    """A database URL fit to write into the state folder (its password masked)."""
    if not url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _on_sigterm_raise_interrupt() -> Any:
    """SIGTERM (a scheduler, `kill`) stops a sweep as Ctrl-C does: running trials KILLED, sweep resumable."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    import signal
    import threading

    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _import_tracking() -> None:
    """Import MLflow ahead of use (about 2 s), in a start-up thread."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow.tracking  # noqa: F401


def _now_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


class _SweepRun:
    """The state of one execution of a sweep (kept out of ``Sweep`` so that ``Sweep`` stays a plan)."""

    def __init__(self, sweep: Sweep, on_event: EventCallback | None, resume: SweepState | None = None) -> None:
        self.sweep = sweep
        self.resuming = resume
        self.spec = sweep.spec
        self.on_event = on_event or (lambda kind, record: None)
        self.metric = self.spec.metric_name
        self.goal = self.spec.direction
        self.objectives = self.spec.objectives
        self.multi = len(self.objectives) > 1
        self.records: dict[int, TrialRecord] = {}
        self.optuna_trials: dict[int, optuna.trial.Trial] = {}
        self.best: TrialRecord | None = None
        self.failure_stop: str | None = None  # set when budget.max_failures ends the sweep
        self.sweep_id = resume.sweep_id if resume else f"{self.spec.name}-{_now_id()}"

    # The order below is deliberate. Everything that can fail on bad input (data, the trainer's import)
    # fails before anything is written (state folder, Optuna journal, MLflow). Slow start-up steps overlap:
    # Ray starts while the data loads and MLflow and the trainer import; the MLflow writer process imports
    # MLflow on its own; the parent run is created while the trial actors warm up.
    def run(self) -> SweepResult:
        from automl.samplers import make_sampler, sampler_name
        from automl.schedulers import make_pruner
        from automl.tracking import SweepTracker

        started = time.perf_counter()
        spec = self.spec
        self.planned = self.sweep.planned_trials()
        shape = {"objectives": len(self.objectives), "trials": self.planned}
        # Resuming, the sampler's random stream continues past the trials already drawn instead of
        # proposing the sweep's first configurations again.
        seed = spec.seed + (self._journal_trials() if self.resuming else 0)
        sampler = make_sampler(spec.method, self.sweep.space, seed, **shape)
        self.sampler_name = sampler_name(spec.method, self.sweep.space, **shape)
        pruner = make_pruner(spec.early_stopping, spec.fixed)
        self.tracker = SweepTracker(self.sweep.tracking_uri, trials=self.spec.tracking.trials)
        backend: RayBackend | None = None
        try:
            with ThreadPoolExecutor(max_workers=3, thread_name_prefix="automl-start") as pool:
                data_future = pool.submit(self._prepare_data)
                trainer_future = pool.submit(self.sweep.trainer.load)  # a broken trainer fails here, early
                pool.submit(_import_tracking)
                connect_ray(self.sweep.address)
                prepared = data_future.result()
                trainer_future.result()
            backend = self._backend = self._start_backend(prepared)
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.folder, study = self._create_study(sampler, pruner)
            self.study = study
            self._open_tracking(backend.capacity)
        except BaseException:
            self.tracker.close()
            if backend is not None:
                backend.shutdown()
            raise
        previous = _on_sigterm_raise_interrupt()
        try:
            status = "FINISHED"
            try:
                backend.wait_ready()
                self.deadline = time.monotonic() + spec.budget.time if spec.budget.time else None
                self._loop(study, backend, prepared)
            except BaseException as exc:
                status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
                self._cancel(study, backend, "cancelled by the user" if status == "KILLED" else _first_line(exc))
                raise
            finally:
                self._finish("FAILED" if self.failure_stop and status == "FINISHED" else status, prepared)
        finally:
            backend.shutdown()
            _restore_sigterm(previous)
        result = self._result(time.perf_counter() - started)
        if self.failure_stop:
            raise SweepFailed(self.failure_stop, result)
        return result

    def _storage(self, folder: Path) -> Any:
        from automl.journal import open_storage
        from automl.state import journal_path

        if self.sweep.storage:
            import optuna

            return optuna.storages.RDBStorage(self.sweep.storage)
        return open_storage(journal_path(folder))

    def _journal_trials(self) -> int:
        if self.sweep.storage:
            import optuna

            return len(optuna.load_study(study_name=self.sweep_id, storage=self.sweep.storage).trials)
        from automl.state import SweepState, journal_path, state_root

        folder = SweepState.folder(state_root(self.sweep.workdir), self.sweep_id)
        path = journal_path(folder)
        if not path.exists():
            return 0
        with open(path, "rb") as f:
            return sum(1 for line in f if b'"op_code":4' in line)  # CREATE_TRIAL entries

    def _restore(self, study: optuna.Study, folder: Path) -> None:
        """Rebuild the records of an interrupted sweep from its Optuna journal.

        Finished trials become records again (kept, never re-run). A trial the driver's death left RUNNING
        is marked FAIL and its configuration queued to run again; a trial queued that way and not yet
        started (WAITING) simply runs next.
        """
        from optuna.trial import TrialState

        from automl.state import best_bundle_path

        storage = study._storage
        for t in study.get_trials(deepcopy=False):
            info = t.user_attrs.get("automl", {})
            if t.state == TrialState.RUNNING:
                storage.set_trial_user_attr(t._trial_id, "automl", {"state": "KILLED", "interrupted": True,
                                                                    "error": "the sweep's driver was killed"})
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                study.enqueue_trial(t.params, skip_if_exists=False)
                continue
            if t.state == TrialState.WAITING or info.get("interrupted"):
                continue
            state = info.get("state") or {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "STOPPED"}.get(
                t.state, "FAILED")
            metrics = dict(info.get("metrics", {}))
            record = TrialRecord(number=t.number, params=dict(t.params), state=state, metrics=metrics,
                                 epochs=int(info.get("epochs", 0)), seconds=float(info.get("seconds", 0.0)),
                                 error=info.get("error") or None)
            record.value = metrics.get(self.metric)
            if t.state == TrialState.COMPLETE and self.multi:
                record.values = list(t.values)
            self.records[t.number] = record
            if state == "COMPLETE" and self._is_better(record):
                self.best = record
        if self.best is not None and not best_bundle_path(folder).is_dir():
            log.warning("the best model of trial %s was not saved before the interruption", self.best.number)

    def _prepare_data(self) -> PreparedData | None:
        if self.spec.data is None:
            return None
        from automl.data import prepare

        return prepare(self.spec.data, base_dir=self.sweep.base_dir, seed=self.spec.seed)

    def _start_backend(self, prepared: PreparedData | None) -> RayBackend:
        import ray

        from automl.backend import RayBackend

        res = self.spec.resources
        slots = self.spec.budget.max_concurrent
        if slots is None:
            total = ray.cluster_resources()
            by_cpu = int(total.get("CPU", 1) // res.cpu) if res.cpu else 1
            by_gpu = int(total.get("GPU", 0) // res.gpu) if res.gpu else by_cpu
            slots = max(1, min(by_cpu, by_gpu))
        slots = max(1, min(slots, self.sweep.planned_trials()))
        return RayBackend(self.sweep.trainer, slots=slots, cpu=res.cpu, gpu=res.gpu,
                          data=prepared.trainer_data if prepared else None)  # k-fold: the list of folds

    def _create_study(self, sampler: Any, pruner: Any) -> tuple[Path, optuna.Study]:
        import optuna

        from automl.state import SweepState, reserve_sweep_id, state_root

        root = state_root(self.sweep.workdir)
        if self.resuming is not None:
            self.state = self.resuming
            folder = SweepState.folder(root, self.sweep_id)
            study = optuna.load_study(study_name=self.sweep_id, storage=self._storage(folder),
                                      sampler=sampler, pruner=pruner)
            self._restore(study, folder)
            self.state.status = "RUNNING"
            self.state.save(root)
            return folder, study
        self.sweep_id = reserve_sweep_id(root, self.sweep_id)
        self.state = SweepState(
            sweep_id=self.sweep_id, name=self.spec.name,
            spec=self.spec.model_dump(mode="json"), base_dir=str(self.sweep.base_dir),
            tracking_uri=self.sweep.tracking_uri, created=time.time(),
            extra={"storage": _without_password(self.sweep.storage)},
        )
        folder = self.state.save(root)
        study = optuna.create_study(storage=self._storage(folder), sampler=sampler, pruner=pruner,
                                    study_name=self.sweep_id,
                                    directions=[m.goal or "maximize" for m in self.objectives])
        for point in self.spec.points_to_evaluate:
            # Stored in the study as WAITING trials: study.ask() hands them out first, and a resume finds
            # those not yet run still waiting.
            study.enqueue_trial(point, skip_if_exists=False)
        return folder, study

    def _open_tracking(self, slots: int) -> None:
        from automl import tracking

        spec = self.spec
        artifact_location = tracking.default_artifact_location(
            self.sweep.tracking_uri, spec.experiment_name, self.sweep.workdir)
        params = {
            "sweep.method": spec.method, "sweep.sampler": self.sampler_name, "sweep.trials": self.planned,
            "sweep.max_concurrent": slots, "sweep.seed": spec.seed,
            "sweep.metric": ",".join(m.name for m in self.objectives),
            "sweep.goal": ",".join(m.goal or "" for m in self.objectives), "sweep.trainer": spec.trainer,
            "sweep.early_stopping": spec.early_stopping.method,
        }
        tags = {tracking.TAG_SWEEP: spec.name, tracking.TAG_SWEEP_ID: self.sweep_id,
                "automl.sampler": self.sampler_name, **_versions()}
        spec_text = self.sweep.spec_text
        if spec_text is None:
            import yaml

            spec_text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
        self.tracker.open(experiment=spec.experiment_name, artifact_location=artifact_location,
                          run_name=self.sweep_id, tags=tags, params=params, spec_text=spec_text,
                          run_id=self.resuming.parent_run_id if self.resuming else None)
        if self.resuming is not None:
            old_runs = self.tracker.close_stale_trials()
            for number, record in self.records.items():
                record.run_id = old_runs.get(number)
        self.state.experiment_id = self.tracker.experiment_id
        self.state.parent_run_id = self.tracker.parent_run_id
        self.state.save(self.folder.parent)

    # ------------------------------------------------------------------------------------------ the loop

    def _launch(self, study: optuna.Study, backend: RayBackend) -> list[int]:
        """Fill free slots while budget is left; returns the numbers of the trials launched."""
        launched: list[int] = []
        while (backend.free_slots() and len(self.records) < self.planned and not self._out_of_time()
               and not self.failure_stop):
            trial = study.ask()
            params = self.sweep.space.suggest(trial)
            number = trial.number
            self.optuna_trials[number] = trial
            self.records[number] = TrialRecord(number=number, params=params)
            backend.launch(number, {**params, **self.spec.fixed}, seed=self.spec.seed + number)
            self._record_start(number)
            launched.append(number)
        return launched

    def _record_start(self, number: int) -> None:
        record = self.records[number]
        self.tracker.trial_started(
            number, {**record.params, **self.spec.fixed},
            {"automl.state": "RUNNING", "automl.sampler": self.sampler_name, "automl.sweep_id": self.sweep_id},
        )
        self.on_event("started", record)

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _loop(self, study: optuna.Study, backend: RayBackend, prepared: PreparedData | None) -> None:
        from automl.backend import TrialEnd

        timed_out = False
        trial_time = self.spec.budget.trial_time
        while True:
            self._launch(study, backend)
            if not backend.running():
                break
            if self._out_of_time() and not timed_out:
                timed_out = True
                for number in backend.running():
                    self._stop(backend, number, "budget.time reached")
            if trial_time is not None:
                self._enforce_trial_time(backend, trial_time)
            wake = 0.5 if (self.deadline or trial_time) else None
            for event in backend.poll(timeout=wake):
                if isinstance(event, TrialEnd):
                    self._on_end(study, event, prepared)
                else:
                    self._on_report(backend, event)

    def _stop(self, backend: RayBackend, number: int, reason: str) -> None:
        self.records[number].stop_reason = reason
        backend.stop(number)

    def _enforce_trial_time(self, backend: RayBackend, limit: float) -> None:
        """Past ``budget.trial_time`` a trial is asked to stop (at its next report); if it has not stopped
        a grace period later (a trainer that never reports), its worker is killed."""
        grace = max(2.0, 0.1 * limit)
        now = time.monotonic()
        for number in backend.running():
            started = backend.started_at(number)
            if started is None:
                continue
            if now - started > limit + grace:
                backend.kill(number)
            elif now - started > limit and self.records[number].stop_reason is None:
                self._stop(backend, number, f"ran past budget.trial_time ({limit:g}s)")

    def _on_report(self, backend: RayBackend, event: Report) -> None:
        record = self.records[event.number]
        record.metrics.update(event.metrics)
        record.epochs = max(record.epochs, event.step)
        value = event.metrics.get(self.metric)
        if value is not None:
            record.value = value
            if not math.isfinite(value):
                backend.stop(event.number)  # diverged: no point in training on; recorded FAILED at its end
            elif not self.multi and record.stop_reason is None:  # Optuna prunes single-objective studies only
                trial = self.optuna_trials[event.number]
                trial.report(value, event.step)
                if trial.should_prune():
                    self._stop(backend, event.number, "early stopping")
        self.tracker.trial_reported(event.number, event.step, event.metrics)
        self.on_event("reported", record)

    def _on_end(self, study: optuna.Study, event: TrialEnd, prepared: PreparedData | None) -> None:
        from optuna.trial import TrialState

        record = self.records[event.number]
        record.seconds = event.seconds
        if event.worker_died and record.stop_reason is None and record.attempts <= self.spec.resources.retries:
            # The worker died under the trial (killed, out of memory, a node lost): run it again, same number.
            record.attempts += 1
            record.metrics, record.value, record.epochs = {}, None, 0
            self._backend.launch(event.number, {**record.params, **self.spec.fixed},
                                 seed=self.spec.seed + event.number)
            return
        trial = self.optuna_trials.pop(event.number)
        state = event.state
        error = event.error
        if record.stop_reason not in (None, "early stopping") and state in ("STOPPED", "FAILED"):
            # Stopped by the sweep, not by early stopping: the time budget (KILLED) or the trial's own
            # time limit (FAILED).
            state = "FAILED" if "trial_time" in record.stop_reason else "KILLED"

            error = record.stop_reason
        for name in [m.name for m in self.objectives] if state in ("COMPLETE", "STOPPED") else []:
            value = record.metrics.get(name)
            if value is not None and not math.isfinite(value):
                state, error = "FAILED", f"'{name}' is {value} at epoch {record.epochs}"
                break
            if value is None and state == "COMPLETE":
                state = "FAILED"
                error = (f"the trainer never reported '{name}' (it reported: "
                         f"{', '.join(sorted(record.metrics)) or 'nothing'})")
                break
        record.state, record.error = state, error
        if state == "FAILED":
            self._count_failure(record)
        trial.set_user_attr("automl", {"state": state, "metrics": record.metrics, "epochs": record.epochs,
                                       "seconds": round(event.seconds, 4), "error": (error or "")[:2000],
                                       "attempts": record.attempts, "interrupted": state == "KILLED"})
        if state == "COMPLETE" and self.multi:
            record.values = [record.metrics[m.name] for m in self.objectives]
            study.tell(trial, record.values)
        elif state == "COMPLETE":
            study.tell(trial, record.value)
        elif state == "STOPPED":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, state=TrialState.FAIL)
        tags = {"automl.state": state, "automl.epochs": str(record.epochs),
                "automl.seconds": f"{event.seconds:.3f}", "automl.attempts": str(record.attempts)}
        if state == "STOPPED":
            tags["automl.early_stopped"] = "true"
        artifacts: list[tuple[str, str]] = []
        if error:
            tags["automl.error"] = error[:5000]
            if event.traceback:
                artifacts.append(("traceback.txt", event.traceback))
        if event.model_note:
            tags["automl.model_note"] = event.model_note
        if event.node:
            tags["automl.node"] = event.node
        if event.gpus:
            tags["automl.gpus"] = ",".join(event.gpus)
        if event.device_note:
            tags["automl.device"] = event.device_note
            if not getattr(self, "_warned_device", False):
                self._warned_device = True
                log.warning("trial %s: %s", event.number, event.device_note)
        record.node, record.gpus = event.node, event.gpus
        if state == "COMPLETE" and self._is_better(record):
            self.best = record
            tags["automl.best_so_far"] = "true"
            if event.model is not None:
                self._save_best(record, event, prepared)
        self.tracker.trial_finished(event.number, state, tags, artifacts)
        self.on_event("finished", record)

    def _count_failure(self, record: TrialRecord) -> None:
        limit = self.spec.budget.max_failures
        failed = sum(1 for r in self.records.values() if r.state == "FAILED")
        if limit is not None and failed >= limit and not self.failure_stop:
            self.failure_stop = (
                f"sweep {self.sweep_id} stopped: {failed} trials failed (budget.max_failures: {limit}); "
                f"last error: {(record.error or '').splitlines()[0][:300] if record.error else 'unknown'}"
            )
            for number in self._backend.running():
                self._stop(self._backend, number, "budget.max_failures reached")

    def _is_better(self, record: TrialRecord) -> bool:
        if record.value is None:
            return False
        if self.best is None or self.best.value is None:
            return True
        if self.goal == "maximize":
            return record.value > self.best.value
        return record.value < self.best.value

    def _save_best(self, record: TrialRecord, event: TrialEnd, prepared: PreparedData | None) -> None:
        """Keep the best model so far on disk: a killed sweep still has it when resumed."""
        from automl.bundle import write_bundle
        from automl.state import best_bundle_path

        assert event.model is not None  # checked by the caller
        target = best_bundle_path(self.folder)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        info = {"trainer": self.spec.trainer, "trial": record.number, "params": record.params,
                "fixed": self.spec.fixed, "metric": {"name": self.metric, "goal": self.goal,
                                                     "value": record.value},
                "metrics": record.metrics, "sweep_id": self.sweep_id}
        write_bundle(tmp, event.model, prepared, info=info)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)

    def _cancel(self, study: optuna.Study, backend: RayBackend, reason: str) -> None:
        from optuna.trial import TrialState

        for number in backend.running():
            record = self.records[number]
            record.state, record.error = "KILLED", reason
            trial = self.optuna_trials.pop(number, None)
            if trial is not None:
                # Cut short, not finished: a resume runs this configuration again from the start.
                trial.set_user_attr("automl", {"state": "KILLED", "interrupted": True, "error": reason})
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(record.params, skip_if_exists=False)
            self.tracker.trial_finished(number, "KILLED", {"automl.state": "KILLED", "automl.error": reason})

    # ------------------------------------------------------------------------------------------ the end

    def _finish(self, status: str, prepared: PreparedData | None) -> None:
        from automl import tracking

        self.tracker.flush()
        for number, record in self.records.items():
            record.run_id = self.tracker.run_id_of(number)
        self.model_uri: str | None = None
        params: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        counts: dict[str, int] = {}
        for r in self.records.values():
            counts[r.state] = counts.get(r.state, 0) + 1
        tags = {f"automl.trials.{k.lower()}": str(v) for k, v in counts.items()}
        if self.multi:
            self._mark_pareto_front(tags)
        best = self.best
        if best is not None and best.value is not None:
            params = dict(best.params)
            metrics = {k: v for k, v in best.metrics.items() if math.isfinite(v)}
            tags.update({"automl.best_trial": str(best.number), tracking.TAG_BEST_RUN: best.run_id or ""})
            from automl.state import best_bundle_path

            bundle = best_bundle_path(self.folder)
            if bundle.is_dir():
                from automl.export import log_pyfunc_model

                self.model_uri = log_pyfunc_model(self.tracker.client, self.tracker.parent_run_id, bundle,
                                                  prepared)
                tags[tracking.TAG_BEST_URI] = self.model_uri
                if self.spec.tracking.register_as:
                    from automl.export import register_champion

                    try:
                        register_champion(self.tracker.client, self.spec.tracking.register_as, self.model_uri,
                                          run_id=self.tracker.parent_run_id, metric=self.metric, goal=self.goal,
                                          value=best.value)
                    except AutoMLError as exc:
                        # The sweep itself succeeded and its record must still be closed: a registry refusal
                        # (permissions, a server down) is a warning and a tag, never a parent left RUNNING.
                        log.warning("%s", exc)
                        tags["automl.register_error"] = str(exc)
        self._log_summary()
        self.tracker.finish(status, params=params, metrics=metrics, tags=tags)
        self.state.status = status
        self.state.extra.update(best_model_uri=self.model_uri)
        self.state.save(self.folder.parent)

    def _log_summary(self) -> None:
        from automl.summary import log_summary

        objectives: list[tuple[str, str]] = [(m.name, str(m.goal or "maximize")) for m in self.objectives]
        board = leaderboard([self.records[k] for k in sorted(self.records)], self.metric, self.goal, objectives)
        log_summary(self.tracker.client, self.tracker.parent_run_id, self.study, board, objectives)

    def _mark_pareto_front(self, tags: dict[str, str]) -> None:
        """Several metrics: record which trials are Pareto-optimal (Optuna's ``best_trials``)."""
        front = sorted(t.number for t in self.study.best_trials)
        self.pareto_front = front
        for number in front:
            self.records[number].pareto = True
        tags["automl.pareto_front"] = ",".join(map(str, front))
        lines = ["trial," + ",".join(m.name for m in self.objectives) + ",run_id"]
        for number in front:
            r = self.records[number]
            lines.append(",".join([str(number), *(repr(v) for v in r.values or []), r.run_id or ""]))
        self.tracker.client.log_text(self.tracker.parent_run_id, "\n".join(lines) + "\n", "pareto_front.csv")

    def _result(self, wall: float) -> SweepResult:
        best = None
        b = self.best
        if b is not None and b.value is not None:
            best = BestTrial(number=b.number, params=b.params, metrics=b.metrics, value=b.value,
                             run_id=b.run_id, model_uri=self.model_uri)
        return SweepResult(
            sweep_id=self.sweep_id, name=self.spec.name, metric=self.metric, goal=self.goal,
            trials=[self.records[k] for k in sorted(self.records)], best=best,
            experiment_id=self.tracker.experiment_id, parent_run_id=self.tracker.parent_run_id,
            tracking_uri=self.sweep.tracking_uri, sampler=self.sampler_name, wall_seconds=wall,
            state_dir=self.folder, objectives=[(m.name, m.goal or "maximize") for m in self.objectives],
            pareto_front=getattr(self, "pareto_front", []),
        )


def find_sweep(name_or_id: str, tracking_uri: str) -> dict[str, Any]:
    """The most recent sweep (parent run) named ``name_or_id``, or with that sweep id; its run's data."""
    from automl import tracking

    client = tracking.make_client(tracking_uri)
    quoted = name_or_id.replace("'", "")
    for key in (tracking.TAG_SWEEP_ID, tracking.TAG_SWEEP):
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`{key}` = '{quoted}' and tags.`{tracking.TAG_ROLE}` = 'sweep'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if runs:
            run = runs[0]
            return {"run_id": run.info.run_id, "status": run.info.status, "tags": run.data.tags,
                    "params": run.data.params, "metrics": run.data.metrics}
    raise SweepNotFoundError(f"no sweep named '{name_or_id}' in {tracking_uri}; `automl status` lists them")
