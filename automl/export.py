"""The best model out of a sweep: MLflow pyfunc logging, the registry's champion, export and predict."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
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


def save_pyfunc_model(path: Path, bundle_dir: Path, prepared: PreparedData | None, *,
                      trusted_modules: Iterable[str] = ()) -> Path:
    """Write an MLflow pyfunc model (models-from-code, signature, input example) at ``path``.

    ``trusted_modules``: modules the bundle's model loader may import besides registered trainers' packages
    (``automl.bundle.ModelBundle``), e.g. the module of the sweep's own ``module:function`` trainer.
    """
    from mlflow.models import infer_signature

    from automl.bundle import ModelBundle

    signature = None
    example = None
    if prepared is not None:
        example = prepared.example
        predictions = ModelBundle(bundle_dir, trusted_modules=trusted_modules).predict(example)
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


def log_pyfunc_model(client: MlflowClient, run_id: str, bundle_dir: Path, prepared: PreparedData | None, *,
                     trusted_modules: Iterable[str] = ()) -> str:
    """Log the bundle as the run's ``best_model`` artifact; returns its ``runs:/`` URI."""
    with tempfile.TemporaryDirectory() as tmp:
        local = save_pyfunc_model(Path(tmp) / MODEL_ARTIFACT, bundle_dir, prepared, trusted_modules=trusted_modules)
        client.log_artifacts(run_id, str(local), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


def register_champion(
    client: MlflowClient, name: str, model_uri: str, *, run_id: str, metric: str, goal: str, value: float
) -> tuple[str, bool]:
    """Register the sweep's best model as a new version of ``name``; returns the version and whether it
    became the champion.

    The rule for the ``champion`` alias: every sweep adds a version (tagged ``automl.metric``,
    ``automl.goal``, ``automl.value``), and the alias moves to it only if it beats the champion on the same
    metric and goal (strictly: a tie keeps the champion). A champion scored on another metric or goal, or not
    by automl at all, is replaced: its score cannot be compared, and the latest sweep says what "better" now
    means (otherwise a sweep that changed its metric could never promote anything again). Scores are compared
    as they are, so sweeps that register under one name should share their data and validation split.
    """
    import math

    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another sweep may have created it meanwhile
            reason = str(exc.message).strip().splitlines()[0]
            raise ExportError(f"tracking.register_as: cannot register '{name}': {reason}") from None
    # The source is the artifact's own location, as mlflow.register_model records it for a runs:/ URI (which
    # it resolves through the global tracking URI; this client's store may be another).
    _, artifact_path = RunsArtifactRepository.parse_runs_uri(model_uri)
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
    value = float(value)  # a numpy scalar's repr ("np.float64(0.9)") would not read back
    mv = client.create_model_version(
        name, source=source, run_id=run_id,
        tags={"automl.metric": metric, "automl.goal": goal, "automl.value": repr(value)},
    )
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None  # no champion yet (stores differ in the error code they give)
    scored = current.tags if current is not None else {}
    promote = True
    if scored.get("automl.metric") == metric and scored.get("automl.goal") == goal:
        try:
            old = float(scored.get("automl.value", "nan"))
        except ValueError:
            old = math.nan
        if math.isfinite(old):  # an unreadable score cannot be beaten, so it does not block
            promote = value > old if goal == "maximize" else value < old
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return str(mv.version), promote


def export_model(model_uri: str, out: Path, *, format: str = "mlflow", tracking_uri: str | None = None,
                 trusted_modules: Iterable[str] = ()) -> Path:
    """Write the model at ``model_uri`` (runs:/, models:/, or a local pyfunc directory) into ``out``.

    ``mlflow`` copies the pyfunc model; ``onnx`` and ``torchscript`` write the bundle's torch network with its
    preprocessing and manifest (automl.portable), verified against the pyfunc model before anything is written.
    They open the bundle itself (never the pyfunc model's code), trusting registered trainers' packages and
    ``trusted_modules`` as its model loader (``automl.bundle.ModelBundle``).
    """
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)} (got {format!r})")
    import mlflow.artifacts

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not empty; choose a new directory")
    location, run_id = _locate(model_uri, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        if "://" not in location and ":/" not in location and Path(location).is_dir():
            local = location  # a local model directory: read in place, no tracking store involved
        else:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                            tracking_uri=tracking_uri)
            except Exception as exc:
                raise ExportError(f"cannot fetch {model_uri}: {str(exc).splitlines()[0]}") from None
        if format != "mlflow":
            from automl.bundle import ModelBundle
            from automl.portable import write_export

            bundle_dir, example = _bundle_of(Path(local), model_uri)
            source = {"model_uri": model_uri, "run_id": run_id}
            bundle = ModelBundle(bundle_dir, trusted_modules=trusted_modules)
            return write_export(bundle, example, out, format=format, source=source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.copytree(local, out)
    return out


def _bundle_of(local: Path, model_uri: str) -> tuple[Path, pd.DataFrame | None]:
    """The bundle directory inside a downloaded pyfunc model, and the model's input example."""
    from mlflow.models import Model

    try:
        mlmodel = Model.load(str(local))
        artifact = mlmodel.flavors["python_function"]["artifacts"]["bundle"]["path"]
    except Exception:
        raise ExportError(f"{model_uri}: not an automl model (no bundle artifact in its MLmodel)") from None
    bundle_dir = (local / artifact).resolve()
    if not bundle_dir.is_relative_to(local.resolve()) or not bundle_dir.is_dir():
        raise ExportError(f"{model_uri}: its bundle artifact {artifact!r} is missing")
    try:
        example = mlmodel.load_input_example(str(local))
    except Exception:
        example = None
    return bundle_dir, example


def _locate(model_uri: str, tracking_uri: str | None) -> tuple[str, str | None]:
    """Where to download ``model_uri`` from, and the MLflow run it came from (``None`` where unknown).

    ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` and ``models:/NAME/latest`` are resolved here, in the
    registry of ``tracking_uri`` (MLflow's own download would ask the process-wide registry instead).
    """
    if model_uri.startswith("runs:/"):
        return model_uri, model_uri.removeprefix("runs:/").split("/", 1)[0] or None
    if not model_uri.startswith("models:/"):
        return model_uri, None
    from mlflow import MlflowClient

    ref = model_uri.removeprefix("models:/").rstrip("/")
    client = MlflowClient(tracking_uri=tracking_uri,
                          registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, which = ref.rpartition("/")
            if which == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise ExportError(f"cannot fetch {model_uri}: registered model '{name}' has no version")
                mv = max(versions, key=lambda v: int(v.version))
            elif which.isdigit():
                mv = client.get_model_version(name, which)
            else:
                raise ExportError(f"{model_uri}: use models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest")
        return client.get_model_version_download_uri(mv.name, mv.version), mv.run_id or None
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"cannot fetch {model_uri}: {str(exc).strip().splitlines()[0]}") from None


def load_model(model: str, tracking_uri: str | None = None, *, trusted_modules: Iterable[str] = ()) -> Any:
    """A model from an exported directory (mlflow, onnx or torchscript), a ``runs:/`` or a ``models:/`` URI.

    Pyfunc models come back as MLflow loads them; ONNX and TorchScript exports as ``automl.portable.PortableModel``.
    ``trusted_modules``: modules a pyfunc model's bundle may name as its model loader besides registered trainers'
    packages (a user's own trainer module). An MLflow model directory is code (MLflow imports its python_model
    file): open only models that automl, you or your registry wrote.
    """
    import mlflow
    import mlflow.pyfunc

    from automl.bundle import trusting

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    # runs:/ and models:/ URIs have a single slash after the scheme
    is_uri = model.startswith(("runs:/", "models:/")) or "://" in model
    if not is_uri and not Path(model, "MLmodel").is_file():
        from automl.portable import PortableModel, is_export

        if is_export(Path(model)):
            return PortableModel(Path(model))
        raise ExportError(f"{model}: not an exported model directory (no MLmodel file, no export manifest.json) "
                          "nor a model URI")
    with trusting(trusted_modules):
        try:
            return mlflow.pyfunc.load_model(model)
        except Exception as exc:
            raise ExportError(f"cannot load {model}: {str(exc).splitlines()[0]}") from None


def predict(model: str, frame: pd.DataFrame, tracking_uri: str | None = None, *,
            trusted_modules: Iterable[str] = ()) -> pd.DataFrame:
    """Predictions for raw rows; a ``prediction`` column appended to the input (``trusted_modules``: see
    ``load_model``)."""
    from automl.bundle import check_columns

    loaded = load_model(model, tracking_uri, trusted_modules=trusted_modules)
    schema = getattr(getattr(loaded, "metadata", None), "get_input_schema", lambda: None)()
    if schema is not None and schema.has_input_names():
        # MLflow's own schema error starts with a dump of the rows; name the missing columns instead.
        check_columns(frame.columns, [str(spec.name) for spec in schema.inputs if spec.required])
    try:
        predictions = loaded.predict(frame)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"prediction failed: {str(exc).strip().splitlines()[0]}") from None
    result = frame.copy()
    result["prediction"] = list(predictions)
    return result
