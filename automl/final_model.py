"""The model a sweep logs and registers when its spec asks for more than the best trial's own model
(``final_model``, on in AutoML mode).

1. Ensemble or single: with ``final_model.ensemble``, the best completed trials (``KEPT_PREDICTIONS`` of them and
   each model family's best) are candidates; greedy ensemble selection over their out-of-fold (k-fold) or
   validation predictions is compared with "the best single trial" on held-out row groups
   (``automl.ensemble.choose``: each fold's score comes from a choice made on the other folds). The ensemble is
   used only where it scores higher there.
2. Refit: the chosen configuration(s) are trained again on every row (all folds, or the training and validation
   rows), with the preprocessing fitted on every row; a trainer that chose its epoch count by patience on the
   validation rows (it reports ``best_epoch``) is refit for that many epochs, patience off.
3. The score reported for it (``final.held_out_<metric>``): the held-out estimate of step 1, i.e. the out-of-fold
   score of the procedure that was chosen, each fold scored by a choice made without it. The refit itself is
   trained on every row, so no row is left to score it on; the estimate says what the refit is expected to score
   on new rows (the trials' hyperparameters were tuned on the same folds, so it is slightly optimistic).

Refits run in the finishing step, inside the sweep's time budget: members whose estimated refit time (their trial's
seconds per fold, scaled to all rows) does not fit in what is left are dropped, and with no time for even one
refit the best trial's own model is logged, with a note.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from automl.data import PreparedData
    from automl.engine.records import TrialRecord
    from automl.engine.run import SweepRun

log = logging.getLogger(__name__)

# Seconds kept, after the refits, for logging and registering the model and closing the record.
LOGGING_SECONDS = 3.0
# The finishing step's time kept at least, whatever the refit is expected to take.
FINISH_MIN_SECONDS = 4.0
# An ensemble's refits, in refits of the best trial: room for a member or two besides the best (more are dropped
# if they do not fit in what is left: automl.final_model._within_time).
ENSEMBLE_REFITS = 1.5
# Refit time granted even when the budget is already spent (a slow start-up, a trial that overran its estimate):
# this share of budget.time, at least MIN_REFIT_SECONDS. The run may end that much late; the alternative, the best
# trial's model trained on part of the rows, is worse on every row the user will ever predict.
MIN_REFIT_SHARE = 0.1
MIN_REFIT_SECONDS = 2.0
# A refit sees all rows where a fold saw (k-1)/k of them, and trees and nets grow a little with the rows.
REFIT_SLOWDOWN = 1.5
# Candidates for the ensemble: the best trials, best first, and each family's best trial.
CANDIDATES = 15
# The sweep metric -> the metric greedy selection scores ensembles with (val_loss is that of the task).
_LOSS_METRIC = {"classification": "val_log_loss", "regression": "val_rmse"}


@dataclass
class FinalModel:
    """What the finishing step logs instead of the best trial's model."""

    model: Any
    prepared: PreparedData  # the preprocessing fitted on every row
    kind: str  # "ensemble" or "refit"
    members: list[tuple[int, str, float]]  # (trial, model family, weight)
    held_out: float | None  # the held-out estimate (module docstring, 3.)
    single_held_out: float | None = None
    ensemble_held_out: float | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self, metric: str) -> str:
        members = ", ".join(f"trial {n} ({family}) {w:.2f}" for n, family, w in self.members)
        what = (f"an ensemble of {len(self.members)} trials ({members})" if self.kind == "ensemble"
                else f"trial {self.members[0][0]} ({self.members[0][1]})")
        text = f"final model: {what}, refit on all rows"
        if self.held_out is not None:
            text += f"; held-out {metric} {self.held_out:.4f} (out-of-fold, chosen without each fold)"
        if self.single_held_out is not None and self.ensemble_held_out is not None:
            text += f" [best single {self.single_held_out:.4f}, ensemble {self.ensemble_held_out:.4f}]"
        return text


