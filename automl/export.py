"""The best model out of a sweep: MLflow pyfunc logging, the registry's champion, export and predict."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.pyfunc import PythonModel

from automl.errors import ExportError

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

    from automl.data import PreparedData

MODEL_ARTIFACT = "best_model"
CHAMPION = "champion"
FORMATS = ("mlflow", "onnx", "torchscript")
_REQUIREMENTS = ("numpy", "pandas", "scikit-learn", "skops", "safetensors", "torch", "mlflow")


class AutoMLPyfunc(PythonModel):
    """The pyfunc face of a bundle: raw rows in, predictions out.

    ``params={"predict_method": "predict_proba"}`` returns one probability column per class instead.
    """

    # Skips MLflow's type-hint-based input validation (and its warning that predict() has no type hints):
    # the signature, inferred from the input example, already describes and checks the input.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from automl.bundle import ModelBundle

        self.bundle = ModelBundle(Path(context.artifacts["bundle"]))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if (params or {}).get("predict_method") == "predict_proba":
            proba = self.bundle.predict_proba(frame)
            return pd.DataFrame(proba, columns=[str(c) for c in self.bundle.classes])
        return self.bundle.predict(frame)


def _requirements() -> list[str]:
    reqs = []
    for name in _REQUIREMENTS:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")  # drop local tags such as +cpu
        except PackageNotFoundError:
            continue
    return reqs


def save_pyfunc_model(path: Path, bundle_dir: Path, prepared: PreparedData | None) -> Path:
    """Write an MLflow pyfunc model (models-from-code, signature, input example) at ``path``."""
    from mlflow.models import infer_signature

    from automl.bundle import ModelBundle

    signature = None
    example = None
    if prepared is not None:
        example = prepared.example
        predictions = ModelBundle(bundle_dir).predict(example)
        signature = infer_signature(example, predictions, params={"predict_method": "predict"})
    with warnings.catch_warnings():
        # MLflow nudges towards type hints on predict(); the signature above already describes the input.
        warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)
        _save(path, bundle_dir, signature, example)
    return path


def _save(path: Path, bundle_dir: Path, signature: Any, example: Any) -> None:
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(Path(__file__).with_name("_pyfunc_model.py")),
        artifacts={"bundle": str(bundle_dir)},
        signature=signature,
        input_example=example,
        pip_requirements=_requirements(),
    )


def log_pyfunc_model(client: MlflowClient, run_id: str, bundle_dir: Path, prepared: PreparedData | None) -> str:
    """Log the bundle as the run's ``best_model`` artifact; returns its ``runs:/`` URI."""
    with tempfile.TemporaryDirectory() as tmp:
        local = save_pyfunc_model(Path(tmp) / MODEL_ARTIFACT, bundle_dir, prepared)
        client.log_artifacts(run_id, str(local), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


def register_champion(
    client: MlflowClient, name: str, model_uri: str, *, run_id: str, metric: str, goal: str, value: float
) -> tuple[str, bool]:
    """Register a new version of ``name``; move the ``champion`` alias to it only if it beats the champion
    on the same metric (higher for maximize, lower for minimize; a champion scored on another metric is
    replaced). Returns the version and whether it became champion."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + model_uri.rsplit("/", 1)[-1]
    mv = client.create_model_version(
        name, source=source, run_id=run_id,
        tags={"automl.metric": metric, "automl.goal": goal, "automl.value": repr(value)},
    )
    promote = True
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is not None and current.tags.get("automl.metric") == metric:
        old = float(current.tags.get("automl.value", "nan"))
        if old == old:
            promote = value > old if goal == "maximize" else value < old
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return str(mv.version), promote


def export_model(model_uri: str, out: Path, *, format: str = "mlflow", tracking_uri: str | None = None) -> Path:
    """Write the model at ``model_uri`` (runs:/, models:/, or a local path) into ``out``."""
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)} (got {format!r})")
    if format != "mlflow":
        raise ExportError(f"--format {format} is not available yet; use --format mlflow")
    import mlflow.artifacts

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty; choose a new directory")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp,
                                                        tracking_uri=tracking_uri)
        except Exception as exc:
            raise ExportError(f"cannot fetch {model_uri}: {str(exc).splitlines()[0]}") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.copytree(local, out)
    return out


def load_model(model: str, tracking_uri: str | None = None) -> Any:
    """A pyfunc model from an exported directory, a ``runs:/`` or a ``models:/`` URI."""
    import mlflow
    import mlflow.pyfunc

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if "://" not in model and not Path(model, "MLmodel").is_file():
        raise ExportError(f"{model}: not an exported model directory (no MLmodel file) nor a model URI")
    try:
        return mlflow.pyfunc.load_model(model)
    except Exception as exc:
        raise ExportError(f"cannot load {model}: {str(exc).splitlines()[0]}") from None


def predict(model: str, frame: pd.DataFrame, tracking_uri: str | None = None) -> pd.DataFrame:
    """Predictions for raw rows; a ``prediction`` column appended to the input."""
    loaded = load_model(model, tracking_uri)
    try:
        predictions = loaded.predict(frame)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"prediction failed: {str(exc).strip().splitlines()[0]}") from None
    result = frame.copy()
    result["prediction"] = list(predictions)
    return result
