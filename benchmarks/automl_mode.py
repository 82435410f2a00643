"""AutoML mode against FLAML's AutoML and scikit-learn's defaults, scored on held-out test rows none of them sees.

(Not named ``automl.py``: run as a script, a file of that name here would shadow the automl package for every
benchmark in this folder.)

    pip install -e .[bench]          # FLAML, a benchmark-only dependency
    python benchmarks/automl_mode.py [--time 30s] [--tables breast_cancer,...] [--json PATH]

Tables: scikit-learn's bundled breast_cancer, wine, diabetes and digits, and three messy tables this script
generates with a fixed seed (nothing is downloaded): ``churn`` (2,000 rows, classification) and ``loans`` (8,000
rows, classification: above AutoML mode's small-table threshold, so one validation split) and ``houses`` (1,500
rows, regression). They have missing values, categorical columns (one of 120 values), a customer/listing ID, a row
number, a person's name and a free-text comment.

For each table:

1. 25% of the rows are held out as **test** rows (stratified for classification, seed 0), never shown to any tool;
   the other 75% are the **work** rows, written to a CSV.
2. AutoML mode runs on that CSV as ``automl run --data FILE --target target --time T`` does
   (``automl.quick.automl_spec``, then ``Sweep(..., deadline=start + T).run()``: 2 trials at a time, the finishing
   step inside the budget, MLflow on SQLite in a temp dir); its logged model (refit, or ensemble) is loaded back
   from MLflow and predicts the raw test rows.
3. FLAML: ``flaml.AutoML().fit(work_X, work_y, task=..., time_budget=T, metric="accuracy"|"r2", n_jobs=2,
   seed=0)`` on the raw work rows (pandas frame; FLAML encodes text columns itself), predicting the raw test rows.
4. scikit-learn's defaults, fitted on all work rows with AutoML's preprocessing (``automl.data.prepare_all_rows``:
   imputer, scaler, one-hot encoder, the same columns left out): ``HistGradientBoosting``, ``RandomForest``
   (``random_state=0``) and ``LogisticRegression(max_iter=1000)`` or ``Ridge()``.

Scores: accuracy (classification) or R² (regression) on the test rows. AutoML's own estimate (its held-out
out-of-fold score, automl.final_model) is printed beside its test score. The ± beside each difference is its paired
bootstrap standard error over the test rows (1000 resamples, both models scored on the same resample): a difference
within about 2 SE is what the sampling of a few hundred test rows explains, not a better model.
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

BUNDLED = ("breast_cancer", "wine", "diabetes", "digits")
GENERATED = ("churn", "loans", "houses")
TABLES = BUNDLED + GENERATED
CONCURRENCY = 2
SEED = 0
TEST_FRACTION = 0.25


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "optuna", "ray", "alembic", "flaml", "flaml.automl.logger"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


# --------------------------------------------------------------------------------------------- tables

_FIRST = ["Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Lena", "Marc", "Nora",
          "Oscar", "Paula", "Quentin", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yara", "Zoe"]
_LAST = ["Smith", "Jones", "Brown", "Garcia", "Miller", "Davis", "Martin", "Lopez", "Wilson", "Moore", "Taylor",
         "Thomas", "White", "Harris", "Clark", "Lewis", "Walker", "Hall", "Young", "King", "Wright", "Scott"]
_FILLER = ["the", "service", "was", "my", "account", "and", "I", "called", "about", "bill", "plan", "again", "today",
           "phone", "app", "internet", "it", "they", "said", "would", "check", "order", "with", "for"]


def _names(rng: Any, rows: int) -> list[str]:
    titles = rng.choice(["Mr.", "Mrs.", "Ms.", "Dr."], rows)
    return [f"{rng.choice(_LAST)}, {t} {rng.choice(_FIRST)} {rng.choice(_FIRST)[0]}." for t in titles]


def _comments(rng: Any, rows: int, tone: Any) -> list[str]:
    """Free text: filler words, with a few words that lean with ``tone`` (-1..1)."""
    good, bad = ["great", "happy", "thanks", "quick", "helpful"], ["angry", "slow", "cancel", "worst", "refund"]
    out = []
    for t in tone:
        words = list(rng.choice(_FILLER, rng.integers(5, 14)))
        if rng.random() < 0.5:
            words.insert(int(rng.integers(0, len(words))), str(rng.choice(bad if t + rng.normal(0, 0.7) > 0 else good)))
        out.append(" ".join(words))
    return out


def _holes(rng: Any, frame: Any, columns: dict[str, float]) -> None:
    import numpy as np

    for column, share in columns.items():
        frame.loc[rng.random(len(frame)) < share, column] = np.nan if frame[column].dtype.kind == "f" else None


def _customers(rows: int, seed: int) -> Any:
    """Shared by churn and loans: a customer table with an ID, a row number, a name and a comment."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "row": np.arange(1, rows + 1),
        "customer_id": rng.choice(10**7, rows, replace=False) + 10**6,
        "name": _names(rng, rows),
        "age": rng.normal(45, 15, rows).clip(18, 90).round(),
        "tenure_months": rng.integers(1, 72, rows).astype(float),
        "monthly_charge": rng.normal(70, 25, rows).clip(10, None).round(2),
        "contract": rng.choice(["month-to-month", "one year", "two years"], rows, p=[0.55, 0.25, 0.2]),
        "payment": rng.choice(["card", "bank transfer", "check", "wallet"], rows),
        "city": rng.choice([f"city_{i:03d}" for i in range(120)], rows),
        "support_calls": rng.poisson(1.5, rows).astype(float),
    })
    return frame, rng


