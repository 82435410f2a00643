"""The finishing step of a sweep, in a thread of its own (other sweeps run on): the best model logged and
registered, the summary (leaderboard, Pareto front, plots) on the parent run, the parent run closed, the state
folder updated, the result built."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.engine.records import BestTrial, SweepFailed, SweepResult, leaderboard
from automl.errors import AutoMLError

if TYPE_CHECKING:
    from automl.engine.run import SweepRun
    from automl.trainer import TrainerRef

log = logging.getLogger(__name__)
# Optuna's matplotlib plots go through pyplot, whose global state two finishing sweeps must not share at once.
_PLOTS = threading.Lock()
_IMPORTS = threading.Lock()
# What the summary plots take, at most, on a busy 2-core machine: a sweep with less than that left of its budget.time
# (a wall-clock deadline) skips them.
PLOT_SECONDS = 3.0  # sys.path and sys.modules are the process's: one finishing step changes them at a time


def finish_sweep(run: SweepRun) -> SweepResult:
    """Close the sweep's record and return its result; ``SweepFailed`` past ``budget.max_failures``."""
    from automl import tracking

    core = run.core
    assert core is not None
    assert run.state is not None
    assert run.folder is not None
    status = core.status
    sweep_log = run.log
    sweep_log.ready()
    try:
        sweep_log.flush()
    except AutoMLError:
        pass  # a dead writer: sweep_log.finish below closes the parent run and says so
    for number, record in core.records.items():
        record.run_id = sweep_log.run_id_of(number) or record.run_id
    params: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    tags = {f"automl.trials.{k.lower()}": str(v) for k, v in core.counts().items()}
    # A recorder without an MLflow client (automl.testing.MemoryRecorder) holds no model and no plot.
    mlflow = getattr(sweep_log, "client", None) is not None
    pareto = _pareto_front(run, tags, log_csv=mlflow) if core.multi else []
    best = core.best
    if best is not None and best.value is not None:
        # MLflow params are immutable: the best trial's values become the parent's params only at a final end; a
        # cancelled or failed sweep may resume and find a better trial, so until then they are a tag.
        if status == "FINISHED":
            params = dict(best.params)
        metrics = {k: v for k, v in best.metrics.items() if math.isfinite(v)}
        tags.update({"automl.best_trial": str(best.number), tracking.TAG_BEST_RUN: best.run_id or "",
                     "automl.best_params": json.dumps(best.params, default=str)[:5000]})
        if mlflow:
            run.model_uri = _log_best_model(run, tags)
    lineage = getattr(core, "lineage", None)
    if callable(lineage):  # method: pbt
        if mlflow:
            run.log.client.log_text(run.log.parent_run_id, json.dumps(lineage(), indent=1, default=str),
                                    "pbt_lineage.json")
        if status == "FINISHED":
            core.finished()  # type: ignore[attr-defined]
    if mlflow:
        _log_summary(run)
        # The plots follow the result (draw_plots): about a second of matplotlib that nothing needs to wait for.
        # Only at the sweep's real end: a cancelled or failed sweep is resumed (and plotted) later.
        run.plots_due = status == "FINISHED"
        deadline = run.plan.deadline  # the whole command's (AutoML mode's --time); not a spec's budget.time
        if run.plots_due and deadline is not None and time.time() > deadline - PLOT_SECONDS:
            # A process waits for its plots before it exits: past budget.time (which counts the whole command),
            # a few seconds of matplotlib on a busy machine would make it later still. The leaderboard and the
            # summary are logged; the plots are what `optuna-dashboard` or the MLflow UI's charts show anyway.
            run.plots_due = False
            tags["automl.plots"] = "skipped: budget.time spent"
    run.state.extra.update(best_model_uri=run.model_uri)
    try:
        sweep_log.finish(status, params=params, metrics=metrics, tags=tags)
    except AutoMLError as exc:
        # Trial records were lost on the way to MLflow: the sweep stays resumable, and a resume writes them.
        run.state.status = "FAILED"
        run.state.save(run.folder.parent)
        raise AutoMLError(f"{exc}; `automl resume {run.sweep_id}` writes the missing trial records") from None
    run.state.status = status
    run.state.save(run.folder.parent)
    result = _result(run, pareto, status)
    if core.failure_stop:
        raise SweepFailed(core.failure_stop, result)
    return result


