"""Sweep files of other tools -> automl spec dicts: Weights & Biases sweeps, NNI search spaces, Katib Experiments.

Users bring the sweep files they already have. Each converter maps every construct of its format that has an
automl equivalent, and refuses every construct that has none with a one-line ``SpecError`` that names the field
in the *source* file and says what to do (``sweep.yaml: parameters.wd.distribution: normal has no bounds ...``);
nothing is dropped silently. What only says how the other tool launches or files its runs (W&B's ``program``,
Katib's ``trialTemplate``) is ignored with a note, because automl's trainer takes that role.

None of these formats names an automl trainer (and NNI names no metric): the caller passes them (``trainer=``,
``data=``, ``target=``, ``metric=``; ``--trainer`` ... on the command line); they replace the spec's own fields
the way ``automl run``'s overrides do, so ``--data`` and a trainer ``module:function`` resolve against the
imported file's directory, like paths written in a spec.

Detection (``detect``): a mapping with ``kind: Experiment`` is Katib; one whose values all carry ``_type`` is NNI;
one with a ``trainer`` or a typed parameter is automl; one with W&B's parameter keys (``values``, ``value``,
``distribution``, ``min``, ``max``), ``method: bayes`` or a W&B-only top-level key is W&B; anything else is handed
to automl's own validation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import BaseModel, ValidationError

from automl.errors import SpecError
from automl.spec import (
    BudgetSpec,
    FieldError,
    Parameter,
    _choice_key,
    _spec_error,
    apply_overrides,
    parse_yaml,
    read_spec_text,
    spec_from_dict,
)

if TYPE_CHECKING:
    from automl.spec import Spec

FORMATS = {
    "automl": "automl spec",
    "wandb": "Weights & Biases sweep",
    "nni": "NNI search space",
    "katib": "Katib Experiment",
}

_SCALARS = (str, int, float, bool, type(None))


# --------------------------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Imported:
    """A file converted to an automl spec dict.

    ``paths`` maps automl field paths (``parameters.lr.low``) to the same field's path in the source file
    (``spec.parameters[0].feasibleSpace.min``), so that a rule automl checks later is still reported against
    the line the user wrote. ``notes`` say what was ignored and where the semantics differ slightly.
    """

    spec: dict[str, Any]
    format: str
    source: str
    notes: tuple[str, ...] = ()
    paths: Mapping[str, str] = field(default_factory=dict)

    def to_spec(self, overrides: dict[str, Any] | None = None) -> Spec:
        """Validate the converted spec (``overrides`` as for ``spec_from_dict``); errors name the source field."""
        try:
            return spec_from_dict(self.spec, source=self.source, overrides=overrides)
        except SpecError as exc:
            raise self.translate(exc) from None

    def translate(self, error: SpecError) -> SpecError:
        """``error`` with its automl field path replaced by the source file's path for that field."""
        if not error.path or self.format == "automl":
            return error
        return SpecError(error.message, path=_translate(error.path, self.paths), source=error.source)

    def to_yaml(self) -> str:
        """The spec as YAML, after a comment line naming the source format and one comment line per note."""
        import yaml

        if self.format == "automl":
            header = [f"# {self.source} is already an automl spec"]
        else:
            header = [f"# automl spec converted from {self.source} ({FORMATS[self.format]}) by `automl import`"]
        header += [f"# note: {note}" for note in self.notes]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.spec, sort_keys=False, allow_unicode=True,
                                                      default_flow_style=None)


