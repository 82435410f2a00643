"""A sweep's start-up inside the engine, in a thread of its own (other sweeps run on meanwhile).

The order is deliberate. Everything that can fail on bad input (the data, the trainer's import) fails before
anything is written (state folder, Optuna journal, MLflow). Slow steps overlap: the workers import the trainer while
the data loads; the parent run is created by the writer process while the first trials start.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.engine.executor import Shape
from automl.engine.records import TrialRecord, TrialState

if TYPE_CHECKING:
    import optuna

    from automl.data import PreparedData
    from automl.engine.driver import Engine
    from automl.engine.run import SweepRun

DEFAULT_TRIALS = 20

log = logging.getLogger(__name__)


def start_sweep(engine: Engine, run: SweepRun) -> None:
    """Prepare ``run`` and hand its decisions to the engine's loop; raises on bad input (nothing written)."""
    from automl.engine.core import SweepCore
    from automl.engine.run import RunHooks, RunOps
    from automl.samplers import sampler_name

    plan = run.plan
    spec = plan.spec
    for text in plan.check():  # cached: the CLI ran it before its header
        run.note(text)
    planned = plan.planned_trials()
    # The data loads while Ray starts (a cold engine) and the workers import the trainer.
    data: Future[PreparedData | None] = Future()
    threading.Thread(target=_fill, args=(data, engine.data_cache.prepare, plan), name="automl-data",
                     daemon=True).start()
    try:
        run.shape = _shape(engine, run)
        capacity = engine.executor.capacity(run.shape)
    except BaseException:
        _settle(data)  # a failure here waits for the data thread: nothing of it runs on unseen
        raise
    requested = spec.budget.max_concurrent
    if requested is not None and capacity and requested > capacity:
        run.note(_capacity_note(requested, capacity, run.shape, engine))
    concurrency = max(1, min(requested or capacity or 1, planned))
    wait_loaded = engine.executor.prepare(run.shape, plan.trainer, min(concurrency, capacity or 1))
    run.prepared = data.result()
    if run.prepared is not None:
        for text in run.prepared.notes:  # columns dropped as identifiers, categories capped
            run.note(f"data: {text}")
    wait_loaded()  # a trainer that imports here but not on the workers fails now, before anything is written

    shape = {"objectives": len(spec.objectives), "trials": planned}
    run.sampler_name = sampler_name(spec.method, plan.space, **shape)
    study = _open_study(engine, run, planned)
    run.data_handle = engine.data_cache.handle(plan, run.prepared, engine.executor)
    _open_record(engine, run, planned, concurrency)
    pbt = spec.method == "pbt"
    live: dict[int, Any] = {}
    records, best = _restore(run, study, live if pbt else None) if run.resume is not None else ({}, None)
    common: dict[str, Any] = dict(
        sweep_id=run.sweep_id, spec=spec, space=plan.space, study=study, ops=RunOps(engine, run),
        hooks=RunHooks(run), planned=planned, concurrency=requested or concurrency, capacity=capacity or None,
        records=records, best=best, offset=run.warm_start, sampler_name=run.sampler_name,
    )
    if pbt:
        run.core = _pbt_core(run, study, live, common)
    else:
        run.core = SweepCore(**common)
    _set_deadline(run)
    if run.resume is not None:
        _repair_trial_runs(run)  # MLflow made to agree with the journal before new trials start


def _pbt_core(run: SweepRun, study: optuna.Study, live: dict[int, Any], common: dict[str, Any]) -> Any:
    """method: pbt: the population's decisions, continued from its state folder when resuming."""
    from optuna.trial import TrialState as OptunaState

    from automl.engine.pbt import CheckpointStore, PbtCore

    assert run.folder is not None
    store = CheckpointStore(run.folder / "pbt")
    restored = store.load_state() if run.resume is not None else None
    core = PbtCore(store=store, restored=restored, live_trials=live, **common)
    for number, trial in live.items():
        if number not in core.trials:  # asked for, but the kill came before the population's state said so
            trial.set_user_attr("automl", {"state": "KILLED", "interrupted": True,
                                           "error": "the sweep's driver was killed"})
            study.tell(trial, state=OptunaState.FAIL)
    return core


