"""What a remote spec may reach, and nothing else.

- ``data.source``: a bundled dataset (``sklearn:<name>``), an uploaded one (``dataset:<id>``), or a path *relative
  to the service's data root* that stays inside it once resolved: absolute paths, ``..`` and symbolic links out of
  the root are refused (422, with the field path).
- ``trainer``: a registered trainer (built in, or an installed package's ``automl.trainers`` entry point), or
  ``module:function`` whose module is a file under the service's ``--trainers-dir``: never another installed
  module (``os:system`` would otherwise be a trainer), never a file elsewhere.

The spec comes back with its data path made absolute, so the engine reads exactly the file checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from automl.errors import AutoMLError, SpecError

if TYPE_CHECKING:
    from automl.service.store import Principal, ServiceStore
    from automl.spec import Spec


class PathRefused(AutoMLError):
    """A remote spec names a file or module the service does not let it reach."""


@dataclass
class Resolved:
    spec: Spec
    raw: dict[str, Any]  # the spec as the engine will run it (JSON-able), paths resolved
    text: str  # what the parent run records as spec.yaml
    base_dir: Path  # where a module:function trainer resolves


def resolve(body_spec: Any, overrides: dict[str, Any] | None, *, data_root: Path, trainers_dir: Path | None,
            store: ServiceStore, principal: Principal) -> Resolved:
    """Parse and check a submitted spec; ``SpecError``/``PathRefused``/``DataError``/``TrainerError`` are 422s."""
    import yaml

    from automl.spec import MAX_SPEC_BYTES, apply_overrides, parse_yaml, spec_from_dict

    if isinstance(body_spec, str):
        if len(body_spec.encode()) > MAX_SPEC_BYTES:
            raise SpecError(f"is more than {MAX_SPEC_BYTES} bytes; a spec is a page of YAML")
        raw = parse_yaml(body_spec, "spec")
    elif isinstance(body_spec, dict):
        raw = dict(body_spec)
    else:
        raise SpecError('must be YAML text or a mapping: {"spec": "<YAML>"} or {"spec": {...}}')
    if overrides is not None and not isinstance(overrides, dict):
        raise SpecError('overrides: must be a mapping of dotted field paths, e.g. {"budget.trials": 50}')
    raw = apply_overrides(raw, overrides)
    raw.setdefault("name", "sweep")
    spec = spec_from_dict(raw, source="spec")
    if spec.data is not None:
        source = _data_source(spec.data.source, data_root, store, principal)
        raw["data"] = {**raw.get("data", {}), "source": source}
        spec = spec_from_dict(raw, source="spec")
    base_dir = _trainer_home(spec.trainer, trainers_dir) or data_root
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    return Resolved(spec=spec, raw=spec.model_dump(mode="json"), text=text, base_dir=base_dir)


def _data_source(source: str, data_root: Path, store: ServiceStore, principal: Principal) -> str:
    if source.startswith("sklearn:"):
        return source
    if source.startswith("dataset:"):
        record = store.get_dataset(source.removeprefix("dataset:"))
        if record is None or not principal.may_see(record["owner"]):
            raise PathRefused(f"spec: data.source: no uploaded dataset '{source}' (POST /api/v1/datasets uploads one)")
        return str(record["path"])
    pure = PurePosixPath(source.replace("\\", "/"))
    if source.startswith("~") or pure.is_absolute() or Path(source).is_absolute():
        raise PathRefused(f"spec: data.source: {source!r} is an absolute path; give a path relative to the "
                          "service's data root, or upload the file (dataset:<id>)")
    if ".." in pure.parts:
        raise PathRefused(f"spec: data.source: {source!r} leaves the service's data root ('..'); give a path "
                          "inside it, or upload the file (dataset:<id>)")
    root = data_root.resolve()
    path = (root / source).resolve()  # follows symbolic links: one that points out of the root is caught below
    if not path.is_relative_to(root):
        raise PathRefused(f"spec: data.source: {source!r} resolves outside the service's data root (a symbolic "
                          "link?); give a file inside it, or upload the file (dataset:<id>)")
    return str(path)


def _trainer_home(trainer: str, trainers_dir: Path | None) -> Path | None:
    """The folder a ``module:function`` trainer resolves in (None for a registered trainer)."""
    from automl.trainer import registered_trainers

    if trainer in registered_trainers():
        return None
    if ":" not in trainer:
        return None  # an unknown name: the preflight check refuses it with the list of known ones
    if trainers_dir is None:
        raise PathRefused(f"spec: trainer: '{trainer}' is not a registered trainer, and this service takes no "
                          "trainer code (it runs without --trainers-dir); use one of its registered trainers")
    module = trainer.partition(":")[0]
    if not all(part.isidentifier() for part in module.split(".")):
        raise PathRefused(f"spec: trainer: '{trainer}' must look like 'module:function'")
    root = trainers_dir.resolve()
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file() and candidate.resolve().is_relative_to(root):
            return root
    raise PathRefused(f"spec: trainer: module '{module}' is not in the service's trainers folder ({root}); "
                      "only registered trainers and modules there can run")