def load_any(
    path: Path,
    *,
    trainer: str | None = None,
    data: str | None = None,
    target: str | None = None,
    metric: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Read an automl spec, a W&B sweep, an NNI search space or a Katib Experiment as an automl spec dict.

    Returns ``(spec dict, format)`` with format ``"automl"``, ``"wandb"``, ``"nni"`` or ``"katib"``. An automl
    spec passes through (with the given fields replaced); the others are converted, and refused with a
    ``SpecError`` naming the source field where a construct has no automl equivalent.
    """
    imported = import_file(path, trainer=trainer, data=data, target=target, metric=metric)
    return imported.spec, imported.format


def import_file(
    path: str | Path,
    *,
    trainer: str | None = None,
    data: str | None = None,
    target: str | None = None,
    metric: str | None = None,
) -> Imported:
    """``load_any`` with the notes and the field-path map (what the CLI prints and reports errors with)."""
    path = Path(path)
    source = path.name
    document = read_document(path)
    fmt = detect(document)
    overrides = option_overrides(trainer=trainer, data=data, target=target, metric=metric)
    if fmt == "automl":
        nni_config = sorted(_NNI_CONFIG_KEYS & set(document)) if "trainer" not in document else []
        if nni_config:
            raise SpecError("this is an NNI experiment config, not a search space: import the search space file "
                            "it names (searchSpaceFile), or its searchSpace saved as JSON, with --trainer and --metric",
                            path=nni_config[0], source=source)
        spec = _apply(dict(document), overrides)
        spec.setdefault("name", _safe_name(path.stem))
        return Imported(spec=spec, format=fmt, source=source)
    conv = _Conversion(source)
    spec = {"wandb": _from_wandb, "nni": _from_nni, "katib": _from_katib}[fmt](document, conv)
    spec.setdefault("name", _safe_name(path.stem))
    if trainer is None:
        conv.refuse("trainer", f"{FORMATS[fmt]}s name no automl trainer; pass --trainer NAME (trainer= in Python): "
                               "a registered trainer such as mlp, or module:function next to the file")
    if target is not None and data is None:
        conv.refuse("data.target", "--target needs --data (the file or sklearn:<name> to train on)")
    if metric is None and "metric" not in spec:
        why = "NNI keeps it in the experiment config" if fmt == "nni" else "this file has none"
        conv.refuse("metric", f"names no metric to optimise ({why}); pass --metric NAME, e.g. --metric val_accuracy "
                              "(its goal follows from the name, as in a spec)")
    spec = _order(_apply(spec, overrides))
    imported = Imported(spec=spec, format=fmt, source=source, notes=tuple(conv.notes), paths=dict(conv.paths))
    _check_parameters(imported)
    return imported


def option_overrides(
    *, trainer: str | None = None, data: str | None = None, target: str | None = None, metric: str | None = None
) -> dict[str, Any]:
    """The spec fields that ``--trainer``, ``--data``, ``--target`` and ``--metric`` replace (dotted paths)."""
    return {"trainer": trainer, "data.source": data, "data.target": target, "metric": metric}


def read_document(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON file (at most ``MAX_SPEC_BYTES``) into a mapping; the errors of ``load_spec``."""
    source = path.name
    text = read_spec_text(path)
    if path.suffix.lower() != ".json":
        return parse_yaml(text, source)  # safe loader; refuses alias bombs and deep nesting
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise SpecError(f"line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}", source=source) from None
    except _DuplicateKey as exc:
        raise SpecError(f"the key '{exc}' appears twice in one object; keep one", source=source) from None
    except RecursionError:
        raise SpecError("nesting too deep; a search space is a few levels deep", source=source) from None
    if not isinstance(data, dict):
        raise SpecError("must be a JSON object of parameters or fields", source=source)
    return data


_NNI_CONFIG_KEYS = {"searchSpaceFile", "searchSpace", "trialCommand", "tuner", "trainingService"}
_WANDB_PARAM_KEYS = {"values", "value", "distribution", "min", "max"}
_WANDB_ONLY_KEYS = {"program", "command", "early_terminate", "run_cap", "entity", "project", "controller"}


def detect(document: Mapping[str, Any]) -> str:
    """The format of a parsed file: ``"katib"``, ``"nni"``, ``"automl"`` or ``"wandb"`` (see the module doc)."""
    if document.get("kind") == "Experiment":
        return "katib"
    if document and all(isinstance(v, dict) and "_type" in v for v in document.values()):
        return "nni"
    params = document.get("parameters")
    params = params if isinstance(params, dict) else {}
    if "trainer" in document or any(isinstance(p, dict) and "type" in p for p in params.values()):
        return "automl"
    if (
        document.get("method") == "bayes"
        or _WANDB_ONLY_KEYS & set(document)
        or any(isinstance(p, dict) and (_WANDB_PARAM_KEYS | {"parameters"}) & set(p) for p in params.values())
    ):
        return "wandb"
    return "automl"


# --------------------------------------------------------------------------------------------- shared helpers


class _Conversion:
    """What a converter accumulates: notes, and automl field path -> source field path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.notes: list[str] = []
        self.paths: dict[str, str] = {}

    def refuse(self, path: str, message: str) -> NoReturn:
        raise SpecError(message, path=path, source=self.source)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def map(self, automl_path: str, source_path: str) -> None:
        self.paths[automl_path] = source_path

    def mapping(self, value: Any, path: str, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.refuse(path, f"must be a mapping ({what}) (got {_short(value)})")
        return value

    def number(self, value: Any, path: str, *, integer: bool = False) -> int | float:
        """A number written as a number or as text (Katib writes "0.01"); whole where ``integer``."""
        number: int | float
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            self.refuse(path, f"must be a number (got {_short(value)})")
        if isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    self.refuse(path, f"must be a number (got {value!r})")
        else:
            number = value
        if isinstance(number, float) and not math.isfinite(number):
            self.refuse(path, f"must be a finite number (got {value!r})")
        if integer:
            if isinstance(number, float) and not number.is_integer():
                self.refuse(path, f"must be a whole number (got {value!r})")
            return int(number)
        return number

    def whole(self, value: Any, path: str) -> int:
        return int(self.number(value, path, integer=True))

    def choices(self, values: Any, path: str) -> list[Any]:
        if not isinstance(values, list) or not values:
            self.refuse(path, f"must be a non-empty list of values (got {_short(values)})")
        return [self.scalar(value, f"{path}[{i}]") for i, value in enumerate(values)]

    def scalar(self, value: Any, path: str) -> Any:
        if not isinstance(value, _SCALARS):
            self.refuse(path, f"automl choices are text, numbers, booleans or null (got {_short(value)}); write it "
                              "as text (e.g. '64x64') and parse it in the trainer")
        return value

    def unknown(self, node: Mapping[str, Any], allowed: set[str], path: str, what: str) -> None:
        for key in node:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.refuse(where, f"is not a key of {what} that automl knows ({', '.join(sorted(allowed))}); "
                                   "remove it or fix its spelling")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _tidy(value: float) -> float:
    """exp(log(1e-4)) is 1.0000000000000002e-04: 12 significant digits read back as the number the user meant."""
    return float(f"{value:.12g}")


def _is_multiple(value: float, step: float) -> bool:
    ratio = value / step
    return abs(ratio - round(ratio)) <= 1e-9 * max(1.0, abs(ratio))


def _near_int(value: float) -> int | None:
    nearest = round(value)
    return int(nearest) if abs(value - nearest) <= 1e-9 * max(1.0, abs(value)) else None


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "sweep"


def _apply(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted-path replacements, as ``spec_from_dict`` applies its overrides."""
    return apply_overrides(raw, overrides)


_ORDER = ("name", "trainer", "data", "metric", "method", "budget", "early_stopping", "resources", "seed", "fixed",
          "parameters", "tracking")


def _order(spec: dict[str, Any]) -> dict[str, Any]:
    """Fields in the order of DESIGN.md section 2, so the printed spec reads like a hand-written one."""
    return {key: spec[key] for key in sorted(spec, key=lambda k: _ORDER.index(k) if k in _ORDER else len(_ORDER))}


def _translate(path: str, paths: Mapping[str, str]) -> str:
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        known = paths.get(".".join(parts[:end]))
        if known is not None:
            return ".".join([known, *parts[end:]])
    return path


class _Parameters(BaseModel):
    parameters: dict[str, Parameter]


def _check_parameters(imported: Imported) -> None:
    """Each converted parameter against automl's rules now, so that a violation names the source field.

    Only the rules of the parameters themselves: the ones that involve the method or budget are checked by
    ``Imported.to_spec``, after the caller's overrides (``--method``) apply.
    """
    from automl.space import SearchSpace

    try:
        checked = _Parameters.model_validate({"parameters": imported.spec.get("parameters") or {}})
        SearchSpace(checked.parameters)
    except ValidationError as exc:
        raise imported.translate(_spec_error(exc, imported.source)) from None
    except FieldError as exc:
        raise imported.translate(SpecError(exc.message, path=exc.field, source=imported.source)) from None


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _bounded_hint(mu: float, sigma: float, *, log: bool = False) -> str:
    """Bounds that hold about 95% of the refused distribution's mass: a starting point, not an equivalent."""
    if log:
        return f"a log-uniform range such as [{math.exp(mu - 2 * sigma):.4g}, {math.exp(mu + 2 * sigma):.4g}] " \
               "(exp(mu ± 2 sigma))"
    return f"a uniform range such as [{mu - 2 * sigma:.4g}, {mu + 2 * sigma:.4g}] (mu ± 2 sigma)"


# --------------------------------------------------------------------------------------------- Weights & Biases

_WANDB_TOP = {"method", "metric", "parameters", "early_terminate", "run_cap", "name", "description", "project",
              "entity", "program", "command", "controller", "job", "image_uri", "apiVersion", "kind"}
_WANDB_LAUNCH = ("program", "command", "controller", "job", "image_uri")
_WANDB_METHODS = {"grid": "grid", "random": "random", "bayes": "bayesian"}
_WANDB_UNBOUNDED = {"normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta"}
_WANDB_DISTRIBUTIONS = {
    "constant": {"value"},
    "categorical": {"values"},
    "int_uniform": {"min", "max"},
    "uniform": {"min", "max"},
    "q_uniform": {"min", "max", "q"},
    "log_uniform": {"min", "max"},
    "log_uniform_values": {"min", "max"},
    "inv_log_uniform": {"min", "max"},
    "inv_log_uniform_values": {"min", "max"},
    "q_log_uniform": {"min", "max", "q"},
    "q_log_uniform_values": {"min", "max", "q"},
}


def _from_wandb(doc: dict[str, Any], c: _Conversion) -> dict[str, Any]:
    c.unknown(doc, _WANDB_TOP, "", "a W&B sweep")
    spec: dict[str, Any] = {}
    if "name" in doc:
        name = str(doc["name"])
        spec["name"] = _safe_name(name)
        c.map("name", "name")
        if spec["name"] != name:
            c.note(f"name: '{name}' written as '{spec['name']}' (automl names use letters, digits, - _ .)")
    launch = [key for key in _WANDB_LAUNCH if key in doc]
    if launch:
        c.note(f"{', '.join(launch)}: ignored; the automl trainer (--trainer) runs each trial and receives the "
               "parameters as a dict")
    labels = [key for key in ("entity", "description") if key in doc]
    if labels:
        c.note(f"{', '.join(labels)}: ignored (W&B's account and label; MLflow keeps automl's record)")
    if "method" in doc:
        method = doc["method"]
        if method not in _WANDB_METHODS:
            c.refuse("method", f"W&B method {method!r} has no automl equivalent; use grid, random or bayes")
        spec["method"] = _WANDB_METHODS[method]
        c.map("method", "method")
    if "metric" in doc:
        spec["metric"] = _wandb_metric(doc["metric"], c)
    if "run_cap" in doc:
        spec["budget"] = {"trials": doc["run_cap"]}
        c.map("budget.trials", "run_cap")
    if "early_terminate" in doc:
        spec["early_stopping"] = _wandb_early_terminate(doc["early_terminate"], c)
    if "project" in doc:
        spec["tracking"] = {"experiment": doc["project"]}
        c.map("tracking.experiment", "project")
        c.note(f"project: '{doc['project']}' becomes the MLflow experiment (tracking.experiment)")
    params = c.mapping(doc.get("parameters"), "parameters", "parameter name -> {values: [...]} or {min, max}")
    searched: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    for name, param in params.items():
        _wandb_param(str(name), param, c, searched, fixed)
    if fixed:
        spec["fixed"] = fixed
    spec["parameters"] = searched
    return spec


def _wandb_metric(metric: Any, c: _Conversion) -> dict[str, Any]:
    metric = c.mapping(metric, "metric", "{name, goal}")
    if "target" in metric:
        c.refuse("metric.target", "automl has no stop-at-target rule (a sweep runs its whole budget); remove "
                                  "target, or lower run_cap")
    for key in ("impute", "impute_while_running"):
        if key in metric:
            c.refuse(f"metric.{key}", "automl does not impute values for failed or running trials (the sampler "
                                      f"ignores failed trials); remove {key}")
    c.unknown(metric, {"name", "goal"}, "metric", "a W&B metric")
    if "name" not in metric:
        c.refuse("metric.name", "is required")
    goal = metric.get("goal")
    if goal is None:
        goal = "minimize"
        c.note("metric.goal: not given; W&B's default, minimize, is kept")
    c.map("metric", "metric")
    return {"name": metric["name"], "goal": goal}


def _wandb_early_terminate(node: Any, c: _Conversion) -> dict[str, Any]:
    et = c.mapping(node, "early_terminate", "{type: hyperband, min_iter, eta}")
    c.unknown(et, {"type", "min_iter", "max_iter", "s", "eta", "strict"}, "early_terminate", "W&B early_terminate")
    if et.get("type") != "hyperband":
        c.refuse("early_terminate.type", f"W&B's only early_terminate type is hyperband (got {et.get('type')!r})")
    if et.get("strict"):
        c.refuse("early_terminate.strict", "automl's asha stops trials by the non-strict rule only; remove strict")
    eta = c.number(et.get("eta", 3), "early_terminate.eta")
    whole_eta = _near_int(float(eta))
    if whole_eta is None or whole_eta < 2:
        c.refuse("early_terminate.eta", f"automl's reduction_factor is a whole number >= 2 (got {eta})")
    if "max_iter" in et:
        # W&B's own reading: brackets at max_iter/eta, max_iter/eta^2, ... (s of them), truncated to integers.
        if "min_iter" in et:
            c.refuse("early_terminate.min_iter", "W&B ignores min_iter when max_iter is given; keep one of them")
        if "s" not in et:
            c.refuse("early_terminate.s", "is required with max_iter (the number of brackets)")
        max_iter = c.whole(et["max_iter"], "early_terminate.max_iter")
        brackets: list[int] = []
        band = float(max_iter)
        for _ in range(c.whole(et["s"], "early_terminate.s")):
            band /= whole_eta
            if band < 1:
                break
            brackets.append(int(band))
        brackets.sort()
        if not brackets or any(b != brackets[0] * whole_eta**k for k, b in enumerate(brackets)):
            c.refuse("early_terminate.max_iter", f"its brackets {brackets} are not min_iter * eta^k; write min_iter "
                                                 "(the first bracket) instead of max_iter and s")
        min_epochs = brackets[0]
        c.map("early_stopping.min_epochs", "early_terminate.max_iter")
    else:
        if "min_iter" not in et:
            c.refuse("early_terminate.min_iter", "is required (or max_iter and s)")
        min_epochs = c.whole(et["min_iter"], "early_terminate.min_iter")
        c.map("early_stopping.min_epochs", "early_terminate.min_iter")
    c.map("early_stopping.reduction_factor", "early_terminate.eta")
    c.map("early_stopping", "early_terminate")
    # W&B's hyperband stopping keeps the top 1/eta of the runs at each bracket, asynchronously: that is ASHA.
    return {"method": "asha", "min_epochs": min_epochs, "reduction_factor": whole_eta}


def _wandb_param(name: str, node: Any, c: _Conversion, searched: dict[str, Any], fixed: dict[str, Any]) -> None:
    here = f"parameters.{name}"
    p = c.mapping(node, here, "{values: [...]}, {value: ...} or {distribution, min, max}")
    if "parameters" in p:
        c.refuse(f"{here}.parameters", "nested parameters have no automl equivalent (a trial gets one flat dict "
                                       f"of parameters); flatten them into top-level names such as {name}_lr")
    if "probabilities" in p:
        c.refuse(f"{here}.probabilities", "automl gives every categorical value the same chance; remove "
                                          "probabilities")
    dist = p.get("distribution")
    if dist is None:  # W&B infers the distribution from the keys given
        if "values" in p:
            dist = "categorical"
        elif "value" in p:
            dist = "constant"
        elif "min" in p and "max" in p:
            whole = all(isinstance(p[k], int) and not isinstance(p[k], bool) for k in ("min", "max"))
            dist = "int_uniform" if whole else "uniform"
            if whole:
                c.note(f"{here}: min and max are whole numbers and no distribution is given, so W&B (and automl) "
                       "search integers; write 0.0-style bounds for a float")
        else:
            c.refuse(here, "needs values, value, or min and max")
    if dist in _WANDB_UNBOUNDED:
        mu = c.number(p.get("mu", 0.0), f"{here}.mu")
        sigma = c.number(p.get("sigma", 1.0), f"{here}.sigma")
        hint = (_bounded_hint(mu, sigma, log="log" in dist) if "normal" in dist
                else "a uniform range over [0, 1] (beta lives there)")
        c.refuse(f"{here}.distribution", f"{dist} has no automl equivalent (automl searches between two bounds, "
                                         f"uniformly or log-uniformly); use {hint}, or values: [...]")
    if dist not in _WANDB_DISTRIBUTIONS:
        c.refuse(f"{here}.distribution", f"W&B distribution {dist!r} has no automl equivalent; use one of "
                                         f"{', '.join(_WANDB_DISTRIBUTIONS)}")
    c.unknown(p, _WANDB_DISTRIBUTIONS[dist] | {"distribution"}, here, f"a W&B {dist} parameter")
    for key in sorted(_WANDB_DISTRIBUTIONS[dist]):
        if key not in p and key != "q":
            c.refuse(f"{here}.{key}", f"is required for distribution {dist}")
    c.map(f"parameters.{name}", here)
    if dist == "constant":
        fixed[name] = p["value"]
        c.map(f"fixed.{name}", f"{here}.value")
        return
    if dist == "categorical":
        searched[name] = {"type": "categorical", "choices": c.choices(p["values"], f"{here}.values")}
        c.map(f"parameters.{name}.choices", f"{here}.values")
        return
    c.map(f"parameters.{name}.low", f"{here}.min")
    c.map(f"parameters.{name}.high", f"{here}.max")
    c.map(f"parameters.{name}.step", f"{here}.q")
    c.map(f"parameters.{name}.log", f"{here}.distribution")
    lo_path, hi_path = f"{here}.min", f"{here}.max"
    if dist == "int_uniform":
        low, high = (c.whole(p[k], f"{here}.{k}") for k in ("min", "max"))
        searched[name] = {"type": "int", "low": low, "high": high}
    elif dist == "uniform":
        searched[name] = {"type": "float", "low": float(c.number(p["min"], lo_path)),
                          "high": float(c.number(p["max"], hi_path))}
    elif dist in ("log_uniform_values", "inv_log_uniform_values"):
        # inv_log_uniform_values: log(1/X) uniform between log(1/max) and log(1/min), i.e. X log-uniform on [min, max].
        searched[name] = {"type": "float", "low": float(c.number(p["min"], lo_path)),
                          "high": float(c.number(p["max"], hi_path)), "log": True}
    elif dist == "log_uniform":  # min and max are exponents of e
        searched[name] = {"type": "float", "low": _tidy(math.exp(c.number(p["min"], lo_path))),
                          "high": _tidy(math.exp(c.number(p["max"], hi_path))), "log": True}
    elif dist == "inv_log_uniform":  # X = exp(-U(min, max)): log-uniform on [exp(-max), exp(-min)]
        searched[name] = {"type": "float", "low": _tidy(math.exp(-c.number(p["max"], hi_path))),
                          "high": _tidy(math.exp(-c.number(p["min"], lo_path))), "log": True}
        c.map(f"parameters.{name}.low", hi_path)
        c.map(f"parameters.{name}.high", lo_path)
    elif dist == "q_uniform":
        q = p.get("q", 1.0)  # W&B's default q is 1.0, a float: values come back as floats
        searched[name] = _quantized(c, p["min"], p["max"], q, lo_path, hi_path, f"{here}.q",
                                    integer=isinstance(q, int) and not isinstance(q, bool), tool="W&B")
    else:  # q_log_uniform(_values): round(exp(U)/q)*q
        q = c.number(p.get("q", 1.0), f"{here}.q")
        if dist == "q_log_uniform":
            low_v, high_v = math.exp(c.number(p["min"], lo_path)), math.exp(c.number(p["max"], hi_path))
        else:
            low_v, high_v = float(c.number(p["min"], lo_path)), float(c.number(p["max"], hi_path))
        searched[name] = _log_quantized(c, low_v, high_v, q, f"{here}.q")


def _quantized(
    c: _Conversion, low: Any, high: Any, q: Any, lo_path: str, hi_path: str, q_path: str, *,
    integer: bool, tool: str,
) -> dict[str, Any]:
    """round(U(low, high) / q) * q: the values low, low+q, ..., high when both bounds are multiples of q."""
    step = c.number(q, q_path, integer=integer)
    if step <= 0:
        c.refuse(q_path, f"must be > 0 (got {q!r})")
    lo = c.number(low, lo_path, integer=integer)
    hi = c.number(high, hi_path, integer=integer)
    for value, path in ((lo, lo_path), (hi, hi_path)):
        if not _is_multiple(value, step):
            near = round(value / step) * step
            near = int(near) if integer else _tidy(near)
            c.refuse(path, f"{tool} rounds values to multiples of q ({step}) but {value} is not one, so the values "
                           f"it gives differ from automl's (bound, bound+step, ...); use {near}")
    if integer:
        return {"type": "int", "low": int(lo), "high": int(hi), "step": int(step)}
    return {"type": "float", "low": float(lo), "high": float(hi), "step": float(step)}


def _log_quantized(c: _Conversion, low: float, high: float, q: float, q_path: str) -> dict[str, Any]:
    """round(logU(low, high) / q) * q: automl's int parameter with log: true when q is 1 and the bounds whole."""
    lo, hi = _near_int(low), _near_int(high)
    if q != 1 or lo is None or hi is None:
        c.refuse(q_path, f"automl cannot combine log with a step (q = {q}, bounds {_tidy(low)}..{_tidy(high)}); "
                         "use q: 1 with whole-number bounds (an int searched on a log scale), drop q for a float "
                         "searched on a log scale, or list the values")
    return {"type": "int", "low": lo, "high": hi, "log": True}


# --------------------------------------------------------------------------------------------- NNI

_NNI_TYPES = ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform",
              "normal", "qnormal", "lognormal", "qlognormal")