# The least share of budget.time the trials get, whatever the start-up took.
MIN_SEARCH_SHARE = 0.25


def _set_deadline(run: SweepRun) -> None:
    """The trials' deadline: ``budget.time`` from now, or from the plan's wall-clock deadline (the CLI's --time,
    start-up included). A sweep that refits its final model stops its trials early enough for the refit of its
    best trial so far and the logging (``automl.final_model.finish_seconds``), but gives them at least
    ``MIN_SEARCH_SHARE`` of the budget whatever the start-up took.

    ``run.deadline`` keeps the wall-clock end of the whole run, which the finishing step's refits respect."""
    core, spec = run.core, run.spec
    assert core is not None
    budget = spec.budget.time
    if budget is None or run.resume is not None:
        return
    now = time.time()
    end = run.plan.deadline if run.plan.deadline is not None else now + budget
    run.deadline = end
    to_clock = core.clock() - now  # wall-clock time -> the core's clock
    if not spec.final_model.refit:
        core.deadline = end + to_clock
        return
    from automl.final_model import finish_seconds

    folds = spec.data.validation.folds if spec.data is not None else None
    core.finish_by = end + to_clock
    core.finish_floor = now + MIN_SEARCH_SHARE * budget + to_clock
    core.finish_seconds = lambda best: finish_seconds(best, folds or 1, ensemble=spec.final_model.ensemble)
    core.plan_finish()
    trials_end = core.deadline if core.deadline is not None else core.finish_floor
    late = trials_end - to_clock + finish_seconds(None, 1, ensemble=False) - end
    if trials_end <= core.finish_floor and late > 0:
        run.note(f"start-up took {budget - (end - now):.0f}s of the {budget:.0f}s budget; the trials get "
                 f"{MIN_SEARCH_SHARE * budget:.0f}s, so the run ends about {late:.0f}s late")


def _fill(future: Future[Any], fn: Any, *args: Any) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as exc:
        future.set_exception(exc)


def _settle(future: Future[Any]) -> None:
    """Wait for ``future`` without raising (its outcome is read later, or not at all)."""
    with contextlib.suppress(BaseException):
        future.exception()


def after_start(run: SweepRun) -> None:
    """What can follow the first trials: the parent run's id into the state folder (what a resume starts from)."""
    assert run.state is not None
    assert run.folder is not None
    run.log.ready()
    run.state.experiment_id = run.log.experiment_id
    run.state.parent_run_id = run.log.parent_run_id
    run.state.save(run.folder.parent)


def prewarm_finish(run: SweepRun) -> None:
    """While the trials run, what the finishing step will need and a cold process lacks: MLflow imported and the
    store opened in this process (the driver's own client, for the best model and the summary), matplotlib and
    Optuna's plots imported. Otherwise a CLI's first sweep pays them (3-5 s on 2 cores) after its last trial."""
    try:
        _ = run.log.client
        import matplotlib

        import automl.summary  # noqa: F401

        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")  # as automl.summary picks it: files only, never a window
        import matplotlib.pyplot
        import optuna.visualization.matplotlib  # noqa: F401
    except Exception:  # a convenience only: the finishing step does (and reports) the same work itself
        log.debug("pre-warming the finishing step failed", exc_info=True)


# ------------------------------------------------------------------------------------------------ resources


def _shape(engine: Engine, run: SweepRun) -> Shape:
    res = run.spec.resources
    gpu = res.gpu
    if gpu and not engine.cluster().get("GPU") and not engine.address:
        # A laptop without a GPU runs a GPU spec on its CPUs (trainers fall back through automl.trainer.device);
        # on a cluster the GPUs may still join (an autoscaler), so the request stands there.
        run.note(f"resources.gpu: {gpu:g} asked for and this machine has no GPU; trials run on the CPU")
        gpu = 0.0
    return Shape(cpu=res.cpu, gpu=gpu)