def trusted_modules(run: SweepRun) -> list[str]:
    """The trainer's own package may be the model's loader: a user's module:function trainer is code the user wrote
    and this sweep ran (a registered trainer's package is trusted anyway)."""
    return [run.plan.trainer.target.partition(":")[0].split(".")[0]]


def _log_best_model(run: SweepRun, tags: dict[str, str]) -> str | None:
    from automl import tracking
    from automl.state import find_best_bundle

    core = run.core
    assert core is not None
    assert core.best is not None
    assert run.folder is not None
    best = core.best
    bundle = find_best_bundle(run.folder, best.number)
    prepared = run.prepared
    value = float(best.value or 0.0)
    final = _final_model(run, tags) if run.spec.final_model.refit and core.status == "FINISHED" else None
    if final is not None:
        bundle, prepared = final
        value = float(tags.get("automl.final.held_out", value))
    if bundle is None:
        return None
    from automl.export import log_pyfunc_model

    client, parent = run.log.client, run.log.parent_run_id
    with trainer_importable(run.plan.trainer):  # a user's own SavableModel lives in the trainer's module
        model_uri = log_pyfunc_model(client, parent, bundle, prepared, trusted_modules=trusted_modules(run))
    tags[tracking.TAG_BEST_URI] = model_uri
    register_as = run.spec.tracking.register_as
    if register_as:
        from automl.export import register_champion

        try:
            register_champion(client, register_as, model_uri, run_id=parent, metric=core.metric, goal=core.goal,
                              value=value)
        except AutoMLError as exc:
            # The sweep itself succeeded and its record must still be closed: a registry refusal (permissions, a
            # server down) is a warning and a tag, never a parent left RUNNING.
            log.warning("%s", exc)
            tags["automl.register_error"] = str(exc)
    return model_uri


def _final_model(run: SweepRun, tags: dict[str, str]) -> tuple[Path, Any] | None:
    """The refit (or ensemble) of ``final_model``, written as a bundle in the state folder; None when there is
    nothing to refit or it failed (the best trial's own model is logged then, and the note says why)."""
    from automl import final_model
    from automl.bundle import pack_model, write_bundle

    core = run.core
    assert core is not None
    assert core.best is not None
    assert run.folder is not None
    try:
        final = final_model.build(run, run.deadline, run.note)
        if final is None:
            return None
        packed = pack_model(final.model)
        if packed is None:
            raise ValueError(f"{type(final.model).__name__} has no safe save format")
        info = {"trainer": run.spec.trainer, "trial": core.best.number, "params": core.best.params,
                "fixed": run.spec.fixed, "sweep_id": run.sweep_id, "final_model": final.kind,
                "members": [{"trial": n, "model": m, "weight": w} for n, m, w in final.members],
                "metric": {"name": core.metric, "goal": core.goal, "value": final.held_out,
                           "estimate": "held-out (out-of-fold, chosen without each fold)"}}
        target = run.folder / "final_model"
        shutil.rmtree(target, ignore_errors=True)
        bundle = write_bundle(target, packed, final.prepared, info=info)
    except Exception as exc:
        log.warning("final model: the refit failed (%s); the best trial's own model is logged", exc)
        run.note(f"final model: the refit failed ({type(exc).__name__}: {str(exc)[:200]}); the best trial's own "
                 "model is logged")
        tags["automl.final.error"] = str(exc)[:5000]
        return None
    for text in final.notes:
        run.note(text)
    run.note(final.describe(core.metric))
    tags["automl.final"] = final.kind
    tags["automl.final.members"] = json.dumps([{"trial": n, "model": m, "weight": round(w, 4)}
                                               for n, m, w in final.members])
    if final.held_out is not None:
        tags["automl.final.held_out"] = repr(float(final.held_out))
        run.log.log_parent(metrics={f"final.held_out_{core.metric}": float(final.held_out)})
    if final.single_held_out is not None and final.ensemble_held_out is not None:
        run.log.log_parent(metrics={f"final.single_held_out_{core.metric}": float(final.single_held_out),
                                    f"final.ensemble_held_out_{core.metric}": float(final.ensemble_held_out)})
    return bundle, final.prepared