def churn_table(seed: int = SEED, rows: int = 2000) -> Any:
    import numpy as np

    frame, rng = _customers(rows, seed)
    month = (frame["contract"] == "month-to-month").to_numpy()
    young_check = ((frame["age"] < 32) & (frame["payment"] == "check")).to_numpy()
    logit = (-1.0 + 1.4 * month - 0.045 * frame["tenure_months"] + 0.025 * (frame["monthly_charge"] - 70)
             + 0.45 * frame["support_calls"] + 1.3 * young_check
             + 0.6 * np.sin(frame["age"].to_numpy() / 6.0)).to_numpy()
    frame["comment"] = _comments(rng, rows, np.tanh(logit / 2))
    frame["target"] = np.where(rng.random(rows) < 1 / (1 + np.exp(-logit)), "churned", "stayed")
    _holes(rng, frame, {"age": 0.1, "monthly_charge": 0.08, "contract": 0.05, "payment": 0.05, "city": 0.03})
    return frame


def loans_table(seed: int = SEED + 1, rows: int = 8000) -> Any:
    import numpy as np

    frame, rng = _customers(rows, seed)
    income = rng.lognormal(10.6, 0.5, rows)
    amount = rng.lognormal(9.3, 0.7, rows)
    frame["income"] = income.round(-2)
    frame["loan_amount"] = amount.round(-2)
    frame["purpose"] = rng.choice(["car", "home", "education", "business", "other"], rows)
    ratio = amount / income
    logit = (-2.0 + 6.0 * ratio + 0.35 * frame["support_calls"].to_numpy() - 0.02 * frame["tenure_months"].to_numpy()
             + 1.2 * (frame["purpose"] == "business").to_numpy() * (ratio > 0.25)
             + 0.8 * (frame["contract"] == "month-to-month").to_numpy())
    frame["comment"] = _comments(rng, rows, np.tanh(logit / 2))
    frame["target"] = np.where(rng.random(rows) < 1 / (1 + np.exp(-logit)), "default", "repaid")
    _holes(rng, frame, {"income": 0.1, "age": 0.05, "purpose": 0.05, "city": 0.03})
    return frame