def finish_seconds(best: TrialRecord | None, folds: int, *, ensemble: bool) -> float:
    """What the finishing step is expected to take: logging, and the refit of ``best`` (of a few ensemble members,
    ``ENSEMBLE_REFITS`` times that, when the sweep may build one)."""
    refit = 0.0 if best is None else REFIT_SLOWDOWN * best.seconds / max(folds, 1)
    return max(FINISH_MIN_SECONDS, LOGGING_SECONDS + refit * (ENSEMBLE_REFITS if ensemble else 1.0))


def scorer(metric: str, goal: str, task: str, n_classes: int) -> Callable[[np.ndarray, np.ndarray], float] | None:
    """The sweep's metric on predictions (probabilities for classification), higher is better; None for a metric
    that cannot be computed from predictions alone (a trainer's own metric)."""
    from automl.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS, evaluate

    if metric == "val_loss":  # the task's loss, computed here from the predictions: always minimised
        name, sign = _LOSS_METRIC[task], -1.0
    else:
        name, sign = metric, (1.0 if goal == "maximize" else -1.0)
    if name not in (CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS):
        return None
    needs_proba = name in ("val_roc_auc", "val_log_loss")

    def score(y: np.ndarray, pred: np.ndarray) -> float:
        if task == "classification":
            found = evaluate(task, y, np.argmax(pred, axis=1), proba=pred if needs_proba else None,
                             n_classes=n_classes)
        else:
            found = evaluate(task, y, pred)
        value = found.get(name)
        return -math.inf if value is None or not math.isfinite(value) else sign * float(value)

    return score


def build(run: SweepRun, deadline: float | None, note: Callable[[str], None] = print) -> FinalModel | None:
    """The final model of ``run`` (module docstring); None when there is nothing to refit or no time for it.

    ``deadline``: wall-clock time (``time.time()``) by which the whole sweep, logging included, should be done;
    ``note`` hears what was left out for lack of time.
    """
    from automl.data import prepare_all_rows
    from automl.ensemble import choose, holdout_groups

    core, prepared, spec = run.core, run.prepared, run.spec
    if core is None or core.best is None or prepared is None or spec.data is None:
        return None
    best = core.best
    notes: list[str] = []
    folds = prepared.folds or [prepared.dataset]
    chosen: list[tuple[TrialRecord, float]] = [(best, 1.0)]
    single_score = ensemble_score = held_out = None
    ds = prepared.dataset
    score = scorer(core.metric, core.goal, ds.task, ds.n_classes)
    if spec.final_model.ensemble and score is not None:
        y = np.concatenate([f.y_val for f in folds])
        groups = (np.concatenate([np.full(len(f.y_val), i) for i, f in enumerate(folds)]) if len(folds) > 1
                  else holdout_groups(len(y), spec.seed))
        candidates = _candidates(core, len(y))
        if candidates:
            choice = choose([core.predictions[r.number] for r in candidates], y, groups, score)
            sign = 1.0 if core.goal == "maximize" else -1.0
            single_score, ensemble_score = sign * choice.single_held_out, sign * choice.ensemble_held_out
            held_out = sign * choice.held_out
            if choice.ensemble:
                chosen = sorted(((r, float(w)) for r, w in zip(candidates, choice.weights, strict=True) if w > 0),
                                key=lambda rw: -rw[1])
    selected = len(chosen)
    chosen = _within_time(chosen, len(folds), deadline, notes,
                          floor=max(MIN_REFIT_SECONDS, MIN_REFIT_SHARE * (spec.budget.time or 0.0)))
    if len(chosen) < selected:
        held_out = None  # the estimate was of the ensemble selected, not of what is left of it
    if not chosen:
        for text in notes:
            note(text)
        return None
    data, preprocessor = prepare_all_rows(spec.data, base_dir=run.plan.base_dir, seed=spec.seed)
    models = [_refit(run, record, data) for record, _ in chosen]
    weights = [w for _, w in chosen]
    members = [(r.number, str(r.params.get("model", spec.trainer)), w / sum(weights)) for r, w in chosen]
    if len(models) > 1:
        from automl.ensemble import EnsembleModel

        model: Any = EnsembleModel(models, weights, task=data.task, n_classes=data.n_classes,
                                   names=[f"trial {n} ({family})" for n, family, _ in members])
        kind = "ensemble"
    else:
        model, kind = models[0], "refit"
        if held_out is not None and single_score is not None and chosen[0][0] is best:
            held_out = single_score
    final_prepared = replace(prepared, dataset=data, preprocessor=preprocessor, folds=None)
    return FinalModel(model=model, prepared=final_prepared, kind=kind, members=members, held_out=held_out,
                      single_held_out=single_score, ensemble_held_out=ensemble_score, notes=notes)


