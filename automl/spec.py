"""The spec file: Pydantic v2 models of DESIGN.md section 2, their validation and their loading.

Every rule a spec must obey lives here, so that a bad spec is refused before anything runs: ``load_spec``
raises ``SpecError`` whose text is one line naming the file, the field path and the rule, e.g.
``spec.yaml: parameters.lr.low: must be > 0 when log is true (got 0.0)``.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from automl.errors import SpecError

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; anything larger is a mistake or an attack
# Caps on numbers, so that an absurd value is refused here rather than breaking something later:
MAX_INT_DIGITS = 100  # any integer in a spec; Python refuses to read more than 4300 digits, and nothing needs 100
MAX_PARAM_INT = 2**53  # int parameters' bounds and step: Optuna samples integers as floats, exact up to 2**53
MAX_SEED = 2**31 - 1  # seed + trial number (the seed of a trial, and of a resumed sampler) stays in NumPy's range
MAX_TRIALS = 10_000_000  # budget.trials
MAX_CONCURRENT = 10_000  # budget.max_concurrent: one Ray actor each
MAX_EPOCHS = 1_000_000_000  # early_stopping.min_epochs (Hyperband takes logarithms of it)

METHODS = ("grid", "random", "bayesian", "tpe", "gp", "cmaes", "qmc", "nsga2", "pbt")
EARLY_STOPPING = ("none", "asha", "hyperband", "median")

# Metrics the spec may name without a goal: their goal is implied by the name.
_MINIMIZED = re.compile(r"(loss|rmse|mae|mse|error)$")

Scalar = str | int | float | bool | None


class FieldError(ValueError):
    """A validation failure that belongs to one named sub-field of the model that raised it.

    Pydantic reports model-level failures at the model's own location; the formatter appends ``field`` so the
    user reads ``parameters.lr.low`` rather than ``parameters.lr``.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(message)


class _Model(BaseModel):
    # strict: YAML already gives real types; "yes" is not a boolean and `true` is not a seed.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --------------------------------------------------------------------------------------------- parameters


class FloatParam(_Model):
    """A real-valued parameter; bounds inclusive; ``log`` samples the logarithm uniformly."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None
    mutable: bool = False  # method: pbt may change it while a member trains (explore)

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_bounds(self.low, self.high, self.log, self.step)
        return self


class IntParam(_Model):
    """An integer parameter; both bounds inclusive, always."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int | None = None
    mutable: bool = False  # method: pbt may change it while a member trains (explore)

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        for name, value in (("low", self.low), ("high", self.high), ("step", self.step)):
            if value is not None and abs(value) > MAX_PARAM_INT:
                raise FieldError(name, f"must be between -2**53 and 2**53 ({MAX_PARAM_INT}): Optuna samples integers "
                                 f"as floats, which are exact only up to there (got {_short(value)})")
        _check_bounds(self.low, self.high, self.log, self.step)
        if self.step is not None and (self.high - self.low) % self.step:
            raise FieldError(
                "high",
                f"must be low plus a multiple of step ({self.low} + k*{self.step}); got {self.high}",
            )
        return self


class CategoricalParam(_Model):
    """A choice among values; ``when`` adds parameters that exist only in trials that chose a value."""

    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)
    when: dict[str, dict[str, Parameter]] | None = None
    mutable: bool = False  # method: pbt may move it to a neighbouring choice while a member trains

    @field_validator("when", mode="before")
    @classmethod
    def _keys_as_text(cls, value: Any) -> Any:
        # YAML reads `when: {32: ...}` with an int key; choices are compared by their text form.
        if isinstance(value, dict):
            return {_choice_key(k): v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check(self) -> CategoricalParam:
        keys = [_choice_key(c) for c in self.choices]
        # `true` and 1, or 1 and 1.0, compare equal: Optuna would record one as the other.
        equal = any(a == b for i, a in enumerate(self.choices) for b in self.choices[i + 1:])
        if len(set(keys)) != len(keys) or equal:
            raise FieldError("choices", f"must not repeat a value, counting equal ones such as true and 1 "
                             f"(got {self.choices})")
        for key in self.when or {}:
            if key not in keys:
                raise FieldError("when", f"'{key}' is not one of the choices {self.choices}")
        return self


Parameter = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]
CategoricalParam.model_rebuild()