def houses_table(seed: int = SEED + 2, rows: int = 1500) -> Any:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    hoods = [f"hood_{i:02d}" for i in range(25)]
    hood_value = dict(zip(hoods, rng.normal(0, 0.25, len(hoods)), strict=True))
    frame = pd.DataFrame({
        "row": np.arange(1, rows + 1),
        "listing_id": rng.choice(10**8, rows, replace=False),
        "agent": _names(rng, rows),
        "area_m2": rng.lognormal(4.5, 0.35, rows).round(),
        "rooms": rng.integers(1, 8, rows).astype(float),
        "year_built": rng.integers(1900, 2024, rows).astype(float),
        "neighbourhood": rng.choice(hoods, rows),
        "condition": rng.choice(["poor", "fair", "good", "excellent"], rows, p=[0.1, 0.3, 0.45, 0.15]),
        "distance_km": rng.gamma(2.0, 3.0, rows).round(1),
        "garage": rng.choice(["yes", "no"], rows),
    })
    cond = frame["condition"].map({"poor": -0.25, "fair": -0.05, "good": 0.05, "excellent": 0.2}).to_numpy()
    log_price = (11.0 + 0.9 * np.log(frame["area_m2"].to_numpy()) + 0.03 * frame["rooms"].to_numpy()
                 + frame["neighbourhood"].map(hood_value).to_numpy() + cond
                 - 0.25 * np.log1p(frame["distance_km"].to_numpy())
                 + 0.15 * ((frame["year_built"].to_numpy() > 2000) | (frame["year_built"].to_numpy() < 1930))
                 + 0.08 * (frame["garage"] == "yes").to_numpy() + rng.normal(0, 0.12, rows))
    frame["description"] = _comments(rng, rows, np.tanh(cond * 4))
    frame["target"] = (np.exp(log_price) / 1000).round(1)  # thousands
    _holes(rng, frame, {"area_m2": 0.05, "year_built": 0.08, "condition": 0.05, "garage": 0.1})
    return frame


def load_table(name: str) -> Any:
    if name in GENERATED:
        return {"churn": churn_table, "loans": loans_table, "houses": houses_table}[name]()
    import sklearn.datasets

    return getattr(sklearn.datasets, f"load_{name}")(as_frame=True).frame


# --------------------------------------------------------------------------------------------- the tools


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


def run_automl(folder: Path, name: str, task: str, budget: str, test: Any) -> dict[str, Any]:
    import numpy as np

    from automl.export import load_model
    from automl.orchestrator import Sweep
    from automl.quick import automl_spec
    from automl.spec import spec_from_dict

    start = time.time()
    raw = automl_spec(f"{name}.csv", "target", time=budget, seed=SEED, base_dir=folder)
    raw["budget"]["max_concurrent"] = CONCURRENCY
    spec = spec_from_dict(raw)
    assert spec.budget.time is not None
    result = Sweep(spec, base_dir=folder, workdir=folder, deadline=start + spec.budget.time).run()
    wall = time.time() - start
    best = result.best
    if best is None or best.model_uri is None:
        raise RuntimeError(f"{name}: AutoML finished no trial")
    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id or "")
    final = parent.data.tags.get("automl.final", "best trial")
    members = json.loads(parent.data.tags.get("automl.final.members", "[]"))
    model = load_model(best.model_uri, tracking_uri=result.tracking_uri)  # each table has its own store
    X_test, y_test = test.drop(columns=["target"]), test["target"].to_numpy()
    pred = np.asarray(model.predict(X_test))
    PREDICTIONS["automl"] = pred
    return {"val": best.value, "held_out": parent.data.metrics.get(f"final.held_out_{spec.metric_name}"),
            "test": score(task, y_test, pred),
            "model": best.params.get("model"), "final": final,
            "members": [f"{m['model']}:{m['weight']:.2f}" for m in members], "trials": len(result.trials),
            "folds": spec.data.validation.folds if spec.data else None, "wall_s": wall}


