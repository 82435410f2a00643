"""Search quality with trials in flight: automl's ``bayesian`` at 1, 2 and 4 concurrent trials against plain Optuna.

    python benchmarks/search_quality.py                    # 5 seeds, 60 trials, 3 functions (about 20 min)
    python benchmarks/search_quality.py --seeds 9 --json /tmp/sq.json
    python benchmarks/search_quality.py --functions branin --seeds 3 --trials 30   # a quick look

Each run proposes ``--trials`` configurations for one objective and records the best value found. The runners:

- ``automl bayesian @q`` (q = 1, 2, 4): the sampler automl builds for ``method: bayesian`` on the spec's space
  (``automl.samplers.make_sampler``, the call the engine makes) asked through the spec's ``SearchSpace.suggest``,
  with ``q`` trials in flight: the first ``q`` are asked at once, then each time the oldest trial ends (all trials
  take equal time) it is told and one more is asked. The engine does exactly this with a worker pool: a trial is
  asked, its parameters suggested and it is launched before the next ask, so the trials still running are RUNNING
  trials of the study when the sampler proposes the next one. ``q = 1`` is sequential.
- ``optuna GP``, ``optuna TPE``, ``random``: plain Optuna's ``GPSampler``, ``TPESampler`` (its defaults) and
  ``RandomSampler`` run sequentially with ``study.optimize`` over the same space, the same number of trials.

The target (issue #16): ``bayesian`` with 2 and 4 in flight within 0.5% of sequential GP's median on every
function. The gap is ``(median(q) - median(GP)) / |median(GP)|`` for minimised objectives, printed per function.

Objectives (all minimised):

- ``hartmann6``: 6 floats in [0, 1]; optimum -3.32237.
- ``hartmann3``: 3 floats in [0, 1]; optimum -3.86278.
- ``branin``: x1 in [-5, 10], x2 in [0, 15]; optimum 0.397887.
- ``svr_diabetes``: a real training objective, the validation RMSE of scikit-learn's ``SVR`` on the bundled
  diabetes table (a fixed 75/25 split, standardised features) over ``C``, ``gamma`` and ``epsilon`` on log scales.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

TRIALS = 60
CONCURRENCY = (1, 2, 4)

# ------------------------------------------------------------------------------------------- objectives

_H6_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14],
                  [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
_H6_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                         [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])
_H3_A = np.array([[3.0, 10, 30], [0.1, 10, 35], [3.0, 10, 30], [0.1, 10, 35]])
_H3_P = 1e-4 * np.array([[3689, 1170, 2673], [4699, 4387, 7470], [1091, 8732, 5547], [381, 5743, 8828]])
_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann(x: np.ndarray, a: np.ndarray, p: np.ndarray) -> float:
    return float(-np.sum(_ALPHA * np.exp(-np.sum(a * (x - p) ** 2, axis=1))))


def branin(x1: float, x2: float) -> float:
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


@lru_cache(maxsize=1)
def _diabetes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_diabetes(return_X_y=True)
    X_tr, X_va, y_tr, y_va = train_test_split(X, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(X_tr)
    return scaler.transform(X_tr), scaler.transform(X_va), y_tr, y_va


def svr_diabetes(C: float, gamma: float, epsilon: float) -> float:
    from sklearn.svm import SVR

    X_tr, X_va, y_tr, y_va = _diabetes()
    pred = SVR(C=C, gamma=gamma, epsilon=epsilon).fit(X_tr, y_tr).predict(X_va)
    return float(np.sqrt(np.mean((pred - y_va) ** 2)))


def _unit(names: list[str]) -> dict[str, Any]:
    return {n: {"type": "float", "low": 0.0, "high": 1.0} for n in names}


# name -> (automl parameters, objective of the parameter dict, known optimum or None)
FUNCTIONS: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], float], float | None]] = {
    "hartmann6": (_unit([f"x{i}" for i in range(6)]),
                  lambda p: hartmann(np.array([p[f"x{i}"] for i in range(6)]), _H6_A, _H6_P), -3.32237),
    "hartmann3": (_unit([f"x{i}" for i in range(3)]),
                  lambda p: hartmann(np.array([p[f"x{i}"] for i in range(3)]), _H3_A, _H3_P), -3.86278),
    "branin": ({"x1": {"type": "float", "low": -5.0, "high": 10.0}, "x2": {"type": "float", "low": 0.0, "high": 15.0}},
               lambda p: branin(p["x1"], p["x2"]), 0.397887),
    "svr_diabetes": ({"C": {"type": "float", "low": 1e-1, "high": 1e3, "log": True},
                      "gamma": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
                      "epsilon": {"type": "float", "low": 1e-2, "high": 1e2, "log": True}},
                     lambda p: svr_diabetes(p["C"], p["gamma"], p["epsilon"]), None),
}


# --------------------------------------------------------------------------------------------- runners


def _plan(parameters: dict[str, Any], seed: int, trials: int, q: int) -> Any:
    from automl.orchestrator import Sweep

    spec = {"name": "search-quality", "trainer": "objectives:trivial", "metric": {"name": "value", "goal": "minimize"},
            "method": "bayesian", "seed": seed, "budget": {"trials": trials, "max_concurrent": q},
            "parameters": parameters}
    return Sweep.from_dict(spec, base_dir=_here())


def _here() -> Any:
    from pathlib import Path

    return Path(__file__).resolve().parent


def run_automl(name: str, seed: int, trials: int, q: int) -> tuple[float, str]:
    """automl's ``bayesian`` sampler with ``q`` trials in flight; returns (best value, sampler class)."""
    import optuna

    from automl.samplers import make_sampler

    parameters, objective, _ = FUNCTIONS[name]
    plan = _plan(parameters, seed, trials, q)
    sampler = make_sampler("bayesian", plan.space, seed, trials=trials)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    in_flight: list[tuple[optuna.Trial, dict[str, Any]]] = []
    asked = 0
    while asked < trials or in_flight:
        while asked < trials and len(in_flight) < q:
            trial = study.ask()
            in_flight.append((trial, plan.space.suggest(trial)))
            asked += 1
        trial, params = in_flight.pop(0)  # equal trial times: the oldest ends first
        study.tell(trial, objective(params))
    return study.best_value, type(sampler).__name__


