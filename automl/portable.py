"""ONNX and TorchScript exports of a bundle's torch network, and the loader that predicts with them on raw rows.

Layout of an export directory (``automl export SWEEP --format onnx|torchscript --out DIR``)::

    manifest.json       the bundle's manifest (columns and dtypes, task, classes, metric, params, trainer)
                        plus "export" (format, file, input and output, versions) and "source" (model URI, run)
    preprocessor.skops  the scikit-learn preprocessing fitted on the training split (skops, trusted types only)
    model.onnx          ONNX: float32 ``features`` (batch, n_features) -> ``probabilities`` (batch, n_classes)
                        or ``prediction`` (batch,); weights are the graph's initializers (protobuf, no code)
    model.pt            TorchScript, the same function; the archive carries its weights (read by
                        torch.jit.load's own reader, which resolves TorchScript types only, never Python pickle)

The network computes everything after the preprocessing (softmax, or the target's scale), so an export needs
only the preprocessor besides: ``PortableModel`` applies it, runs the network, and decodes class labels.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from automl.bundle import MANIFEST, PREPROCESSOR, ModelBundle, Preprocessing
from automl.errors import ExportError
from automl.trainer import SavableModel

if TYPE_CHECKING:
    import pandas as pd

FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
INPUT_NAME = "features"
# ONNX opset 17: supported by every onnxruntime this project accepts (>= 1.18) and by the legacy exporter.
OPSET = 17
# How closely an export must reproduce the bundle (the pyfunc model) on the input example: absolute for
# probabilities, relative and absolute for regression values in target units (float32 has ~7 digits).
TOLERANCE = 1e-5


@contextmanager
def _quiet_torch() -> Iterator[None]:
    # torch 2.9+ marks TorchScript and the TorchScript-based ONNX exporter deprecated. They are what these formats
    # are made of (the dynamo exporter needs onnxscript, not a dependency here), so the warnings tell a user
    # nothing; a traced network's TracerWarnings neither: the export is verified on two batch sizes instead.
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------- writing


def torch_network(bundle: ModelBundle, format: str) -> Any:
    """The bundle's network as a CPU ``torch.nn.Module`` in eval mode; ``ExportError`` when it has none."""
    from automl.ensemble import EnsembleModel

    model = bundle.model
    if isinstance(model, EnsembleModel):
        raise ExportError(f"--format {format} holds one network; the best model is an ensemble of "
                          f"{len(model.members)} models ({', '.join(model.names)}); use --format mlflow")
    module = model.torch_module() if isinstance(model, SavableModel) else None
    if module is None:
        raise ExportError(f"--format {format} needs a torch network; the best model is {type(model).__name__}; "
                          "use --format mlflow")
    return module.cpu().eval()


def write_export(bundle: ModelBundle, example: pd.DataFrame | None, out: Path, *, format: str,
                 source: dict[str, Any]) -> Path:
    """Write ``bundle`` as an ONNX or TorchScript export into ``out`` (a new directory), verified first.

    The export is built in a temporary directory, checked (onnx.checker; onnxruntime or torch.jit.load must
    reproduce the bundle on ``example``, the pyfunc model's input example, within ``TOLERANCE``), and only
    then moved to ``out``: a refused export leaves nothing behind.
    """
    if format not in FILES:
        raise ExportError(f"--format must be one of {', '.join(FILES)} (got {format!r})")
    module = torch_network(bundle, format)
    if example is None or len(example) == 0:
        raise ExportError(f"--format {format}: the model has no input example (a sweep without data); "
                          "use --format mlflow")
    features = bundle.features(example)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "export"
        stage.mkdir()
        file = stage / FILES[format]
        if format == "onnx":
            details = _write_onnx(module, features, file, bundle.task)
        else:
            details = _write_torchscript(module, features, file)
        if (bundle.path / PREPROCESSOR).is_file():
            shutil.copyfile(bundle.path / PREPROCESSOR, stage / PREPROCESSOR)
        output = "probabilities" if bundle.task == "classification" else "prediction"
        n_out = len(bundle.classes) if bundle.task == "classification" else None
        manifest = {
            **bundle.manifest,
            "export": {
                "format": format,
                "file": file.name,
                "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, int(features.shape[1])]},
                "output": {"name": output, "dtype": "float32", "shape": [None, n_out] if n_out else [None]},
                **details,
                "torch": _version("torch"),
                "automl": _version("automl"),
                "verified": {"rows": len(example), "tolerance": TOLERANCE},
            },
            "source": source,
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        verify(bundle, PortableModel(stage), example)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # the caller checked it is empty
        shutil.move(str(stage), str(out))
    return out


def _write_onnx(module: Any, features: np.ndarray, file: Path, task: str) -> dict[str, Any]:
    import onnx
    import torch

    output = "probabilities" if task == "classification" else "prediction"
    try:
        with _quiet_torch(), torch.no_grad():
            # dynamo=False: the TorchScript-based exporter needs only onnx; the batch axis is dynamic.
            torch.onnx.export(module, (torch.from_numpy(features),), str(file), dynamo=False,
                              input_names=[INPUT_NAME], output_names=[output], opset_version=OPSET,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}})
    except Exception as exc:
        raise ExportError(f"--format onnx: torch.onnx.export failed: {_first_line(exc)}") from None
    try:
        onnx.checker.check_model(str(file), full_check=True)
    except Exception as exc:
        raise ExportError(f"--format onnx: the exported graph fails onnx.checker: {_first_line(exc)}") from None
    return {"opset": OPSET, "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime")}


