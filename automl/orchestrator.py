"""The user's side of a sweep: ``Sweep`` (a plan: spec, space, trainer, where it records) and its run on the engine.

``Sweep.from_yaml(path).run()`` runs it on this process's engine (``automl.engine``: a warm pool of Ray workers, one
MLflow writer, many sweeps at once) and returns a ``SweepResult``; ``Sweep.submit()`` returns a handle at once.
The sweep's decisions, the driver loop, the finishing step and the result types live in ``automl.engine``; this
module keeps the names users and the CLI import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.engine.records import (
    BestTrial,
    SweepFailed,
    SweepResult,
    TrialKey,
    TrialRecord,
    TrialState,
    leaderboard,
)
from automl.engine.startup import DEFAULT_TRIALS
from automl.errors import AutoMLError, SweepNotFoundError, TrainerError
from automl.spec import Spec, load_spec, spec_from_dict

if TYPE_CHECKING:
    from automl.engine.driver import SweepHandle

__all__ = [
    "DEFAULT_TRIALS",
    "BestTrial",
    "Sweep",
    "SweepFailed",
    "SweepResult",
    "TrialKey",
    "TrialRecord",
    "TrialState",
    "connect_ray",
    "find_sweep",
    "leaderboard",
]

log = logging.getLogger(__name__)

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
        source: str | None = None,
        deadline: float | None = None,
    ) -> None:
        """``deadline``: the wall-clock time (``time.time()``) by which the whole run, its start-up and finishing
        step included, should be over: the CLI's ``--time`` counted from the command's start. Without one,
        ``budget.time`` counts from the moment the sweep's trials can start."""
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
        self.deadline = deadline
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
        from automl.engine.startup import planned_trials

        return planned_trials(self.spec, self.space)

    # ------------------------------------------------------------------------------------------ running

    def run(self, on_event: EventCallback | None = None, on_note: Callable[[str], None] | None = None
            ) -> SweepResult:
        """Run the sweep to the end of its budget on this process's engine; returns the leaderboard and the best
        trial.

        ``on_event(kind, record)`` hears each trial start, report and end; ``on_note(text)`` each decision the user
        should read before the first trial (trials capped to what the cluster holds, data columns dropped). Ctrl-C
        cancels the sweep (running trials KILLED, resumable) and is raised again once the sweep has stopped.
        """
        return _wait(self.submit(on_event=on_event, on_note=on_note))

    def submit(self, on_event: EventCallback | None = None, on_note: Callable[[str], None] | None = None
               ) -> SweepHandle:
        """Start the sweep on this process's engine and return at once: ``handle.result()`` waits for it,
        ``handle.update(trials=, max_concurrent=, time=)`` changes its budget live, ``handle.cancel()`` stops it."""
        from automl.engine import default_engine

        return default_engine(self.address).submit(self, on_event=on_event, on_note=on_note)

    def continuing(self) -> Sweep:
        """``automl run SPEC --continue``: this sweep, warm-started from the latest sweep of its name."""
        from automl.tracking import TAG_SWEEP_ID

        try:
            found = find_sweep(self.spec.name, self.tracking_uri)
        except SweepNotFoundError as exc:
            raise SweepNotFoundError(f"--continue: {exc}") from None
        latest = found["tags"].get(TAG_SWEEP_ID)
        spec = spec_from_dict(self.spec.model_dump(mode="json"),
                              overrides={"warm_start": [*self.spec.warm_start, latest]})
        return Sweep(spec, base_dir=self.base_dir, tracking_uri=self.tracking_uri, address=self.address,
                     workdir=self.workdir, spec_text=self.spec_text, storage=self.storage, source=self.source)

    @property
    def warm_start(self) -> list[str]:
        """Earlier sweeps (ids or names) or MLflow experiments whose finished trials seed this sweep's sampler."""
        return list(self.spec.warm_start)

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
        from automl.engine import default_engine
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
            handle = default_engine(plan.address).submit(plan, on_event=on_event, on_note=on_note, resume=state,
                                                          lock=lock)
            return _wait(handle)
        finally:
            lock.release()


def _wait(handle: SweepHandle) -> SweepResult:
    try:
        return handle.result()
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM, which the CLI turns into it): the sweep stops cleanly, its running trials KILLED and
        # queued to run again on resume; then the interrupt goes on to the caller.
        handle.cancel("cancelled by the user")
        with contextlib.suppress(Exception):
            handle.result()
        raise


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
    # Ray starts in a thread of the engine's own (automl.engine.driver), so ray.init cannot install its SIGTERM
    # handler and says so on the terminal; signals are the CLI's business (it cancels the sweep), not Ray's.
    logging.getLogger("ray._private.worker").addFilter(_NotMainThreadNotice())
    try:
        # No address: a Ray of our own. (Ray's own default would join any Ray already running on this
        # machine, such as another user's sweep; the embedded default is a local Ray for this sweep.)
        ray.init(address=address or "local", **kwargs)
    except ConnectionError as exc:
        raise AutoMLError(f"cannot reach the Ray cluster at {address}: {exc}") from None


class _NotMainThreadNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


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