def _choice_key(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    return str(value)


def _check_bounds(low: float, high: float, log: bool, step: float | None) -> None:
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, float) and not math.isfinite(value):
            raise FieldError(name, f"must be a finite number (got {value})")
    if low > high:
        raise FieldError("high", f"must be >= low ({low}) (got {high})")
    if log and low <= 0:
        raise FieldError("low", f"must be > 0 when log is true (got {low})")
    if step is not None:
        if log:
            raise FieldError("step", "cannot be combined with log: true; remove one of them")
        if step <= 0:
            raise FieldError("step", f"must be > 0 (got {step})")


# --------------------------------------------------------------------------------------------- sections


class ValidationSplit(_Model):
    """One train/validation split of ``fraction``, or k-fold cross-validation when ``folds`` is set (then
    ``fraction`` is not used); stratified by class for classification unless ``stratify`` is false."""

    fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    stratify: bool = True
    folds: int | None = Field(default=None, ge=2)


class DataSpec(_Model):
    source: str = Field(min_length=1)
    target: str | None = None
    task: Literal["auto", "classification", "regression"] = "auto"
    validation: ValidationSplit = ValidationSplit()


class MetricSpec(_Model):
    name: str = Field(min_length=1)
    goal: Literal["maximize", "minimize"] | None = None

    @model_validator(mode="after")
    def _default_goal(self) -> MetricSpec:
        if self.goal is None:
            implied = "minimize" if _MINIMIZED.search(self.name) else "maximize"
            object.__setattr__(self, "goal", implied)
        return self

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float | None:
    """``90s``, ``10m``, ``2h`` or a number of seconds -> seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"must be a duration such as 90s, 10m or 2h (got {value!r})")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past 1e308
            raise ValueError(f"must be a finite duration (got {_short(value)})") from None
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"must be a duration such as 90s, 10m or 2h (got {value!r})")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite duration (got {_short(value)})")
    if seconds <= 0:
        raise ValueError(f"must be > 0 (got {_short(value)})")
    return seconds


class BudgetSpec(_Model):
    trials: int | None = Field(default=None, ge=1, le=MAX_TRIALS)
    max_concurrent: int | None = Field(default=None, ge=1, le=MAX_CONCURRENT)
    time: float | None = None
    trial_time: float | None = None
    max_failures: int | None = Field(default=None, ge=1)

    @field_validator("time", "trial_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return parse_duration(value)


class EarlyStoppingSpec(_Model):
    method: Literal["none", "asha", "hyperband", "median"] = "none"
    min_epochs: int = Field(default=1, ge=1, le=MAX_EPOCHS)
    reduction_factor: int = Field(default=3, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if value is None or value is False:
            return {"method": "none"}
        return {"method": value} if isinstance(value, str) else value


class PbtSpec(_Model):
    """Population-based training (``method: pbt``): ``population`` members train at once; every ``interval``
    reported steps the bottom ``quantile`` copy the checkpoint of a random top-``quantile`` member (exploit) and
    perturb its mutable parameters (explore): each is resampled with ``resample_probability``, else multiplied by
    one of ``factors`` (categoricals: a neighbouring choice), and kept inside its bounds."""

    population: int = Field(default=8, ge=2, le=10_000)
    interval: int = Field(default=2, ge=1, le=MAX_EPOCHS)
    quantile: float = Field(default=0.25, gt=0.0, le=0.5)
    resample_probability: float = Field(default=0.25, ge=0.0, le=1.0)
    factors: list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]] = Field(default=[0.8, 1.2], min_length=1,
                                                                               max_length=100)


class ResourcesSpec(_Model):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)
    retries: int = Field(default=1, ge=0)  # runs of a trial whose Ray worker died under it

    @model_validator(mode="after")
    def _check(self) -> ResourcesSpec:
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise FieldError("gpu", f"must be a whole number when above 1 (got {self.gpu})")
        return self


class TrackingSpec(_Model):
    experiment: str | None = None
    register_as: str | None = None
    # false: only the sweep's parent run is written (summary, leaderboard, best model), no child run per trial;
    # for sweeps of thousands of cheap trials, where MLflow's client is most of the per-trial cost.
    trials: bool = True

    @field_validator("register_as")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        # The name goes into models:/NAME@champion URIs, where '/', '@' and ':' would be read as separators.
        if value is not None and not _NAME.match(value):
            raise ValueError(f"must use only letters, digits, '-', '_' and '.' (got {value!r})")
        return value


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class FinalModelSpec(_Model):
    """What is logged and registered at the end (automl.final_model). By default the best trial's own model.

    ``refit``: the best configuration trained again on every row (training and validation rows, all folds) before
    it is logged. ``ensemble``: a greedy ensemble of the best trials (their validation or out-of-fold predictions)
    whenever it beats the best single trial on held-out folds; its members are refit, so it needs ``refit``.
    AutoML mode turns both on.
    """

    refit: bool = False
    ensemble: bool = False

    @model_validator(mode="after")
    def _check(self) -> FinalModelSpec:
        if self.ensemble and not self.refit:
            raise FieldError("ensemble", "an ensemble's members are refit on all rows; set refit: true too")
        return self


class Spec(_Model):
    """A whole sweep, as written in the spec file (DESIGN.md section 2)."""

    name: str = "sweep"
    trainer: str = Field(min_length=1)
    data: DataSpec | None = None
    metric: Annotated[
        Annotated[MetricSpec, Tag("one")] | Annotated[list[MetricSpec], Tag("many")],
        Discriminator(lambda v: "many" if isinstance(v, list) else "one"),
    ]
    method: Literal["grid", "random", "bayesian", "tpe", "gp", "cmaes", "qmc", "nsga2", "pbt"] = "bayesian"
    pbt: PbtSpec = PbtSpec()  # method: pbt only
    budget: BudgetSpec = BudgetSpec()
    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    fixed: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Parameter] = Field(min_length=1)
    # Configurations tried first, in order (Ray Tune's name; Optuna's enqueue_trial): known-good defaults, or
    # last sweep's best. A point may leave parameters out; the method proposes those.
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    tracking: TrackingSpec = TrackingSpec()
    final_model: FinalModelSpec = FinalModelSpec()
    # Earlier sweeps (ids or names) or MLflow experiments in the same store whose finished trials seed the sampler:
    # not run again, not counted in the budget (automl.engine.warmstart states which trials qualify).
    warm_start: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(default_factory=list,
                                                                                max_length=100)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"must use only letters, digits, '-', '_' and '.' (got {value!r})")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Spec:
        from automl.space import SearchSpace  # the space owns the rules about parameter names

        space = SearchSpace(self.parameters)
        clash = sorted(set(space.all_names()) & set(self.fixed))
        if clash:
            raise FieldError("fixed", f"'{clash[0]}' is both fixed and searched; keep it in one place")
        if self.warm_start and self.method == "grid":
            raise FieldError("warm_start", "a grid runs every point of the grid whatever came before; remove "
                             "warm_start or use another method")
        if self.points_to_evaluate and self.method == "grid":
            raise FieldError("points_to_evaluate", "a grid runs every point of the grid already; remove "
                             "points_to_evaluate or use another method")
        for i, point in enumerate(self.points_to_evaluate):
            space.check_point(point, f"points_to_evaluate.{i}")
        from automl.samplers import check_method

        objectives = self.objectives
        if not objectives:
            raise FieldError("metric", "needs at least one {name, goal}")
        names = [m.name for m in objectives]
        if len(set(names)) != len(names):
            raise FieldError("metric", f"names a metric twice ({names})")
        check_method(self.method, space, objectives=len(objectives))  # refused now, not mid-sweep
        if (self.final_model.refit or self.final_model.ensemble) and (self.data is None or len(self.objectives) > 1):
            raise FieldError("final_model", "refit and ensemble need a data: section and a single metric")
        if self.data is not None and self.data.validation.folds and self.early_stopping.method != "none":
            # A k-fold trial reports once all its folds are trained: there are no intermediate steps to prune.
            raise FieldError("early_stopping", f"cannot stop k-fold trials early (data.validation.folds: "
                             f"{self.data.validation.folds}); use early_stopping: none or remove "
                             "data.validation.folds")
        if len(objectives) > 1 and self.early_stopping.method != "none":
            raise FieldError("early_stopping", "needs a single metric to compare trials by; use early_stopping: none "
                             "with several metrics")
        self._check_pbt(space)
        return self

    def _check_pbt(self, space: Any) -> None:
        """What population-based training cannot honour is refused here, before anything runs."""
        from automl.space import mutable_paths

        mutable = mutable_paths(self.parameters)
        if self.method != "pbt":
            if mutable:
                raise FieldError(f"{mutable[0]}.mutable", "only method: pbt changes a parameter while a trial "
                                 "trains; remove mutable or use method: pbt")
            # A default section is what a resolved spec (automl validate, a sweep's saved spec) carries: accepted.
            if "pbt" in self.model_fields_set and self.pbt != PbtSpec():
                raise FieldError("pbt", f"is read only with method: pbt (method is {self.method}); remove the pbt "
                                 "section or set method: pbt")
            return
        pbt = self.pbt
        if len(self.objectives) > 1:
            raise FieldError("metric", "method: pbt ranks members by one metric; give a single metric")
        if self.budget.trials is not None and self.budget.trials != pbt.population:
            raise FieldError("budget.trials", f"must equal pbt.population ({pbt.population}) with method: pbt (got "
                             f"{self.budget.trials}); remove budget.trials or change pbt.population")
        if not mutable:
            raise FieldError("parameters", "method: pbt needs at least one parameter with mutable: true (e.g. lr), "
                             "or it is a random search; mark the parameters that may change while training")
        nested = [p for p in mutable if p.count(".when.")]
        if nested:
            raise FieldError(f"{nested[0]}.mutable", "a conditional (when:) parameter cannot change while training; "
                             "make it a top-level parameter or remove mutable")
        if self.early_stopping.method != "none":
            raise FieldError("early_stopping", "method: pbt selects members itself (exploit); use "
                             "early_stopping: none")
        if self.data is not None and self.data.validation.folds:
            raise FieldError("data.validation.folds", "method: pbt needs a checkpoint per member, which k-fold "
                             "trials do not have; remove data.validation.folds")
        if self.points_to_evaluate:
            raise FieldError("points_to_evaluate", "method: pbt samples its population at random; remove "
                             "points_to_evaluate")
        if self.warm_start:
            raise FieldError("warm_start", "method: pbt does not learn from earlier sweeps; remove warm_start")
        epochs = self.fixed.get("epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise FieldError("fixed", f"method: pbt needs fixed.epochs, the steps every member trains (e.g. fixed: "
                             f"{{epochs: 20}}); got {_short(epochs)}")
        if pbt.interval >= epochs:
            raise FieldError("pbt.interval", f"must be less than fixed.epochs ({epochs}) so that members exploit at "
                             f"least once (got {pbt.interval})")

    @property
    def objectives(self) -> list[MetricSpec]:
        """The metrics to optimise, the first one also ranking the leaderboard and choosing the best model."""
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]

    @property
    def metric_name(self) -> str:
        return self.objectives[0].name

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def direction(self) -> str:
        return self.objectives[0].goal or "maximize"  # always filled by MetricSpec's validator


# --------------------------------------------------------------------------------------------- loading


def read_spec_text(path: Path) -> str:
    """The text of a spec-like file (at most ``MAX_SPEC_BYTES``); ``SpecError`` if it cannot be read."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SpecError("file not found; check the path", source=str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read the file ({exc.strerror})", source=str(path)) from None
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"file is {size} bytes; a spec must be at most {MAX_SPEC_BYTES} bytes", source=path.name)
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SpecError(f"cannot read the file ({exc.strerror or exc})", source=str(path)) from None


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> Spec:
    """Read, parse and validate a spec file; raise ``SpecError`` (one line) on any problem.

    ``overrides`` maps dotted field paths (``budget.trials``) to values given on the command line.
    """
    path = Path(path)
    source = path.name
    raw = parse_yaml(read_spec_text(path), source)
    if "name" not in raw:
        raw["name"] = _name_from_path(path)
    return spec_from_dict(raw, source=source, overrides=overrides)


