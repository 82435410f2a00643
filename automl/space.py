"""The search space: spec parameters -> Optuna suggestions (define-by-run) and grid enumeration.

Define-by-run keeps conditional parameters (``when``) honest: a trial asks only for the parameters its own
choices lead to, so Optuna records (and MLflow shows) exactly what each trial used.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from automl.spec import CategoricalParam, FieldError, FloatParam, IntParam, _choice_key

if TYPE_CHECKING:
    import optuna

    from automl.spec import Parameter

MAX_GRID = 1_000_000  # enumerating more than this is never what a user meant
_HUGE = 10**15  # grid sizes are shown up to here, and "more than 1e+15" past it


class SearchSpace:
    """A tree of parameters; categorical choices may open sub-spaces (``when``)."""

    def __init__(self, parameters: Mapping[str, Parameter]) -> None:
        self.parameters = dict(parameters)
        self._check_names(self.parameters, seen={})

    # ------------------------------------------------------------------ structure

    def all_names(self) -> list[str]:
        """Every parameter name that some trial may use, in spec order."""
        names: list[str] = []
        for name, _ in _walk(self.parameters):
            if name not in names:
                names.append(name)
        return names

    @property
    def is_conditional(self) -> bool:
        return any(isinstance(p, CategoricalParam) and p.when for _, p in _walk(self.parameters))

    @property
    def has_categorical(self) -> bool:
        return any(isinstance(p, CategoricalParam) for _, p in _walk(self.parameters))

    @staticmethod
    def _check_names(
        params: Mapping[str, Parameter], seen: dict[str, Parameter], outer: frozenset[str] = frozenset(),
        path: str = "parameters",
    ) -> frozenset[str]:
        """Check the names of one level; returns every name a trial may use from it.

        A name may repeat only across mutually exclusive `when` branches (of one choice), and only if it means
        the same thing there: Optuna's samplers (and a user reading MLflow) treat one name as one dimension.
        """
        used: set[str] = set()
        for name, param in params.items():
            here = f"{path}.{name}"
            plain = param.model_copy(update={"when": None}) if isinstance(param, CategoricalParam) else param
            if name in seen and seen[name] != plain:
                raise FieldError(here, f"'{name}' is defined twice with different settings; rename one of them")
            seen[name] = plain
            reach = {name}
            if isinstance(param, CategoricalParam):
                inner = outer | frozenset(params)
                for choice, branch in (param.when or {}).items():
                    reach |= SearchSpace._check_names(branch, seen, inner, f"{here}.when.{choice}")
            clash = sorted(reach & (used | outer))
            if clash:
                raise FieldError(here, f"'{clash[0]}' can be used twice by one trial (outside this when branch, "
                                 "or under another choice); rename one of them")
            used |= reach
        return frozenset(used)

    # ------------------------------------------------------------------ sampling

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Ask ``trial`` for one configuration, following ``when`` branches define-by-run."""
        values: dict[str, Any] = {}
        _suggest_into(trial, self.parameters, values)
        return values

    def check_point(self, point: Mapping[str, Any], path: str) -> None:
        """A configuration to try first (``points_to_evaluate``): known names, values inside their ranges.

        A point may leave parameters out; the sampler proposes those. ``FieldError`` names the first problem.
        """
        params = dict(_walk(self.parameters))
        for name, value in point.items():
            param = params.get(name)
            here = f"{path}.{name}"
            if param is None:
                raise FieldError(here, f"is not a parameter of this spec; use one of {', '.join(params)}")
            if isinstance(param, CategoricalParam):
                if value not in param.choices:
                    raise FieldError(here, f"must be one of {param.choices} (got {value!r})")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise FieldError(here, f"must be a number (got {value!r})")
            elif isinstance(param, IntParam) and value != int(value):
                raise FieldError(here, f"must be an integer (got {value!r})")
            elif not param.low <= value <= param.high:
                raise FieldError(here, f"must be within [{param.low}, {param.high}] (got {value!r})")

    def place(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """An earlier configuration (``values``: parameter name -> value or its text, as MLflow keeps params) put in
        this space: the typed values of the parameters a trial of this space would use, following ``when``
        branches, and their Optuna distributions (exactly those ``suggest`` asks for). ``ValueError`` names the
        first parameter that is missing or outside this space. Names this space does not have are ignored."""
        params: dict[str, Any] = {}
        distributions: dict[str, Any] = {}
        _place_into(self.parameters, values, params, distributions)
        return params, distributions

    # ------------------------------------------------------------------ grid

    def grid_size(self) -> int:
        """Number of distinct configurations of a grid over this space.

        Raises ``FieldError`` if a parameter is continuous (a float without ``step``).
        """
        return _count(self.parameters, path="parameters")

    def grid(self) -> Iterator[dict[str, Any]]:
        """Every configuration of the grid, in a deterministic order."""
        yield from _enumerate(self.parameters)

    def flat_grid(self) -> dict[str, list[Any]]:
        """Per-parameter value lists for Optuna's ``GridSampler`` (spaces without ``when``)."""
        return {name: _values(param, f"parameters.{name}") for name, param in self.parameters.items()}


def mutable_paths(params: Mapping[str, Parameter], path: str = "parameters") -> list[str]:
    """The field paths of parameters marked ``mutable`` (PBT may change them while training), in spec order."""
    found: list[str] = []
    for name, param in params.items():
        if param.mutable:
            found.append(f"{path}.{name}")
        if isinstance(param, CategoricalParam):
            for choice, branch in (param.when or {}).items():
                found.extend(mutable_paths(branch, f"{path}.{name}.when.{choice}"))
    return found


def _walk(params: Mapping[str, Parameter]) -> Iterator[tuple[str, Parameter]]:
    for name, param in params.items():
        yield name, param
        if isinstance(param, CategoricalParam):
            for branch in (param.when or {}).values():
                yield from _walk(branch)


def _suggest_into(trial: optuna.Trial, params: Mapping[str, Parameter], out: dict[str, Any]) -> None:
    for name, param in params.items():
        if isinstance(param, FloatParam):
            # float(): a grid's brute-force sampler may hand back 1 for 1.0
            out[name] = float(trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step))
        elif isinstance(param, IntParam):
            out[name] = trial.suggest_int(name, param.low, param.high, step=param.step or 1, log=param.log)
        else:
            choice = trial.suggest_categorical(name, param.choices)
            out[name] = choice
            branch = (param.when or {}).get(_choice_key(choice))
            if branch:
                _suggest_into(trial, branch, out)


