"""Orchestration overhead, side by side: plain Optuna, plain Ray Tune (OptunaSearch) and automl.

    python benchmarks/overhead.py [--quick] [--json PATH]

Each runner runs the same two sweeps (``objectives.py`` holds the shared objectives), 2 trials at a time:

1. trivial: ``loss = x**2`` over one float, one report per trial, ``--trivial-trials`` trials (200), TPE.
2. digits: a small torch MLP on scikit-learn's digits, 10 epochs with one report each, about 0.4 s of
   compute on one thread per trial, ``--digits-trials`` trials (20), TPE.

The runners:

- optuna: ``study.optimize(objective, n_trials=N, n_jobs=2)`` in this process, ``TPESampler(seed=0)``,
  in-memory storage (two threads; torch releases the GIL only inside its kernels).
- ray-tune / ray-tune reuse_actors: ``tune.Tuner(trainable, param_space=..., tune_config=TuneConfig(
  search_alg=OptunaSearch(sampler=TPESampler(seed=0)), num_samples=N, max_concurrent_trials=2, metric, mode,
  reuse_actors=False|True), run_config=RunConfig(storage_path=<temp dir>, verbose=0)).fit()``, the digits
  data passed with ``tune.with_parameters`` (Ray's object store), everything else at Ray Tune's defaults.
- automl: ``Sweep.from_dict(spec, base_dir=benchmarks/, workdir=<temp dir>).run()`` with ``method:
  bayesian`` and ``budget: {trials: N, max_concurrent: 2}``; MLflow logging on (SQLite in the workdir), the
  Optuna journal and state folder written as in any sweep. Trainers ``objectives:trivial`` and
  ``objectives:digits_mlp``; the row "automl (trainer: mlp)" runs the built-in ``mlp`` trainer instead
  (``fixed: {epochs: 10}``): the same training, but its in-trial compute is automl's own
  ``TrialRecord.seconds``, which in each actor's first trial also counts what the trainer initialises
  lazily (when this was written: importing ``scipy.stats`` in ``automl.metrics.roc_auc``, 1.5 to 2 s).

Definitions:

- wall: ``time.perf_counter`` around everything a runner does for one sweep (creating the study / Tuner /
  Sweep, starting and stopping its workers, every trial, logging, picking the best). Excluded, as one-time
  costs of the process: ``ray.init(num_cpus=2, include_dashboard=False)`` (called once, shared by Ray Tune and
  automl), importing the libraries, and creating the empty MLflow SQLite store (its schema migrations; the
  time is in the JSON as ``store_init_s``).
- per-trial overhead (trivial): wall / trials, in ms. The trial's compute is nil, so this is all overhead.
- in-trial compute: measured inside each objective with ``time.perf_counter``; it excludes the time inside
  the runner's ``report`` callback and a one-time torch warm-up per worker process (see ``objectives.py``).
- parallel efficiency (digits): (sum of in-trial compute / concurrency) / wall. 1.0 means both cores trained
  all the time; what is missing is orchestration (and, on a busy machine, other processes).
- best val_accuracy: the best trial's last reported ``val_accuracy``; trials are not seeded alike across
  runners (Optuna's parallel trials race for its sampler), so it only checks that each runner trained.

DESIGN.md section 7 gives the budgets: automl at most 15 ms per trivial trial and an efficiency of at least
0.90 on the digits sweep. Timings on a shared 2-core machine are noisy; compare runners within one run.
Ray Tune with default settings needs 1 to 1.5 s per trial, so the full run takes about 7 minutes on 2 cores;
``--quick`` runs that one sweep on fewer trivial trials (the table says how many) and takes about 3.
Ray Tune's default runner ends each trial's worker with SIGTERM, and Ray forwards the workers' resulting
"SystemExit: 1" tracebacks to this terminal: they are noise, not failures (a failed sweep shows in the table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import objectives  # noqa: E402 - resolved against this folder, as automl resolves "objectives:trivial"

CONCURRENCY = 2
QUICK_TUNE_DEFAULT_TRIVIAL_TRIALS = 40


@dataclass
class Measurement:
    """One runner on one workload."""

    runner: str
    workload: str  # trivial | digits
    trials: int  # planned
    completed: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0  # sum of in-trial compute
    concurrency: int = CONCURRENCY
    best: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ms_per_trial(self) -> float | None:
        return 1000.0 * self.wall_s / self.trials if self.trials and not self.error else None

    @property
    def efficiency(self) -> float | None:
        if self.error or self.wall_s <= 0:
            return None
        return (self.compute_s / self.concurrency) / self.wall_s

    @property
    def mean_compute_s(self) -> float | None:
        return self.compute_s / self.completed if self.completed else None

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ms_per_trial": self.ms_per_trial, "efficiency": self.efficiency,
                "mean_compute_s": self.mean_compute_s}


@contextlib.contextmanager
def _temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def measure(runner: str, workload: str, trials: int, body: Callable[[Measurement], None]) -> Measurement:
    """Run ``body`` (which fills in the figures, wall time included); a failure becomes the row's error."""
    m = Measurement(runner=runner, workload=workload, trials=trials)
    print(f"  {runner:<28} {workload:<8} {trials:>4} trials ...", end="", flush=True, file=sys.stderr)
    try:
        body(m)
        if m.completed != trials:
            m.error = f"{m.completed}/{trials} trials completed"
    except Exception as exc:
        m.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        traceback.print_exc(file=sys.stderr)
    status = m.error or f"wall {m.wall_s:.1f} s"
    print(f" {status}", file=sys.stderr, flush=True)
    return m