def run_flaml(task: str, seconds: float, work: Any, test: Any) -> dict[str, Any]:
    import numpy as np
    from flaml import AutoML

    automl = AutoML()
    start = time.time()
    automl.fit(X_train=work.drop(columns=["target"]), y_train=work["target"], task=task, time_budget=seconds,
               metric="accuracy" if task == "classification" else "r2", n_jobs=CONCURRENCY, seed=SEED, verbose=0)
    wall = time.time() - start
    pred = np.asarray(automl.predict(test.drop(columns=["target"])))
    PREDICTIONS["flaml"] = pred
    return {"test": score(task, test["target"].to_numpy(), np.asarray(pred)), "model": automl.best_estimator,
            "wall_s": wall}


def run_defaults(folder: Path, name: str, task: str, test: Any) -> dict[str, Any]:
    import numpy as np

    from automl.data import prepare_all_rows
    from automl.spec import DataSpec

    data, pre = prepare_all_rows(DataSpec(source=f"{name}.csv", target="target", task=task), base_dir=folder,
                                 seed=SEED)
    X_test = np.asarray(pre.transform(test.drop(columns=["target"])), dtype=np.float32)
    out = {}
    for label, estimator in defaults(task).items():
        estimator.fit(data.X_train, data.y_train)
        pred = estimator.predict(X_test)
        if task == "classification":  # class indices -> the original labels
            pred = np.asarray(data.classes, dtype=object)[pred]
        out[label] = score(task, test["target"].to_numpy(), pred)
        PREDICTIONS[label] = pred
    return out


# Test predictions of the table being run, by tool (and default), for the paired bootstrap.
PREDICTIONS: dict[str, Any] = {}
BOOTSTRAP = 1000


