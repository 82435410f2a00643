"""Importing W&B sweeps, NNI search spaces and Katib Experiments (automl.importers, `automl import`).

The example files under tests/assets/imports/ are real files of each tool's format; the tests assert the exact
automl parameters they become, and that every construct without an automl equivalent is refused with one line
naming the field in the source file.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from automl.errors import SpecError
from automl.importers import detect, import_file, load_any
from automl.spec import MAX_SPEC_BYTES, BudgetSpec, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets" / "imports"
_SCRIPT = Path(sys.executable).with_name("automl")
AUTOML = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "automl.cli"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["COLUMNS"] = "80"  # a narrow terminal must not wrap the one error line
    return subprocess.run([*AUTOML, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- W&B


def test_wandb_sweep_with_every_distribution() -> None:
    imported = import_file(ASSETS / "wandb.yaml", trainer="mlp", data="sklearn:digits")
    spec = imported.spec
    assert imported.format == "wandb"
    assert spec["name"] == "digits-sweep"  # "digits sweep" made a valid automl name
    assert spec["trainer"] == "mlp"
    assert spec["data"] == {"source": "sklearn:digits"}
    assert spec["method"] == "bayesian"  # bayes
    assert spec["metric"] == {"name": "val_accuracy", "goal": "maximize"}
    assert spec["budget"] == {"trials": 12}  # run_cap
    assert spec["early_stopping"] == {"method": "asha", "min_epochs": 2, "reduction_factor": 3}  # hyperband
    assert spec["fixed"] == {"epochs": 4}  # value: a constant
    assert spec["parameters"] == {
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd", "rmsprop"]},
        "activation": {"type": "categorical", "choices": ["relu", "tanh"]},
        "depth": {"type": "int", "low": 1, "high": 3},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "beta1": {"type": "float", "low": 0.8, "high": 0.99},
        "width": {"type": "int", "low": 16, "high": 64},
        "batch_size": {"type": "int", "low": 32, "high": 128, "step": 32},
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.02},
        "lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},
        "lr_decay": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},  # exp(-9.21...), exp(-2.30...)
        "label_smoothing": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        "grad_clip": {"type": "float", "low": 0.1, "high": 1.0, "log": True},  # exp(-ln 10), exp(-0)
        "hidden": {"type": "int", "low": 32, "high": 256, "log": True},
        "embedding": {"type": "int", "low": 8, "high": 128, "log": True},  # exp(ln 8), exp(ln 128)
    }
    params = spec["parameters"]
    # == does not tell 32 from 32.0: the types are part of the contract (an int q gives ints in W&B too).
    assert all(type(params[n][k]) is int for n in ("depth", "width", "batch_size", "hidden", "embedding")
               for k in ("low", "high"))
    assert type(params["batch_size"]["step"]) is int
    assert all(type(params[n][k]) is float for n in ("dropout", "weight_decay", "lr", "lr_decay", "grad_clip")
               for k in ("low", "high"))
    assert type(params["weight_decay"]["step"]) is float
    notes = " | ".join(imported.notes)
    assert "program, command: ignored" in notes
    assert "parameters.width" in notes  # whole bounds without a distribution search integers, as in W&B
    spec_from_dict(spec, source="wandb.yaml")  # a valid automl spec


@pytest.mark.parametrize(("method", "expected"), [("grid", "grid"), ("random", "random"), ("bayes", "bayesian")])
def test_wandb_methods(tmp_path: Path, method: str, expected: str) -> None:
    path = write(tmp_path, "sweep.yaml", f"method: {method}\nmetric: {{name: loss}}\n"
                                         "parameters:\n  depth: {values: [1, 2, 3]}\n")
    spec, fmt = load_any(path, trainer="mlp")
    assert fmt == "wandb"
    assert spec["method"] == expected
    assert spec["metric"] == {"name": "loss", "goal": "minimize"}  # W&B's default goal, stated
    assert spec["name"] == "sweep"  # the file's name, as for a spec without one


def test_wandb_max_iter_brackets_and_project(tmp_path: Path) -> None:
    path = write(tmp_path, "sweep.yaml", "method: random\nproject: digits\nmetric: {name: val_loss, goal: minimize}\n"
                                         "early_terminate: {type: hyperband, max_iter: 27, s: 2, eta: 3}\n"
                                         "parameters:\n  lr: {min: 0.001, max: 0.1}\n")
    spec, _ = load_any(path, trainer="mlp")
    # W&B's brackets for max_iter 27, s 2, eta 3 are 3 and 9: ASHA from 3 epochs, reduction factor 3.
    assert spec["early_stopping"] == {"method": "asha", "min_epochs": 3, "reduction_factor": 3}
    assert spec["tracking"] == {"experiment": "digits"}
    assert spec["parameters"] == {"lr": {"type": "float", "low": 0.001, "high": 0.1}}


# --------------------------------------------------------------------------------------------- NNI


def test_nni_search_space_with_every_type() -> None:
    imported = import_file(ASSETS / "nni.json", trainer="mlp", metric="val_accuracy")
    spec = imported.spec
    assert imported.format == "nni"
    assert spec["metric"] == "val_accuracy"
    assert "method" not in spec  # NNI keeps its tuner in the experiment config: automl's default applies
    assert spec["parameters"] == {
        "optimizer": {  # nested choice: a categorical whose options open their own parameters
            "type": "categorical",
            "choices": ["sgd", "adam", "rmsprop"],
            "when": {
                "sgd": {"momentum": {"type": "float", "low": 0.0, "high": 0.99},
                        "nesterov": {"type": "categorical", "choices": [True, False]}},
                "adam": {"beta1": {"type": "float", "low": 0.8, "high": 0.999}},
            },
        },
        "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
        "depth": {"type": "int", "low": 1, "high": 3},  # randint [1, 4): the upper bound is exclusive in NNI
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "width": {"type": "int", "low": 32, "high": 256, "step": 32},  # quniform, whole numbers
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.02},  # quniform
        "lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},  # loguniform
        "hidden": {"type": "int", "low": 16, "high": 512, "log": True},  # qloguniform with q = 1
    }
    assert any("optimizer" in note and "_name" in note for note in imported.notes)
    spec_from_dict(spec, source="nni.json")


@pytest.mark.parametrize(("value", "low", "high"), [([0, 10], 0, 9), ([-3, -1], -3, -2), ([5, 6], 5, 5),
                                                      ([7], 0, 6)])
def test_nni_randint_upper_bound_is_exclusive(tmp_path: Path, value: list[int], low: int, high: int) -> None:
    path = write(tmp_path, "space.json", '{"seed": {"_type": "randint", "_value": ' + str(value) + "}}")
    spec, _ = load_any(path, trainer="mlp", metric="val_loss")
    assert spec["parameters"]["seed"] == {"type": "int", "low": low, "high": high}


# --------------------------------------------------------------------------------------------- Katib


def test_katib_experiment() -> None:
    imported = import_file(ASSETS / "katib.yaml", trainer="mlp", data="sklearn:digits")
    spec = imported.spec
    assert imported.format == "katib"
    assert spec["name"] == "digits-katib"
    assert spec["metric"] == {"name": "val_accuracy", "goal": "maximize"}
    assert spec["method"] == "tpe"
    assert spec["seed"] == 7  # algorithmSettings random_state, written as text
    assert spec["budget"] == {"trials": 12, "max_concurrent": 2}
    assert spec["early_stopping"] == {"method": "median", "min_epochs": 2}  # medianstop start_step
    assert spec["parameters"] == {
        "lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
        "momentum": {"type": "float", "low": 0.5, "high": 0.99},
        "depth": {"type": "int", "low": 1, "high": 3},
        "width": {"type": "int", "low": 32, "high": 256, "log": True},
        "epochs": {"type": "int", "low": 2, "high": 10, "step": 2},
        "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
        "batch_size": {"type": "categorical", "choices": [32, 64, 128]},  # discrete: numbers, not text
    }
    params = spec["parameters"]
    assert type(params["depth"]["low"]) is int
    assert type(params["lr"]["low"]) is float
    notes = " | ".join(imported.notes)
    assert "spec.trialTemplate: ignored" in notes
    assert "metadata.namespace" in notes
    spec_from_dict(spec, source="katib.yaml")


KATIB_MIN = """apiVersion: kubeflow.org/v1beta1
kind: Experiment
metadata: {name: k}
spec:
  objective: {type: minimize, objectiveMetricName: val_loss}
  algorithm: {algorithmName: ALGO}
  parameters:
    - {name: depth, parameterType: int, feasibleSpace: {min: "1", max: "3"}}
    - {name: lr, parameterType: double, feasibleSpace: {min: "0.1", max: "0.5", step: "0.1"}}
