"""Model-based search with trials in flight: a proposal made while other trials run accounts for them.

The engine asks a trial, suggests its parameters and launches it before it asks the next: the trials still
running are RUNNING trials of the study when the sampler proposes. A sampler that ignored them (Optuna's GP before
5.0) proposes the same point again for every free slot; on Hartmann6 with two in flight that cost 4 of 9 runs
(benchmarks/search_quality.py measures it).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
from typer.testing import CliRunner

from automl.cli import app
from automl.samplers import describe, make_sampler
from automl.space import SearchSpace
from automl.spec import spec_from_dict


def _space(parameters: dict[str, Any]) -> SearchSpace:
    spec = spec_from_dict({"name": "t", "trainer": "x:y", "metric": {"name": "v", "goal": "minimize"},
                           "parameters": parameters})
    return SearchSpace(spec.parameters)


ASSETS = Path(__file__).parent / "assets"
FLOATS = {"a": {"type": "float", "low": 0.0, "high": 1.0}, "b": {"type": "float", "low": 0.0, "high": 1.0}}


def _bowl(p: dict[str, Any]) -> float:
    return (p["a"] - 0.3) ** 2 + (p["b"] - 0.7) ** 2  # deterministic: the same point always scores the same


@pytest.mark.parametrize(("seed", "storage"), [(0, "journal"), (1, "memory"), (2, "memory")])
def test_two_asks_with_a_trial_running_do_not_propose_the_same_point(seed: int, storage: str,
                                                                       tmp_path: Path) -> None:
    from automl.journal import open_storage

    space = _space(FLOATS)
    sampler = make_sampler("bayesian", space, seed, trials=20)
    assert isinstance(sampler, optuna.samplers.GPSampler)
    # The engine's own search state (a journal file) as well as Optuna's in-memory storage.
    where = open_storage(tmp_path / "journal.log") if storage == "journal" else None
    study = optuna.create_study(direction="minimize", sampler=sampler, storage=where)
    for _ in range(12):  # past the GP's 10 random start-up trials
        trial = study.ask()
        study.tell(trial, _bowl(space.suggest(trial)))
    first = space.suggest(study.ask())  # still running
    second = space.suggest(study.ask())
    # Ignoring the running trial, the GP's acquisition has the same optimum both times (distance ~1e-6).
    assert math.dist(first.values(), second.values()) > 0.01, (first, second)


def test_tpe_runs_with_a_constant_liar() -> None:
    # `bayesian` picks TPE for categorical and conditional spaces: it must keep parallel trials apart too.
    space = _space({**FLOATS, "kind": {"type": "categorical", "choices": ["x", "y"]}})
    sampler = make_sampler("bayesian", space, 0, trials=20)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._constant_liar  # Optuna has no public accessor for it


def test_the_header_and_validate_say_which_sampler_and_parallel_strategy_run(tmp_path: Any) -> None:
    space = _space(FLOATS)
    assert describe("bayesian", space, trials=30, concurrent=4) == (
        "Optuna GPSampler; with trials in flight, pending trials in its acquisition (Optuna's qLogEI over the "
        "running trials)")
    assert describe("bayesian", space, trials=30, concurrent=1) == "Optuna GPSampler, one trial at a time"
    assert describe("pbt", space, trials=8, concurrent=4).startswith("population-based training: the population "
                                                                      "drawn by Optuna's RandomSampler")
    shutil.copy(ASSETS / "toy_trainers.py", tmp_path)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ntrainer: toy_trainers:quadratic\nmetric: {name: score, goal: maximize}\n"
                    "method: bayesian\nbudget: {trials: 30, max_concurrent: 2}\n"
                    "parameters:\n  x: {type: float, low: 0, high: 1}\n  kind: {type: categorical, choices: [a, b]}\n")
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0, result.output
    assert ("# search: Optuna TPESampler; with trials in flight, constant liar (running trials count among the "
            "bad ones)") in result.output
