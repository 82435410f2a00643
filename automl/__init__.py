"""automl: declarative hyperparameter search on Optuna, Ray and MLflow.

    from automl import Sweep
    result = Sweep.from_yaml("search_spaces/digits_mlp.yaml").run()
    result.best.params, result.best.metrics, result.best.model_uri
    result.export("best/", format="mlflow")

    from automl import Client                   # a sweep on the automl service (`automl serve`)
    sweep = Client("http://127.0.0.1:8765").submit("search_spaces/digits_mlp.yaml")
    sweep.wait(), sweep.leaderboard()

Heavy libraries (torch, ray, mlflow) are imported only when a sweep runs, so the CLI answers fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from automl.errors import (
    AutoMLError,
    DataError,
    ExportError,
    ServiceError,
    SpecError,
    SweepNotFoundError,
    TrainerError,
)

__version__ = "0.1.0"
__all__ = [
    "AutoMLError",
    "Client",
    "DataError",
    "ExportError",
    "ServiceError",
    "SpecError",
    "Sweep",
    "SweepNotFoundError",
    "SweepResult",
    "TrainerError",
    "__version__",
]

if TYPE_CHECKING:
    from automl.client import Client
    from automl.orchestrator import Sweep, SweepResult


def __getattr__(name: str) -> Any:
    if name in ("Sweep", "SweepResult"):
        from automl import orchestrator

        return getattr(orchestrator, name)
    if name == "Client":  # requests is imported only by those who talk to a service
        from automl.client import Client

        return Client
    raise AttributeError(f"module 'automl' has no attribute {name!r}")