def _capacity_note(requested: int, capacity: int, shape: Shape, engine: Engine) -> str:
    from automl.engine.pool import MAX_ACTORS_PER_CPU, capacity_for

    total = engine.cluster()
    cpus = total.get("CPU", 1.0)
    need = f"{shape.cpu:g} CPU" + (f" and {shape.gpu:g} GPU" if shape.gpu else "")
    have = f"{cpus:g} CPUs" + (f" and {total.get('GPU', 0.0):g} GPUs" if shape.gpu else "")
    unbounded = capacity_for(shape, {**total, "CPU": cpus * 10**6}) if shape.gpu else int(cpus // shape.cpu)
    capped = f", at most {MAX_ACTORS_PER_CPU} trials per CPU" if capacity < unbounded else ""
    return f"budget.max_concurrent: {requested} asked for; {capacity} run at once ({need} per trial on {have}{capped})"


# ------------------------------------------------------------------------------------------------ the search state


def _open_study(engine: Engine, run: SweepRun, planned: int) -> optuna.Study:
    """The state folder (reserved and locked), ``sweep.json`` and the Optuna study: new, or reloaded to resume."""
    import optuna

    from automl import logfile
    from automl.redact import mask_url
    from automl.samplers import make_sampler
    from automl.schedulers import make_pruner
    from automl.state import SweepLock, SweepState, reserve_sweep_id, state_root

    plan, spec = run.plan, run.plan.spec
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = state_root(plan.workdir)
    objectives = {"objectives": len(spec.objectives), "trials": planned}
    pruner = make_pruner(spec.early_stopping, spec.fixed)
    if run.resume is not None:
        run.sweep_id = run.resume.sweep_id
        run.state = run.resume
        run.folder = SweepState.folder(root, run.sweep_id)
        logfile.activate(log_file(plan))
        storage = _storage(plan, run.folder)
        run.warm_start = int(run.state.extra.get("warm_start_trials", 0))
        # Resuming, the sampler's random stream continues past the trials already drawn instead of proposing the
        # sweep's first configurations again.
        sampler = make_sampler(spec.method, plan.space, spec.seed + _trial_count(storage, run.sweep_id), **objectives)
        study = optuna.load_study(study_name=run.sweep_id, storage=storage, sampler=sampler, pruner=pruner)
        run.state.status = "RUNNING"
        run.state.save(root)
        return study
    found = None
    if plan.warm_start:  # the earlier sweeps are found (or refused) before anything is written
        from automl.engine.warmstart import find_candidates

        found = find_candidates(engine.client_for(plan.tracking_uri), plan)
    run.sweep_id = reserve_sweep_id(root, run.requested_id or f"{spec.name}-{_now_id()}")
    run.folder = SweepState.folder(root, run.sweep_id)
    run.lock = SweepLock(run.folder).acquire(run.sweep_id)
    logfile.activate(log_file(plan))  # the state folder exists now: library output may be written there
    run.state = SweepState(
        sweep_id=run.sweep_id, name=spec.name, spec=spec.model_dump(mode="json"), base_dir=str(plan.base_dir),
        tracking_uri=mask_url(plan.tracking_uri) or "", created=time.time(),
        extra={"storage": mask_url(plan.storage)},
    )
    run.state.save(root)
    sampler = make_sampler(spec.method, plan.space, spec.seed, **objectives)
    study = optuna.create_study(storage=_storage(plan, run.folder), sampler=sampler, pruner=pruner,
                                study_name=run.sweep_id, directions=[m.goal or "maximize" for m in spec.objectives])
    if found is not None:
        from automl.engine.warmstart import seed_study

        seeded = seed_study(study, plan, found)
        run.warm_start, run.warm_sources = seeded.trials, seeded.sources
        for text in seeded.notes:
            run.note(text)
        run.state.extra["warm_start_trials"] = run.warm_start
        run.state.save(root)
    for point in spec.points_to_evaluate:
        # Stored in the study as WAITING trials: study.ask() hands them out first, and a resume finds those not yet
        # run still waiting.
        study.enqueue_trial(point, skip_if_exists=False)
    return study


def log_file(plan: Any) -> Path:
    from automl.state import log_path, state_root

    return log_path(state_root(plan.workdir))


def _storage(plan: Any, folder: Path) -> Any:
    from automl.journal import open_storage
    from automl.state import journal_path

    if plan.storage:
        import optuna

        return optuna.storages.RDBStorage(plan.storage)
    return open_storage(journal_path(folder))


def _trial_count(storage: Any, study_name: str) -> int:
    import optuna

    return len(optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False))


