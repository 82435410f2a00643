"""The spec contract (DESIGN.md section 2): defaults, and one-line errors that name the field path."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from automl.errors import AutoMLError, SpecError
from automl.spec import (
    MAX_CONCURRENT,
    MAX_INT_DIGITS,
    MAX_SEED,
    MAX_SPEC_BYTES,
    MAX_TRIALS,
    FloatParam,
    load_spec,
    spec_from_dict,
)

BASE: dict[str, Any] = {
    "trainer": "mlp",
    "metric": "val_loss",
    "parameters": {
        "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
        "depth": {"type": "int", "low": 1, "high": 4},
    },
}


def write(tmp_path: Path, content: dict[str, Any] | str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def spec_with(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    change(raw)
    return raw


def spec_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    error = info.value
    text = str(error)
    assert "\n" not in text, f"the error must be one line: {text!r}"
    assert isinstance(error, AutoMLError)
    assert error.exit_code == 2
    return error


# --------------------------------------------------------------------------------------------- valid specs


def test_minimal_spec_gets_every_default(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE, "my_sweep.yaml"))
    assert spec.name == "my_sweep"  # from the file stem when the spec has no name
    assert spec.trainer == "mlp"
    assert spec.data is None
    assert spec.method == "bayesian"
    assert spec.budget.trials is None
    assert spec.budget.max_concurrent is None
    assert spec.budget.time is None
    assert spec.early_stopping.method == "none"
    assert spec.early_stopping.reduction_factor == 3
    assert spec.resources.cpu == 1.0
    assert spec.resources.gpu == 0.0
    assert spec.seed == 0
    assert spec.fixed == {}
    assert spec.tracking.experiment is None
    assert spec.experiment_name == "my_sweep"
    lr = spec.parameters["lr"]
    assert isinstance(lr, FloatParam)
    assert (lr.low, lr.high, lr.log, lr.step) == (1.0e-4, 1.0e-1, True, None)


def test_explicit_name_wins_over_file_stem(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, {"name": "digits-mlp.v2", **BASE}, "other.yaml"))
    assert spec.name == "digits-mlp.v2"
    assert spec.experiment_name == "digits-mlp.v2"


def test_name_from_awkward_file_stem_is_a_valid_sweep_name(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE, "my sweep (v2).yaml"))
    assert spec.name == "my-sweep-v2"


def test_data_section_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, {**BASE, "data": {"source": "sklearn:digits"}}))
    assert spec.data is not None
    assert spec.data.source == "sklearn:digits"
    assert spec.data.target is None
    assert spec.data.task == "auto"
    assert spec.data.validation.fraction == 0.2
    assert spec.data.validation.stratify is True


@pytest.mark.parametrize(
    ("metric", "goal"),
    [
        ("val_loss", "minimize"),
        ("val_log_loss", "minimize"),
        ("val_rmse", "minimize"),
        ("val_mae", "minimize"),
        ("val_accuracy", "maximize"),
        ("val_f1", "maximize"),
        ("val_roc_auc", "maximize"),
        ("val_r2", "maximize"),
    ],
)
def test_metric_goal_is_inferred_from_its_name(tmp_path: Path, metric: str, goal: str) -> None:
    short = load_spec(write(tmp_path, {**BASE, "metric": metric}, "short.yaml"))
    long = load_spec(write(tmp_path, {**BASE, "metric": {"name": metric}}, "long.yaml"))
    assert short.metric.name == long.metric.name == metric
    assert short.metric.goal == long.metric.goal == goal
    assert short.direction == goal


def test_explicit_metric_goal_is_kept(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, {**BASE, "metric": {"name": "val_loss", "goal": "maximize"}}))
    assert spec.direction == "maximize"


def test_early_stopping_shorthand(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, {**BASE, "early_stopping": "asha"}))
    assert spec.early_stopping.method == "asha"
    assert spec.early_stopping.min_epochs == 1
    assert spec.early_stopping.reduction_factor == 3


def test_early_stopping_full_form(tmp_path: Path) -> None:
    raw = {**BASE, "early_stopping": {"method": "hyperband", "min_epochs": 2, "reduction_factor": 4}}
    spec = load_spec(write(tmp_path, raw))
    assert (spec.early_stopping.method, spec.early_stopping.min_epochs) == ("hyperband", 2)
    assert spec.early_stopping.reduction_factor == 4


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("1.5h", 5400.0), (45, 45.0)]
)
def test_durations_become_seconds(tmp_path: Path, text: Any, seconds: float) -> None:
    spec = load_spec(write(tmp_path, {**BASE, "budget": {"time": text, "trial_time": text}}))
    assert spec.budget.time == seconds
    assert spec.budget.trial_time == seconds


def test_full_design_example_loads(tmp_path: Path) -> None:
    text = """
