"""Property tests of the search space: random valid spaces, every method's real Optuna sampler.

Hypothesis builds parameter spaces the spec accepts (floats and ints with or without log or step, categoricals
with ``when`` branches up to depth 2, a name repeated only in sibling branches of one categorical with the same
settings). For each method, ``make_sampler`` + ``SearchSpace.suggest`` under ask/tell must propose
configurations that lie in the space and obey ``when``, and the same seed must give the same sequence.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import optuna
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from automl.errors import SpecError
from automl.samplers import check_method, make_sampler
from automl.space import SearchSpace
from automl.spec import FieldError, spec_from_dict

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_CONFIGS = 8
MAX_GRID = 64
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Categorical values, no two of which compare equal or share a text form (True == 1, 0 == False, 1 == 1.0 would:
# see test_equal_choices_with_different_text_are_refused below).
CHOICE_POOL: list[Any] = ["a", "b", "relu", "x y", 2, 3, -7, 64, 0.5, 1.5, -2.25, True, None]

Raw = dict[str, dict[str, Any]]


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental samplers; Optuna adjusting a high that is off the step grid
        yield


# --------------------------------------------------------------------------------------------- strategies


def _nice_float(draw: st.DrawFn, low: float, high: float) -> float:
    return draw(st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False,
                          allow_subnormal=False))


@st.composite
def float_params(draw: st.DrawFn, grid: bool = False) -> dict[str, Any]:
    kind = "step" if grid else draw(st.sampled_from(["plain", "log", "step"]))
    if kind == "log":
        low = _nice_float(draw, 1e-6, 1e3)
        high = low * draw(st.sampled_from([1.0, 1.5, 10.0, 1e3, 1e4]))
        return {"type": "float", "low": low, "high": high, "log": True}
    if kind == "step":
        step = draw(st.sampled_from(["0.001", "0.05", "0.1", "0.25", "0.3", "0.5", "1", "2.5"]))
        low = Decimal(draw(st.integers(-400, 400))) * Decimal("0.05")
        if grid:
            # As a YAML user types them: decimal literals. (Computed bounds such as low + k*step can fall a hair
            # below a grid point: see test_grid_point_a_hair_above_high_is_not_lost.)
            high: Any = low + Decimal(step) * draw(st.integers(0, 4))
            return {"type": "float", "low": float(low), "high": float(high), "step": float(step)}
        # high need not be on the step grid (Optuna lowers it onto the grid), and low is computed, not typed.
        computed = float(low) * 1.0000001
        return {"type": "float", "low": computed, "high": computed + _nice_float(draw, 0.0, 50.0), "step": float(step)}
    low = _nice_float(draw, -1e3, 1e3)
    high = low + draw(st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e3)))
    return {"type": "float", "low": low, "high": high}


@st.composite
def int_params(draw: st.DrawFn, grid: bool = False) -> dict[str, Any]:
    kind = draw(st.sampled_from(["plain", "step"] if grid else ["plain", "log", "step"]))
    if kind == "log":
        low = draw(st.integers(1, 100))
        return {"type": "int", "low": low, "high": low + draw(st.integers(0, 5000)), "log": True}
    low = draw(st.integers(-50, 50))
    if kind == "step":
        step = draw(st.integers(1, 5))
        return {"type": "int", "low": low, "high": low + step * draw(st.integers(0, 4 if grid else 20)),
                "step": step}
    return {"type": "int", "low": low, "high": low + draw(st.integers(0, 4 if grid else 100))}


def _text(value: Any) -> str:
    """A choice's text form, as a YAML key reads it (true, null, 2, 0.5)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