def bootstrap_se(task: str, y: Any, a: Any, b: Any) -> float:
    """The standard error of score(a) - score(b) over test rows resampled with replacement (paired: the same
    resample for both), i.e. how much of a difference the test rows' own sampling explains."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    y, a, b = np.asarray(y), np.asarray(a), np.asarray(b)
    diffs = []
    for _ in range(BOOTSTRAP):
        idx = rng.integers(0, len(y), len(y))
        diffs.append(score(task, y[idx], a[idx]) - score(task, y[idx], b[idx]))
    return float(np.std(diffs))


def run_table(name: str, budget: str, root: Path, tools: set[str]) -> dict[str, Any]:
    from sklearn.model_selection import train_test_split

    from automl.data import infer_task
    from automl.spec import parse_duration

    frame = load_table(name)
    task = infer_task(frame["target"])
    stratify = frame["target"] if task == "classification" else None
    work, test = train_test_split(frame, test_size=TEST_FRACTION, random_state=SEED, stratify=stratify)
    folder = root / name
    folder.mkdir()
    work.to_csv(folder / f"{name}.csv", index=False)
    work = work.reset_index(drop=True)
    out: dict[str, Any] = {"table": name, "task": task, "rows": len(frame), "columns": frame.shape[1] - 1,
                           "metric": "accuracy" if task == "classification" else "r2"}
    if "automl" in tools:
        out["automl"] = run_automl(folder, name, task, budget, test)
    if "flaml" in tools:
        out["flaml"] = run_flaml(task, float(parse_duration(budget) or 0), work, test)
    out["defaults"] = run_defaults(folder, name, task, test)
    if "automl" in out:
        y = test["target"].to_numpy()
        best_default = max(out["defaults"], key=out["defaults"].get)
        rivals = {"flaml": "flaml", "default": best_default} if "flaml" in out else {"default": best_default}
        out["se_vs"] = {who: bootstrap_se(task, y, PREDICTIONS["automl"], PREDICTIONS[key])
                        for who, key in rivals.items()}
    PREDICTIONS.clear()
    return out


# --------------------------------------------------------------------------------------------- the report


def table(results: list[dict[str, Any]], budget: str) -> str:
    lines = [f"| table (rows, task) | metric | AutoML test (--time {budget}) | FLAML test | best default test | "
             "AutoML - FLAML (± SE) | AutoML - best default (± SE) | AutoML's estimate | "
             "AutoML's final model (trials, validation) | FLAML's model | defaults: HGB, RF, linear |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in results:
        d = r["defaults"]
        best = max(d.items(), key=lambda kv: kv[1])
        a, f = r.get("automl"), r.get("flaml")
        a_test = f"**{a['test']:.4f}**" if a else "-"
        estimate = f"{a['held_out']:.4f}" if a and a.get("held_out") is not None else "-"
        final = "-"
        if a:
            kind = a["final"] if a["final"] != "refit" else f"refit {a['model']}"
            if a["final"] == "ensemble":
                kind = "ensemble " + " + ".join(a["members"])
            scheme = f"{a['folds']}-fold" if a["folds"] else "20% split"
            final = f"{kind} ({a['trials']}, {scheme})"
        f_test = f"{f['test']:.4f}" if f else "-"
        se = r.get("se_vs", {})
        vs_flaml = f"{a['test'] - f['test']:+.4f} ± {se['flaml']:.4f}" if a and f and "flaml" in se else "-"
        vs_default = f"{a['test'] - best[1]:+.4f} ± {se['default']:.4f}" if a and "default" in se else "-"
        lines.append(
            f"| {r['table']} ({r['rows']}, {r['task'][:5]}.) | {r['metric']} | {a_test} | {f_test} | "
            f"{best[1]:.4f} ({best[0]}) | {vs_flaml} | {vs_default} | {estimate} | {final} | "
            f"{f['model'] if f else '-'} | {', '.join(f'{v:.4f}' for v in d.values())} |"
        )
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> str:
    lost = []
    for r in results:
        a = r.get("automl")
        if a is None:
            continue
        rivals = {"FLAML": r["flaml"]["test"]} if r.get("flaml") else {}
        rivals["the best default"] = max(r["defaults"].values())
        se = r.get("se_vs", {})
        ses = {"FLAML": se.get("flaml"), "the best default": se.get("default")}
        behind = [f"{who} by {v - a['test']:.4f}" + (f" ({(v - a['test']) / ses[who]:.1f} SE)" if ses[who] else "")
                  for who, v in rivals.items() if a["test"] < v]
        if behind:
            lost.append(f"{r['table']} ({', '.join(behind)})")
    return ("AutoML's test score is at least FLAML's and the best default's on every table." if not lost else
            f"AutoML's test score is below a rival's on: {'; '.join(lost)}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--time", default="30s", help="each tool's time budget per table (default: %(default)s)")
    parser.add_argument("--tables", default=",".join(TABLES))
    parser.add_argument("--tools", default="automl,flaml", help="automl, flaml or both (defaults always run)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the raw figures to PATH")
    args = parser.parse_args(argv)
    _quiet()
    import ray

    tools = set(args.tools.split(","))
    started = time.perf_counter()
    ray.init(address="local", num_cpus=CONCURRENCY, include_dashboard=False, logging_level=logging.ERROR)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-automl-") as tmp:
        for name in args.tables.split(","):
            results.append(run_table(name.strip(), args.time, Path(tmp), tools))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    ray.shutdown()
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/automl_mode.py" + (" " + " ".join(given) if given else "")
    print(table(results, args.time))
    print()
    import flaml

    print(f"`{command}` on {machine()}; " + ", ".join(f"{k} {v}" for k, v in versions().items())
          + f", flaml {flaml.__version__}; {CONCURRENCY} concurrent trials (FLAML n_jobs={CONCURRENCY}). "
          f"Total {time.perf_counter() - started:.0f} s.")
    print(verdict(results))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
