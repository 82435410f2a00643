"""The objectives that ``overhead.py`` runs, shared by every runner so that each does the same work.

Two workloads:

- ``trivial``: ``loss = x**2`` over one float, one report per trial. Its compute is nil, so a runner's wall
  time per trial is its overhead.
- ``digits``: a small torch MLP on scikit-learn's digits for ``DIGITS_EPOCHS`` epochs with one report per
  epoch (about 0.4 s of compute on one thread). The training is automl's built-in ``mlp`` trainer
  (``trainers.mlp.MLPTrainer``) on the split automl makes for ``data: {source: sklearn:digits}``, so plain
  Optuna, plain Ray Tune and automl train exactly the same networks on exactly the same rows.

In-trial compute is measured inside the objective with ``time.perf_counter`` and excludes the time spent in
the runner's ``report`` callback (Ray Tune's may block) and a one-time warm-up per process (torch's first
backward pass and optimizer step cost about 1 s of lazy initialisation; a runner that starts a fresh process
per trial pays it in every trial, which is overhead, not compute). Every report carries the compute so far as
``compute_s``; automl's trainer signature is ``fn(params, data, report)``, which ``trivial`` and
``digits_mlp`` follow (the spec names them ``objectives:trivial`` and ``objectives:digits_mlp``).

A digits report also carries two wall-clock timestamps (``time.time()``, seconds since the epoch, one clock for
every process on the machine): ``t_start``, taken when the training starts (after the warm-up, where the
compute timer starts), and ``t_end``, taken as the report is entered; the last report's ``t_end`` is the end
of the training. Each runner hands back the last report's metrics (automl: ``TrialRecord.metrics``; Ray Tune:
``Result.metrics``; plain Optuna: the trial's user attributes), so ``overhead.py`` sees every trial's span.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

TRIVIAL_METRIC = "loss"  # minimised
DIGITS_METRIC = "val_accuracy"  # maximised
T_START, T_END = "t_start", "t_end"  # wall-clock span of a digits trial's training, in every report
DIGITS_EPOCHS = 10
SEED = 0

# The searched space, in automl's spec form; ``optuna_digits_params`` and ``tune_digits_space`` mirror it.
TRIVIAL_SPACE: dict[str, Any] = {"x": {"type": "float", "low": -10.0, "high": 10.0}}
DIGITS_SPACE: dict[str, Any] = {
    "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 48]},
    "depth": {"type": "int", "low": 2, "high": 3},
    "width": {"type": "int", "low": 64, "high": 128, "log": True},
}

ReportFn = Callable[[int, Mapping[str, float]], None]


# --------------------------------------------------------------------------------------------- trivial


def trivial_value(x: float) -> float:
    return float(x) ** 2


def trivial(params: dict[str, Any], data: Any, report: ReportFn) -> None:
    """automl trainer: one report of ``loss = x**2``; nothing to export."""
    start = time.perf_counter()
    loss = trivial_value(params["x"])
    report(1, {TRIVIAL_METRIC: loss, "compute_s": time.perf_counter() - start})


def optuna_trivial(trial: Any) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)  # sampling is the runner's work, not the trial's
    start = time.perf_counter()
    loss = trivial_value(x)
    trial.set_user_attr("compute_s", time.perf_counter() - start)
    return loss


def tune_trivial(config: dict[str, Any]) -> None:
    from ray import tune

    start = time.perf_counter()
    loss = trivial_value(config["x"])
    tune.report({TRIVIAL_METRIC: loss, "compute_s": time.perf_counter() - start})


def tune_trivial_space() -> dict[str, Any]:
    from ray import tune

    return {"x": tune.uniform(-10.0, 10.0)}


def stamped(params: dict[str, Any], data: Any, report: ReportFn) -> None:
    """automl trainer for the service benchmark: ``loss = x**2`` after ``params["sleep"]`` seconds (default 0),
    with the wall-clock span of the trial (``t_start`` when the trainer is entered, ``t_end`` at its report)."""
    wall_start = time.time()
    start = time.perf_counter()
    time.sleep(float(params.get("sleep", 0.0)))
    report(1, {TRIVIAL_METRIC: trivial_value(params["x"]), "compute_s": time.perf_counter() - start,
               T_START: wall_start, T_END: time.time()})


# --------------------------------------------------------------------------------------------- digits


def digits_data(seed: int = SEED) -> Any:
    """The ``Dataset`` automl prepares for ``data: {source: sklearn:digits}`` (same split, same scaling)."""
    from automl.data import prepare
    from automl.spec import DataSpec

    return prepare(DataSpec(source="sklearn:digits"), seed=seed).dataset


_warm = False


def _warm_up(data: Any) -> None:
    """Pay torch's one-time lazy initialisation (first backward, first optimizer step) outside the timer."""
    global _warm
    if _warm:
        return
    from trainers.mlp import MLPTrainer

    MLPTrainer().fit({"epochs": 1, "depth": 1, "width": 8, "batch_size": 512}, data, lambda step, m: None)
    _warm = True


def train_digits(params: Mapping[str, Any], data: Any, report: ReportFn) -> float:
    """Train the MLP (``params["epochs"]``, default ``DIGITS_EPOCHS``) on one thread; report after each epoch.

    Every report adds ``compute_s`` (so far), ``t_start`` and ``t_end`` (wall clock, see the module docstring).
    Returns the seconds of compute (training and validation, not the time inside ``report``).
    """
    import torch

    from trainers.mlp import MLPTrainer

    torch.set_num_threads(1)
    _warm_up(data)
    in_report = 0.0
    wall_start = time.time()
    start = time.perf_counter()

    def timed_report(step: int, metrics: Mapping[str, float]) -> None:
        nonlocal in_report
        entered = time.perf_counter()
        wall_now = time.time()
        report(step, {**metrics, "compute_s": entered - start - in_report, T_START: wall_start, T_END: wall_now})
        in_report += time.perf_counter() - entered

    MLPTrainer().fit({"epochs": DIGITS_EPOCHS, **params}, data, timed_report)
    return time.perf_counter() - start - in_report


def digits_mlp(params: dict[str, Any], data: Any, report: ReportFn) -> None:
    """automl trainer: ``train_digits`` (the built-in ``mlp`` with the warm-up kept out of the timer)."""
    train_digits(params, data, report)


def optuna_digits_params(trial: Any) -> dict[str, Any]:
    return {
        "lr": trial.suggest_float("lr", 1.0e-3, 1.0e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [32, 48]),
        "depth": trial.suggest_int("depth", 2, 3),
        "width": trial.suggest_int("width", 64, 128, log=True),
    }


def optuna_digits(trial: Any, data: Any) -> float:
    last: dict[str, float] = {}

    def report(step: int, metrics: Mapping[str, float]) -> None:
        last.update(metrics)
        trial.report(metrics[DIGITS_METRIC], step)

    seconds = train_digits(optuna_digits_params(trial), data, report)
    trial.set_user_attr("compute_s", seconds)
    trial.set_user_attr(T_START, last[T_START])
    trial.set_user_attr(T_END, last[T_END])
    return last[DIGITS_METRIC]


def tune_digits(config: dict[str, Any], data: Any = None) -> None:
    from ray import tune

    train_digits(config, data, lambda step, metrics: tune.report(dict(metrics)))


def tune_digits_space() -> dict[str, Any]:
    from ray import tune

    return {
        "lr": tune.loguniform(1.0e-3, 1.0e-2),
        "batch_size": tune.choice([32, 48]),
        "depth": tune.randint(2, 4),  # upper bound exclusive: 2 or 3
        "width": tune.lograndint(64, 129),  # upper bound exclusive: 64..128
    }
