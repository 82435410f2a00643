"""The sweep loop: the only part that knows spec, space, sampler, scheduler, backend, tracker and trainer.

Optuna's ask/tell proposes each configuration and decides early stopping (its pruners); the Ray backend runs
trials in parallel; MLflow records them. The loop itself is small: launch while slots are free and budget
is left, turn each event from a trial into a report or a tell, and record everything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.errors import AutoMLError, SweepNotFoundError, TrainerError
from automl.redact import mask_url
from automl.spec import Spec, load_spec, spec_from_dict

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from automl.backend import RayBackend, Report, TrialEnd
    from automl.data import PreparedData
    from automl.state import SweepLock, SweepState

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
    # Modules the best model's loader may come from besides registered trainers: a module:function trainer's own
    trusted_modules: list[str] = field(default_factory=list)

    def leaderboard(self, top: int | None = None) -> pd.DataFrame:
        """Trials sorted best first (finished trials first, then stopped, then failed)."""
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


MAX_ACTORS_PER_CPU = 4  # trial actors (processes) per CPU of the cluster, however small resources.cpu is


@dataclass(frozen=True)
class SlotPlan:
    slots: int
    note: str | None = None


def plan_slots(requested: int | None, *, cpu: float, gpu: float, cluster: dict[str, float], trials: int) -> SlotPlan:
    """How many trials run at once: ``budget.max_concurrent`` (default: what the cluster's CPUs and GPUs hold for
    ``resources``), never more than the cluster can run at once, never more than ``MAX_ACTORS_PER_CPU`` actors per
    CPU (each is a process; ``resources.cpu: 0.001`` would otherwise ask for thousands), never more than trials."""
    cpus = cluster.get("CPU", 1.0)
    by_cpu = int(cpus // cpu) if cpu else 1
    by_gpu = int(cluster.get("GPU", 0.0) // gpu) if gpu else by_cpu
    fits = max(1, min(by_cpu, by_gpu, MAX_ACTORS_PER_CPU * max(1, math.ceil(cpus))))
    slots = max(1, min(requested or fits, fits, trials))
    note = None
    if requested is not None and requested > fits:
        need = f"{cpu:g} CPU" + (f" and {gpu:g} GPU" if gpu else "")
        have = f"{cpus:g} CPUs" + (f" and {cluster.get('GPU', 0.0):g} GPUs" if gpu else "")
        capped = f", at most {MAX_ACTORS_PER_CPU} trials per CPU" if fits < min(by_cpu, by_gpu) else ""
        note = f"budget.max_concurrent: {requested} asked for; {fits} run at once ({need} per trial on {have}{capped})"
    return SlotPlan(slots, note)


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
        source: str | None = None,
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
        self.source = source  # the spec file's name, for error lines
        self.space = SearchSpace(spec.parameters)  # the spec's validators already checked it against the method
        self.trainer = resolve_trainer(spec.trainer, self.base_dir)
        self._checked: list[str] | None = None

    def check(self) -> list[str]:
        """What ``automl validate`` checks of the inputs, in well under a second and before anything starts: the
        data file exists and has the target column (its header only), the trainer can be imported (its source
        parsed, never run). Returns notes for the user; raises ``DataError``/``TrainerError`` in one line."""
        if self._checked is None:
            from automl.errors import DataError
            from automl.preflight import check_inputs

            try:
                # On a cluster, the workers may have packages this machine lacks: their imports are theirs to check.
                self._checked = check_inputs(self.spec, self.base_dir, imports=not self.address)
            except (DataError, TrainerError) as exc:
                if self.source is None:
                    raise
                raise type(exc)(f"{self.source}: {exc}") from None
        return self._checked

    @classmethod
    def from_yaml(cls, path: str | Path, *, overrides: dict[str, Any] | None = None, **kwargs: Any) -> Sweep:
        path = Path(path)
        spec = load_spec(path, overrides=overrides)
        try:
            return cls(spec, base_dir=path.resolve().parent, spec_text=path.read_text(), source=path.name, **kwargs)
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

    def run(self, on_event: EventCallback | None = None, on_note: Callable[[str], None] | None = None
            ) -> SweepResult:
        """Run the sweep to the end of its budget; returns the leaderboard and the best trial.

        ``on_event(kind, record)`` hears each trial start, report and end; ``on_note(text)`` each decision the user
        should read before the first trial (trials capped to what the cluster holds, data columns dropped).
        """
        return _SweepRun(self, on_event, on_note=on_note).run()

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
        on_note: Callable[[str], None] | None = None,
    ) -> SweepResult:
        """Finish an interrupted sweep (by id, or the latest unfinished one of that name).

        Completed trials are kept and never run again; trials the interruption cut short run again from
        the start; the sweep ends when its whole budget is spent, in the same MLflow parent run.
        """
        from automl.redact import is_masked
        from automl.state import SweepLock, SweepState, find_unfinished, state_root

        state = find_unfinished(sweep, workdir)
        # The state folder keeps URLs with their passwords masked: such a URL must be given again.
        uri = tracking_uri or state.tracking_uri
        if is_masked(uri):
            uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
        if is_masked(uri):
            raise AutoMLError("the sweep's MLflow tracking URI has a password: pass it again with --tracking-uri "
                              "or MLFLOW_TRACKING_URI")
        storage = storage or os.environ.get("AUTOML_STORAGE") or state.extra.get("storage")
        if is_masked(storage):
            raise AutoMLError("the sweep's search state is in a database with a password: pass it again with "
                              "--storage or AUTOML_STORAGE")
        lock = SweepLock(SweepState.folder(state_root(workdir), state.sweep_id)).acquire(state.sweep_id)
        try:
            plan = cls(spec_from_dict(state.spec), base_dir=Path(state.base_dir), workdir=workdir,
                       tracking_uri=uri, address=address, storage=storage)
            return _SweepRun(plan, on_event, resume=state, lock=lock, on_note=on_note).run()
        finally:
            lock.release()


def connect_ray(address: str | None, capture_logs: bool = False) -> None:
    """Join ``address`` (a running cluster) or start a local Ray; reuse a Ray this process already joined.

    A local Ray runs with token authentication (``RAY_AUTH_MODE=token``, Ray >= 2.52; the default from Ray
    2.59): nothing else on the machine can submit work to it. Ray's own log lines (its start-up notices, the
    token warning) go to the state folder's log file (``automl.logfile``) rather than the user's terminal when
    ``capture_logs``.
    """
    import sys

    if not address and "ray" not in sys.modules:
        # Read when Ray is imported: set later, the driver and the Ray it starts would disagree on the mode.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": False, "configure_logging": not capture_logs}
    if capture_logs:
        from automl import logfile

        logfile.capture("ray")
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


_PAUSES: dict[str, int] = {}


def _debug_pause(point: str) -> None:
    """A test hook for crash-consistency tests: with ``AUTOML_DEBUG_PAUSE_AT=<point>#<n>`` the driver stops at the
    n-th pass through ``point`` (writes ``<point>.paused`` in the state folder and sleeps) so that a test can kill
    it exactly there. Unset, it costs one dictionary update."""
    _PAUSES[point] = _PAUSES.get(point, 0) + 1
    wanted = os.environ.get("AUTOML_DEBUG_PAUSE_AT")
    if wanted and wanted == f"{point}#{_PAUSES[point]}":
        from automl.state import state_root

        (state_root() / f"{point}.paused").write_text(str(os.getpid()))
        time.sleep(3600)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _import_tracking_then(load_trainer: Callable[[], Any]) -> None:
    """Import MLflow ahead of use (about 2 s), then the trainer (a broken one fails here, early); in a start-up
    thread."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow.tracking  # noqa: F401

    load_trainer()