# --------------------------------------------------------------------------------------------- optuna


def optuna_trivial(m: Measurement) -> None:
    import optuna

    start = time.perf_counter()
    sampler = optuna.samplers.TPESampler(seed=objectives.SEED)
    study = optuna.create_study(sampler=sampler, direction="minimize")
    study.optimize(objectives.optuna_trivial, n_trials=m.trials, n_jobs=CONCURRENCY)
    m.wall_s = time.perf_counter() - start
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    m.completed = len(done)
    m.compute_s = sum(t.user_attrs["compute_s"] for t in done)
    m.best = study.best_value


def optuna_digits(m: Measurement) -> None:
    import optuna

    start = time.perf_counter()
    data = objectives.digits_data()
    sampler = optuna.samplers.TPESampler(seed=objectives.SEED)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    study.optimize(lambda trial: objectives.optuna_digits(trial, data), n_trials=m.trials, n_jobs=CONCURRENCY)
    m.wall_s = time.perf_counter() - start
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    m.completed = len(done)
    m.compute_s = sum(t.user_attrs["compute_s"] for t in done)
    m.best = study.best_value


# --------------------------------------------------------------------------------------------- ray tune


def tune_sweep(m: Measurement, *, reuse_actors: bool) -> None:
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    if m.workload == "trivial":
        metric, mode = objectives.TRIVIAL_METRIC, "min"
    else:
        metric, mode = objectives.DIGITS_METRIC, "max"
    with _temp_dir("overhead-tune-") as storage:
        start = time.perf_counter()
        if m.workload == "trivial":
            trainable: Any = objectives.tune_trivial
            space = objectives.tune_trivial_space()
        else:
            trainable = tune.with_parameters(objectives.tune_digits, data=objectives.digits_data())
            space = objectives.tune_digits_space()
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=objectives.SEED)),
                num_samples=m.trials,
                max_concurrent_trials=CONCURRENCY,
                metric=metric,
                mode=mode,
                reuse_actors=reuse_actors,
            ),
            run_config=tune.RunConfig(name=f"overhead-{m.workload}", storage_path=str(storage), verbose=0),
        )
        results = tuner.fit()
        best = results.get_best_result(metric=metric, mode=mode)
        m.wall_s = time.perf_counter() - start
    finished = [r for r in results if r.error is None and r.metrics and metric in r.metrics]
    m.completed = len(finished)
    m.compute_s = sum(float(r.metrics.get("compute_s", 0.0)) for r in finished)
    m.best = float(best.metrics[metric]) if best.metrics else None
    m.extra["num_errors"] = results.num_errors


