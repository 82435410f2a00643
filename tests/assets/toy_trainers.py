"""Small trainers for tests: fast (no torch), deterministic, and covering the trainer contract's shapes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from automl.trainer import SavableModel


def quadratic(params: dict[str, Any], data: Any, report: Any) -> Any:
    """A benchmark function with epochs: the score improves per epoch, best near x = 0.3. With ``model: true`` it
    returns a tiny exportable model (a constant) that remembers its configuration."""
    x = float(params["x"])
    bonus = {"a": 0.0, "b": 0.05, "c": 0.1}.get(str(params.get("kind", "a")), 0.0)
    for step in range(1, int(params.get("epochs", 3)) + 1):
        time.sleep(float(params.get("sleep", 0.0)))
        report(step, {"score": -((x - 0.3) ** 2) + bonus + 0.01 * step})
    return Constant(x) if params.get("model") else None


class Constant(SavableModel):
    """Predicts one number for every row (the ``x`` of the trial that trained it)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def predict(self, X: Any) -> Any:
        import numpy as np

        return np.full(len(X), self.value)

    def save(self, path: Path) -> None:
        (path / "constant.json").write_text(json.dumps({"value": self.value}))

    @classmethod
    def load(cls, path: Path) -> Constant:
        return cls(json.loads((path / "constant.json").read_text())["value"])


def flaky(params: dict[str, Any], data: Any, report: Any) -> None:
    """Fails for x > 0.5 (an exception), returns NaN for x < 0.1, and works otherwise."""
    x = float(params["x"])
    report(1, {"score": x})
    if x > 0.5:
        raise ValueError(f"x={x:.3f} is too large for this trainer")
    report(2, {"score": math.nan if x < 0.1 else x})


class LogisticFitter:
    """A class-shaped trainer (fit method) that returns a scikit-learn model (exported with skops)."""

    def fit(self, params: dict[str, Any], data: Any, report: Any) -> Any:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=float(params["C"]), max_iter=200)
        model.fit(data.X_train, data.y_train)
        proba = model.predict_proba(data.X_val)
        report(1, data.evaluate(proba.argmax(axis=1), proba=proba))
        return model


def two_scores(params: dict[str, Any], data: Any, report: Any) -> None:
    """Two conflicting objectives over x in [0, 1]: accuracy-like x, cost-like x squared."""
    x = float(params["x"])
    report(1, {"gain": x, "cost": x * x + 0.1 * float(params.get("y", 0.0))})


def dies_once(params: dict[str, Any], data: Any, report: Any) -> None:
    """Kills its own Ray worker process (SIGKILL, by PID) the first time it sees a marker-less trial."""
    import os
    import signal
    from pathlib import Path

    marker = Path(str(params["marker_dir"])) / f"trial-{float(params['x']):.6f}"
    report(1, {"score": float(params["x"])})
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    report(2, {"score": float(params["x"])})


def never_reports(params: dict[str, Any], data: Any, report: Any) -> None:
    """Hangs without reporting when x > 0.5 (a trainer stuck in a loop); quick otherwise."""
    if float(params["x"]) > 0.5:
        time.sleep(60)
    report(1, {"score": float(params["x"])})


def gpu_probe(params: dict[str, Any], data: Any, report: Any) -> None:
    """Asks automl for its device (the GPU Ray assigned, or the CPU fallback) and holds it for a while."""
    from automl.trainer import device

    start = time.time()
    dev = device()
    time.sleep(float(params.get("hold", 1.5)))
    report(1, {"score": float(params["x"]), "start": start, "end": time.time(), "cuda": float(dev.type == "cuda")})