"""


@pytest.mark.parametrize(("algorithm", "method"), [
    ("random", "random"), ("grid", "grid"), ("bayesianoptimization", "bayesian"), ("tpe", "tpe"),
    ("multivariate-tpe", "tpe"), ("cmaes", "cmaes"), ("sobol", "qmc"),
])
def test_katib_algorithms(tmp_path: Path, algorithm: str, method: str) -> None:
    path = write(tmp_path, "exp.yaml", KATIB_MIN.replace("ALGO", algorithm))
    imported = import_file(path, trainer="mlp")
    assert imported.spec["method"] == method
    assert imported.spec["metric"] == {"name": "val_loss", "goal": "minimize"}
    imported.to_spec()


def test_katib_max_failed_trial_count(tmp_path: Path) -> None:
    path = write(tmp_path, "exp.yaml", KATIB_MIN.replace("ALGO", "random").replace(
        "  parameters:", "  maxFailedTrialCount: 3\n  parameters:"))
    if "max_failures" in BudgetSpec.model_fields:  # both stop the sweep once that many trials failed
        assert load_any(path, trainer="mlp")[0]["budget"] == {"max_failures": 3}
    else:
        with pytest.raises(SpecError, match=r"^exp\.yaml: spec\.maxFailedTrialCount: "):
            load_any(path, trainer="mlp")


# --------------------------------------------------------------------------------------------- refusals

W_BASE = "method: random\nmetric: {name: val_loss, goal: minimize}\nparameters:\n  lr: {min: 0.001, max: 0.1}\n"
N_BASE = '{"lr": {"_type": "uniform", "_value": [0.001, 0.1]}}'
K_BASE = KATIB_MIN.replace("ALGO", "random")

# name -> (file name, content, the source field path the one-line error must name, a word of the rule)
REFUSED: dict[str, tuple[str, str, str, str]] = {
    # W&B
    "w-unknown-key": ("w.yaml", W_BASE + "trials: 3\n", "trials", "remove it"),
    "w-method-custom": ("w.yaml", W_BASE.replace("random", "custom"), "method", "grid, random or bayes"),
    "w-metric-target": ("w.yaml", W_BASE.replace("goal: minimize", "goal: minimize, target: 0.1"),
                        "metric.target", "stop-at-target"),
    "w-metric-impute": ("w.yaml", W_BASE.replace("goal: minimize", "goal: minimize, impute: best"),
                        "metric.impute", "impute"),
    "w-et-type": ("w.yaml", W_BASE + "early_terminate: {type: median, min_iter: 2}\n", "early_terminate.type",
                  "hyperband"),
    "w-et-strict": ("w.yaml", W_BASE + "early_terminate: {type: hyperband, min_iter: 2, strict: true}\n",
                    "early_terminate.strict", "non-strict"),
    "w-et-eta": ("w.yaml", W_BASE + "early_terminate: {type: hyperband, min_iter: 2, eta: 2.5}\n",
                 "early_terminate.eta", "whole number"),
    "w-et-brackets": ("w.yaml", W_BASE + "early_terminate: {type: hyperband, max_iter: 10, s: 3, eta: 2}\n",
                      "early_terminate.max_iter", "min_iter"),
    "w-nested": ("w.yaml", W_BASE + "  opt:\n    parameters:\n      lr: {values: [1, 2]}\n",
                 "parameters.opt.parameters", "flatten"),
    "w-probabilities": ("w.yaml", W_BASE + "  act: {values: [relu, tanh], probabilities: [0.8, 0.2]}\n",
                        "parameters.act.probabilities", "same chance"),
    "w-normal": ("w.yaml", W_BASE + "  wd: {distribution: normal, mu: 0.0, sigma: 0.1}\n",
                 "parameters.wd.distribution", "[-0.2, 0.2]"),
    "w-log-normal": ("w.yaml", W_BASE + "  wd: {distribution: log_normal, mu: 0, sigma: 1}\n",
                     "parameters.wd.distribution", "log-uniform"),
    "w-q-normal": ("w.yaml", W_BASE + "  wd: {distribution: q_normal, mu: 0, sigma: 1, q: 1}\n",
                   "parameters.wd.distribution", "two bounds"),
    "w-q-log-normal": ("w.yaml", W_BASE + "  wd: {distribution: q_log_normal, mu: 0, sigma: 1, q: 1}\n",
                       "parameters.wd.distribution", "two bounds"),
    "w-beta": ("w.yaml", W_BASE + "  wd: {distribution: beta, a: 2, b: 2}\n", "parameters.wd.distribution",
               "[0, 1]"),
    "w-q-beta": ("w.yaml", W_BASE + "  wd: {distribution: q_beta, a: 2, b: 2, q: 0.1}\n",
                 "parameters.wd.distribution", "two bounds"),
    "w-unknown-distribution": ("w.yaml", W_BASE + "  wd: {distribution: zipf, min: 1, max: 2}\n",
                               "parameters.wd.distribution", "zipf"),
    "w-stray-key": ("w.yaml", W_BASE + "  wd: {distribution: uniform, min: 0.0, max: 1.0, q: 0.1}\n",
                    "parameters.wd.q", "remove it"),
    "w-q-offset": ("w.yaml", W_BASE + "  bs: {distribution: q_uniform, min: 10, max: 128, q: 16}\n",
                   "parameters.bs.min", "use 16"),
    "w-q-log-step": ("w.yaml", W_BASE + "  bs: {distribution: q_log_uniform_values, min: 16, max: 512, q: 16}\n",
                     "parameters.bs.q", "log with a step"),
    "w-list-value": ("w.yaml", W_BASE + "  shape: {values: [[64, 64], [128, 128]]}\n", "parameters.shape.values[0]",
                     "as text"),
    "w-missing-bound": ("w.yaml", W_BASE + "  wd: {distribution: uniform, min: 0.0}\n", "parameters.wd.max",
                        "required"),
    "w-no-range": ("w.yaml", W_BASE + "  wd: {min: 0.0}\n", "parameters.wd", "values, value, or min and max"),
    "w-log-zero": ("w.yaml", W_BASE + "  wd: {distribution: log_uniform_values, min: 0.0, max: 0.1}\n",
                   "parameters.wd.min", "> 0 when log"),
    "w-min-above-max": ("w.yaml", W_BASE + "  wd: {distribution: uniform, min: 0.5, max: 0.1}\n",
                        "parameters.wd.max", "must be >="),
    # NNI
    "n-normal": ("n.json", '{"w": {"_type": "normal", "_value": [0, 1]}}', "w._type", "no bounded equivalent"),
    "n-qnormal": ("n.json", '{"w": {"_type": "qnormal", "_value": [0, 1, 0.1]}}', "w._type", "[-2, 2]"),
    "n-lognormal": ("n.json", '{"w": {"_type": "lognormal", "_value": [0, 1]}}', "w._type", "log-uniform"),
    "n-qlognormal": ("n.json", '{"w": {"_type": "qlognormal", "_value": [0, 1, 1]}}', "w._type",
                     "no bounded equivalent"),
    "n-unknown-type": ("n.json", '{"w": {"_type": "mutable_layer", "_value": []}}', "w._type", "mutable_layer"),
    "n-randint-empty": ("n.json", '{"s": {"_type": "randint", "_value": [3, 3]}}', "s._value[1]", "exclusive"),
    "n-quniform-offset": ("n.json", '{"w": {"_type": "quniform", "_value": [10, 100, 20]}}', "w._value[0]",
                          "multiples of q"),
    "n-qloguniform-step": ("n.json", '{"w": {"_type": "qloguniform", "_value": [16, 512, 16]}}', "w._value[2]",
                           "log with a step"),
    "n-nested-no-name": ("n.json", '{"o": {"_type": "choice", "_value": [{"lr": {"_type": "uniform", '
                                   '"_value": [0, 1]}}]}}', "o._value[0]", "_name"),
    "n-choice-list": ("n.json", '{"o": {"_type": "choice", "_value": [[1, 2], [3]]}}', "o._value[0]", "as text"),
    "n-branch-clash": ("n.json", '{"o": {"_type": "choice", "_value": ['
                                 '{"_name": "sgd", "lr": {"_type": "uniform", "_value": [0.01, 0.1]}}, '
                                 '{"_name": "adam", "lr": {"_type": "loguniform", "_value": [0.0001, 0.01]}}]}}',
                       "o._value[1].lr", "rename"),
    "n-value-not-list": ("n.json", '{"w": {"_type": "uniform", "_value": 3}}', "w._value", "a list"),
    "n-arity": ("n.json", '{"w": {"_type": "uniform", "_value": [0, 1, 2]}}', "w._value", "[low, high]"),
    "n-stray-key": ("n.json", '{"w": {"_type": "uniform", "_value": [0, 1], "_default": 0.5}}', "w._default",
                    "remove it"),
    "n-log-zero": ("n.json", '{"w": {"_type": "loguniform", "_value": [0, 1]}}', "w._value[0]", "> 0 when log"),
    # Katib
    "k-goal": ("k.yaml", K_BASE.replace("objectiveMetricName: val_loss}", "objectiveMetricName: val_loss, "
                                        "goal: 0.1}"), "spec.objective.goal", "stop-at-goal"),
    "k-strategy": ("k.yaml", K_BASE.replace("objectiveMetricName: val_loss}", "objectiveMetricName: val_loss, "
                                            "metricStrategies: [{name: val_loss, value: min}]}"),
                   "spec.objective.metricStrategies[0].value", "latest"),
    "k-hyperband": ("k.yaml", KATIB_MIN.replace("ALGO", "hyperband"), "spec.algorithm.algorithmName",
                    "early_stopping"),
    "k-pbt": ("k.yaml", KATIB_MIN.replace("ALGO", "pbt"), "spec.algorithm.algorithmName", "population"),
    "k-enas": ("k.yaml", KATIB_MIN.replace("ALGO", "enas"), "spec.algorithm.algorithmName", "architecture"),
    "k-darts": ("k.yaml", KATIB_MIN.replace("ALGO", "darts"), "spec.algorithm.algorithmName", "architecture"),
    "k-unknown-algorithm": ("k.yaml", KATIB_MIN.replace("ALGO", "annealing"), "spec.algorithm.algorithmName",
                            "annealing"),
    "k-setting": ("k.yaml", K_BASE.replace("algorithmName: random}", "algorithmName: random, algorithmSettings: "
                                           "[{name: n_EI_candidates, value: '25'}]}"),
                  "spec.algorithm.algorithmSettings[0]", "n_EI_candidates"),
    "k-early-stopping": ("k.yaml", K_BASE.replace("  parameters:", "  earlyStopping: {algorithmName: truncation}\n"
                                                  "  parameters:"), "spec.earlyStopping.algorithmName", "medianstop"),
    "k-min-trials": ("k.yaml", K_BASE.replace("  parameters:", "  earlyStopping: {algorithmName: medianstop, "
                                              "algorithmSettings: [{name: min_trials_required, value: '3'}]}\n"
                                              "  parameters:"),
                     "spec.earlyStopping.algorithmSettings[0].value", "5 finished trials"),
    "k-normal": ("k.yaml", K_BASE.replace('step: "0.1"', "distribution: normal"),
                 "spec.parameters[1].feasibleSpace.distribution", "uniform or logUniform"),
    "k-lognormal": ("k.yaml", K_BASE.replace('step: "0.1"', "distribution: logNormal"),
                    "spec.parameters[1].feasibleSpace.distribution", "uniform or logUniform"),
    "k-log-step": ("k.yaml", K_BASE.replace('step: "0.1"', 'step: "0.1", distribution: logUniform'),
                   "spec.parameters[1].feasibleSpace.step", "logUniform with a step"),
    "k-type": ("k.yaml", K_BASE.replace("parameterType: int", "parameterType: string"),
               "spec.parameters[0].parameterType", "double, int, categorical or discrete"),
    "k-nas": ("k.yaml", K_BASE + "  nasConfig: {graphConfig: {numLayers: 8}}\n", "spec.nasConfig",
              "architecture search"),
    "k-api": ("k.yaml", K_BASE.replace("kubeflow.org/v1beta1", "batch/v1"), "apiVersion", "kubeflow.org"),
    "k-unknown-key": ("k.yaml", K_BASE + "  maxTrialCnt: 3\n", "spec.maxTrialCnt", "remove it"),
    "k-duplicate": ("k.yaml", K_BASE.replace("name: lr", "name: depth"), "spec.parameters[1].name", "already"),
    "k-not-a-number": ("k.yaml", K_BASE.replace('min: "0.1"', 'min: "low"'), "spec.parameters[1].feasibleSpace.min",
                       "a number"),
    "k-min-above-max": ("k.yaml", K_BASE.replace('min: "1"', 'min: "4"'), "spec.parameters[0].feasibleSpace.max",
                        "must be >="),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_one_line_naming_the_source_field(tmp_path: Path, case: str) -> None:
    name, text, field, rule = REFUSED[case]
    path = write(tmp_path, name, text)
    with pytest.raises(SpecError) as info:
        import_file(path, trainer="mlp", metric="val_loss")
    error = info.value
    line = str(error)
    assert "\n" not in line
    assert error.source == name
    assert error.path == field, line
    assert line.startswith(f"{name}: {field}: "), line
    assert rule in line, line


def test_method_rules_are_reported_against_the_source_field(tmp_path: Path) -> None:
    # A grid over an unstepped range: refused by automl's own rule, reported where the Katib file wrote it.
    path = write(tmp_path, "k.yaml", KATIB_MIN.replace("ALGO", "grid").replace(', step: "0.1"', ""))
    imported = import_file(path, trainer="mlp")
    with pytest.raises(SpecError, match=r"^k\.yaml: spec\.parameters\[1\]: a grid needs a step"):
        imported.to_spec()
    imported.to_spec({"method": "random"})  # an override (automl run --method) lifts it


def test_trainer_and_metric_are_required_for_imported_files(tmp_path: Path) -> None:
    for name in ("wandb.yaml", "katib.yaml"):
        with pytest.raises(SpecError, match=rf"^{name}: trainer: .*pass --trainer"):
            import_file(ASSETS / name)
    with pytest.raises(SpecError, match=r"^nni\.json: metric: .*pass --metric"):
        import_file(ASSETS / "nni.json", trainer="mlp")
    with pytest.raises(SpecError, match=r"^wandb\.yaml: data\.target: --target needs --data"):
        import_file(ASSETS / "wandb.yaml", trainer="mlp", target="label")


def test_reading_refusals(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        import_file(tmp_path / "nope.json", trainer="mlp")
    big = write(tmp_path, "big.json", '{"a": {"_type": "choice", "_value": [' + "1," * MAX_SPEC_BYTES + "1]}}")
    with pytest.raises(SpecError, match=rf"^big\.json: file is \d+ bytes; a spec must be at most {MAX_SPEC_BYTES}"):
        import_file(big, trainer="mlp")
    bad = write(tmp_path, "bad.json", '{"a": {"_type": "choice", "_value": [1, 2}}')
    with pytest.raises(SpecError, match=r"^bad\.json: line 1, column \d+: invalid JSON"):
        import_file(bad, trainer="mlp")
    twice = write(tmp_path, "twice.json", '{"a": {"_type": "choice", "_value": [1]}, "a": {"_type": "choice", '
                                          '"_value": [2]}}')
    with pytest.raises(SpecError, match=r"^twice\.json: the key 'a' appears twice"):
        import_file(twice, trainer="mlp")


def test_an_nni_experiment_config_points_to_its_search_space(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yml", "searchSpaceFile: search_space.json\ntrialCommand: python3 train.py\n"
                                         "tuner: {name: TPE, classArgs: {optimize_mode: maximize}}\n")
    with pytest.raises(SpecError, match=r"^config\.yml: searchSpaceFile: this is an NNI experiment config"):
        import_file(path, trainer="mlp")


def test_automl_specs_pass_through(tmp_path: Path) -> None:
    text = (ROOT / "search_spaces" / "digits_mlp.yaml").read_text()
    path = write(tmp_path, "digits.yaml", text)
    spec, fmt = load_any(path)
    assert fmt == "automl"
    assert spec == yaml.safe_load(text)
    spec, _ = load_any(path, trainer="my_trainers:train", data="d.csv", target="y")
    assert spec["trainer"] == "my_trainers:train"
    assert spec["data"] == {"source": "d.csv", "target": "y", "validation": {"fraction": 0.2, "stratify": True}}
    assert load_spec(path).parameters == spec_from_dict(load_any(path)[0]).parameters


@pytest.mark.parametrize(("document", "fmt"), [
    ({"kind": "Experiment", "spec": {}}, "katib"),
    ({"lr": {"_type": "uniform", "_value": [0, 1]}}, "nni"),
    ({"method": "bayes", "parameters": {}}, "wandb"),
    ({"parameters": {"lr": {"min": 0.1, "max": 1.0}}}, "wandb"),
    ({"program": "train.py", "parameters": {}}, "wandb"),
    ({"trainer": "mlp", "method": "bayes", "parameters": {}}, "automl"),  # a typo of bayesian stays automl's
    ({"parameters": {"lr": {"type": "float", "values": [1]}}}, "automl"),  # typed: automl's own error applies
    ({"metric": "val_loss"}, "automl"),
])
def test_detect(document: dict[str, Any], fmt: str) -> None:
    assert detect(document) == fmt


# --------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(("name", "options"), [
    ("wandb.yaml", ["--trainer", "mlp", "--data", "sklearn:digits"]),
    ("nni.json", ["--trainer", "mlp", "--data", "sklearn:digits", "--metric", "val_accuracy"]),
    ("katib.yaml", ["--trainer", "mlp"]),
])
def test_cli_import_prints_a_spec_that_validate_accepts(tmp_path: Path, name: str, options: list[str]) -> None:
    shutil.copy(ASSETS / name, tmp_path / name)
    proc = cli("import", name, *options, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    label = {"wandb.yaml": "Weights & Biases sweep", "nni.json": "NNI search space", "katib.yaml": "Katib Experiment"}
    assert first == f"# automl spec converted from {name} ({label[name]}) by `automl import`"
    assert yaml.safe_load(proc.stdout)["trainer"] == "mlp"
    (tmp_path / "converted.yaml").write_text(proc.stdout)
    check = cli("validate", "converted.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stderr.strip() == "ok: converted.yaml"
    assert {p.name for p in tmp_path.iterdir()} == {name, "converted.yaml"}  # nothing written to MLflow


def test_cli_validate_takes_a_wandb_sweep_directly(tmp_path: Path) -> None:
    shutil.copy(ASSETS / "wandb.yaml", tmp_path / "wandb.yaml")
    proc = cli("validate", "wandb.yaml", "--trainer", "mlp", "--data", "sklearn:digits", "--sample", "2",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "ok: wandb.yaml (wandb)"
    resolved = yaml.safe_load(proc.stdout.split("\n#", 1)[0])
    assert resolved["method"] == "bayesian"
    assert resolved["parameters"]["hidden"]["log"] is True
    examples = [ast.literal_eval(line[2:]) for line in proc.stdout.splitlines() if line.startswith("- {")]
    assert len(examples) == 2
    for example in examples:
        assert example["epochs"] == 4
        assert 32 <= example["hidden"] <= 256
        assert example["batch_size"] in (32, 64, 96, 128)
    assert "# note: program, command: ignored" in proc.stdout


def test_cli_validate_without_trainer_is_one_line(tmp_path: Path) -> None:
    shutil.copy(ASSETS / "wandb.yaml", tmp_path / "wandb.yaml")
    line = one_line_error(cli("validate", "wandb.yaml", cwd=tmp_path))
    assert line.startswith("error: wandb.yaml: trainer: ")
    assert "--trainer" in line


@pytest.mark.parametrize("command", ["validate", "run", "import"])
def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path: Path, command: str) -> None:
    write(tmp_path, "sweep.yaml", W_BASE + "  wd: {distribution: normal, mu: 0.0, sigma: 0.1}\n")
    line = one_line_error(cli(command, "sweep.yaml", "--trainer", "mlp", cwd=tmp_path))
    assert line.startswith("error: sweep.yaml: parameters.wd.distribution: normal has no automl equivalent"), line
    assert {p.name for p in tmp_path.iterdir()} == {"sweep.yaml"}


def test_cli_trainer_next_to_the_imported_file(tmp_path: Path) -> None:
    # --trainer module:function and relative --data resolve against the file's directory, like a spec's paths.
    (tmp_path / "sweeps").mkdir()
    shutil.copy(ROOT / "tests" / "assets" / "toy_trainers.py", tmp_path / "sweeps" / "toy_trainers.py")
    shutil.copy(ASSETS / "nni.json", tmp_path / "sweeps" / "nni.json")
    proc = cli("validate", "sweeps/nni.json", "--trainer", "toy_trainers:quadratic", "--metric", "score",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "goal: maximize" in proc.stdout  # from the name, as in a spec
    line = one_line_error(cli("validate", "sweeps/nni.json", "--trainer", "elsewhere:train", "--metric", "score",
                              cwd=tmp_path))
    assert "elsewhere" in line


def test_cli_options_override_an_automl_spec(tmp_path: Path) -> None:
    write(tmp_path, "spec.yaml", "trainer: mlp\nmetric: val_accuracy\nparameters:\n"
                                 "  lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}\n")
    proc = cli("validate", "spec.yaml", "--data", "sklearn:iris", "--metric", "val_loss", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout.split("\n#", 1)[0])
    assert resolved["data"]["source"] == "sklearn:iris"
    assert resolved["metric"] == {"name": "val_loss", "goal": "minimize"}
    assert proc.stderr.strip() == "ok: spec.yaml"


@pytest.mark.usefixtures("ray_session")
def test_cli_run_takes_a_wandb_sweep(workdir: Path) -> None:
    """End to end: a W&B sweep file runs as is, with the trainer named on the command line (in-process CLI on the
    session's Ray: a subprocess would start a Ray of its own)."""
    from typer.testing import CliRunner

    from automl.cli import app

    shutil.copy(ROOT / "tests" / "assets" / "toy_trainers.py", workdir / "toy_trainers.py")
    write(workdir, "sweep.yaml", "name: toy\nprogram: train.py\nmethod: random\nrun_cap: 3\n"
                                 "metric: {name: score, goal: maximize}\nparameters:\n"
                                 "  x: {distribution: uniform, min: 0.0, max: 1.0}\n  kind: {values: [a, b, c]}\n"
                                 "  epochs: {value: 2}\n")
    result = CliRunner().invoke(app, ["run", "sweep.yaml", "--trainer", "toy_trainers:quadratic",
                                      "--max-concurrent", "1"])
    assert result.exit_code == 0, result.output
    assert "toy: 3 trials of toy_trainers:quadratic, method random, optimising score (maximize)" in result.output
    assert "search: Optuna RandomSampler, one trial at a time" in result.output
    assert "note: program: ignored" in result.output
    assert "trials: 3 complete" in result.output
    assert (workdir / "mlflow.db").exists()


def test_cli_help_lists_import(tmp_path: Path) -> None:
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "import" in proc.stdout
    proc = cli("import", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "--trainer" in proc.stdout