def evaluate(params: dict[str, Any], data: Any, report: Callable[[int, dict[str, float]], None]) -> None:
    """automl trainer for ``--engine``: one function's value after ``seconds`` of (slept) training."""
    params = dict(params)
    name, seconds = params.pop("function"), params.pop("seconds")
    time.sleep(seconds)
    report(1, {"value": FUNCTIONS[name][1](params)})


def run_engine(name: str, seed: int, trials: int, q: int, seconds: float) -> float:
    """The same search through automl's own engine: its sweep loop, its journal and ``q`` trial threads of the
    in-process executor (the worker code the Ray actors run), each trial taking ``seconds``."""
    import tempfile
    from pathlib import Path

    from automl.engine import Engine
    from automl.orchestrator import Sweep
    from automl.testing import InProcessExecutor, MemoryRecorder

    parameters, _, _ = FUNCTIONS[name]
    spec = {"name": f"sq-{name}", "trainer": "search_quality:evaluate", "metric": {"name": "value", "goal": "minimize"},
            "method": "bayesian", "seed": seed, "budget": {"trials": trials, "max_concurrent": q},
            "fixed": {"function": name, "seconds": seconds}, "parameters": parameters}
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(executor=InProcessExecutor(slots=q), recorder=MemoryRecorder(), workdir=Path(tmp))
        try:
            result = engine.run(Sweep.from_dict(spec, base_dir=_here(), workdir=Path(tmp)))
        finally:
            engine.shutdown()
    if result.best is None or result.best.value is None:
        raise RuntimeError(f"{name}: the engine's sweep found no best trial")
    return float(result.best.value)


def run_plain(name: str, seed: int, trials: int, kind: str) -> float:
    import optuna

    parameters, objective, _ = FUNCTIONS[name]
    sampler = {"gp": lambda: optuna.samplers.GPSampler(seed=seed),
               "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=seed)}[kind]()
    space = _plan(parameters, seed, trials, 1).space
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(lambda t: objective(space.suggest(t)), n_trials=trials)
    return study.best_value


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    import optuna

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--functions", nargs="*", default=["hartmann6", "branin", "svr_diabetes"],
                        choices=list(FUNCTIONS))
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..N (default 5)")
    parser.add_argument("--trials", type=int, default=TRIALS)
    parser.add_argument("--json", help="write every run's result here")
    parser.add_argument("--engine", type=float, metavar="SECONDS", default=None,
                        help="also run bayesian at 2 and 4 in flight through automl's engine (in-process executor), "
                             "each trial taking SECONDS")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sys.path.insert(0, str(_here()))

    runners: dict[str, Callable[[str, int], float]] = {}
    for q in CONCURRENCY:
        runners[f"automl bayesian @{q}"] = lambda f, s, q=q: run_automl(f, s, args.trials, q)[0]
    if args.engine is not None:
        for q in CONCURRENCY[1:]:
            runners[f"engine @{q}"] = lambda f, s, q=q: run_engine(f, s, args.trials, q, args.engine)
    for kind, label in (("gp", "optuna GP"), ("tpe", "optuna TPE"), ("random", "random")):
        runners[label] = lambda f, s, kind=kind: run_plain(f, s, args.trials, kind)

    rows: list[dict[str, Any]] = []
    table: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for name in args.functions:
        table[name] = {}
        for label, runner in runners.items():
            values, seconds = [], []
            for seed in range(1, args.seeds + 1):
                t0 = time.perf_counter()
                values.append(runner(name, seed))
                seconds.append(time.perf_counter() - t0)
            median = statistics.median(values)
            table[name][label] = median
            row = {"function": name, "runner": label, "median": median, "values": values,
                   "seconds_median": statistics.median(seconds)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    labels = list(runners)
    print("| function (optimum) | " + " | ".join(labels) + " | gap @2 | gap @4 |")
    print("|---|" + "---:|" * (len(labels) + 2))
    worst = 0.0
    for name, medians in table.items():
        optimum = FUNCTIONS[name][2]
        gp = medians["optuna GP"]
        gaps = [(medians[f"automl bayesian @{q}"] - gp) / abs(gp) for q in (2, 4)]
        worst = max(worst, *gaps)
        head = f"{name} ({optimum})" if optimum is not None else name
        cells = " | ".join(f"{medians[label]:.4f}" for label in labels)
        print(f"| {head} | {cells} | {gaps[0]:+.2%} | {gaps[1]:+.2%} |")
    seq_sampler = run_automl(args.functions[0], 1, 2, 1)[1]
    print(f"\nMedian best value over seeds 1-{args.seeds}, {args.trials} trials each (lower is better); gap: "
          f"automl bayesian at 2 and 4 in flight against sequential optuna GP (positive: worse). "
          f"`bayesian` ran {seq_sampler}. Target: every gap at most +0.50%; worst {worst:+.2%} "
          f"({'met' if worst <= 0.005 else 'missed'}).")
    print(f"`python benchmarks/search_quality.py --seeds {args.seeds} --trials {args.trials}` on "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, optuna "
          f"{optuna.__version__}; {time.perf_counter() - started:.0f} s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