@st.composite
def spaces(draw: st.DrawFn, *, categorical: bool = True, when: bool = True, grid: bool = False) -> Raw:
    """A raw ``parameters:`` mapping the spec accepts; names are unique except shared sibling-branch names."""
    counter = iter(range(1000))

    def leaf() -> dict[str, Any]:
        kinds = ["float", "int"] + (["categorical"] if categorical else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "float":
            return draw(float_params(grid=grid))
        if kind == "int":
            return draw(int_params(grid=grid))
        return {"type": "categorical",
                "choices": draw(st.lists(st.sampled_from(CHOICE_POOL), min_size=1, max_size=4, unique=True))}

    def level(depth: int, size: int) -> Raw:
        params: Raw = {}
        for _ in range(size):
            param = leaf()
            if param["type"] == "categorical" and when and depth < 2 and draw(st.booleans()):
                chosen = draw(st.lists(st.sampled_from(param["choices"]), min_size=1, unique=True))
                branches: dict[Any, Raw] = {}
                for value in chosen:
                    key = _text(value) if draw(st.booleans()) else value  # YAML gives either form
                    branches[key] = level(depth + 1, draw(st.integers(1, 2)))
                if len(branches) >= 2 and draw(st.booleans()):
                    # The same name, same settings, in two sibling branches: one dimension, never both at once.
                    first, second = list(branches.values())[:2]
                    name, shared = next(iter(first.items()))
                    if shared["type"] != "categorical":
                        second[name] = dict(shared)
                param["when"] = branches
            params[f"p{next(counter)}"] = param
        return params

    return level(0, draw(st.integers(1, 3)))


def make_space(raw: Raw, method: str = "random") -> SearchSpace:
    spec = spec_from_dict({"trainer": "toy:train", "metric": "score", "method": method, "parameters": raw})
    return SearchSpace(spec.parameters)


# --------------------------------------------------------------------------------------------- checks


def _same(value: Any, choice: Any) -> bool:
    return type(value) is type(choice) and value == choice


def _branch(param: dict[str, Any], value: Any) -> Raw | None:
    for key, branch in (param.get("when") or {}).items():
        if _same(key, value) or (isinstance(key, str) and key == _text(value)):
            return branch
    return None


def check_config(raw: Raw, config: dict[str, Any], *, int_for_float: bool = False) -> None:
    """``config`` lies in the space, and holds exactly the parameters its own choices lead to.

    ``int_for_float`` tolerates an int for a float parameter (a known bug of grids over ``when``: see
    test_grid_over_when_gives_floats_for_float_parameters).
    """
    expected: set[str] = set()

    def walk(params: Raw, where: str) -> None:
        for name, p in params.items():
            expected.add(name)
            assert name in config, f"{where}.{name} missing from {config}"
            v = config[name]
            if p["type"] == "categorical":
                assert any(_same(v, c) for c in p["choices"]), (name, v, p["choices"])
                branch = _branch(p, v)
                if branch:
                    walk(branch, f"{where}.{name}.when.{_text(v)}")
                continue
            if p["type"] == "int":
                assert type(v) is int, (name, v)
            else:
                assert type(v) is float or (int_for_float and type(v) is int), (name, v)
            assert p["low"] <= v <= p["high"], (name, v, p)
            step = p.get("step")
            if step:
                k = (v - p["low"]) / step
                assert abs(k - round(k)) < 1e-6, (name, v, p)

    walk(raw, "parameters")
    assert set(config) == expected, f"unexpected {set(config) - expected}, missing {expected - set(config)}"


def _is_float_param(raw: Raw, name: str) -> bool:
    for key, p in raw.items():
        if key == name and p["type"] == "float":
            return True
        if any(_is_float_param(branch, name) for branch in (p.get("when") or {}).values()):
            return True
    return False


def _score(config: dict[str, Any]) -> float:
    """A deterministic objective value for a configuration."""
    total = 0.0
    for name in sorted(config):
        v = config[name]
        if isinstance(v, bool) or v is None:
            total += 0.5 if v else 0.0
        elif isinstance(v, int | float):
            total += math.tanh(float(v) / 100.0)
        else:
            total += len(str(v)) / 10.0
    return total


def sample(space: SearchSpace, method: str, seed: int, n: int = N_CONFIGS) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=make_sampler(method, space, seed), direction="minimize")
    configs = []
    for _ in range(n):
        trial = study.ask()
        config = space.suggest(trial)
        study.tell(trial, _score(config))
        configs.append(config)
    return configs


def _canon(config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, round(v, 9) if type(v) is float else (type(v).__name__, v)) for k, v in config.items()))


# TPE and GP propose at random for their first 10 trials: sample past that so that their models propose too
# (one GP proposal costs ~0.3 s, hence one for GP and fewer examples).
N_BY_METHOD = {"bayesian": 11, "tpe": 12, "gp": 11}


def check_method_on(raw: Raw, method: str, seed: int) -> list[dict[str, Any]]:
    space = make_space(raw, method)  # a valid space is accepted, with the method, by the spec itself
    n = N_BY_METHOD.get(method, N_CONFIGS)
    first = sample(space, method, seed, n)
    for config in first:
        check_config(raw, config, int_for_float=method == "grid" and space.is_conditional)
    assert sample(space, method, seed, n) == first, f"{method}: seed {seed} did not reproduce the sequence"
    return first


