"""AutoML mode against scikit-learn's defaults, on scikit-learn's bundled datasets.

(Not named ``automl.py``: run as a script, a file of that name here would shadow the automl package for every
benchmark in this folder.)

    python benchmarks/automl_mode.py [--time 60s] [--datasets breast_cancer,wine,diabetes,digits] [--json PATH]

For each dataset:

1. 20% of the rows are held out as a **test** set (stratified for classification, seed 0) and never shown to
   AutoML; the other 80% are written to a CSV in a temp dir.
2. AutoML mode runs on that CSV exactly as ``automl run --data FILE --target target --time T`` would
   (``automl.quick.automl_spec`` then ``Sweep(...).run()``, 2 trials at a time, MLflow on SQLite in a temp dir):
   it splits off its own stratified 20% **validation** rows (seed 0), searches models and their
   hyperparameters under the time budget, and keeps the best trial's model.
3. scikit-learn's defaults are fitted on the same training rows, preprocessed the same way
   (``automl.data.prepare`` with the same spec and seed: the same split, imputer, scaler, one-hot encoder):
   ``HistGradientBoosting{Classifier,Regressor}(random_state=0)``, ``RandomForest{Classifier,Regressor}
   (random_state=0)``, and ``LogisticRegression(max_iter=1000)`` or ``Ridge()``.
4. Scores: accuracy (classification) or R² (regression), on the validation rows (AutoML's own ``val_*`` of its
   best trial; each default's score on the same rows) and on the held-out test rows (AutoML's exported best
   model, loaded back from MLflow, predicting raw test rows; each default on the same rows).

The validation score favours AutoML: it is the best of many trials scored on those rows, and a default is one
fit. The test score has no such bias; both are printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from overhead import machine, versions  # the same machine and version lines as the other benchmarks

DATASETS = ("breast_cancer", "wine", "diabetes", "digits")
CONCURRENCY = 2
SEED = 0


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "optuna", "ray", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


def defaults(task: str) -> dict[str, Any]:
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LogisticRegression, Ridge

    if task == "classification":
        return {"hist_gradient_boosting": HistGradientBoostingClassifier(random_state=SEED),
                "random_forest": RandomForestClassifier(random_state=SEED),
                "logistic_regression": LogisticRegression(max_iter=1000)}
    return {"hist_gradient_boosting": HistGradientBoostingRegressor(random_state=SEED),
            "random_forest": RandomForestRegressor(random_state=SEED),
            "ridge": Ridge()}


def score(task: str, y_true: Any, y_pred: Any) -> float:
    from sklearn.metrics import accuracy_score, r2_score

    if task == "classification":
        return float(accuracy_score(list(map(str, y_true)), list(map(str, y_pred))))
    return float(r2_score(y_true, y_pred))


def run_dataset(name: str, budget: str, root: Path) -> dict[str, Any]:
    import numpy as np
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    from automl.data import infer_task, prepare
    from automl.export import load_model
    from automl.orchestrator import Sweep
    from automl.quick import automl_spec
    from automl.spec import spec_from_dict

    frame = getattr(sklearn.datasets, f"load_{name}")(as_frame=True).frame
    task = infer_task(frame["target"])
    stratify = frame["target"] if task == "classification" else None
    work, test = train_test_split(frame, test_size=0.2, random_state=SEED, stratify=stratify)
    folder = root / name
    folder.mkdir()
    work.to_csv(folder / f"{name}.csv", index=False)

    raw = automl_spec(f"{name}.csv", "target", time=budget, seed=SEED, base_dir=folder)
    raw["budget"]["max_concurrent"] = CONCURRENCY
    spec = spec_from_dict(raw)
    start = time.perf_counter()
    result = Sweep(spec, base_dir=folder, workdir=folder).run()
    wall = time.perf_counter() - start
    best = result.best
    if best is None or best.model_uri is None:
        raise RuntimeError(f"{name}: AutoML finished no trial")
    model = load_model(best.model_uri, tracking_uri=result.tracking_uri)  # each dataset has its own store
    X_test, y_test = test.drop(columns=["target"]), test["target"].to_numpy()
    out: dict[str, Any] = {
        "dataset": name, "task": task, "rows": len(frame), "metric": spec.metric_name,
        "automl": {"val": best.value, "test": score(task, y_test, np.asarray(model.predict(X_test))),
                   "model": best.params.get("model"), "trials": len(result.trials), "wall_s": wall},
        "defaults": {},
    }
    assert spec.data is not None
    prepared = prepare(spec.data, base_dir=folder, seed=spec.seed)
    ds = prepared.dataset
    X_test_t = np.asarray(prepared.preprocessor.transform(X_test), dtype=np.float32)
    for label, estimator in defaults(task).items():
        estimator.fit(ds.X_train, ds.y_train)
        val_pred, test_pred = estimator.predict(ds.X_val), estimator.predict(X_test_t)
        if task == "classification":  # class indices -> the original labels
            classes = np.asarray(ds.classes, dtype=object)
            val_pred, test_pred = classes[val_pred], classes[test_pred]
            y_val = classes[ds.y_val]
        else:
            y_val = ds.y_val
        out["defaults"][label] = {"val": score(task, y_val, val_pred), "test": score(task, y_test, test_pred)}
    return out


def table(results: list[dict[str, Any]], budget: str) -> str:
    lines = [f"| dataset (rows, task) | metric | AutoML val (--time {budget}) | best default val | AutoML test | "
             "best default test | AutoML's best model (trials) | defaults val / test: HGB, RF, linear |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in results:
        d = r["defaults"]
        best_val = max(d.items(), key=lambda kv: kv[1]["val"])
        best_test = max(d.items(), key=lambda kv: kv[1]["test"])
        each = ", ".join(f"{v['val']:.4f} / {v['test']:.4f}" for v in d.values())
        a = r["automl"]
        lines.append(
            f"| {r['dataset']} ({r['rows']}, {r['task'][:5]}.) | {r['metric'].removeprefix('val_')} | "
            f"**{a['val']:.4f}** | {best_val[1]['val']:.4f} ({best_val[0]}) | **{a['test']:.4f}** | "
            f"{best_test[1]['test']:.4f} ({best_test[0]}) | {a['model']} ({a['trials']}) | {each} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", default="60s", help="AutoML's time budget per dataset (default: %(default)s)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the raw figures to PATH")
    args = parser.parse_args(argv)
    _quiet()
    import ray

    started = time.perf_counter()
    ray.init(address="local", num_cpus=CONCURRENCY, include_dashboard=False, logging_level=logging.ERROR)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-automl-") as tmp:
        for name in args.datasets.split(","):
            results.append(run_dataset(name.strip(), args.time, Path(tmp)))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    ray.shutdown()
    command = "python benchmarks/automl_mode.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                if (argv or sys.argv[1:]) else "")
    print(table(results, args.time))
    print()
    print(f"`{command}` on {machine()}; " + ", ".join(f"{k} {v}" for k, v in versions().items())
          + f"; {CONCURRENCY} concurrent trials. Total {time.perf_counter() - started:.0f} s.")
    lost = [r["dataset"] for r in results
            if r["automl"]["val"] < max(v["val"] for v in r["defaults"].values())]
    print("AutoML's validation score is at least the best default's on every dataset." if not lost else
          f"AutoML's validation score is below the best default's on: {', '.join(lost)}.")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
