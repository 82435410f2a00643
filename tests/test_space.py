"""The search space (suggestions and grids) and the method -> Optuna sampler mapping."""

from __future__ import annotations

import tracemalloc
import warnings
from collections.abc import Iterator
from typing import Any

import optuna
import pytest

from automl.errors import SpecError
from automl.samplers import check_method, make_sampler, sampler_name
from automl.space import SearchSpace
from automl.spec import METHODS, FieldError, spec_from_dict

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True)
def _quiet_optuna() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def space_of(parameters: dict[str, Any]) -> SearchSpace:
    spec = spec_from_dict({"trainer": "mlp", "metric": "val_loss", "parameters": parameters})
    return SearchSpace(spec.parameters)


def samples(space: SearchSpace, n: int, seed: int = 0) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return out


def key(config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(config.items()))


OPTIMIZER_WHEN = {
    "type": "categorical",
    "choices": ["adam", "sgd", "rmsprop"],
    "when": {
        "sgd": {
            "momentum": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25},
            "nesterov": {"type": "categorical", "choices": [True, False]},
        },
        "adam": {"beta_idx": {"type": "int", "low": 1, "high": 2}},
    },
}


# --------------------------------------------------------------------------------------------- suggest


def test_suggest_respects_bounds_and_types() -> None:
    space = space_of({
        "depth": {"type": "int", "low": 1, "high": 4},
        "width": {"type": "int", "low": 8, "high": 64, "log": True},
        "units": {"type": "int", "low": 0, "high": 12, "step": 4},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05},
        "act": {"type": "categorical", "choices": ["relu", "tanh", 3, 0.5, True]},
    })
    configs = samples(space, 400)
    depths = {c["depth"] for c in configs}
    assert depths == {1, 2, 3, 4}  # both bounds inclusive, and reached
    assert all(isinstance(c["depth"], int) for c in configs)
    assert all(8 <= c["width"] <= 64 and isinstance(c["width"], int) for c in configs)
    assert {c["units"] for c in configs} == {0, 4, 8, 12}
    lrs = [c["lr"] for c in configs]
    assert all(1e-4 <= v <= 1e-1 for v in lrs)
    assert min(lrs) < 1e-3
    assert max(lrs) > 1e-2
    drops = [c["dropout"] for c in configs]
    assert all(0.0 <= v <= 0.5 for v in drops)
    assert all(abs(v / 0.05 - round(v / 0.05)) < 1e-9 for v in drops)  # on the step grid
    assert len({round(v / 0.05) for v in drops}) == 11
    assert {c["act"] for c in configs} == {"relu", "tanh", 3, 0.5, True}