MAX_YAML_NODES = 100_000  # after expanding aliases: a "billion laughs" alias bomb is refused, not expanded
MAX_YAML_DEPTH = 64


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """Safe-load YAML (no tags that build Python objects) into a mapping; refuse alias bombs and deep nesting."""
    import yaml

    loader = _safe_loader()
    try:
        node = yaml.compose(text, Loader=loader)
        if node is not None:
            _check_yaml_size(node)
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{where}invalid YAML: {problem}", source=source) from None
    except RecursionError:
        raise SpecError(f"nesting deeper than {MAX_YAML_DEPTH} levels; a spec is a few levels deep",
                        source=source) from None
    except _YamlRefused as exc:
        raise SpecError(exc.message, path=exc.path, source=source) from None
    if not isinstance(data, dict):
        raise SpecError("must be a YAML mapping of fields (name, trainer, metric, parameters, ...)", source=source)
    return data


@functools.cache
def _safe_loader() -> Any:
    """The safe loader (no tags that build Python objects), whose values that cannot be built (a timestamp
    2001-13-45) are YAML errors with a line, not a ``ValueError`` from inside the constructor."""
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # safe loaders only: no !!python tags

    class Loader(base):  # type: ignore[misc,valid-type]
        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep=deep)
            except (ValueError, OverflowError) as exc:
                kind = str(node.tag).rsplit(":", 1)[-1]
                raise yaml.constructor.ConstructorError(
                    None, None, f"{_short(node.value)} is not a valid {kind} ({_first_line(exc)}); quote it to keep "
                    "it as text", node.start_mark) from None

    return Loader


