"""Does AutoML mode need LightGBM besides scikit-learn's HistGradientBoosting? The two side by side.

    pip install lightgbm             # (comes with the bench extra's FLAML)
    python benchmarks/boosted_trees.py

On the tables of benchmarks/automl_mode.py (the same 75% work rows, AutoML's preprocessing fitted in each fold):
5-fold cross-validated accuracy or R², and fit seconds per fold, of each library's defaults and of one tuned-ish
setting (learning rate 0.05, 300 rounds, leaves 15), both single-threaded as AutoML's trials are. Both are
histogram gradient boosting in LightGBM's manner; the question is whether the library adds accuracy or speed.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

from automl_mode import SEED, TABLES, TEST_FRACTION, load_table


def models(task: str) -> dict[str, Any]:
    import lightgbm
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    hgb = HistGradientBoostingClassifier if task == "classification" else HistGradientBoostingRegressor
    lgb = lightgbm.LGBMClassifier if task == "classification" else lightgbm.LGBMRegressor
    quiet = {"verbose": -1, "n_jobs": 1, "random_state": SEED}
    return {
        "HGB defaults": hgb(random_state=SEED),
        "LGBM defaults": lgb(**quiet),
        "HGB lr .05, 300, 15 leaves": hgb(learning_rate=0.05, max_iter=300, max_leaf_nodes=15, early_stopping=False,
                                          random_state=SEED),
        "LGBM lr .05, 300, 15 leaves": lgb(learning_rate=0.05, n_estimators=300, num_leaves=15, **quiet),
    }


def main() -> int:
    import numpy as np
    from sklearn.base import clone
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split
    from threadpoolctl import threadpool_limits

    from automl.data import infer_task, make_preprocessor, screen_columns

    warnings.filterwarnings("ignore")
    print("| table | " + " | ".join(models("classification")) + " |")
    print("|---|" + "---:|" * len(models("classification")))
    for name in TABLES:
        frame = load_table(name)
        task = infer_task(frame["target"])
        work, _ = train_test_split(frame, test_size=TEST_FRACTION, random_state=SEED,
                                   stratify=frame["target"] if task == "classification" else None)
        X = work.drop(columns=["target"])
        y_raw = work["target"]
        y = (np.unique(y_raw.astype(str), return_inverse=True)[1] if task == "classification"
             else y_raw.to_numpy(dtype=float))
        dropped, _ = screen_columns(X)
        splitter = (StratifiedKFold(5, shuffle=True, random_state=SEED) if task == "classification"
                    else KFold(5, shuffle=True, random_state=SEED))
        cells = []
        for model in models(task).values():
            scores, seconds = [], []
            for train, val in splitter.split(X, y):
                pre = make_preprocessor(X.iloc[train], drop=dropped)
                Xt = pre.fit_transform(X.iloc[train]).astype(np.float32)
                Xv = pre.transform(X.iloc[val]).astype(np.float32)
                m = clone(model)
                start = time.perf_counter()
                with threadpool_limits(1):
                    m.fit(Xt, y[train])
                seconds.append(time.perf_counter() - start)
                pred = m.predict(Xv)
                scores.append(accuracy_score(y[val], pred) if task == "classification" else r2_score(y[val], pred))
            cells.append(f"{np.mean(scores):.4f} ({np.mean(seconds):.2f} s)")
        print(f"| {name} ({len(work)}, {task[:5]}.) | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