def test_suggest_is_reproducible_with_a_seed() -> None:
    space = space_of({"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}})
    assert samples(space, 5, seed=3) == samples(space, 5, seed=3)


def test_when_parameters_appear_only_in_their_branch() -> None:
    space = space_of({"depth": {"type": "int", "low": 1, "high": 3}, "optimizer": OPTIMIZER_WHEN})
    configs = samples(space, 200)
    seen = {c["optimizer"] for c in configs}
    assert seen == {"adam", "sgd", "rmsprop"}
    for c in configs:
        assert "depth" in c
        assert ("momentum" in c) == ("nesterov" in c) == (c["optimizer"] == "sgd"), c
        assert ("beta_idx" in c) == (c["optimizer"] == "adam"), c
        if c["optimizer"] == "sgd":
            assert c["momentum"] in (0.0, 0.25, 0.5)
            assert c["nesterov"] in (True, False)
        if c["optimizer"] == "adam":
            assert c["beta_idx"] in (1, 2)


def test_nested_when_and_non_string_choice_keys() -> None:
    space = space_of({
        "batch": {
            "type": "categorical",
            "choices": [32, 64],
            "when": {32: {"mode": {"type": "categorical", "choices": ["a", "b"],
                                   "when": {"b": {"k": {"type": "int", "low": 5, "high": 6}}}}}},
        },
    })
    configs = samples(space, 200)
    for c in configs:
        assert ("mode" in c) == (c["batch"] == 32), c
        assert ("k" in c) == (c.get("mode") == "b"), c
    assert any("k" in c for c in configs)
    assert space.all_names() == ["batch", "mode", "k"]
    assert space.is_conditional
    assert space.has_categorical


# --------------------------------------------------------------------------------------------- grids


def test_grid_size_and_grid_agree_without_when() -> None:
    space = space_of({
        "depth": {"type": "int", "low": 1, "high": 4},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05},
        "act": {"type": "categorical", "choices": ["relu", "tanh"]},
    })
    configs = list(space.grid())
    assert space.grid_size() == len(configs) == 4 * 11 * 2
    assert len({key(c) for c in configs}) == len(configs)
    assert all(set(c) == {"depth", "dropout", "act"} for c in configs)


def test_grid_size_and_grid_agree_with_when() -> None:
    space = space_of({"depth": {"type": "int", "low": 1, "high": 3}, "optimizer": OPTIMIZER_WHEN})
    configs = list(space.grid())
    # adam: 2 beta_idx; sgd: 3 momentum x 2 nesterov; rmsprop: 1  -> 9, times 3 depths
    assert space.grid_size() == len(configs) == 27
    assert len({key(c) for c in configs}) == 27
    for c in configs:
        assert ("momentum" in c) == (c["optimizer"] == "sgd")
        assert ("beta_idx" in c) == (c["optimizer"] == "adam")
    assert list(space.grid()) == configs  # deterministic order


def test_grid_size_refuses_an_unstepped_float() -> None:
    space = space_of({"lr": {"type": "float", "low": 0.0, "high": 1.0}, "d": {"type": "int", "low": 1, "high": 2}})
    with pytest.raises(FieldError) as info:
        space.grid_size()
    assert info.value.field == "parameters.lr"
    assert "step" in info.value.message


def test_grid_size_refuses_an_enormous_grid() -> None:
    space = space_of({"a": {"type": "int", "low": 0, "high": 999}, "b": {"type": "int", "low": 0, "high": 999},
                      "c": {"type": "int", "low": 0, "high": 9}})
    with pytest.raises(FieldError):
        space.grid_size()


def _peak_bytes(call: Any) -> tuple[Any, int]:
    """``call()``'s result (or the exception it raised) and the peak of Python memory allocated meanwhile."""
    tracemalloc.start()
    try:
        result = call()
    except FieldError as exc:
        result = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, peak


def test_grid_size_counts_int_and_stepped_float_ranges_without_listing_them() -> None:
    # A million values: listing them took 36 MB (and a 30-million range 1.2 GB) only to count them.
    space = space_of({"x": {"type": "int", "low": 0, "high": 999_999}})
    size, peak = _peak_bytes(space.grid_size)
    assert size == 1_000_000
    assert peak < 1 << 20
    floats = space_of({"x": {"type": "float", "low": 0.0, "high": 100.0, "step": 0.001}})
    size, peak = _peak_bytes(floats.grid_size)
    assert size == 100_001
    assert peak < 1 << 20


@pytest.mark.parametrize("param", [
    {"type": "int", "low": 0, "high": 10**12},
    {"type": "int", "low": -(2**53), "high": 2**53, "step": 4},
    {"type": "float", "low": 0.0, "high": 1.0e6, "step": 1.0e-9},
    {"type": "float", "low": -1.0e308, "high": 1.0e308, "step": 1.0e-300},  # the span itself overflows to inf
])
def test_a_grid_over_a_huge_range_is_refused_at_once_naming_the_parameter(param: dict[str, Any]) -> None:
    space = space_of({"x": param, "y": {"type": "int", "low": 1, "high": 2}})  # method random: a valid spec
    error, peak = _peak_bytes(space.grid_size)  # what `automl validate` prints for any method
    assert isinstance(error, FieldError), error
    assert error.field == "parameters.x"
    assert "grid values" in error.message
    assert "larger step" in error.message
    assert peak < 1 << 20
    with pytest.raises(FieldError, match="grid values"):
        space.flat_grid()
    with pytest.raises(SpecError, match=r"parameters\.x: .*grid values"):
        spec_from_dict({"trainer": "mlp", "metric": "val_loss", "method": "grid", "parameters": {"x": param}})


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        ({"type": "float", "low": 0.0, "high": 0.5, "step": 0.05}, [round(k * 0.05, 12) for k in range(11)]),
        ({"type": "float", "low": 0.1, "high": 0.3, "step": 0.1}, [0.1, 0.2, 0.3]),
        ({"type": "float", "low": 0.1, "high": 0.35, "step": 0.1}, [0.1, 0.2, 0.3]),
        ({"type": "float", "low": -1.0, "high": 1.0, "step": 0.5}, [-1.0, -0.5, 0.0, 0.5, 1.0]),
        ({"type": "int", "low": 0, "high": 10, "step": 5}, [0, 5, 10]),
        ({"type": "int", "low": 2, "high": 4}, [2, 3, 4]),
        ({"type": "categorical", "choices": ["a", 1, None]}, ["a", 1, None]),
    ],
)
def test_flat_grid_values_are_exact(param: dict[str, Any], expected: list[Any]) -> None:
    values = space_of({"x": param}).flat_grid()["x"]
    assert values == expected