def _now_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


class _SweepRun:
    """The state of one execution of a sweep (kept out of ``Sweep`` so that ``Sweep`` stays a plan)."""

    def __init__(self, sweep: Sweep, on_event: EventCallback | None, resume: SweepState | None = None,
                 lock: SweepLock | None = None, on_note: Callable[[str], None] | None = None) -> None:
        self.sweep = sweep
        self.on_note = on_note or (lambda text: None)
        self.resuming = resume
        self.lock = lock  # held by the resuming caller; a new sweep takes its own once its folder exists
        self._history: dict[int, dict[int, float]] = {}  # resuming: intermediate values of restored trials
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
        from automl.state import log_path, state_root
        from automl.tracking import SweepTracker

        started = time.perf_counter()
        spec = self.spec
        for text in self.sweep.check():  # bad input refused now, before Ray, MLflow or the state folder
            self.note(text)
        self.planned = self.sweep.planned_trials()
        shape = {"objectives": len(self.objectives), "trials": self.planned}
        # Resuming, the sampler's random stream continues past the trials already drawn instead of
        # proposing the sweep's first configurations again.
        seed = spec.seed + (self._journal_trials() if self.resuming else 0)
        sampler = make_sampler(spec.method, self.sweep.space, seed, **shape)
        self.sampler_name = sampler_name(spec.method, self.sweep.space, **shape)
        pruner = make_pruner(spec.early_stopping, spec.fixed)
        self.log_file = log_path(state_root(self.sweep.workdir))
        self.tracker = SweepTracker(self.sweep.tracking_uri, trials=self.spec.tracking.trials, log_file=self.log_file)
        backend: RayBackend | None = None
        try:
            with ThreadPoolExecutor(max_workers=3, thread_name_prefix="automl-start") as pool:
                data_future = pool.submit(self._prepare_data)
                # MLflow first: loading a module:function trainer puts the spec's folder first on sys.path, and a
                # stray mlflow.py there must not become the MLflow this process records with.
                trainer_future = pool.submit(_import_tracking_then, self.sweep.trainer.load)
                connect_ray(self.sweep.address, capture_logs=True)
                prepared = data_future.result()
                trainer_future.result()
            backend = self._backend = self._start_backend(prepared)
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.folder, study = self._create_study(sampler, pruner)
            self.study = study
            self._open_tracking(backend.capacity)
        except BaseException:
            with contextlib.suppress(AutoMLError):  # the error that stopped the start-up is the one to report
                self.tracker.close()
            if backend is not None:
                backend.shutdown()
            if self.lock is not None and not self.resuming:
                self.lock.release()
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
            if self.lock is not None and not self.resuming:
                self.lock.release()  # a resume's lock is its caller's to release
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
            self._history[t.number] = dict(t.intermediate_values)
            if state == "COMPLETE" and self._is_better(record):
                self.best = record
        if self.best is not None and self._best_bundle() is None:
            log.warning("the best model of trial %s was not saved before the interruption", self.best.number)

    def _prepare_data(self) -> PreparedData | None:
        if self.spec.data is None:
            return None
        from automl.data import prepare

        prepared = prepare(self.spec.data, base_dir=self.sweep.base_dir, seed=self.spec.seed)
        for text in prepared.notes:  # columns dropped as identifiers, categories capped
            self.note(f"data: {text}")
        return prepared

    def _start_backend(self, prepared: PreparedData | None) -> RayBackend:
        import ray

        from automl.backend import RayBackend

        res = self.spec.resources
        total = ray.cluster_resources()
        gpu = res.gpu
        if gpu and not total.get("GPU") and not self.sweep.address:
            # A laptop without a GPU runs a GPU spec on its CPUs (trainers fall back through automl.trainer.device);
            # on a cluster the GPUs may still join (an autoscaler), so the request stands there.
            self.note(f"resources.gpu: {gpu:g} asked for and this machine has no GPU; trials run on the CPU")
            gpu = 0.0
        plan = plan_slots(self.spec.budget.max_concurrent, cpu=res.cpu, gpu=gpu, cluster=total,
                          trials=self.sweep.planned_trials())
        if plan.note:
            self.note(plan.note)
        return RayBackend(self.sweep.trainer, slots=plan.slots, cpu=res.cpu, gpu=gpu,
                          data=prepared.trainer_data if prepared else None)  # k-fold: the list of folds

    def note(self, text: str) -> None:
        """Something the user should read in the run header (what automl decided about their spec or data)."""
        log.info("%s", text)
        self.on_note(text)

    def _create_study(self, sampler: Any, pruner: Any) -> tuple[Path, optuna.Study]:
        import optuna

        from automl import logfile
        from automl.state import SweepLock, SweepState, reserve_sweep_id, state_root

        root = state_root(self.sweep.workdir)
        if self.resuming is not None:
            self.state = self.resuming
            folder = self.folder = SweepState.folder(root, self.sweep_id)
            logfile.activate(self.log_file)
            study = optuna.load_study(study_name=self.sweep_id, storage=self._storage(folder),
                                      sampler=sampler, pruner=pruner)
            self._restore(study, folder)
            self.state.status = "RUNNING"
            self.state.save(root)
            return folder, study
        self.sweep_id = reserve_sweep_id(root, self.sweep_id)
        logfile.activate(self.log_file)  # the state folder exists now: library output may be written there
        self.lock = SweepLock(SweepState.folder(root, self.sweep_id)).acquire(self.sweep_id)
        self.state = SweepState(
            sweep_id=self.sweep_id, name=self.spec.name,
            spec=self.spec.model_dump(mode="json"), base_dir=str(self.sweep.base_dir),
            tracking_uri=mask_url(self.sweep.tracking_uri) or "", created=time.time(),
            extra={"storage": mask_url(self.sweep.storage)},
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
            self._repair_trial_runs()
        self.state.experiment_id = self.tracker.experiment_id
        self.state.parent_run_id = self.tracker.parent_run_id
        self.state.save(self.folder.parent)

    def _repair_trial_runs(self) -> None:
        """Resuming: make MLflow agree with the search state.

        A trial the journal kept (finished) whose child run is missing or still RUNNING (the writer died before
        writing it, e.g. killed with the driver) gets its record written again from the journal: parameters,
        its intermediate values, its last metrics and its final state. A RUNNING child run of a trial that will
        run again (cut short by the interruption) is closed as KILLED.
        """
        if not self.tracker.trials:
            return
        runs = self.tracker.child_runs()
        for number, (run_id, status) in runs.items():
            record = self.records.get(number)
            if record is None:
                if status == "RUNNING":
                    self.tracker.kill_run(run_id, "the sweep's driver was killed; the trial runs again")
                continue
            record.run_id = run_id
            if status == "RUNNING":
                self.tracker.trial_adopted(number, run_id)
                self._rewrite_trial(record, create=False)
        for number, record in self.records.items():
            if number not in runs:
                self._rewrite_trial(record, create=True)

    def _rewrite_trial(self, record: TrialRecord, *, create: bool) -> None:
        number = record.number
        tags = {"automl.state": record.state, "automl.epochs": str(record.epochs),
                "automl.seconds": f"{record.seconds:.3f}", "automl.recovered": "true"}
        if create:
            self.tracker.trial_started(number, {**record.params, **self.spec.fixed},
                                       {"automl.sampler": self.sampler_name, "automl.sweep_id": self.sweep_id})
        for step, value in sorted(self._history.get(number, {}).items()):
            self.tracker.trial_reported(number, step, {self.metric: value})
        if record.metrics:
            self.tracker.trial_reported(number, record.epochs, record.metrics)
        if record.state == "STOPPED":
            tags["automl.early_stopped"] = "true"
        if record.error:
            tags["automl.error"] = record.error[:5000]
        self.tracker.trial_finished(number, record.state, tags)

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
        new_best = state == "COMPLETE" and self._is_better(record)
        if new_best and event.model is not None:
            # Saved before the trial is told to Optuna: after a crash at any point, the trial the search state
            # calls best has its model on disk (a trial cut short before its tell runs again on resume).
            self._save_best(record, event, prepared)
            _debug_pause("best-saved")
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
        if new_best:
            self.best = record
            tags["automl.best_so_far"] = "true"
            self._drop_other_bundles(record.number)
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
        """Keep the best model so far on disk: a killed sweep still has it when resumed.

        Each candidate is written whole under ``models/trial-N`` (to a temporary name, then renamed), then the
        ``best_model`` link is swapped to it atomically; the previous best stays until the new one is told to
        Optuna (``_drop_other_bundles``). A crash at any point leaves the bundle of every trial the search state
        may call best.
        """
        from automl.bundle import write_bundle
        from automl.state import best_bundle_path, trial_bundle_path

        assert event.model is not None  # checked by the caller
        target = trial_bundle_path(self.folder, record.number)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        info = {"trainer": self.spec.trainer, "trial": record.number, "params": record.params,
                "fixed": self.spec.fixed, "metric": {"name": self.metric, "goal": self.goal,
                                                     "value": record.value},
                "metrics": record.metrics, "sweep_id": self.sweep_id}
        write_bundle(tmp, event.model, prepared, info=info)
        shutil.rmtree(target, ignore_errors=True)  # a re-run of a trial cut short after its model was saved
        os.replace(tmp, target)
        link = best_bundle_path(self.folder)
        new_link = link.with_name(link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            new_link.unlink()
        new_link.symlink_to(target.relative_to(self.folder), target_is_directory=True)
        if link.is_dir() and not link.is_symlink():  # the layout of older versions: one plain folder
            shutil.rmtree(link)
        os.replace(new_link, link)

    def _drop_other_bundles(self, keep: int) -> None:
        """Once trial ``keep`` is told to Optuna as the best, the other saved models are no longer needed."""
        from automl.state import trial_bundle_path

        kept = trial_bundle_path(self.folder, keep)
        for path in kept.parent.glob("trial-*"):
            if path != kept:
                shutil.rmtree(path, ignore_errors=True)

    def _best_bundle(self) -> Path | None:
        """The saved model of the best trial, checked against it: never the bundle of another trial."""
        import json

        from automl.state import best_bundle_path, trial_bundle_path

        assert self.best is not None  # checked by the caller
        for path in (trial_bundle_path(self.folder, self.best.number), best_bundle_path(self.folder)):
            try:
                trial = json.loads((path / "manifest.json").read_text()).get("trial")
            except (OSError, ValueError):
                continue
            if trial == self.best.number:
                return path
        return None

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

        with contextlib.suppress(AutoMLError):  # a dead writer: tracker.finish below closes the parent and says so
            self.tracker.flush()
        for number, record in self.records.items():
            record.run_id = self.tracker.run_id_of(number) or record.run_id
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
            bundle = self._best_bundle()
            if bundle is not None:
                from automl.export import log_pyfunc_model

                self.model_uri = log_pyfunc_model(self.tracker.client, self.tracker.parent_run_id, bundle,
                                                  prepared, trusted_modules=self._trusted_modules())
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
        self.state.extra.update(best_model_uri=self.model_uri)
        try:
            self.tracker.finish(status, params=params, metrics=metrics, tags=tags)
        except AutoMLError as exc:
            # Trial records were lost on the way to MLflow: the sweep stays resumable, and a resume writes them.
            self.state.status = "FAILED"
            self.state.save(self.folder.parent)
            raise AutoMLError(f"{exc}; `automl resume {self.sweep_id}` writes the missing trial records") from None
        self.state.status = status
        self.state.save(self.folder.parent)

    def _trusted_modules(self) -> list[str]:
        """The trainer's own package may be the model's loader: a user's module:function trainer is code the user
        wrote and this sweep ran (a registered trainer's package is trusted anyway)."""
        return [self.sweep.trainer.target.partition(":")[0].split(".")[0]]

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
            pareto_front=getattr(self, "pareto_front", []), trusted_modules=self._trusted_modules(),
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
