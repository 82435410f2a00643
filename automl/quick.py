"""AutoML mode: a spec built from a data file alone, searching model families and their hyperparameters.

``automl run --data FILE --target COL`` infers the task, asks every registered trainer for its AutoML search
space (``Trainer.search_space``: built-in and plug-in trainers alike), and joins them under one conditional
``model`` parameter: a trial first picks a model, then that model's parameters (``<model>__<param>``, as in
scikit-learn pipelines). Each model's library defaults are tried first (``points_to_evaluate``), so the search
starts from what a user would get without tuning and can only improve on it.

What generalises to new rows: a small table (``SMALL_TABLE_ROWS``) is scored by ``CV_FOLDS``-fold cross-validation
(``validation_rule``), and ``final_model: {refit: true, ensemble: true}`` makes the logged model the best trial, or a
greedy ensemble of the best trials, refit on every row (automl.final_model). The CLI prints these rules, and
automl.data's column rule, in the run header.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.errors import DataError, SpecError
from automl.trainer import MODEL_PARAM_SEPARATOR as SEPARATOR

if TYPE_CHECKING:
    from automl.orchestrator import SweepResult, TrialRecord

DEFAULT_TIME = "2m"
# The small-table rule: a table of at most SMALL_TABLE_ROWS rows is scored by CV_FOLDS-fold cross-validation (every
# row validates once, so a lucky 20% split cannot pick the model); a larger one by one 20% validation split, where
# k fits per trial would cost more search than the split's noise costs accuracy.
SMALL_TABLE_ROWS = 5000
CV_FOLDS = 5
DEFAULT_METRIC = {"classification": "val_accuracy", "regression": "val_r2"}
MAX_TRIALS = 1000  # the time budget ends an AutoML sweep; this only bounds a very long --time


def automl_spec(
    data: str,
    target: str | None = None,
    *,
    time: str | None = None,
    metric: str | None = None,
    task: str = "auto",
    seed: int = 0,
    base_dir: Path | None = None,
    facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The spec AutoML mode runs for ``data`` (what ``--print-spec`` prints): a plain dict in spec format.

    ``facts``, when given, receives what the spec was built from that the run header shows (``rows``)."""
    from automl.data import infer_task, load_frame

    frame, own_target = load_frame(data, base_dir)
    target = target or own_target
    if target is None:
        raise DataError("--target: name the column to predict (automl run --data FILE --target COLUMN)")
    if target not in frame.columns:
        columns = ", ".join(map(str, frame.columns[:20]))
        raise DataError(f"--target: column '{target}' not found; the columns are: {columns}")
    y = frame[target].dropna()
    if task == "auto":
        task = infer_task(y)
    if task not in DEFAULT_METRIC:
        raise SpecError(f"--task must be auto, classification or regression (got {task!r})")
    validation = validation_rule(task, y)
    if facts is not None:
        facts["rows"] = len(y)
    spaces = model_spaces(task, n_rows=len(y))
    if not spaces:
        raise SpecError(f"no registered trainer offers an AutoML search space for {task}")

    when: dict[str, dict[str, Any]] = {}
    fixed: dict[str, Any] = {}
    points: list[dict[str, Any]] = []
    for model, space in spaces.items():
        when[model] = {f"{model}{SEPARATOR}{k}": v for k, v in space.get("parameters", {}).items()}
        fixed.update({f"{model}{SEPARATOR}{k}": v for k, v in space.get("fixed", {}).items()})
        start = space.get("start", {})
        points.append({"model": model, **{f"{model}{SEPARATOR}{k}": v for k, v in start.items()}})
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(data.removeprefix("sklearn:")).stem).strip("-") or "data"
    return {
        "name": f"{name}-automl",
        "trainer": "auto",
        "data": {"source": data, "target": str(target), "task": task, **validation},
        "metric": metric or DEFAULT_METRIC[task],
        "method": "tpe",
        "budget": {"trials": MAX_TRIALS, "time": time or DEFAULT_TIME},
        "seed": seed,
        "fixed": fixed,
        "parameters": {"model": {"type": "categorical", "choices": list(spaces),
                                 "when": {m: p for m, p in when.items() if p}}},
        "points_to_evaluate": points,
        "tracking": {"register_as": f"{name}-automl"},
        # The best configuration(s) refit on every row, as an ensemble where that wins on held-out folds.
        "final_model": {"refit": True, "ensemble": True},
    }


def validation_rule(task: str, y: Any) -> dict[str, Any]:
    """The small-table rule: ``{"validation": {"folds": k}}`` for a table of at most ``SMALL_TABLE_ROWS`` rows (k is
    ``CV_FOLDS``, fewer when a class has fewer rows than that), else nothing (one 20% validation split)."""
    if len(y) > SMALL_TABLE_ROWS:
        return {}
    folds = CV_FOLDS
    if task == "classification":
        folds = min(folds, int(y.value_counts().min()))
    return {"validation": {"folds": folds}} if folds >= 2 else {}


def describe_validation(spec: Any, rows: int) -> str:
    """The run header's line on how trials are scored, with the rule that chose it."""
    rule = (f"rule: {CV_FOLDS}-fold cross-validation for tables of at most {SMALL_TABLE_ROWS} rows, one 20% "
            "validation split above")
    folds = spec.data.validation.folds if spec.data is not None else None
    if folds:
        return f"validation: {folds}-fold cross-validation on {rows} rows ({rule})"
    return f"validation: one {spec.data.validation.fraction:.0%} split of {rows} rows ({rule})"


# Models whose defaults train fastest go first: with a short --time, every model's defaults still get a turn.
# Names only; trainers not listed (plug-ins) follow in registry order.
FIRST = ("logistic_regression", "ridge", "svm", "hist_gradient_boosting", "random_forest", "mlp")


def model_spaces(task: str, n_rows: int) -> dict[str, dict[str, Any]]:
    """Every registered trainer's AutoML search space for this task and table size, by trainer name."""
    from automl.trainer import registered_trainers, resolve_trainer

    registered = registered_trainers()
    order = [n for n in FIRST if n in registered] + [n for n in registered if n not in FIRST]
    spaces: dict[str, dict[str, Any]] = {}
    for name in order:
        if name == "auto":
            continue
        hook = getattr(resolve_trainer(name).load_object(), "search_space", None)
        space = hook(task, n_rows) if callable(hook) else None
        if space is not None:
            spaces[name] = space
    return spaces


def best_per_model(result: SweepResult) -> list[TrialRecord]:
    """The best completed trial of each model family, best first."""
    best: dict[str, TrialRecord] = {}
    sign = 1.0 if result.goal == "maximize" else -1.0
    for t in result.trials:
        if t.state != "COMPLETE" or t.value is None:
            continue
        model = str(t.params.get("model"))
        if model not in best or sign * t.value > sign * (best[model].value or 0.0):
            best[model] = t
    return sorted(best.values(), key=lambda t: -sign * (t.value or 0.0))


def own_params(record: TrialRecord) -> dict[str, Any]:
    """A trial's parameters without the model prefix: what its trainer received (searched ones only)."""
    model = str(record.params.get("model"))
    prefix = f"{model}{SEPARATOR}"
    return {k.removeprefix(prefix): v for k, v in record.params.items() if k.startswith(prefix)}