def test_flat_grid_of_stepped_float_ends_exactly_on_high() -> None:
    values = space_of({"x": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05}}).flat_grid()["x"]
    assert len(values) == 11
    assert values[0] == 0.0
    assert values[-1] == 0.5
    assert values[3] == 0.15


# --------------------------------------------------------------------------------------------- samplers


NUMERIC = {
    "depth": {"type": "int", "low": 1, "high": 3},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25},
}



@pytest.mark.parametrize("method", METHODS)
def test_make_sampler_for_every_method(method: str) -> None:
    space = space_of(NUMERIC)
    sampler = make_sampler(method, space, seed=0)
    expected = getattr(optuna.samplers, sampler_name(method, space))
    assert isinstance(sampler, expected)
    if method == "grid":
        assert isinstance(sampler, optuna.samplers.GridSampler)
    # The sampler drives a real study under ask/tell.
    study = optuna.create_study(sampler=sampler)
    for _ in range(3):
        trial = study.ask()
        config = space.suggest(trial)
        assert 1 <= config["depth"] <= 3
        assert config["dropout"] in (0.0, 0.25, 0.5)
        study.tell(trial, float(config["depth"]))


# bayesian resolves to GP on a small all-numeric space (see test_multi_objective for the other cases).
@pytest.mark.parametrize(("method", "expected"), [("bayesian", "GPSampler"), ("random", "RandomSampler"),
                                                  ("grid", "GridSampler"), ("cmaes", "CmaEsSampler")])
def test_sampler_names(method: str, expected: str) -> None:
    assert sampler_name(method, space_of(NUMERIC)) == expected


def test_cmaes_refuses_categoricals() -> None:
    space = space_of({**NUMERIC, "act": {"type": "categorical", "choices": ["relu", "tanh"]}})
    with pytest.raises(FieldError) as info:
        make_sampler("cmaes", space, seed=0)
    assert info.value.field == "method"


@pytest.mark.parametrize("method", ["cmaes", "qmc", "gp"])
def test_conditional_spaces_are_refused_by_methods_that_cannot_follow_them(method: str) -> None:
    space = space_of({"opt": {"type": "categorical", "choices": [1, 2],
                              "when": {"1": {"m": {"type": "float", "low": 0.0, "high": 1.0}}}}})
    with pytest.raises(FieldError) as info:
        check_method(method, space)
    assert info.value.field == "method"


def test_grid_method_refuses_an_unstepped_float() -> None:
    with pytest.raises(FieldError):
        make_sampler("grid", space_of({"lr": {"type": "float", "low": 0.0, "high": 1.0}}), seed=0)


def run_grid_concurrently(space: SearchSpace, concurrency: int, seed: int = 0) -> list[dict[str, Any]]:
    """What the orchestrator does: ask up to `concurrency` trials, tell the oldest, ask again."""
    study = optuna.create_study(sampler=make_sampler("grid", space, seed=seed))
    total = space.grid_size()
    done: list[dict[str, Any]] = []
    running: list[tuple[optuna.Trial, dict[str, Any]]] = []
    asked = 0
    while asked < total or running:
        while len(running) < concurrency and asked < total:
            trial = study.ask()
            running.append((trial, space.suggest(trial)))
            asked += 1
        trial, config = running.pop(0)
        study.tell(trial, 0.0)
        done.append(config)
    return done


@pytest.mark.parametrize("concurrency", [1, 2, 3])
def test_grid_sampler_runs_the_whole_grid_exactly_once(concurrency: int) -> None:
    space = space_of({
        "depth": {"type": "int", "low": 1, "high": 3},
        "act": {"type": "categorical", "choices": ["relu", "tanh"]},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05},
    })
    done = run_grid_concurrently(space, concurrency)
    assert len(done) == space.grid_size() == 66
    assert sorted(map(key, done)) == sorted(map(key, space.grid()))


@pytest.mark.parametrize("concurrency", [1, 2])
def test_conditional_grid_runs_the_whole_tree_exactly_once(concurrency: int) -> None:
    space = space_of({"depth": {"type": "int", "low": 1, "high": 2}, "optimizer": OPTIMIZER_WHEN})
    done = run_grid_concurrently(space, concurrency)
    assert len(done) == space.grid_size() == 18
    assert sorted(map(key, done), key=repr) == sorted(map(key, space.grid()), key=repr)