def _write_torchscript(module: Any, features: np.ndarray, file: Path) -> dict[str, Any]:
    import torch

    with _quiet_torch(), torch.no_grad():
        # Scripting keeps the network's control flow; a network TorchScript cannot compile is traced instead
        # (its operations on this example, batch size kept symbolic), and the check below runs it on two
        # batch sizes.
        try:
            scripted, how = torch.jit.script(module), "script"
        except Exception:
            try:
                scripted, how = torch.jit.trace(module, torch.from_numpy(features)), "trace"
            except Exception as exc:
                raise ExportError(f"--format torchscript: the network can be neither scripted nor traced: "
                                  f"{_first_line(exc)}") from None
        scripted.save(str(file))
    return {"conversion": how}


def verify(bundle: ModelBundle, exported: PortableModel, example: pd.DataFrame) -> None:
    """Refuse an export that does not reproduce the bundle on the example rows, as a batch and one row alone
    (which also checks that the batch axis is dynamic): probabilities within ``TOLERANCE`` and the same labels,
    or regression values within ``TOLERANCE`` (relative and absolute)."""
    fmt = exported.format
    for rows in (example, example.iloc[:1]):
        try:
            if bundle.task == "classification":
                want, got = bundle.predict_proba(rows), exported.predict_proba(rows)
                same_labels = bool((bundle.predict(rows) == exported.predict(rows)).all())
                rtol = 0.0
            else:
                want, got = np.asarray(bundle.predict(rows), dtype=np.float64), exported.predict(rows)
                same_labels, rtol = True, TOLERANCE
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"--format {fmt}: checking the export on the input example failed: "
                              f"{_first_line(exc)}") from None
        if want.shape != got.shape:
            problem = f"gives shape {got.shape}, the model {want.shape}"
        elif not np.allclose(got, want, rtol=rtol, atol=TOLERANCE):
            problem = f"differs from the model by up to {np.abs(got - want).max():.3g} (tolerance {TOLERANCE})"
        elif not same_labels:
            problem = "predicts other labels than the model"
        else:
            continue
        raise ExportError(f"--format {fmt}: the export {problem} on the input example ({len(rows)} rows); "
                          "use --format mlflow")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------- loading


def is_export(path: Path) -> bool:
    """Whether ``path`` is an ONNX or TorchScript export directory (its manifest names an export format)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("export"), dict)


class PortableModel(Preprocessing):
    """An ONNX (onnxruntime) or TorchScript export: ``predict`` and ``predict_proba`` on raw rows.

    The preprocessing, the missing-column check and the label decoding are the bundle's own
    (``automl.bundle.Preprocessing``), so an export answers exactly as the pyfunc model does.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        export = self.manifest.get("export") or {}
        self.format = str(export.get("format"))
        if self.format not in FILES:
            raise ExportError(f"{self.path}: not an ONNX or TorchScript export (export format {self.format!r})")
        file = self.path / FILES[self.format]  # never a name from the manifest: it stays inside the directory
        if not file.is_file():
            raise ExportError(f"{self.path}: {file.name} is missing")
        self._run = _onnx_runner(file) if self.format == "onnx" else _torchscript_runner(file)

    def outputs(self, frame: pd.DataFrame) -> np.ndarray:
        """The network's output on raw rows: probabilities (n, n_classes) or predictions (n,)."""
        return self._run(self.features(frame))

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Labels (the original class values) for classification; values for regression."""
        out = self.outputs(frame)
        return self.labels(out.argmax(axis=1)) if self.task == "classification" else out

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        if self.task != "classification":
            raise ExportError("predict_proba: the model is a regression model")
        return self.outputs(frame)


def _onnx_runner(file: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    try:
        # The CPU provider everywhere: the same numbers on every machine, and the one every build has.
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{file}: onnxruntime cannot load it: {_first_line(exc)}") from None
    name = session.get_inputs()[0].name

    def run(X: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: np.ascontiguousarray(X, dtype=np.float32)})[0])

    return run


def _torchscript_runner(file: Path) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    try:
        with _quiet_torch():
            module = torch.jit.load(str(file), map_location="cpu")
    except Exception as exc:
        raise ExportError(f"{file}: torch.jit.load cannot load it: {_first_line(exc)}") from None
    module.eval()

    def run(X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(module(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy())

    return run