# --------------------------------------------------------------------------------------------- automl


def automl_spec(workload: str, trials: int, trainer: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        # One name per sweep here: automl's sweep id is the name plus a timestamp in whole seconds.
        "name": f"overhead-{workload}" + (f"-{trainer.replace(':', '.')}" if trainer else ""),
        "method": "bayesian",
        "budget": {"trials": trials, "max_concurrent": CONCURRENCY},
        "seed": objectives.SEED,
    }
    if workload == "trivial":
        spec.update(trainer=trainer or "objectives:trivial",
                    metric={"name": objectives.TRIVIAL_METRIC, "goal": "minimize"},
                    parameters=objectives.TRIVIAL_SPACE)
    else:
        spec.update(trainer=trainer or "objectives:digits_mlp", data={"source": "sklearn:digits"},
                    metric={"name": objectives.DIGITS_METRIC, "goal": "maximize"},
                    fixed={"epochs": objectives.DIGITS_EPOCHS}, parameters=objectives.DIGITS_SPACE)
    return spec


def automl_sweep(m: Measurement, *, workdir: Path, trainer: str | None = None) -> None:
    from automl import Sweep

    spec = automl_spec(m.workload, m.trials, trainer)
    start = time.perf_counter()
    result = Sweep.from_dict(spec, base_dir=HERE, workdir=workdir).run()
    m.wall_s = time.perf_counter() - start
    done = [t for t in result.trials if t.state == "COMPLETE"]
    m.completed = len(done)
    if trainer is None:
        m.compute_s = sum(t.metrics.get("compute_s", 0.0) for t in done)
    else:  # a trainer that does not report compute_s: automl's own measure of the time in the trainer
        m.compute_s = sum(t.seconds for t in done)
    m.best = result.best.value if result.best else None
    m.extra.update(
        sweep_wall_seconds=result.wall_seconds,
        trial_seconds=sum(t.seconds for t in done),
        states={s: sum(1 for t in result.trials if t.state == s) for s in {t.state for t in result.trials}},
        errors=sorted({t.error for t in result.trials if t.error})[:3],
    )