def _now_id() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def _restore(run: SweepRun, study: optuna.Study, live: dict[int, Any] | None = None
             ) -> tuple[dict[int, TrialRecord], TrialRecord | None]:
    """Rebuild the records of an interrupted sweep from its Optuna journal.

    Finished trials become records again (kept, never re-run). A trial the driver's death left RUNNING is marked
    FAIL and its configuration queued to run again; a trial queued that way and not yet started (WAITING) simply
    runs next. Warm-start trials (the first ``run.warm_start``) seeded the sampler and are not the sweep's.
    With ``live`` (method: pbt) a RUNNING trial is a member that continues from its checkpoint: its Optuna trial
    goes into ``live`` by number, open.
    """
    import optuna
    from optuna.trial import TrialState as OptunaState

    from automl.state import find_best_bundle

    spec = run.spec
    metric, goal = spec.metric_name, spec.direction
    multi = len(spec.objectives) > 1
    storage = study._storage
    records: dict[int, TrialRecord] = {}
    best: TrialRecord | None = None
    for t in study.get_trials(deepcopy=False):
        if t.number < run.warm_start:
            continue
        info = t.user_attrs.get("automl", {})
        if t.state == OptunaState.RUNNING and live is not None:
            live[t.number - run.warm_start] = optuna.trial.Trial(study, t._trial_id)
            continue
        if t.state == OptunaState.RUNNING:
            storage.set_trial_user_attr(t._trial_id, "automl", {"state": "KILLED", "interrupted": True,
                                                                "error": "the sweep's driver was killed"})
            storage.set_trial_state_values(t._trial_id, OptunaState.FAIL)
            study.enqueue_trial(t.params, skip_if_exists=False)
            continue
        if t.state == OptunaState.WAITING or info.get("interrupted"):
            continue
        default = {OptunaState.COMPLETE: "COMPLETE", OptunaState.PRUNED: "STOPPED"}.get(t.state, "FAILED")
        number = t.number - run.warm_start
        metrics = dict(info.get("metrics", {}))
        record = TrialRecord(number=number, params=dict(t.params), state=TrialState(info.get("state") or default),
                             metrics=metrics, epochs=int(info.get("epochs", 0)),
                             seconds=float(info.get("seconds", 0.0)), error=info.get("error") or None,
                             attempts=int(info.get("attempts", 1)))
        record.value = metrics.get(metric)
        if t.state == OptunaState.COMPLETE and multi:
            record.values = list(t.values)
        records[number] = record
        run.history[number] = dict(t.intermediate_values)
        if record.state == TrialState.COMPLETE and record.value is not None and (
                best is None or best.value is None
                or (record.value > best.value if goal == "maximize" else record.value < best.value)):
            best = record
    if best is not None and run.folder is not None and find_best_bundle(run.folder, best.number) is None:
        run.note(f"the best model of trial {best.number} was not saved before the interruption")
    return records, best


# ------------------------------------------------------------------------------------------------ the record