# --------------------------------------------------------------------------------------------- properties

SEEDS = st.integers(0, 2**31 - 1)


@pytest.mark.parametrize("method", ["random", "bayesian", "tpe", "nsga2"])
@PROPERTY_SETTINGS
@given(raw=spaces(), seed=SEEDS)
def test_any_space_any_method(method: str, raw: Raw, seed: int) -> None:
    check_method_on(raw, method, seed)


@PROPERTY_SETTINGS
@given(raw=spaces(when=False), seed=SEEDS)
def test_spaces_without_when_qmc(raw: Raw, seed: int) -> None:
    check_method_on(raw, "qmc", seed)


@settings(PROPERTY_SETTINGS, max_examples=10)
@given(raw=spaces(when=False), seed=SEEDS)
def test_spaces_without_when_gp(raw: Raw, seed: int) -> None:
    check_method_on(raw, "gp", seed)


@PROPERTY_SETTINGS
@given(raw=spaces(categorical=False, when=False), seed=SEEDS)
def test_numeric_spaces_cmaes(raw: Raw, seed: int) -> None:
    check_method_on(raw, "cmaes", seed)


@PROPERTY_SETTINGS
@given(raw=spaces(grid=True), seed=SEEDS)
def test_small_grids(raw: Raw, seed: int) -> None:
    size = SearchSpace(spec_from_dict({"trainer": "toy:train", "metric": "score", "parameters": raw}).parameters
                       ).grid_size()
    assume(size <= MAX_GRID)
    configs = check_method_on(raw, "grid", seed)
    points = {_canon(c) for c in make_space(raw, "grid").grid()}
    assert len(points) == size
    lenient = make_space(raw).is_conditional  # see test_grid_over_when_gives_floats_for_float_parameters
    for config in configs:
        if lenient:
            config = {k: float(v) if type(v) is int and _is_float_param(raw, k) else v for k, v in config.items()}
        assert _canon(config) in points, config
    head = configs[: min(size, N_CONFIGS)]
    assert len({_canon(c) for c in head}) == len(head), "the grid repeated a point before it was exhausted"


@PROPERTY_SETTINGS
@given(raw=spaces())
def test_check_method_agrees_with_the_space(raw: Raw) -> None:
    """What a method refuses, it refuses for the documented reason only; everything else is accepted."""
    space = make_space(raw)
    for method in ("random", "bayesian", "tpe", "nsga2", "cmaes", "qmc", "gp"):
        refused = (method in ("cmaes", "qmc", "gp") and space.is_conditional) or (
            method == "cmaes" and space.has_categorical)
        if refused:
            with pytest.raises(FieldError) as info:
                check_method(method, space)
            assert info.value.field == "method"
        else:
            check_method(method, space)


# --------------------------------------------------------------------------------------------- found bugs


def _grid_points(raw: Raw) -> tuple[list[Any], list[Any]]:
    """The grid automl enumerates, and what a grid study actually proposes over as many trials."""
    space = make_space(raw, "grid")
    return [c["p"] for c in space.grid()], sorted(c["p"] for c in sample(space, "grid", 0, space.grid_size()))


def test_grid_with_a_tiny_step_keeps_its_points() -> None:
    raw: Raw = {"p": {"type": "float", "low": 1e-14, "high": 5e-14, "step": 1e-14}}
    enumerated, proposed = _grid_points(raw)
    assert len(set(enumerated)) == 5
    assert all(1e-14 <= v <= 5e-14 for v in proposed), proposed


def test_grid_over_when_gives_floats_for_float_parameters() -> None:
    raw: Raw = {"opt": {"type": "categorical", "choices": ["a", "b"],
                        "when": {"a": {"x": {"type": "float", "low": 0.0, "high": 1.0, "step": 1.0}}}}}
    configs = sample(make_space(raw, "grid"), "grid", 0, n=3)
    values = [c["x"] for c in configs if "x" in c]
    assert sorted(values) == [0.0, 1.0]
    assert all(type(v) is float for v in values), values


def test_equal_choices_with_different_text_are_refused() -> None:
    raw: Raw = {"a": {"type": "categorical", "choices": [True, 1],
                      "when": {"1": {"m": {"type": "int", "low": 0, "high": 3}}}}}
    # Accepted, a grid sweep over it would fail inside Optuna's BruteForceSampler ("param_name mismatch"),
    # and other samplers would store trial a=1 as a=True.
    with pytest.raises(SpecError, match="choices"):
        make_space(raw, "grid")