class _YamlRefused(Exception):
    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path


_INT_TAG = "tag:yaml.org,2002:int"


def _check_yaml_size(root: Any) -> None:
    """Count the nodes the document would have once aliases are expanded (memoised: linear time); refuse
    repeated keys and integers of more than ``MAX_INT_DIGITS`` digits (naming their field)."""
    sizes: dict[int, int] = {}

    def size(node: Any, depth: int, path: str) -> int:
        if depth > MAX_YAML_DEPTH:
            raise _YamlRefused(f"nesting deeper than {MAX_YAML_DEPTH} levels; a spec is a few levels deep")
        key = id(node)
        if key in sizes:
            return sizes[key]
        total = 1
        if node.tag == _INT_TAG and isinstance(node.value, str):
            text = node.value.lstrip("+-").replace("_", "").replace(":", "")
            digits = len(text[2:] if text[:2].lower() in ("0x", "0b", "0o") else text)
            if digits > MAX_INT_DIGITS:
                raise _YamlRefused(f"integer of {digits} digits (line {node.start_mark.line + 1}); a spec's integers "
                                   f"have at most {MAX_INT_DIGITS} digits", path)
        if isinstance(node.value, list) and node.tag.endswith(":map"):
            keys = [k.value for k, _ in node.value if isinstance(getattr(k, "value", None), str)]
            repeated = sorted(k for k, n in Counter(keys).items() if n > 1)  # Counter: linear in the keys
            if repeated:
                mark = node.start_mark
                raise _YamlRefused(f"line {mark.line + 1}: key '{repeated[0]}' appears twice in the same mapping; "
                                    "keep one")
        if isinstance(node.value, list):
            for i, item in enumerate(node.value):
                children: tuple[tuple[Any, str], ...]
                if isinstance(item, tuple):  # a mapping's (key, value)
                    name = item[0].value if isinstance(item[0].value, str) else str(i)
                    children = ((item[0], path), (item[1], f"{path}.{name}" if path else name))
                else:
                    children = ((item, f"{path}.{i}" if path else str(i)),)
                for child, where in children:
                    total += size(child, depth + 1, where)
                    if total > MAX_YAML_NODES:
                        raise _YamlRefused(
                            f"more than {MAX_YAML_NODES} values once aliases are expanded (an alias bomb?)")
        sizes[key] = total
        return total

    size(root, 0, "")


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Dotted-path replacements (``budget.trials`` -> 10) in place; ``None`` values leave a field alone."""
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[leaf] = value
    return raw


def spec_from_dict(
    raw: dict[str, Any], *, source: str = "spec", overrides: dict[str, Any] | None = None
) -> Spec:
    raw = apply_overrides(dict(raw), overrides)
    _check_int_sizes(raw, "", source)
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(exc, source) from None


def _check_int_sizes(value: Any, path: str, source: str, depth: int = 0) -> None:
    """The YAML rule for mappings built in Python or from JSON: no integer of more than ``MAX_INT_DIGITS``
    digits anywhere (a 5000-digit integer cannot even be printed in an error line)."""
    if depth > MAX_YAML_DEPTH:
        return  # the model refuses what it does not expect; this only looks for huge integers
    items: Any = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(item, int) and not isinstance(item, bool) and _digits(item) > MAX_INT_DIGITS:
            raise SpecError(f"integer of {_digits(item)} digits; a spec's integers have at most {MAX_INT_DIGITS} "
                            "digits", path=where, source=source)
        _check_int_sizes(item, where, source, depth + 1)


def _digits(value: int) -> int:
    bits = abs(value).bit_length()
    # str() of an int past 4300 digits raises; log10(2) per bit is within one digit of the exact count
    return len(str(abs(value))) if bits < 10_000 else int(bits * math.log10(2)) + 1


def _short(value: Any) -> str:
    """``repr`` for an error line: huge integers and long texts shortened."""
    if isinstance(value, int) and not isinstance(value, bool) and _digits(value) > 30:
        return f"an integer of {_digits(value)} digits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _name_from_path(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-") or "sweep"


_TAGS = {"float", "int", "categorical"}


def _spec_error(exc: ValidationError, source: str) -> SpecError:
    err = exc.errors(include_url=False)[0]
    loc = _clean_loc(err["loc"])
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, FieldError):
        loc.append(ctx_error.field)
        message = ctx_error.message
    else:
        message = _message(err)
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("type")
    return SpecError(message, path=".".join(loc), source=source)


def _clean_loc(loc: tuple[Any, ...]) -> list[str]:
    """Drop Pydantic's union tags (``parameters.lr.float.low`` -> ``parameters.lr.low``)."""
    out: list[str] = []
    expect_tag = False
    for i, item in enumerate(loc):
        text = str(item)
        if expect_tag and text in _TAGS:
            expect_tag = False
            continue
        if i >= 1 and str(loc[i - 1]) == "metric" and text in ("one", "many"):
            continue  # the tag of metric's union: one {name, goal} or a list of them
        out.append(text)
        # A parameter name follows "parameters" or a when-branch (when.<choice>.<name>).
        parent = str(loc[i - 1]) if i >= 1 else ""
        grandparent = str(loc[i - 2]) if i >= 2 else ""
        expect_tag = parent == "parameters" or grandparent == "when"
    return out


def _message(err: Any) -> str:
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return "unknown field; check its spelling against `automl schema`"
    if kind == "missing":
        return "is required"
    if kind == "union_tag_invalid":
        tag = got.get("type") if isinstance(got, dict) else got
        return f"type must be one of float, int, categorical (got {tag!r})"
    if kind == "union_tag_not_found":
        return "needs a type: float, int or categorical"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"must be one of {expected} (got {got!r})"
    message = str(err["msg"])
    message = message.removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else message
    if "(got" not in message and kind not in ("model_type", "dict_type") and not isinstance(got, dict | list):
        message += f" (got {_short(got)})"
    return message