def distribution(param: Parameter) -> Any:
    """The Optuna distribution ``_suggest_into`` samples ``param`` from."""
    import optuna

    if isinstance(param, FloatParam):
        return optuna.distributions.FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return optuna.distributions.IntDistribution(param.low, param.high, log=param.log, step=param.step or 1)
    return optuna.distributions.CategoricalDistribution(param.choices)


def _place_into(params: Mapping[str, Parameter], values: Mapping[str, Any], out: dict[str, Any],
                dists: dict[str, Any]) -> None:
    for name, param in params.items():
        if name not in values:
            raise ValueError(f"it has no '{name}'")
        raw = values[name]
        if isinstance(param, CategoricalParam):
            matches = [c for c in param.choices if c == raw and type(c) is type(raw)] or [
                c for c in param.choices if str(raw) in (str(c), _choice_key(c))]
            if not matches:
                raise ValueError(f"its {name}={raw!r} is not one of {param.choices}")
            value: Any = matches[0]
        else:
            try:
                number = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"its {name}={raw!r} is not a number") from None
            if isinstance(param, IntParam):
                if not number.is_integer():
                    raise ValueError(f"its {name}={raw!r} is not a whole number")
                value = int(number)
            else:
                value = number
        dist = distribution(param)
        if not dist._contains(dist.to_internal_repr(value)):
            raise ValueError(f"its {name}={value!r} is outside this sweep's range for it")
        out[name] = value
        dists[name] = dist
        branch = (param.when or {}).get(_choice_key(value)) if isinstance(param, CategoricalParam) else None
        if branch:
            _place_into(branch, values, out, dists)


def _values(param: Parameter, path: str) -> list[Any]:
    count = _size(param, path)  # refuses before anything is listed
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if isinstance(param, IntParam):
        return list(range(param.low, param.high + 1, param.step or 1))
    step = param.step or 0.0  # a float here has a step: _size refused it otherwise
    # 12 significant digits keep 0.1 + 3*0.05 from becoming 0.25000000000000006 (Optuna would reject it)
    # without collapsing tiny steps (1e-14) to zero.
    return [float(f"{param.low + k * step:.12g}") for k in range(count)]


def _size(param: Parameter, path: str) -> int:
    """How many grid values one parameter has, counted without listing them (an int range may be 1e12 wide);
    ``FieldError`` past ``MAX_GRID``, the most a grid lists."""
    if isinstance(param, CategoricalParam):
        count = len(param.choices)
    elif isinstance(param, IntParam):
        count = (param.high - param.low) // (param.step or 1) + 1
    elif param.step is None:
        raise FieldError(
            path, "a grid needs a step for a float parameter (add step:, or use method: random or bayesian)"
        )
    else:
        ratio = (param.high - param.low) / param.step  # inf when the span overflows (-1e308 to 1e308)
        count = math.floor(ratio + 1e-9) + 1 if ratio < _HUGE else _HUGE
    if count > MAX_GRID:
        shown = str(count) if count < _HUGE else f"more than {_HUGE:.0e}"
        raise FieldError(path, f"has {shown} grid values (a grid lists at most {MAX_GRID}); use a larger step, or "
                         "method: random or bayesian")
    return count


def _count(params: Mapping[str, Parameter], path: str) -> int:
    total = 1
    for name, param in params.items():
        here = f"{path}.{name}"
        if isinstance(param, CategoricalParam) and param.when:
            total *= sum(
                _count(param.when.get(_choice_key(c), {}), f"{here}.when.{_choice_key(c)}")
                for c in param.choices
            )
        else:
            total *= _size(param, here)
        if total > MAX_GRID:
            raise FieldError("parameters", f"the grid has more than {MAX_GRID} points; use fewer values")
    return total


def _enumerate(params: Mapping[str, Parameter]) -> Iterator[dict[str, Any]]:
    options: list[list[dict[str, Any]]] = []
    for name, param in params.items():
        choices: list[dict[str, Any]] = []
        for value in _values(param, name):
            branch = param.when.get(_choice_key(value)) if isinstance(param, CategoricalParam) and param.when else None
            if branch:
                choices.extend({name: value, **sub} for sub in _enumerate(branch))
            else:
                choices.append({name: value})
        options.append(choices)
    for combo in itertools.product(*options):
        merged: dict[str, Any] = {}
        for part in combo:
            merged.update(part)
        yield merged