def _open_record(engine: Engine, run: SweepRun, planned: int, concurrency: int) -> None:
    """The sweep's parent run, created by the writer process (this does not wait for it)."""
    from automl import tracking

    plan, spec = run.plan, run.plan.spec
    run.log = engine.recorder.open(plan.tracking_uri, trials=spec.tracking.trials)
    artifact_location = tracking.default_artifact_location(plan.tracking_uri, spec.experiment_name, plan.workdir)
    params = {
        "sweep.method": spec.method, "sweep.sampler": run.sampler_name, "sweep.trials": planned,
        "sweep.max_concurrent": concurrency, "sweep.seed": spec.seed,
        "sweep.metric": ",".join(m.name for m in spec.objectives),
        "sweep.goal": ",".join(m.goal or "" for m in spec.objectives), "sweep.trainer": spec.trainer,
        "sweep.early_stopping": spec.early_stopping.method,
    }
    if run.warm_start and run.resume is None:
        params["warm_start.trials"] = run.warm_start
        params["warm_start.sweeps"] = ",".join(run.warm_sources)[:6000]
    tags = {tracking.TAG_SWEEP: spec.name, tracking.TAG_SWEEP_ID: run.sweep_id,
            "automl.sampler": run.sampler_name, **versions()}
    spec_text = plan.spec_text
    if spec_text is None:
        import yaml

        spec_text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    parent = None
    if run.resume is not None:
        parent = run.resume.parent_run_id or _find_parent(engine, plan.tracking_uri, run.sweep_id)
    run.log.open(experiment=spec.experiment_name, artifact_location=artifact_location, run_name=run.sweep_id,
                 tags=tags, params=params, spec_text=spec_text, run_id=parent, log_file=log_file(plan))
    if run.resume is None:
        budget = spec.budget
        # The budget as metrics on the parent run, at the start and at each live change: MLflow shows when it moved.
        run.log.log_parent(metrics={"budget.trials": planned, "budget.max_concurrent": concurrency,
                                    **({"budget.time": budget.time} if budget.time else {})})


def _find_parent(engine: Engine, tracking_uri: str, sweep_id: str) -> str | None:
    """The parent run of a sweep whose driver died before it saved the run's id (the writer made it after)."""
    from automl import tracking

    client = engine.client_for(tracking_uri)
    found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.`{tracking.TAG_SWEEP_ID}` = '{sweep_id}' and "
                                             f"tags.`{tracking.TAG_ROLE}` = 'sweep'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    return str(found[0].info.run_id) if found else None


def _repair_trial_runs(run: SweepRun) -> None:
    """Resuming: make MLflow agree with the search state.

    A trial the journal kept (finished) whose child run is missing or still RUNNING (the writer died before writing
    it, e.g. killed with the driver) gets its record written again from the journal: parameters, its intermediate
    values, its last metrics and its final state. A RUNNING child run of a trial that will run again (cut short by
    the interruption) is closed as KILLED.
    """
    assert run.core is not None
    if not run.spec.tracking.trials:
        return
    runs = run.log.child_runs()
    records = run.core.records
    for number, (run_id, status) in runs.items():
        record = records.get(number)
        if record is None:
            if status == "RUNNING":
                run.log.kill_run(run_id, "the sweep's driver was killed; the trial runs again")
            continue
        record.run_id = run_id
        if record.state == TrialState.RUNNING:
            # A PBT member that continues from its checkpoint: on its own run, reopened if a cancel closed it.
            run.log.trial_adopted(number, run_id)
            if getattr(run.log, "client", None) is not None:
                if status != "RUNNING":
                    run.log.client.update_run(run_id, status="RUNNING")
                logged = {m.step for m in run.log.client.get_metric_history(run_id, run.spec.metric_name)}
                _relog_member(run, number, logged)
        elif status == "RUNNING":
            run.log.trial_adopted(number, run_id)
            _rewrite_trial(run, record, create=False)
    for number, record in records.items():
        if number in runs:
            continue
        if record.state == TrialState.RUNNING:
            run.log.trial_started(number, {**record.params, **run.spec.fixed},
                                  {"automl.sampler": run.sampler_name, "automl.sweep_id": run.sweep_id})
            _relog_member(run, number, set())
        else:
            _rewrite_trial(run, record, create=True)


def _relog_member(run: SweepRun, number: int, logged: set[int]) -> None:
    """A PBT member's metric up to its checkpoint that the killed writer never wrote: written again from the
    population's state (its steps after the checkpoint are trained, and reported, again)."""
    members = getattr(run.core, "members", {})
    member = members.get(number)
    if member is None:
        return
    for step, value in member.history:
        if step not in logged:
            run.log.trial_reported(number, step, {run.spec.metric_name: value})