@contextlib.contextmanager
def trainer_importable(trainer: TrainerRef) -> Iterator[None]:
    """A ``module:function`` trainer's folder first on the import path while its model is loaded here (checked
    against the bundle's manifest: automl.bundle), then off it again; the engine serves sweeps from many folders."""
    from automl.engine.worker import forget_other_copy

    folder = trainer.search_path
    if not folder:
        yield
        return
    with _IMPORTS:
        forget_other_copy(trainer)
        sys.path.insert(0, folder)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def _log_summary(run: SweepRun) -> None:
    from automl.summary import log_summary

    core = run.core
    assert core is not None
    board = leaderboard([core.records[k] for k in sorted(core.records)], core.metric, core.goal, _objectives(run))
    log_summary(run.log.client, run.log.parent_run_id, core.study, board, _objectives(run), plots=False)


def draw_plots(run: SweepRun) -> None:
    """The summary plots on the parent run, once the result is out (the engine's finishing thread; never raises)."""
    from automl.summary import log_plots

    core = run.core
    if not run.plots_due or core is None:
        return
    with _PLOTS:
        log_plots(run.log.client, run.log.parent_run_id, core.study, _objectives(run))
        lineage = getattr(core, "lineage", None)
        if callable(lineage):
            from automl.engine.pbt_plots import log_schedules

            log_schedules(run.log.client, run.log.parent_run_id, lineage())


def _objectives(run: SweepRun) -> list[tuple[str, str]]:
    assert run.core is not None
    return [(m.name, str(m.goal or "maximize")) for m in run.core.objectives]


def _pareto_front(run: SweepRun, tags: dict[str, str], *, log_csv: bool) -> list[int]:
    """Several metrics: record which of the sweep's trials are Pareto-optimal (Optuna's ``best_trials``)."""
    core = run.core
    assert core is not None
    front = sorted(t.number - core.offset for t in core.study.best_trials if t.number >= core.offset)
    front = [n for n in front if n in core.records]
    for number in front:
        core.records[number].pareto = True
    tags["automl.pareto_front"] = ",".join(map(str, front))
    lines = ["trial," + ",".join(m.name for m in core.objectives) + ",run_id"]
    for number in front:
        r = core.records[number]
        lines.append(",".join([str(number), *(repr(v) for v in r.values or []), r.run_id or ""]))
    if log_csv:
        run.log.client.log_text(run.log.parent_run_id, "\n".join(lines) + "\n", "pareto_front.csv")
    return front


def _result(run: SweepRun, pareto: list[int], status: str) -> SweepResult:
    core = run.core
    assert core is not None
    assert run.folder is not None
    best = None
    b = core.best
    if b is not None and b.value is not None:
        best = BestTrial(number=b.number, params=b.params, metrics=b.metrics, value=b.value, run_id=b.run_id,
                         model_uri=run.model_uri)
    return SweepResult(
        sweep_id=run.sweep_id, name=run.spec.name, metric=core.metric, goal=core.goal,
        trials=[core.records[k] for k in sorted(core.records)], best=best,
        experiment_id=run.log.experiment_id or None, parent_run_id=run.log.parent_run_id or None,
        tracking_uri=run.plan.tracking_uri, sampler=run.sampler_name,
        wall_seconds=time.perf_counter() - run.submitted, state_dir=run.folder,
        objectives=[(m.name, m.goal or "maximize") for m in core.objectives], pareto_front=pareto,
        trusted_modules=trusted_modules(run), status=status, warm_start_trials=run.warm_start, summary=run.summary,
    )