name: digits-mlp
trainer: mlp
data:
  source: sklearn:digits
  target: target
  task: auto
  validation: {fraction: 0.2, stratify: true}
metric: {name: val_accuracy, goal: maximize}
method: bayesian
budget: {trials: 40, max_concurrent: 2, time: 10m}
early_stopping: {method: asha, min_epochs: 2, reduction_factor: 3}
resources: {cpu: 1, gpu: 0.25}
seed: 0
fixed: {epochs: 20}
parameters:
  lr:         {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
  batch_size: {type: categorical, choices: [32, 64, 128, 256]}
  depth:      {type: int, low: 1, high: 4}
  width:      {type: int, low: 32, high: 512, log: true}
  dropout:    {type: float, low: 0.0, high: 0.5, step: 0.05}
  activation: {type: categorical, choices: [relu, gelu, tanh, silu]}
  optimizer:
    type: categorical
    choices: [adam, sgd, rmsprop]
    when:
      sgd:
        momentum: {type: float, low: 0.0, high: 0.99}
tracking:
  experiment: digits
  register_as: digits-mlp
"""
    spec = load_spec(write(tmp_path, text))
    assert spec.budget.time == 600.0
    assert spec.resources.gpu == 0.25
    assert spec.experiment_name == "digits"
    assert spec.fixed == {"epochs": 20}
    optimizer = spec.parameters["optimizer"]
    assert optimizer.when is not None  # type: ignore[union-attr]
    assert set(optimizer.when) == {"sgd"}  # type: ignore[union-attr]


def test_when_keys_match_non_string_choices(tmp_path: Path) -> None:
    text = """
trainer: mlp
metric: val_loss
parameters:
  batch_size:
    type: categorical
    choices: [32, 64]
    when:
      32: {warmup: {type: int, low: 0, high: 3}}
"""
    spec = load_spec(write(tmp_path, text))
    assert spec.parameters["batch_size"].choices == [32, 64]  # type: ignore[union-attr]


def test_same_param_under_two_branches_with_same_settings_is_allowed(tmp_path: Path) -> None:
    momentum = {"type": "float", "low": 0.0, "high": 0.99}
    raw = spec_with(lambda d: d["parameters"].update(optimizer={
        "type": "categorical", "choices": ["sgd", "rmsprop"],
        "when": {"sgd": {"momentum": momentum}, "rmsprop": {"momentum": momentum}},
    }))
    load_spec(write(tmp_path, raw))


def test_overrides_replace_dotted_fields(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    spec = load_spec(path, overrides={"budget.trials": 5, "method": "random", "seed": None, "budget.time": "90s"})
    assert spec.budget.trials == 5
    assert spec.method == "random"
    assert spec.seed == 0  # None means "not given on the command line"
    assert spec.budget.time == 90.0


def test_bad_override_names_its_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, BASE), overrides={"budget.trials": 0})
    assert info.value.path == "budget.trials"


def test_grid_with_stepped_floats_is_accepted(tmp_path: Path) -> None:
    raw = spec_with(lambda d: d.update(method="grid", parameters={
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05},
        "depth": {"type": "int", "low": 1, "high": 4},
    }))
    assert load_spec(write(tmp_path, raw)).method == "grid"


# --------------------------------------------------------------------------------------------- malformed specs


def _param(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["parameters"].update(x=fields)


def _set(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.update(fields)


def _pop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.pop(key)


_OPT_SGD = {"type": "categorical", "choices": ["adam", "sgd"]}

# Numbers that break something later (Optuna, NumPy, Ray) however they arrive: in a YAML file or a JSON mapping.
ABSURD_NUMBERS: list[Any] = [
    pytest.param(_param(type="int", low=0, high=2**53 + 2), "parameters.x.high", "2**53", id="int-high-past-2**53"),
    pytest.param(_param(type="int", low=-(2**60), high=0), "parameters.x.low", "2**53", id="int-low-past-2**53"),
    pytest.param(_param(type="int", low=-(2**53), high=2**53, step=2**54), "parameters.x.step", "2**53",
                 id="int-step-past-2**53"),
    pytest.param(_set(seed=-1), "seed", "greater than or equal to 0", id="seed-negative"),
    pytest.param(_set(seed=2**40), "seed", "less than or equal to 2147483647", id="seed-past-2**31"),
    pytest.param(_set(budget={"trials": 10**9}), "budget.trials", "10000000", id="trials-past-cap"),
    pytest.param(_set(budget={"max_concurrent": 10**6}), "budget.max_concurrent", "10000",
                 id="max-concurrent-past-cap"),
    pytest.param(_set(budget={"time": float("inf")}), "budget.time", "finite", id="infinite-duration"),
    pytest.param(_set(early_stopping={"method": "asha", "min_epochs": 10**12}), "early_stopping.min_epochs",
                 "1000000000", id="min-epochs-past-cap"),
    pytest.param(_set(fixed={"big": 10**150}), "fixed.big", "151 digits", id="int-of-151-digits"),
]

BAD_SPECS: list[Any] = [
    *[pytest.param(p.values[0], {p.values[1]}, p.values[2], id=p.id) for p in ABSURD_NUMBERS],
    pytest.param(lambda d: d["parameters"]["lr"].update(low=0.0), {"parameters.lr.low"}, "> 0", id="log-low-zero"),
    pytest.param(lambda d: d["parameters"]["lr"].update(low=-1.0), {"parameters.lr.low"}, "> 0", id="log-low-neg"),
    pytest.param(_param(type="float", low=0.5, high=0.1), {"parameters.x.low", "parameters.x.high"}, "low",
                 id="low-above-high"),
    pytest.param(_param(type="int", low=5, high=1), {"parameters.x.low", "parameters.x.high"}, "low",
                 id="int-low-above-high"),
    pytest.param(lambda d: d["parameters"]["lr"].update(step=0.01), {"parameters.lr.step", "parameters.lr.log"},
                 "log", id="step-with-log"),
    pytest.param(_param(type="float", low=0.0, high=1.0, step=0.0), {"parameters.x.step"}, "> 0",
                 id="float-step-zero"),
    pytest.param(_param(type="int", low=0, high=10, step=-2), {"parameters.x.step"}, "> 0", id="int-step-neg"),
    pytest.param(_param(type="int", low=0, high=10, step=3), {"parameters.x.high"}, "step",
                 id="int-step-not-dividing"),
    pytest.param(_param(type="float", low=float("nan"), high=1.0), {"parameters.x.low"}, "finite", id="nan-low"),
    pytest.param(_param(type="categorical", choices=[]), {"parameters.x.choices"}, "1", id="empty-choices"),
    pytest.param(_param(type="categorical", choices=["a", "a"]), {"parameters.x.choices"}, "repeat",
                 id="repeated-choices"),
    pytest.param(_set(epochs_max=3), {"epochs_max"}, "unknown", id="unknown-top-level-key"),
    pytest.param(lambda d: d["parameters"]["lr"].update(lgo=True), {"parameters.lr.lgo"}, "unknown",
                 id="unknown-param-key"),
    pytest.param(lambda d: d["parameters"]["lr"].update(type="double"), {"parameters.lr", "parameters.lr.type"},
                 "float, int, categorical", id="wrong-type-name"),
    pytest.param(lambda d: d["parameters"]["lr"].pop("type"), {"parameters.lr", "parameters.lr.type"},
                 "type", id="missing-type"),
    pytest.param(_pop("trainer"), {"trainer"}, "required", id="missing-trainer"),
    pytest.param(_pop("metric"), {"metric"}, "required", id="missing-metric"),
    pytest.param(_pop("parameters"), {"parameters"}, "required", id="missing-parameters"),
    pytest.param(_set(parameters={}), {"parameters"}, "1", id="empty-parameters"),
    pytest.param(_set(name="my sweep!"), {"name"}, "letters", id="bad-name-chars"),
    pytest.param(_set(name="a/b"), {"name"}, "letters", id="name-with-slash"),
    pytest.param(_set(method="grid", parameters={"a": {"type": "float", "low": 0.0, "high": 1.0}}),
                 {"parameters.a"}, "step", id="grid-over-unstepped-float"),
    pytest.param(_set(method="grid", parameters={"opt": {**_OPT_SGD, "when": {
        "sgd": {"m": {"type": "float", "low": 0.0, "high": 1.0}}}}}),
                 {"parameters.opt.when.sgd.m"}, "step", id="grid-over-unstepped-float-in-when"),
    pytest.param(_set(fixed={"lr": 0.01}), {"fixed", "fixed.lr"}, "lr", id="fixed-and-searched"),
    pytest.param(_set(parameters={"opt": {**_OPT_SGD, "when": {"sgdd": {"m": {"type": "int", "low": 0, "high": 1}}}}}),
                 {"parameters.opt.when", "parameters.opt.when.sgdd"}, "sgdd", id="when-key-not-a-choice"),
    pytest.param(_set(parameters={"opt": {**_OPT_SGD, "when": {
        "adam": {"m": {"type": "float", "low": 0.0, "high": 1.0}},
        "sgd": {"m": {"type": "float", "low": 0.0, "high": 0.9}}}}}),
                 {"parameters", "parameters.opt", "parameters.opt.when.sgd.m", "parameters.opt.when.adam.m"}, "'m'",
                 id="same-name-two-branches-different-settings"),
    pytest.param(_set(parameters={"opt": {**_OPT_SGD, "when": {
        "sgd": {"m": {"type": "float", "low": 1.0, "high": 0.0}}}}}),
                 {"parameters.opt.when.sgd.m.low", "parameters.opt.when.sgd.m.high"}, "low",
                 id="bad-bounds-inside-when"),
    pytest.param(_set(budget={"time": "10 minutes"}), {"budget.time"}, "duration", id="bad-duration"),
    pytest.param(_set(budget={"time": "0s"}), {"budget.time"}, "> 0", id="zero-duration"),
    pytest.param(_set(budget={"trials": 0}), {"budget.trials"}, "1", id="zero-trials"),
    pytest.param(_set(method="annealing"), {"method"}, "bayesian", id="unknown-method"),
    pytest.param(_set(early_stopping="sometimes"), {"early_stopping.method"}, "asha", id="unknown-early-stopping"),
    pytest.param(_set(metric={"name": "val_loss", "goal": "lowest"}), {"metric.goal"}, "minimize",
                 id="bad-metric-goal"),
    pytest.param(_set(data={"source": "sklearn:digits", "validation": {"fraction": 1.5}}),
                 {"data.validation.fraction"}, "1", id="bad-validation-fraction"),
    pytest.param(_set(data={"source": "x.csv", "task": "ranking"}), {"data.task"}, "classification",
                 id="bad-task"),
    pytest.param(_set(resources={"gpu": 1.5}), {"resources.gpu"}, "whole", id="fractional-gpu-above-one"),
]


@pytest.mark.parametrize(("change", "paths", "rule"), BAD_SPECS)
def test_malformed_spec_is_one_line_naming_the_field(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], paths: set[str], rule: str
) -> None:
    error = spec_error(write(tmp_path, spec_with(change), "bad.yaml"))
    assert error.path in paths, str(error)
    assert error.source == "bad.yaml"
    text = str(error)
    assert text.startswith(f"bad.yaml: {error.path}: "), text
    message = text.removeprefix(f"bad.yaml: {error.path}: ")
    assert message.strip(), text
    assert rule in message, text


@pytest.mark.parametrize(("change", "path", "rule"), ABSURD_NUMBERS)
def test_absurd_numbers_are_refused_from_a_json_mapping_too(
    change: Callable[[dict[str, Any]], None], path: str, rule: str
) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(json.loads(json.dumps(spec_with(change))))  # what the HTTP service will hand over
    assert info.value.path == path, str(info.value)
    assert rule in info.value.message, str(info.value)
    assert "\n" not in str(info.value)


def test_the_caps_themselves_are_accepted(tmp_path: Path) -> None:
    raw = spec_with(lambda d: d.update(seed=MAX_SEED, budget={"trials": MAX_TRIALS, "max_concurrent": MAX_CONCURRENT},
                                       fixed={"big": 10**99}))
    raw["parameters"]["depth"] = {"type": "int", "low": -(2**53), "high": 2**53, "step": 2**53}
    spec = load_spec(write(tmp_path, raw))
    assert (spec.seed, spec.budget.trials, spec.budget.max_concurrent) == (2**31 - 1, 10**7, 10**4)
    assert spec.fixed["big"] == 10**99
    assert spec_from_dict(raw) == spec.model_copy(update={"name": "sweep"})


@pytest.mark.parametrize("digits", [101, 5000, 100_000])
def test_an_integer_of_thousands_of_digits_is_one_line_naming_its_field(tmp_path: Path, digits: int) -> None:
    # Python refuses to read an int of more than 4300 digits: a ValueError from inside the YAML loader before.
    text = (f"trainer: mlp\nmetric: val_loss\nfixed:\n  big: {'9' * digits}\n"
            "parameters: {a: {type: int, low: 1, high: 2}}\n")
    error = spec_error(write(tmp_path, text, "big.yaml"))
    assert str(error) == (f"big.yaml: fixed.big: integer of {digits} digits (line 4); a spec's integers have at most "
                          f"{MAX_INT_DIGITS} digits")
    hexadecimal = text.replace("big: 9", "big: 0x9")
    assert error.path == spec_error(write(tmp_path, hexadecimal, "hex.yaml")).path == "fixed.big"
    with pytest.raises(SpecError, match=r"^spec: fixed\.big: integer of \d+ digits"):
        spec_from_dict({**BASE, "fixed": {"big": 10 ** (digits - 1)}})  # past 4300 digits, str() would raise


def test_a_yaml_value_that_cannot_be_built_is_a_line_not_a_traceback(tmp_path: Path) -> None:
    text = "trainer: mlp\nmetric: val_loss\nfixed: {day: 2001-13-45}\nparameters: {a: {type: int, low: 1, high: 2}}\n"
    message = str(spec_error(write(tmp_path, text, "date.yaml")))
    assert message.startswith("date.yaml: line 3, column 14: invalid YAML: '2001-13-45' is not a valid timestamp"), (
        message)
    assert "quote it" in message


def test_repeated_key_check_is_linear_in_the_number_of_keys() -> None:
    """Counted, not timed: comparing every key with every other (list.count per key) took 2 s for 10k keys."""
    import yaml

    from automl.spec import _check_yaml_size

    class CountingKey(str):
        compared = 0

        def __eq__(self, other: object) -> bool:
            CountingKey.compared += 1
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    keys = 3000
    root = yaml.compose("\n".join(f"k{i}: {i}" for i in range(keys)), Loader=yaml.SafeLoader)
    assert root is not None
    for key, _ in root.value:
        key.value = CountingKey(key.value)
    _check_yaml_size(root)
    assert CountingKey.compared < keys  # a dict of the keys: equal hashes only (quadratic: 9 million)
    root.value[-1][0].value = CountingKey("k0")
    with pytest.raises(Exception, match="key 'k0' appears twice"):
        _check_yaml_size(root)


def test_log_low_zero_message_matches_the_design(tmp_path: Path) -> None:
    error = spec_error(write(tmp_path, spec_with(lambda d: d["parameters"]["lr"].update(low=0.0)), "spec.yaml"))
    assert str(error) == "spec.yaml: parameters.lr.low: must be > 0 when log is true (got 0.0)"


def test_wrong_type_name_reports_the_bad_name(tmp_path: Path) -> None:
    error = spec_error(write(tmp_path, spec_with(lambda d: d["parameters"]["lr"].update(type="double"))))
    assert "'double'" in str(error)


def test_cmaes_over_categoricals_is_refused(tmp_path: Path) -> None:
    raw = spec_with(lambda d: d.update(method="cmaes", parameters={
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "act": {"type": "categorical", "choices": ["relu", "tanh"]},
    }))
    error = spec_error(write(tmp_path, raw, "bad.yaml"))
    assert error.path == "method"
    assert "categorical" in str(error)


def test_cmaes_over_numbers_is_accepted(tmp_path: Path) -> None:
    raw = spec_with(lambda d: d.update(method="cmaes"))
    assert load_spec(write(tmp_path, raw)).method == "cmaes"


# --------------------------------------------------------------------------------------------- the file itself


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    text = "trainer: mlp\nmetric: val_loss\nparameters: {lr: {type: float, low: 0.1\n"
    error = spec_error(write(tmp_path, text, "broken.yaml"))
    message = str(error)
    assert message.startswith("broken.yaml: ")
    assert "line 4" in message or "line 3" in message, message
    assert "column" in message
    assert "invalid YAML" in message


def test_yaml_bad_indentation_points_at_the_line(tmp_path: Path) -> None:
    text = "trainer: mlp\n  metric: val_loss\n"
    message = str(spec_error(write(tmp_path, text, "indent.yaml")))
    assert "line 2, column" in message, message


@pytest.mark.parametrize("text", ["- trainer: mlp\n- metric: val_loss\n", "just a string\n", "42\n", ""])
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    message = str(spec_error(write(tmp_path, text, "notmap.yaml")))
    assert message.startswith("notmap.yaml: ")
    assert "mapping" in message


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system",
        "!!python/object/apply:subprocess.check_call",
        "!!python/object/new:os.system",
    ],
)
def test_python_tags_are_refused_and_never_executed(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "pwned"
    argument = f"['touch {marker}']" if "subprocess" not in tag else f"[['touch', '{marker}']]"
    text = f"trainer: {tag} {argument}\nmetric: val_loss\nparameters: {{a: {{type: int, low: 1, high: 2}}}}\n"
    message = str(spec_error(write(tmp_path, text, "evil.yaml")))
    assert message.startswith("evil.yaml: ")
    assert "python/object" in message
    assert not marker.exists()


def test_python_name_tag_is_refused(tmp_path: Path) -> None:
    text = "trainer: !!python/name:os.system\nmetric: val_loss\nparameters: {a: {type: int, low: 1, high: 2}}\n"
    assert "python/name" in str(spec_error(write(tmp_path, text, "evil.yaml")))


def test_file_over_one_mib_is_refused(tmp_path: Path) -> None:
    padding = "#" + "x" * 1023 + "\n"
    text = yaml.safe_dump(BASE) + padding * (MAX_SPEC_BYTES // len(padding) + 1)
    path = write(tmp_path, text, "huge.yaml")
    assert path.stat().st_size > MAX_SPEC_BYTES
    message = str(spec_error(path))
    assert message.startswith("huge.yaml: ")
    assert "bytes" in message


def test_file_just_under_the_limit_loads(tmp_path: Path) -> None:
    head = yaml.safe_dump(BASE)
    text = head + "#" * (MAX_SPEC_BYTES - len(head) - 2) + "\n"
    path = write(tmp_path, text)
    assert path.stat().st_size < MAX_SPEC_BYTES
    assert load_spec(path).trainer == "mlp"


def test_missing_file(tmp_path: Path) -> None:
    message = str(spec_error(tmp_path / "nope.yaml"))
    assert "nope.yaml" in message
    assert "not found" in message


def test_directory_instead_of_file_is_a_spec_error(tmp_path: Path) -> None:
    folder = tmp_path / "spaces.yaml"
    folder.mkdir()
    assert "spaces.yaml" in str(spec_error(folder))


def test_non_utf8_bytes_do_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(yaml.safe_dump({**BASE, "name": "caf"}).encode() + b"# caf\xe9\n")
    assert load_spec(path).name == "caf"