def _candidates(core: Any, rows: int) -> list[TrialRecord]:
    """Completed trials with predictions for every row, best first: the best ``CANDIDATES`` and each model
    family's best; the sweep's best trial always first."""
    sign = -1.0 if core.goal == "maximize" else 1.0
    ranked = sorted((core.records[n] for n, p in core.predictions.items() if len(p) == rows),
                    key=lambda r: (r.number != core.best.number, sign * (r.value or 0.0)))
    picked = ranked[:CANDIDATES]
    families = {r.params.get("model") for r in picked}
    for record in ranked[CANDIDATES:]:
        family = record.params.get("model")
        if family not in families:
            families.add(family)
            picked.append(record)
    return picked if picked and picked[0].number == core.best.number else []


def _within_time(chosen: list[tuple[TrialRecord, float]], folds: int, deadline: float | None, notes: list[str], *,
                 floor: float = 0.0) -> list[tuple[TrialRecord, float]]:
    """The members whose refits fit before ``deadline`` (heaviest weights first); all of them without one."""
    if deadline is None:
        return chosen
    # A start-up that overran the budget (a cold Ray on a busy machine) still leaves the refit a moment: the
    # best configuration refit on every row is the model the user asked for.
    left = max(deadline - time.time() - LOGGING_SECONDS, floor)
    kept: list[tuple[TrialRecord, float]] = []
    spent = 0.0
    for record, weight in chosen:
        cost = REFIT_SLOWDOWN * record.seconds / folds
        if spent + cost <= left:
            kept.append((record, weight))
            spent += cost
    if len(kept) < len(chosen):
        if kept:
            notes.append(f"final model: {len(chosen) - len(kept)} of {len(chosen)} ensemble members left out: no "
                         "time left in the budget to refit them")
        else:
            notes.append("final model: no time left in the budget to refit; the best trial's own model (trained "
                         "on its training split) is logged")
    return kept


def refit_params(record: TrialRecord, fixed: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters for its refit: those it ran with, and, where it reported ``best_epoch`` (patience chose
    its epoch count on the validation rows, which the refit trains on), that many epochs without patience."""
    params = {**record.params, **fixed}
    best_epoch = record.metrics.get("best_epoch")
    if best_epoch is not None and math.isfinite(best_epoch):
        family = str(record.params.get("model", ""))
        for key in ("epochs", f"{family}__epochs"):
            if key in params:
                params[key] = max(1, round(best_epoch))
        for key in ("patience", f"{family}__patience"):
            if key in params:
                params[key] = 0
    return params


def _refit(run: SweepRun, record: TrialRecord, data: Any) -> Any:
    from automl.engine.finish import trainer_importable
    from automl.engine.worker import _seed_everything

    with trainer_importable(run.plan.trainer):
        fit = run.plan.trainer.load()
    _seed_everything(run.spec.seed + record.number)  # the trial's own seed: the refit draws as it did

    def report(step: int, metrics: Any) -> None:  # the refit's metrics are on its own training rows: not kept
        return None

    return fit(refit_params(record, run.spec.fixed), data, report)