def _from_nni(doc: dict[str, Any], c: _Conversion) -> dict[str, Any]:
    c.note("NNI keeps the tuner in the experiment config: method is automl's default (bayesian); pass --method "
           "to automl run to change it")
    return {"parameters": _nni_space(doc, c, prefix="", automl_prefix="parameters")}


def _nni_space(space: Mapping[str, Any], c: _Conversion, prefix: str, automl_prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, node in space.items():
        here = f"{prefix}{name}"
        target = f"{automl_prefix}.{name}"
        if not isinstance(node, dict) or "_type" not in node:
            c.refuse(here, f"must be {{\"_type\": ..., \"_value\": [...]}} (got {_short(node)})")
        c.unknown(node, {"_type", "_value"}, here, "an NNI parameter")
        c.map(target, here)
        out[str(name)] = _nni_param(str(name), node, c, here, target)
    return out


def _nni_param(name: str, node: dict[str, Any], c: _Conversion, here: str, target: str) -> dict[str, Any]:
    kind = node["_type"]
    value = node.get("_value")
    vpath = f"{here}._value"
    if kind not in _NNI_TYPES:
        c.refuse(f"{here}._type", f"NNI type {kind!r} has no automl equivalent; use one of {', '.join(_NNI_TYPES)}")
    if not isinstance(value, list):
        c.refuse(vpath, f"must be a list (got {_short(value)})")
    if kind == "choice":
        return _nni_choice(name, value, c, here, target)
    for sub, index in (("low", 0), ("high", 1), ("step", 2)):
        c.map(f"{target}.{sub}", f"{vpath}[{index}]")
    c.map(f"{target}.log", f"{here}._type")
    if kind in ("normal", "qnormal", "lognormal", "qlognormal"):
        mu = c.number(value[0], f"{vpath}[0]") if value else 0.0
        sigma = c.number(value[1], f"{vpath}[1]") if len(value) > 1 else 1.0
        c.refuse(f"{here}._type", f"{kind} has no bounded equivalent in automl (automl searches between two "
                                  f"bounds); use {_bounded_hint(mu, sigma, log='log' in kind)}, or a choice")
    arity = 3 if kind in ("quniform", "qloguniform") else 2
    if kind == "randint" and len(value) == 1:  # NNI 1.x: [upper] meant [0, upper)
        value = [0, value[0]]
    if len(value) != arity:
        shape = "[low, high, q]" if arity == 3 else ("[lower, upper]" if kind == "randint" else "[low, high]")
        c.refuse(vpath, f"{kind} takes {shape} (got {_short(value)})")
    if kind == "randint":
        lower = c.whole(value[0], f"{vpath}[0]")
        upper = c.whole(value[1], f"{vpath}[1]")
        if upper <= lower:
            c.refuse(f"{vpath}[1]", f"randint's upper bound is exclusive, so [{lower}, {upper}] holds no integer; "
                                    f"use [{lower}, {lower + 1}] for the single value {lower}")
        return {"type": "int", "low": lower, "high": upper - 1}  # NNI: lower inclusive, upper EXCLUSIVE
    if kind == "uniform":
        return {"type": "float", "low": float(c.number(value[0], f"{vpath}[0]")),
                "high": float(c.number(value[1], f"{vpath}[1]"))}
    if kind == "loguniform":
        return {"type": "float", "low": float(c.number(value[0], f"{vpath}[0]")),
                "high": float(c.number(value[1], f"{vpath}[1]")), "log": True}
    if kind == "quniform":
        # NNI: clip(round(uniform(low, high) / q) * q, low, high); whole numbers written as such give an int.
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return _quantized(c, value[0], value[1], value[2], f"{vpath}[0]", f"{vpath}[1]", f"{vpath}[2]",
                          integer=whole, tool="NNI")
    low = float(c.number(value[0], f"{vpath}[0]"))
    high = float(c.number(value[1], f"{vpath}[1]"))
    return _log_quantized(c, low, high, c.number(value[2], f"{vpath}[2]"), f"{vpath}[2]")


def _nni_choice(name: str, options: list[Any], c: _Conversion, here: str, target: str) -> dict[str, Any]:
    vpath = f"{here}._value"
    c.map(f"{target}.choices", vpath)
    if not options:
        c.refuse(vpath, "must list at least one option")
    choices: list[Any] = []
    when: dict[str, Any] = {}
    for i, option in enumerate(options):
        if not isinstance(option, dict):
            choices.append(c.scalar(option, f"{vpath}[{i}]"))
            continue
        # A nested search space: {"_name": value, param: {...}, ...} is chosen, then its params are searched.
        opath = f"{vpath}[{i}]"
        if "_name" not in option:
            c.refuse(opath, "a nested search space needs a _name (the value this option stands for)")
        label = option["_name"]
        if not isinstance(label, _SCALARS) or isinstance(label, bool) or label is None:
            c.refuse(f"{opath}._name", f"must be text or a number (got {_short(label)})")
        choices.append(label)
        branch = {k: v for k, v in option.items() if k != "_name"}
        if branch:
            key = _choice_key(label)
            when[key] = _nni_space(branch, c, prefix=f"{opath}.", automl_prefix=f"{target}.when.{key}")
            c.map(f"{target}.when.{key}", opath)
    if when:
        c.note(f"{here}: NNI passes the chosen option as a dict ({{'_name': ..., ...}}); automl passes {name} = "
               "the _name value and the option's parameters as parameters of their own")
    out: dict[str, Any] = {"type": "categorical", "choices": choices}
    if when:
        out["when"] = when
    return out


# --------------------------------------------------------------------------------------------- Katib

_KATIB_SPEC = {"objective", "algorithm", "parameters", "parallelTrialCount", "maxTrialCount", "maxFailedTrialCount",
               "earlyStopping", "trialTemplate", "metricsCollectorSpec", "resumePolicy", "nasConfig"}
_KATIB_METHODS = {
    "random": "random",
    "grid": "grid",
    "bayesianoptimization": "bayesian",
    "tpe": "tpe",
    "multivariate-tpe": "tpe",  # automl's tpe is Optuna's multivariate TPE
    "cmaes": "cmaes",
    "sobol": "qmc",  # Optuna's QMCSampler draws a scrambled Sobol sequence
}
_KATIB_REFUSED = {
    "hyperband": "Katib's hyperband algorithm has no automl method; use --method random (or bayesian) and add "
                 "early_stopping: {method: hyperband} to the printed spec",
    # Katib's pbt needs its own trial image saving checkpoints to a suggestion folder: nothing of it converts.
    "pbt": "Katib's population based training does not convert (its trials save checkpoints their own way); write "
           "method: pbt with a pbt: section and mutable: true on the parameters that may change (README)",
    "enas": "neural architecture search (enas) has no automl equivalent",
    "darts": "neural architecture search (darts) has no automl equivalent",
}


def _from_katib(doc: dict[str, Any], c: _Conversion) -> dict[str, Any]:
    api = doc.get("apiVersion")
    if api is not None and not str(api).startswith("kubeflow.org/"):
        c.refuse("apiVersion", f"a Katib Experiment is kubeflow.org/v1beta1 (got {api!r})")
    c.unknown(doc, {"apiVersion", "kind", "metadata", "spec", "status"}, "", "a Katib Experiment")
    spec: dict[str, Any] = {}
    meta = c.mapping(doc.get("metadata", {}), "metadata", "name, namespace, ...")
    if "name" in meta:
        spec["name"] = _safe_name(str(meta["name"]))
        c.map("name", "metadata.name")
    others = sorted(k for k in meta if k != "name")
    if others:
        c.note(f"metadata.{', metadata.'.join(others)}: ignored (Kubernetes placement and labels)")
    if "status" in doc:
        c.note("status: ignored (the state of a Katib run, not part of the search)")
    body = c.mapping(doc.get("spec"), "spec", "objective, algorithm, parameters, ...")
    c.unknown(body, _KATIB_SPEC, "spec", "a Katib Experiment spec")
    if "nasConfig" in body:
        c.refuse("spec.nasConfig", "neural architecture search has no automl equivalent; search hyperparameters "
                                   "in spec.parameters instead")
    if "objective" in body:
        spec["metric"] = _katib_objective(body["objective"], c)
    method, seed = _katib_algorithm(body.get("algorithm"), c)
    if method is not None:
        spec["method"] = method
    budget: dict[str, Any] = {}
    if "maxTrialCount" in body:
        budget["trials"] = c.whole(body["maxTrialCount"], "spec.maxTrialCount")
        c.map("budget.trials", "spec.maxTrialCount")
    if "parallelTrialCount" in body:
        budget["max_concurrent"] = c.whole(body["parallelTrialCount"], "spec.parallelTrialCount")
        c.map("budget.max_concurrent", "spec.parallelTrialCount")
    if "maxFailedTrialCount" in body:
        if "max_failures" not in BudgetSpec.model_fields:
            c.refuse("spec.maxFailedTrialCount", "automl records failed trials and goes on until the budget is "
                                                 "spent; it has no failure limit: remove maxFailedTrialCount")
        # Both stop the sweep once that many trials have failed.
        budget["max_failures"] = c.whole(body["maxFailedTrialCount"], "spec.maxFailedTrialCount")
        c.map("budget.max_failures", "spec.maxFailedTrialCount")
    if budget:
        spec["budget"] = budget
    if "earlyStopping" in body:
        spec["early_stopping"] = _katib_early_stopping(body["earlyStopping"], c)
    if seed is not None:
        spec["seed"] = seed
    for key, why in (("trialTemplate", "the automl trainer (--trainer) runs each trial and receives the "
                                       "parameters under their spec.parameters names"),
                     ("metricsCollectorSpec", "the trainer reports its metrics to automl directly"),
                     ("resumePolicy", "automl can resume any interrupted sweep (automl resume)")):
        if key in body:
            c.note(f"spec.{key}: ignored; {why}")
    params = body.get("parameters")
    if not isinstance(params, list) or not params:
        c.refuse("spec.parameters", f"must be a non-empty list of parameters (got {_short(params)})")
    spec["parameters"] = {}
    for i, param in enumerate(params):
        name, converted = _katib_param(i, param, c)
        if name in spec["parameters"]:
            c.refuse(f"spec.parameters[{i}].name", f"'{name}' is already a parameter; rename one of them")
        spec["parameters"][name] = converted
    return spec


def _katib_objective(node: Any, c: _Conversion) -> dict[str, Any]:
    obj = c.mapping(node, "spec.objective", "type, objectiveMetricName")
    c.unknown(obj, {"type", "goal", "objectiveMetricName", "additionalMetricNames", "metricStrategies"},
              "spec.objective", "a Katib objective")
    if "goal" in obj:
        c.refuse("spec.objective.goal", "automl has no stop-at-goal rule (a sweep runs its whole budget); remove "
                                        "goal, or lower maxTrialCount")
    if obj.get("type") not in ("maximize", "minimize"):
        c.refuse("spec.objective.type", f"must be maximize or minimize (got {obj.get('type')!r})")
    name = obj.get("objectiveMetricName")
    if not isinstance(name, str) or not name:
        c.refuse("spec.objective.objectiveMetricName", f"is required (got {_short(name)})")
    strategies = obj.get("metricStrategies") or []
    if not isinstance(strategies, list):
        c.refuse("spec.objective.metricStrategies", "must be a list of {name, value}")
    ours = [s for s in strategies if isinstance(s, dict) and s.get("name") == name]
    for i, strategy in enumerate(strategies):
        if strategy in ours and strategy.get("value") != "latest":
            c.refuse(f"spec.objective.metricStrategies[{i}].value",
                     f"automl ranks a trial by the last value it reports (Katib's latest), not by its "
                     f"{strategy.get('value')}; use latest or remove the strategy")
    if not ours:
        c.note(f"spec.objective: Katib ranks a trial by its best {name} ({obj['type'][:3]}); automl by the last "
               "value the trial reports (Katib's metricStrategies value latest)")
    if obj.get("additionalMetricNames"):
        c.note("spec.objective.additionalMetricNames: automl logs every metric the trainer reports; nothing to map")
    c.map("metric", "spec.objective")
    c.map("metric.name", "spec.objective.objectiveMetricName")
    c.map("metric.goal", "spec.objective.type")
    return {"name": name, "goal": obj["type"]}


def _katib_settings(node: Any, path: str, c: _Conversion) -> dict[str, tuple[Any, str]]:
    if node is None:
        return {}
    if not isinstance(node, list):
        c.refuse(path, "must be a list of {name, value}")
    out: dict[str, tuple[Any, str]] = {}
    for i, item in enumerate(node):
        entry = c.mapping(item, f"{path}[{i}]", "{name, value}")
        out[str(entry.get("name"))] = (entry.get("value"), f"{path}[{i}]")
    return out


def _katib_algorithm(node: Any, c: _Conversion) -> tuple[str | None, int | None]:
    if node is None:
        c.note("spec.algorithm: not given; method is automl's default (bayesian)")
        return None, None
    algo = c.mapping(node, "spec.algorithm", "algorithmName, algorithmSettings")
    c.unknown(algo, {"algorithmName", "algorithmSettings"}, "spec.algorithm", "a Katib algorithm")
    name = algo.get("algorithmName")
    path = "spec.algorithm.algorithmName"
    if name in _KATIB_REFUSED:
        c.refuse(path, _KATIB_REFUSED[name])
    if name not in _KATIB_METHODS:
        c.refuse(path, f"Katib algorithm {name!r} has no automl method; use one of {', '.join(_KATIB_METHODS)}")
    c.map("method", path)
    seed = None
    for key, (value, where) in _katib_settings(algo.get("algorithmSettings"), "spec.algorithm.algorithmSettings",
                                               c).items():
        if key != "random_state":
            c.refuse(where, f"automl has no setting for {name}'s {key}; remove it (automl's {_KATIB_METHODS[name]} "
                            "uses Optuna's defaults)")
        seed = c.whole(value, f"{where}.value")
        c.map("seed", f"{where}.value")
    if name == "bayesianoptimization":
        c.note("spec.algorithm: bayesianoptimization (a Gaussian process in Katib) becomes automl's bayesian "
               "(Optuna's TPE, or a Gaussian process on small numeric spaces); --method gp forces the GP")
    return _KATIB_METHODS[name], seed


def _katib_early_stopping(node: Any, c: _Conversion) -> dict[str, Any]:
    es = c.mapping(node, "spec.earlyStopping", "algorithmName, algorithmSettings")
    c.unknown(es, {"algorithmName", "algorithmSettings"}, "spec.earlyStopping", "Katib earlyStopping")
    if es.get("algorithmName") != "medianstop":
        c.refuse("spec.earlyStopping.algorithmName",
                 f"Katib's early stopping is medianstop, automl's median (got {es.get('algorithmName')!r})")
    settings = _katib_settings(es.get("algorithmSettings"), "spec.earlyStopping.algorithmSettings", c)
    min_epochs = 4  # Katib's default start_step
    for key, (value, where) in settings.items():
        if key == "start_step":
            min_epochs = c.whole(value, f"{where}.value")
            c.map("early_stopping.min_epochs", f"{where}.value")
        elif key == "min_trials_required":
            if c.whole(value, f"{where}.value") != 5:
                c.refuse(f"{where}.value", f"automl's median rule waits for 5 finished trials; it cannot use "
                                           f"{value}: remove min_trials_required (or set it to 5)")
        else:
            c.refuse(where, f"medianstop has no setting {key!r} in automl; remove it")
    if "min_trials_required" not in settings:
        c.note("spec.earlyStopping: automl's median rule waits for 5 finished trials (Katib's default is 3)")
    return {"method": "median", "min_epochs": min_epochs}


def _katib_param(i: int, node: Any, c: _Conversion) -> tuple[str, dict[str, Any]]:
    here = f"spec.parameters[{i}]"
    p = c.mapping(node, here, "name, parameterType, feasibleSpace")
    c.unknown(p, {"name", "parameterType", "feasibleSpace"}, here, "a Katib parameter")
    name = p.get("name")
    if not isinstance(name, str) or not name:
        c.refuse(f"{here}.name", f"is required (got {_short(name)})")
    ptype = p.get("parameterType")
    fs_path = f"{here}.feasibleSpace"
    fs = c.mapping(p.get("feasibleSpace"), fs_path, "min, max, step, list, distribution")
    target = f"parameters.{name}"
    c.map(target, here)
    if ptype in ("categorical", "discrete"):
        c.unknown(fs, {"list"}, fs_path, f"a Katib {ptype} feasibleSpace")
        values = c.choices(fs.get("list"), f"{fs_path}.list")
        c.map(f"{target}.choices", f"{fs_path}.list")
        if ptype == "discrete":  # numbers, written as text in Katib
            values = [c.number(v, f"{fs_path}.list[{k}]") for k, v in enumerate(values)]
        return name, {"type": "categorical", "choices": values}
    if ptype not in ("double", "int"):
        c.refuse(f"{here}.parameterType", f"must be double, int, categorical or discrete (got {ptype!r})")
    c.unknown(fs, {"min", "max", "step", "distribution"}, fs_path, f"a Katib {ptype} feasibleSpace")
    for key in ("min", "max"):
        if key not in fs:
            c.refuse(f"{fs_path}.{key}", f"is required for a {ptype} parameter")
    c.map(f"{target}.low", f"{fs_path}.min")
    c.map(f"{target}.high", f"{fs_path}.max")
    c.map(f"{target}.step", f"{fs_path}.step")
    c.map(f"{target}.log", f"{fs_path}.distribution")
    integer = ptype == "int"
    convert: Callable[[Any, str], int | float] = (
        (lambda v, at: c.whole(v, at)) if integer else (lambda v, at: float(c.number(v, at)))
    )
    out: dict[str, Any] = {"type": "int" if integer else "float",
                           "low": convert(fs["min"], f"{fs_path}.min"), "high": convert(fs["max"], f"{fs_path}.max")}
    dist = fs.get("distribution", "uniform")
    if dist in ("normal", "logNormal"):
        c.refuse(f"{fs_path}.distribution", f"{dist} has no automl equivalent (automl searches between min and max "
                                            "uniformly or log-uniformly); use uniform or logUniform")
    if dist not in ("uniform", "logUniform"):
        c.refuse(f"{fs_path}.distribution", f"must be uniform, logUniform, normal or logNormal (got {dist!r})")
    step = convert(fs["step"], f"{fs_path}.step") if "step" in fs else None
    if dist == "logUniform":
        if step is not None and not (integer and step == 1):
            c.refuse(f"{fs_path}.step", "automl cannot combine logUniform with a step; remove step (an int on a log "
                                        "scale takes every whole number)")
        out["log"] = True
    elif step is not None and not (integer and step == 1):
        out["step"] = step
    return name, out