def _rewrite_trial(run: SweepRun, record: TrialRecord, *, create: bool) -> None:
    number = record.number
    spec = run.spec
    tags = {"automl.state": str(record.state), "automl.epochs": str(record.epochs),
            "automl.seconds": f"{record.seconds:.3f}", "automl.recovered": "true"}
    if create:
        run.log.trial_started(number, {**record.params, **spec.fixed},
                              {"automl.sampler": run.sampler_name, "automl.sweep_id": run.sweep_id})
    for step, value in sorted(run.history.get(number, {}).items()):
        run.log.trial_reported(number, step, {spec.metric_name: value})
    if record.metrics:
        run.log.trial_reported(number, record.epochs, record.metrics)
    if record.state == TrialState.STOPPED:
        tags["automl.early_stopped"] = "true"
    if record.error:
        tags["automl.error"] = record.error[:5000]
    run.log.trial_finished(number, str(record.state), tags)


def versions() -> dict[str, str]:
    """The versions a sweep ran with, for its parent run: results depend on them."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("automl", "torch", "ray", "optuna", "mlflow", "scikit-learn"):
        try:
            found[f"automl.version.{name}"] = version(name)
        except PackageNotFoundError:
            continue
    return found


# ------------------------------------------------------------------------------------------------ data


class DataCache:
    """Prepared data, kept for the next sweep on the same data (a warm engine's second sweep does not load, split
    and preprocess the same file again), and its handle in the executor's object store. Keyed by the data section,
    the seed and the file's size and modification time; a few entries, the least recently used go first."""

    def __init__(self, size: int = 4) -> None:
        import threading

        self._size = size
        self._entries: dict[tuple[Any, ...], tuple[PreparedData, Any]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(plan: Any) -> tuple[Any, ...] | None:
        data = plan.spec.data
        if data is None:
            return None
        stamp: tuple[Any, ...] = ()
        if not data.source.startswith("sklearn:"):
            from automl.data import source_path

            path = source_path(data.source, plan.base_dir)
            try:
                st = path.stat()
            except OSError:
                return None
            if path.is_dir():
                return None  # an image folder: its files may change without the folder's time changing
            stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        return (data.model_dump_json(), plan.spec.seed, str(plan.base_dir), stamp)

    def prepare(self, plan: Any) -> PreparedData | None:
        if plan.spec.data is None:
            return None
        key = self._key(plan)
        with self._lock:
            if key is not None and key in self._entries:
                entry = self._entries.pop(key)
                self._entries[key] = entry  # most recently used last
                return entry[0]
        from automl.data import prepare

        prepared = prepare(plan.spec.data, base_dir=plan.base_dir, seed=plan.spec.seed)
        if key is not None:
            with self._lock:
                self._entries[key] = (prepared, None)
                while len(self._entries) > self._size:
                    self._entries.pop(next(iter(self._entries)))
        return prepared

    def handle(self, plan: Any, prepared: PreparedData | None, executor: Any) -> Any:
        """The data in the executor's object store (k-fold: the list of folds), put there once per entry."""
        if prepared is None:
            return None
        key = self._key(plan)
        with self._lock:
            entry = self._entries.get(key) if key is not None else None
            if entry is not None and entry[1] is not None and entry[0] is prepared:
                return entry[1]
        handle = executor.put_data(prepared.trainer_data)
        if key is not None:
            with self._lock:
                if key in self._entries and self._entries[key][0] is prepared:
                    self._entries[key] = (prepared, handle)
        return handle

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def planned_trials(spec: Any, space: Any) -> int:
    if spec.method == "pbt":
        return int(spec.pbt.population)  # budget.trials may only repeat it (automl.spec)
    if spec.method == "grid":
        size = space.grid_size()
        return int(min(size, spec.budget.trials) if spec.budget.trials else size)
    return int(spec.budget.trials or DEFAULT_TRIALS)