def init_store(workdir: Path) -> float:
    """Create automl's empty MLflow store (SQLite schema migrations): a one-time cost, not a sweep's."""
    from automl.tracking import make_client, resolve_tracking_uri

    start = time.perf_counter()
    make_client(resolve_tracking_uri(None, workdir)).search_experiments()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[tuple[str, Measurement | None, Measurement | None]], default_trivial: int,
          default_digits: int) -> str:
    lines = [
        "| runner | trivial: ms/trial | digits: efficiency | digits: wall s | digits: best val_accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, trivial, digits in rows:
        cells = [name]
        if trivial is None:
            cells.append("—")
        elif trivial.error:
            cells.append(f"failed ({trivial.error})")
        else:
            cell = _fmt(trivial.ms_per_trial, ".1f")
            if trivial.trials != default_trivial:
                cell += f" ({trivial.trials} trials)"
            cells.append(cell)
        if digits is None:
            cells += ["—", "—", "—"]
        elif digits.error:
            cells += [f"failed ({digits.error})", _fmt(digits.wall_s or None, ".1f"), "—"]
        else:
            eff = _fmt(digits.efficiency, ".2f")
            if digits.trials != default_digits:
                eff += f" ({digits.trials} trials)"
            cells += [eff, _fmt(digits.wall_s, ".1f"), _fmt(digits.best, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{usable} cores ({cores} online), {model}, Python {platform.python_version()}"


def versions() -> dict[str, str]:
    import mlflow
    import optuna
    import ray
    import torch

    return {"optuna": optuna.__version__, "ray": ray.__version__, "torch": torch.__version__,
            "mlflow": mlflow.__version__}


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Ray Tune's newer console output prints an experiment banner even with verbose=0; the classic one obeys.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("ray", "ray.tune", "ray.train", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"Ray Tune with default settings runs {QUICK_TUNE_DEFAULT_TRIVIAL_TRIALS} "
                             "trivial trials instead of all (it needs about 1 s per trial)")
    parser.add_argument("--trivial-trials", type=int, default=200)
    parser.add_argument("--digits-trials", type=int, default=20)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the raw figures to PATH")
    args = parser.parse_args(argv)
    n_trivial, n_digits = args.trivial_trials, args.digits_trials
    n_tune_default_trivial = min(n_trivial, QUICK_TUNE_DEFAULT_TRIVIAL_TRIALS) if args.quick else n_trivial

    _quiet()
    started = time.perf_counter()
    # One-time costs, kept out of every sweep's wall time: imports, Ray's start, the digits data's first load.
    import ray

    info = versions()
    objectives.digits_data()
    ray.init(num_cpus=CONCURRENCY, include_dashboard=False)
    print(f"ray.init and imports: {time.perf_counter() - started:.1f} s", file=sys.stderr)

    with _temp_dir("overhead-automl-") as workdir:
        store_init_s = init_store(workdir)
        def tune(reuse: bool) -> Callable[[Measurement], None]:
            return lambda m: tune_sweep(m, reuse_actors=reuse)

        rows: list[tuple[str, Measurement | None, Measurement | None]] = [
            ("optuna (in-process, n_jobs=2)",
             measure("optuna", "trivial", n_trivial, optuna_trivial),
             measure("optuna", "digits", n_digits, optuna_digits)),
            ("automl",
             measure("automl", "trivial", n_trivial, lambda m: automl_sweep(m, workdir=workdir)),
             measure("automl", "digits", n_digits, lambda m: automl_sweep(m, workdir=workdir))),
            ("automl (trainer: mlp)", None,
             measure("automl (trainer: mlp)", "digits", n_digits,
                     lambda m: automl_sweep(m, workdir=workdir, trainer="mlp"))),
            ("ray tune, reuse_actors=True",
             measure("ray-tune reuse_actors", "trivial", n_trivial, tune(True)),
             measure("ray-tune reuse_actors", "digits", n_digits, tune(True))),
            ("ray tune, defaults",
             measure("ray-tune", "trivial", n_tune_default_trivial, tune(False)),
             measure("ray-tune", "digits", n_digits, tune(False))),
        ]
    ray.shutdown()

    command = "python benchmarks/overhead.py" + ("" if argv is None and len(sys.argv) < 2 else
                                                 " " + " ".join(sys.argv[1:] if argv is None else argv))
    print()
    print(table(rows, n_trivial, n_digits))
    print()
    print(f"`{command}` on {machine()}; " + ", ".join(f"{k} {v}" for k, v in info.items())
          + f"; {CONCURRENCY} concurrent trials; trivial: {n_trivial} trials, digits: {n_digits} trials of "
          f"{objectives.DIGITS_EPOCHS} epochs. Total {time.perf_counter() - started:.0f} s.")
    digits = [(name, d) for name, _, d in rows if d is not None and d.mean_compute_s is not None]
    print("In-trial compute per digits trial (s): "
          + ", ".join(f"{name} {d.mean_compute_s:.2f}" for name, d in digits)
          + ". Threads of one process (optuna) slow each other down, which lengthens their compute.")
    if n_tune_default_trivial != n_trivial:
        print(f"--quick: Ray Tune with default settings ran {n_tune_default_trivial} trivial trials, not "
              f"{n_trivial}.")
    if args.json:
        payload = {
            "command": command, "machine": machine(), "versions": info, "concurrency": CONCURRENCY,
            "store_init_s": store_init_s,
            "results": [m.as_json() for _, *ms in rows for m in ms if m is not None],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"raw figures: {args.json}")
    failed = [m for _, *ms in rows for m in ms if m is not None and m.error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
