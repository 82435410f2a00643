"""Orchestration overhead side by side (plain Optuna, plain Ray Tune, automl on a cold and a warm engine), first trial.

Also how soon the first trial starts after the call: an automl sweep on a cold and on a warm engine, and a cold
``automl run``.

    python benchmarks/overhead.py [--quick] [--json PATH]

Each runner runs the same two sweeps (``objectives.py`` holds the shared objectives), 2 trials at a time:

1. trivial: ``loss = x**2`` over one float, one report per trial, TPE; run twice, with N1 = ``--trivial-trials``
   trials (200) and then with N2 = 2 * N1 (400), for the marginal figure (see the definitions). Ray Tune with
   default settings is the exception: its marginal figure comes from N1 = 20 and N2 = 40 trials whatever
   ``--trivial-trials`` says (it needs 1 to 2 s per trial), while its end-to-end figure still runs
   ``--trivial-trials`` trials (a sweep of a size already run is reused, not run again).
2. digits: a small torch MLP on scikit-learn's digits, 10 epochs with one report each, about 0.4 s of
   compute on one thread per trial, ``--digits-trials`` trials (20), TPE.

The runners:

- optuna: ``study.optimize(objective, n_trials=N, n_jobs=2)`` in this process, ``TPESampler(seed=0)``,
  in-memory storage (two threads; torch releases the GIL only inside its kernels).
- ray-tune / ray-tune reuse_actors: ``tune.Tuner(trainable, param_space=..., tune_config=TuneConfig(
  search_alg=OptunaSearch(sampler=TPESampler(seed=0)), num_samples=N, max_concurrent_trials=2, metric, mode,
  reuse_actors=False|True), run_config=RunConfig(storage_path=<temp dir>, verbose=0)).fit()``, the digits
  data passed with ``tune.with_parameters`` (Ray's object store), everything else at Ray Tune's defaults.
- automl: ``Sweep.from_dict(spec, base_dir=benchmarks/, workdir=<temp dir>).run()`` with ``method: tpe`` (as the
  other runners; ``bayesian`` would pick GP for the one-float trivial space below 100 trials) and ``budget:
  {trials: N, max_concurrent: 2}``; MLflow logging on (SQLite in the workdir), the Optuna journal and state
  folder written as in any sweep. Trainers ``objectives:trivial`` and ``objectives:digits_mlp``; the row
  "automl (trainer: mlp)" runs the built-in ``mlp`` trainer instead (``fixed: {epochs: 10}``): the same
  training, but its in-trial compute is automl's own ``TrialRecord.seconds`` (the time inside the trainer, its
  ``report`` calls included), and as the built-in trainer records no timestamps of its own, its trial spans are
  the driver's: each trial's MLflow run start and end times (milliseconds, taken when automl launches the trial
  and when it has processed its end), which bracket the training, so its steady-state figure is a slight
  underestimate (marked ``*``).
  ``run()`` runs on the process's default engine (``automl.engine.default_engine()``: a pool of Ray actors that
  keep their imports between sweeps, and one MLflow writer process shared by every sweep).
  - Cold engine (the rows "automl, cold engine", "automl, MLflow trial logging off", "automl (trainer: mlp)" and
    the logging-cost pairs): before each sweep, outside its wall time, the engine is stopped
    (``automl.engine.shutdown()``: its workers and writer end) and Ray is waited on until it has its CPUs back,
    so the sweep starts a new engine: a new writer process (importing MLflow), new workers (importing the trainer
    and torch), the data loaded again. Ray itself stays up and the libraries stay imported in this process (the
    one-time costs below), so this is the first sweep of a process that has already started Ray: ``automl run``
    in a fresh process, Ray's start included, is the "cold ``automl run``" figure below.
  - Warm engine (the rows "automl, warm engine (2nd sweep)" and "(3rd sweep)"): each sweep of the cold row
    (trivial N1, trivial N2, digits) is followed at once by the same sweep twice more, a new ``Sweep`` each time
    (same spec, same trainer) on the same engine: the 2nd and the 3rd sweep of that engine, whose workers have
    imported the trainer and torch already (the JSON has ``worker_imports``, each live worker's
    ``executor.imports()`` after each automl sweep: 1 per trainer on a warm engine). Each warm row takes every
    figure from sweeps of the same rank: its marginal figure is (wall(N2) - wall(N1)) / (N2 - N1) of the N2 and
    N1 sweeps that were both the 2nd (or both the 3rd) sweep of their engine.

Definitions:

- wall: ``time.perf_counter`` around everything a runner does for one sweep (creating the study / Tuner /
  Sweep, starting and stopping its workers, every trial, logging, picking the best). Excluded, as one-time
  costs of the process: ``ray.init(address="local", num_cpus=2, include_dashboard=False)`` (called once,
  shared by Ray Tune and automl; "local": a Ray of its own, even when another ``ray start`` runs on the
  machine, which a bare ``ray.init`` would join, or fail to join with ``num_cpus``), importing the libraries
  (``ray.tune``, its ``OptunaSearch``, matplotlib and the modules an automl sweep imports included, imported
  before the first sweep; see ``PREIMPORTS``), and creating the empty MLflow SQLite store (its schema
  migrations; the time is in the JSON as ``store_init_s``).
- end-to-end per-trial overhead (trivial, column ``trivial: ms/trial``): wall(N1) / N1, in ms. The trial's
  compute is nil, so this is all overhead: the sweep's start-up and tear-down (on a cold engine: worker
  processes, automl's writer subprocess; on any: the MLflow experiment and parent run, the final flush, the
  summary) spread over N1 trials, plus the cost of each trial.
- marginal per-trial overhead (trivial, column ``trivial: marginal ms/trial``): (wall(N2) - wall(N1)) /
  (N2 - N1), in ms: the cost of one more trial, free of what every sweep pays once whatever its size (both
  sweeps pay it, so it cancels), while what a writer or a store does per trial, at the end included (the
  final flush of the trials' logs), stays in the slope. For each runner the N1 sweep runs first and the N2
  sweep after it. A difference of two wall times, it is noisier than either; the JSON has both walls
  (``trivial_marginal``). A sampler's own cost per trial grows with the trials before it (TPE's slowly), so
  the slope is that of trials N1 to N2 (200 to 400), for every runner alike; small runs are smoke tests only.
- in-trial compute: measured inside each objective with ``time.perf_counter``; it excludes the time inside
  the runner's ``report`` callback and a one-time torch warm-up per worker process (see ``objectives.py``).
- parallel efficiency (digits): (sum of in-trial compute / concurrency) / wall. 1.0 means both cores trained
  all the time; what is missing is orchestration (and, on a busy machine, other processes).
- steady-state efficiency (digits): (sum of in-trial compute / concurrency) / (last trial's end - first
  trial's start), from the wall-clock timestamps (``time.time()``) each objective takes around its training
  (``t_start``, ``t_end``: see ``objectives.py``). It leaves out the one-time start-up before the first trial
  (worker processes starting and importing torch, the warm-up) and the tear-down after the last, so what it
  misses is the per-trial orchestration cost. The JSON has, per runner, ``startup_s`` = first start - the
  moment the runner's sweep call began and ``teardown_s`` = the moment the call returned - last end, where the
  sweep call is ``study.optimize`` (optuna), ``Tuner.fit`` (Ray Tune) and ``Sweep.from_dict(...).run()``
  (automl); ``call_s`` is the call's duration (wall also counts the few lines around it).
- first trial after the call (table "first trial after the call"): for automl's digits sweeps, cold engine
  (1st sweep) and warm engine (2nd, 3rd sweep), ``startup_s`` above: the earliest ``t_start`` of the sweep's
  trials (the first trial's start as the trainer sees it, wall clock) minus the moment the
  ``Sweep.from_dict(...).run()`` call began (spec validation, data, the MLflow parent run, the study, the workers
  and the launch all fall inside). ``t_start`` is taken after ``objectives.py``'s one-time torch warm-up of the
  worker process (about 1 s of lazy initialisation, done on a cold engine's workers in their first trial, and
  already done on a warm engine's), so the cold figure leaves that warm-up out.
- cold ``automl run``: ``automl run search_spaces/digits_mlp.yaml --trials 4`` (the demo spec: the built-in
  ``mlp``, ASHA, 2 at a time) as a fresh process (the ``automl`` script next to this Python), ``--cli-runs``
  times (3; 1 with ``--quick``) one after the other, each in a new empty temporary folder holding only the spec
  (so the MLflow store is created there, as in a first run), after this process has stopped its engine and
  its Ray; ``MLFLOW_TRACKING_URI`` and ``RAY_ADDRESS`` are removed from its environment (it starts a Ray of its
  own). Its stdout is a pipe, so the CLI prints one line per finished trial (``[  t s] trial ...``); each line
  is timestamped as it is read. The figure is the time from just before the process is started to its first
  trial result line (the first trial's end, not its start: Python's start, the imports, Ray's start and the
  trial's training all fall inside); the table gives the median [min, max] of the runs, the JSON
  (``cli_runs``) every run's timestamped lines.
- best val_accuracy: the best trial's last reported ``val_accuracy``; trials are not seeded alike across
  runners (Optuna's parallel trials race for its sampler), so it only checks that each runner trained.

DESIGN.md section 7 gives the budgets: a marginal overhead of at most 5 ms per trivial trial (MLflow logging on),
the first trial within 0.3 s of the call on a warm engine, a cold ``automl run`` showing its first trial result
within 4 s of the command, and a parallel efficiency of at least 0.85 on the 20-trial digits sweep on a warm
engine. The paragraph after the tables checks each of them against this run's warm figures (the 2nd and the 3rd
sweep, each labelled; the cold CLI for its own budget) and gives the cold engine's figures beside them; the JSON
holds the same under ``budgets``. Timings on a shared 2-core machine are noisy; compare runners within one run.
Ray Tune with default settings needs 1 to 1.5 s per trial on a quiet machine (more on a busy one), so the full run
takes about 15 minutes on 2 cores; ``--quick`` runs Ray Tune's end-to-end trivial sweep on at most 40 trials (the
table says how many; a sweep of 40 doubles as its marginal N2) and the cold ``automl run`` once, and takes about 6.
Smaller ``--trivial-trials`` and ``--digits-trials`` (and ``--logging-repeats 0``, ``--cli-runs 0``) make a smoke
test, not figures.
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
import re
import shutil
import statistics
import subprocess
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
ROOT = HERE.parent
# automl on a warm engine: the rows of an engine's 2nd and 3rd sweep (the cold row is its 1st).
WARM_SWEEPS = (2, 3)
COLD_ROW = "automl, cold engine"
# The cold `automl run`: the demo spec, as a fresh process in an empty folder.
CLI_SPEC = ROOT / "search_spaces" / "digits_mlp.yaml"
CLI_TRIALS = 4
_CLI_SCRIPT = Path(sys.executable).with_name("automl")
AUTOML_CLI = [str(_CLI_SCRIPT)] if _CLI_SCRIPT.exists() else [sys.executable, "-m", "automl.cli"]
# The line the CLI prints for each finished trial when its stdout is not a terminal (automl.cli._Progress).
CLI_TRIAL_LINE = re.compile(r"^\[\s*[0-9.]+s\] trial\s+\d+\s")
# Ray Tune with default settings (1 to 2 s per trial): its marginal figure's sweep sizes, whatever --trivial-trials.
TUNE_DEFAULT_MARGINAL_TRIALS = (20, 40)


@dataclass
class Measurement:
    """One runner on one workload. Times named ``t_*`` and ``call_*`` are wall clock (``time.time()``)."""

    runner: str
    workload: str  # trivial | digits
    trials: int  # planned
    completed: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0  # sum of in-trial compute
    concurrency: int = CONCURRENCY
    best: float | None = None
    error: str | None = None
    call_began: float | None = None  # the runner's sweep call
    call_returned: float | None = None
    t_first_start: float | None = None  # earliest trial start (digits)
    t_last_end: float | None = None  # latest trial end (digits)
    span_source: str | None = None  # "objective" (its own timestamps) or "driver" (MLflow run times)
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
    def span_s(self) -> float | None:
        """First trial start to last trial end."""
        if self.t_first_start is None or self.t_last_end is None:
            return None
        return self.t_last_end - self.t_first_start

    @property
    def steady_efficiency(self) -> float | None:
        span = self.span_s
        if self.error or not span or span <= 0:
            return None
        return (self.compute_s / self.concurrency) / span

    @property
    def startup_s(self) -> float | None:
        if self.call_began is None or self.t_first_start is None:
            return None
        return self.t_first_start - self.call_began

    @property
    def teardown_s(self) -> float | None:
        if self.call_returned is None or self.t_last_end is None:
            return None
        return self.call_returned - self.t_last_end

    @property
    def call_s(self) -> float | None:
        if self.call_began is None or self.call_returned is None:
            return None
        return self.call_returned - self.call_began

    @property
    def mean_compute_s(self) -> float | None:
        return self.compute_s / self.completed if self.completed else None

    def set_spans(self, spans: list[tuple[float, float]], source: str = "objective") -> None:
        """Each finished trial's (start, end), wall clock."""
        if spans:
            self.t_first_start = min(start for start, _ in spans)
            self.t_last_end = max(end for _, end in spans)
            self.span_source = source

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ms_per_trial": self.ms_per_trial, "efficiency": self.efficiency,
                "steady_efficiency": self.steady_efficiency, "span_s": self.span_s, "startup_s": self.startup_s,
                "teardown_s": self.teardown_s, "call_s": self.call_s, "mean_compute_s": self.mean_compute_s}


@dataclass
class Marginal:
    """One runner's trivial sweeps of N1 and N2 trials: the cost of one more trial is the slope between them."""

    n1: Measurement
    n2: Measurement

    @property
    def error(self) -> str | None:
        return self.n1.error or self.n2.error

    @property
    def ms_per_trial(self) -> float | None:
        """(wall(N2) - wall(N1)) / (N2 - N1), in ms."""
        if self.error or self.n2.trials == self.n1.trials:
            return None
        return 1000.0 * (self.n2.wall_s - self.n1.wall_s) / (self.n2.trials - self.n1.trials)

    def as_json(self) -> dict[str, Any]:
        return {"runner": self.n1.runner, "n1": self.n1.trials, "n2": self.n2.trials, "wall_n1_s": self.n1.wall_s,
                "wall_n2_s": self.n2.wall_s, "marginal_ms_per_trial": self.ms_per_trial, "error": self.error}


@dataclass
class Row:
    """One line of the table: a runner's trivial sweeps (end-to-end and marginal) and its digits sweep."""

    name: str
    trivial: Measurement | None = None  # the end-to-end figure's sweep
    marginal: Marginal | None = None
    digits: Measurement | None = None

    def measurements(self) -> list[Measurement]:
        """Every sweep this row ran, once each (the end-to-end sweep may also be one of the marginal pair)."""
        found: list[Measurement] = []
        for m in (self.trivial, *((self.marginal.n1, self.marginal.n2) if self.marginal else ()), self.digits):
            if m is not None and all(m is not other for other in found):
                found.append(m)
        return found

    def as_json(self) -> dict[str, Any]:
        return {"row": self.name,
                "end_to_end_trials": self.trivial.trials if self.trivial else None,
                "end_to_end_ms_per_trial": self.trivial.ms_per_trial if self.trivial else None,
                **(self.marginal.as_json() if self.marginal else {"marginal_ms_per_trial": None})}


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


def measure_trivial(runner: str, n_end_to_end: int, n1: int, n2: int,
                    body: Callable[[Measurement], None]) -> tuple[Measurement, Marginal]:
    """The end-to-end sweep first, then the marginal pair's (N1 before N2); a size already run is reused."""
    runs: dict[int, Measurement] = {}
    for n in (n_end_to_end, n1, n2):
        if n not in runs:
            runs[n] = measure(runner, "trivial", n, body)
    return runs[n_end_to_end], Marginal(runs[n1], runs[n2])


# --------------------------------------------------------------------------------------------- optuna


def optuna_trivial(m: Measurement) -> None:
    import optuna

    start = time.perf_counter()
    sampler = optuna.samplers.TPESampler(seed=objectives.SEED)
    study = optuna.create_study(sampler=sampler, direction="minimize")
    m.call_began = time.time()
    study.optimize(objectives.optuna_trivial, n_trials=m.trials, n_jobs=CONCURRENCY)
    m.call_returned = time.time()
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
    m.call_began = time.time()
    study.optimize(lambda trial: objectives.optuna_digits(trial, data), n_trials=m.trials, n_jobs=CONCURRENCY)
    m.call_returned = time.time()
    m.wall_s = time.perf_counter() - start
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    m.completed = len(done)
    m.compute_s = sum(t.user_attrs["compute_s"] for t in done)
    m.set_spans([(t.user_attrs[objectives.T_START], t.user_attrs[objectives.T_END]) for t in done])
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
        m.call_began = time.time()
        results = tuner.fit()
        m.call_returned = time.time()
        best = results.get_best_result(metric=metric, mode=mode)
        m.wall_s = time.perf_counter() - start
    finished = [r for r in results if r.error is None and r.metrics and metric in r.metrics]
    m.completed = len(finished)
    m.compute_s = sum(float(r.metrics.get("compute_s", 0.0)) for r in finished)
    if m.workload == "digits":
        m.set_spans([(float(r.metrics[objectives.T_START]), float(r.metrics[objectives.T_END])) for r in finished])
    m.best = float(best.metrics[metric]) if best.metrics else None
    m.extra["num_errors"] = results.num_errors


# --------------------------------------------------------------------------------------------- automl


def automl_spec(workload: str, trials: int, trainer: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        # automl makes sweep ids unique (name-timestamp, then -2, -3...); distinct names only read better in MLflow.
        "name": f"overhead-{workload}" + (f"-{trainer.replace(':', '.')}" if trainer else ""),
        # TPE, as DESIGN §7 says and as the other runners use (`bayesian` would pick GP for the trivial one-float
        # space below 100 trials).
        "method": "tpe",
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


def fresh_engine() -> None:
    """Stop this process's default engine (its workers and its MLflow writer end) and wait until Ray has its CPUs
    back, so that the next sweep starts a new engine, cold. Ray itself stays up: a one-time cost of the process."""
    import ray

    from automl import engine

    engine.shutdown()
    deadline = time.monotonic() + 30.0
    while ray.available_resources().get("CPU", 0.0) < CONCURRENCY and time.monotonic() < deadline:
        time.sleep(0.05)


def worker_imports() -> list[dict[str, int]] | None:
    """Each live worker of the default engine: trainer target -> times imported (``executor.imports()``)."""
    from automl.engine import default_engine

    try:
        return default_engine().executor.imports()  # type: ignore[attr-defined]
    except Exception:
        return None


def automl_sweep(m: Measurement, *, workdir: Path, trainer: str | None = None, trial_logging: bool = True,
                 engine: str = "cold") -> None:
    """One automl sweep; ``engine="cold"`` starts it on a new engine, ``"warm"`` on the one the last sweep used."""
    from automl import Sweep

    spec = automl_spec(m.workload, m.trials, trainer)
    if not trial_logging:  # the parent run only: what MLflow's per-trial writes cost is the difference
        spec["tracking"] = {"trials": False}
    if engine == "cold":
        fresh_engine()  # outside the wall time: the previous engine's end is not this sweep's cost
    m.extra["engine"] = engine
    start = time.perf_counter()
    m.call_began = time.time()
    result = Sweep.from_dict(spec, base_dir=HERE, workdir=workdir).run()
    m.call_returned = time.time()
    m.wall_s = time.perf_counter() - start
    # The summary plots follow the result in the background; they finish here, outside this sweep's wall time and
    # before the next measurement starts, so that no sweep pays for the one before it.
    result.wait_for_summary(timeout=600)
    done = [t for t in result.trials if t.state == "COMPLETE"]
    m.completed = len(done)
    if trainer is None:
        m.compute_s = sum(t.metrics.get("compute_s", 0.0) for t in done)
        if m.workload == "digits":  # the last report's metrics: the objective's own timestamps
            m.set_spans([(t.metrics[objectives.T_START], t.metrics[objectives.T_END]) for t in done])
    else:  # a trainer that does not report compute_s: automl's own measure of the time in the trainer
        m.compute_s = sum(t.seconds for t in done)
        if m.workload == "digits":
            m.set_spans(driver_spans(result.tracking_uri, [t.run_id for t in done]), source="driver")
    m.best = result.best.value if result.best else None
    m.extra.update(
        sweep_wall_seconds=result.wall_seconds,
        trial_seconds=sum(t.seconds for t in done),
        states={s: sum(1 for t in result.trials if t.state == s) for s in {t.state for t in result.trials}},
        errors=sorted({t.error for t in result.trials if t.error})[:3],
        worker_imports=worker_imports(),
    )


def engine_rows(workdir: Path, n1: int, n2: int, n_digits: int) -> list[Row]:
    """The row "automl, cold engine" and the warm rows: each of the cold row's sweeps (trivial N1, trivial N2,
    digits) runs as the 1st sweep of a new engine, followed at once by the same sweep as that engine's 2nd and
    3rd (a new ``Sweep`` each time, same spec and trainer). A row takes every figure from sweeps of its rank."""
    ranks = (1, *WARM_SWEEPS)
    names = [COLD_ROW, *(warm_row_name(rank) for rank in WARM_SWEEPS)]
    series: dict[tuple[str, int], list[Measurement]] = {}
    for workload, n in (("trivial", n1), ("trivial", n2), ("digits", n_digits)):
        if (workload, n) in series:
            continue
        runs = []
        for rank in ranks:
            runner = "automl, cold engine" if rank == 1 else f"automl, warm engine #{rank}"

            def body(m: Measurement, rank: int = rank) -> None:
                automl_sweep(m, workdir=workdir, engine="cold" if rank == 1 else "warm")
                m.extra["engine_sweep"] = rank

            runs.append(measure(runner, workload, n, body))
        series[(workload, n)] = runs
    rows = []
    for i, name in enumerate(names):
        row = Row(name, trivial=series[("trivial", n1)][i], digits=series[("digits", n_digits)][i])
        row.marginal = Marginal(series[("trivial", n1)][i], series[("trivial", n2)][i])
        rows.append(row)
    return rows


def warm_row_name(rank: int) -> str:
    return f"automl, warm engine ({_ordinal(rank)} sweep)"


def _ordinal(n: int) -> str:
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(n if n < 20 else n % 10, "th")
    return f"{n}{suffix}"


# --------------------------------------------------------------------------------------------- cold automl run


@dataclass
class CliRun:
    """One ``automl run`` as a fresh process: its stdout lines, each with the seconds since just before its start."""

    first_result_s: float | None = None  # the first trial result line
    total_s: float | None = None  # to the process's exit
    returncode: int | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    error: str | None = None


def cli_command() -> list[str]:
    return [*AUTOML_CLI, "run", f"search_spaces/{CLI_SPEC.name}", "--trials", str(CLI_TRIALS)]


def cold_cli_run(timeout: float = 600.0) -> CliRun:
    """``automl run search_spaces/digits_mlp.yaml --trials 4`` in a new empty folder holding only the spec."""
    import threading

    run = CliRun()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AUTOML_STATE_DIR", "AUTOML_STORAGE")}
    with _temp_dir("overhead-cli-") as folder, tempfile.TemporaryFile() as stderr:
        (folder / "search_spaces").mkdir()
        shutil.copy(CLI_SPEC, folder / "search_spaces" / CLI_SPEC.name)
        start = time.perf_counter()
        proc = subprocess.Popen(cli_command(), cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, bufsize=1)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                seconds = time.perf_counter() - start
                run.lines.append((round(seconds, 3), line.rstrip()[:300]))
                if run.first_result_s is None and CLI_TRIAL_LINE.match(line):
                    run.first_result_s = seconds
            run.returncode = proc.wait()
            run.total_s = time.perf_counter() - start
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if run.returncode != 0 or run.first_result_s is None:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace").strip().splitlines()[-3:]
            run.error = (f"exit {run.returncode}" + ("" if run.first_result_s is not None else ", no trial line")
                         + (f": {' / '.join(tail)}" if tail else ""))[:300]
    return run


def measure_cli(runs: int) -> list[CliRun]:
    results = []
    for i in range(runs):
        print(f"  {'automl run (cold process)':<28} #{i + 1} ...", end="", flush=True, file=sys.stderr)
        try:
            run = cold_cli_run()
        except Exception as exc:
            run = CliRun(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            traceback.print_exc(file=sys.stderr)
        status = run.error or f"first trial result line at {run.first_result_s:.2f} s, exit at {run.total_s:.1f} s"
        print(f" {status}", file=sys.stderr, flush=True)
        results.append(run)
    return results


def driver_spans(tracking_uri: str, run_ids: list[str | None]) -> list[tuple[float, float]]:
    """Trials' MLflow run start and end times (automl's driver sets them at launch and after the trial's end)."""
    from automl.tracking import make_client

    client = make_client(tracking_uri)
    spans = []
    for run_id in run_ids:
        info = client.get_run(run_id).info if run_id else None
        if info is None or info.start_time is None or info.end_time is None:
            return []  # one trial without its span: no figure rather than a wrong one
        spans.append((info.start_time / 1000.0, info.end_time / 1000.0))
    return spans


def init_store(workdir: Path) -> float:
    """Create automl's empty MLflow store (SQLite schema migrations): a one-time cost, not a sweep's."""
    from automl.tracking import make_client, resolve_tracking_uri

    start = time.perf_counter()
    make_client(resolve_tracking_uri(None, workdir)).search_experiments()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


MARGINAL_MARK = "†"  # a marginal figure from other sweep sizes than N1 and 2 * N1


def table(rows: list[Row], default_trivial: int, default_digits: int) -> str:
    lines = [
        "| runner | trivial: ms/trial | trivial: marginal ms/trial | digits: efficiency "
        "| digits: steady-state efficiency | digits: wall s | digits: best val_accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row.name]
        trivial, marginal, digits = row.trivial, row.marginal, row.digits
        if trivial is None:
            cells.append("—")
        elif trivial.error:
            cells.append(f"failed ({trivial.error})")
        else:
            cell = _fmt(trivial.ms_per_trial, ".1f")
            if trivial.trials != default_trivial:
                cell += f" ({trivial.trials} trials)"
            cells.append(cell)
        if marginal is None:
            cells.append("—")
        elif marginal.error:
            cells.append(f"failed ({marginal.error})")
        else:
            cell = _fmt(marginal.ms_per_trial, ".1f")
            if (marginal.n1.trials, marginal.n2.trials) != (default_trivial, 2 * default_trivial):
                cell += MARGINAL_MARK
            cells.append(cell)
        if digits is None:
            cells += ["—", "—", "—", "—"]
        elif digits.error:
            cells += [f"failed ({digits.error})", "—", _fmt(digits.wall_s or None, ".1f"), "—"]
        else:
            eff = _fmt(digits.efficiency, ".2f")
            if digits.trials != default_digits:
                eff += f" ({digits.trials} trials)"
            steady = _fmt(digits.steady_efficiency, ".2f")
            if digits.span_source == "driver" and digits.steady_efficiency is not None:
                steady += "*"
            cells += [eff, steady, _fmt(digits.wall_s, ".1f"), _fmt(digits.best, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MARGINAL_BUDGET_MS = 5.0  # DESIGN.md section 7: at most, marginal, per trivial trial (MLflow logging on)
FIRST_TRIAL_BUDGET_S = 0.3  # DESIGN.md section 7: at most, from the call to the first trial on a warm engine
CLI_BUDGET_S = 4.0  # DESIGN.md section 7: at most, from a cold `automl run` to its first trial result line
EFFICIENCY_BUDGET = 0.85  # DESIGN.md section 7: at least, on the 20-trial digits sweep on a warm engine


def _ok(m: Measurement | None) -> Measurement | None:
    return m if m is not None and not m.error else None


def first_trial_s(row: Row) -> float | None:
    """From the sweep call to its first trial's start (the trainer's own ``t_start``), on the digits sweep."""
    digits = _ok(row.digits)
    return digits.startup_s if digits is not None else None


def cli_figures(runs: list[CliRun]) -> tuple[float, float, float] | None:
    """The cold ``automl run``'s time to its first trial result line: median, min, max over the runs that passed."""
    seconds = [r.first_result_s for r in runs if r.error is None and r.first_result_s is not None]
    return (statistics.median(seconds), min(seconds), max(seconds)) if seconds else None


def _at_most(value: float | None, budget: float) -> bool | None:
    return None if value is None else value <= budget


def budget_figures(cold: Row, warm: dict[int, Row], mlp: Measurement | None, cli: list[CliRun]) -> dict[str, Any]:
    """automl's figures against DESIGN.md section 7's budgets, per engine sweep ("cold", then "2nd", "3rd"); the
    verdicts are the warm sweeps' (and the cold CLI's); a figure not measured is None, and so is its verdict."""
    ranks = {"cold": cold, **{_ordinal(rank): row for rank, row in warm.items()}}

    def per_rank(fig: Callable[[Row], float | None]) -> dict[str, float | None]:
        return {name: fig(row) for name, row in ranks.items()}

    marginal = per_rank(lambda r: r.marginal.ms_per_trial if r.marginal is not None else None)
    first = per_rank(first_trial_s)
    efficiency = per_rank(lambda r: d.efficiency if (d := _ok(r.digits)) is not None else None)
    cli_fig = cli_figures(cli)
    return {
        "marginal_budget_ms": MARGINAL_BUDGET_MS,
        "marginal_trials": [cold.marginal.n1.trials, cold.marginal.n2.trials] if cold.marginal else None,
        "marginal_ms_per_trial": marginal,
        "marginal_met": {k: _at_most(v, MARGINAL_BUDGET_MS) for k, v in marginal.items() if k != "cold"},
        "end_to_end_trials": cold.trivial.trials if cold.trivial is not None else None,
        "end_to_end_ms_per_trial": per_rank(lambda r: r.trivial.ms_per_trial if r.trivial is not None else None),
        "first_trial_budget_s": FIRST_TRIAL_BUDGET_S,
        "first_trial_s": first,
        "first_trial_met": {k: _at_most(v, FIRST_TRIAL_BUDGET_S) for k, v in first.items() if k != "cold"},
        "cli_budget_s": CLI_BUDGET_S,
        "cli_first_result_s": cli_fig[0] if cli_fig else None,
        "cli_first_result_range_s": list(cli_fig[1:]) if cli_fig else None,
        "cli_runs": len(cli),
        "cli_met": _at_most(cli_fig[0] if cli_fig else None, CLI_BUDGET_S),
        "efficiency_budget": EFFICIENCY_BUDGET,
        "digits_trials": cold.digits.trials if cold.digits is not None else None,
        "efficiency": efficiency,
        "efficiency_met": {k: None if v is None else v >= EFFICIENCY_BUDGET
                           for k, v in efficiency.items() if k != "cold"},
        "steady_state_efficiency": per_rank(lambda r: d.steady_efficiency if (d := _ok(r.digits)) else None),
        "mlp_trainer_efficiency": mlp.efficiency if mlp is not None else None,
    }


def _verdict(met: bool | None) -> str:
    return "met" if met else "missed"


def _cli_cell(runs: list[CliRun]) -> str:
    fig = cli_figures(runs)
    if fig is None:
        errors = sorted({r.error for r in runs if r.error})
        return "failed (" + "; ".join(errors) + ")" if errors else "not run"
    median, low, high = fig
    passed = sum(1 for r in runs if r.error is None)
    text = f"{median:.2f} [{low:.2f}, {high:.2f}]" if passed > 1 else f"{median:.2f}"
    if passed != len(runs):
        text += f" ({len(runs) - passed} of {len(runs)} runs failed)"
    return text


def first_trial_table(cold: Row, warm: dict[int, Row], cli: list[CliRun]) -> str:
    """The table "first trial after the call": automl's digits sweeps by engine rank, then the cold CLI."""
    lines = ["| first trial after the call | seconds | DESIGN.md §7 |", "|---|---:|---|"]
    what = "`Sweep.run()` to its first trial's start (digits)"
    entries = [(f"{COLD_ROW} (1st sweep): {what}", cold, None),
               *((f"{warm_row_name(rank)}: {what}", row, FIRST_TRIAL_BUDGET_S) for rank, row in warm.items())]
    for label, row, budget in entries:
        value = first_trial_s(row)
        if row.digits is not None and row.digits.error and value is None:
            cell = f"failed ({row.digits.error})"
        else:
            cell = _fmt(value, ".2f")
        target = "—" if budget is None else f"at most {budget:g} s" + (
            "" if value is None else f": {_verdict(value <= budget)}")
        lines.append(f"| {label} | {cell} | {target} |")
    passed = sum(1 for r in cli if r.error is None)
    fig = cli_figures(cli)
    of = f", median of {passed} [min, max]" if passed > 1 else ""
    target = f"at most {CLI_BUDGET_S:g} s" + ("" if fig is None else f": {_verdict(fig[0] <= CLI_BUDGET_S)}")
    lines.append(f"| cold `automl run {CLI_SPEC.parent.name}/{CLI_SPEC.name} --trials {CLI_TRIALS}`: the command's "
                 f"start to its first trial result line{of} | {_cli_cell(cli)} | {target} |")
    return "\n".join(lines)


def budgets(cold: Row, warm: dict[int, Row], mlp: Measurement | None, cli: list[CliRun]) -> str:
    """The paragraph on DESIGN.md section 7's budgets: which of them automl meets in this run, all computed."""
    fig = budget_figures(cold, warm, mlp, cli)
    checks: dict[str, bool | None] = {}

    def warm_text(name: str, values: dict[str, float | None], met: dict[str, bool | None], spec: str, unit: str,
                  not_measured: Callable[[str], str]) -> str:
        parts = []
        for rank, ok in met.items():
            value = values[rank]
            if value is None:
                parts.append(f"{rank} sweep {not_measured(rank)}")
            else:
                checks[f"{name} ({rank} sweep)"] = ok
                parts.append(f"{rank} sweep {format(value, spec)}{unit}, {_verdict(ok)}")
        cold_value = values["cold"]
        cold_text = f"cold engine {format(cold_value, spec)}{unit}" if cold_value is not None else \
            f"cold engine {not_measured('cold')}"
        return "; ".join(parts) + f" [{cold_text}]"

    def row_of(rank: str) -> Row:
        return cold if rank == "cold" else next(r for k, r in warm.items() if _ordinal(k) == rank)

    def trivial_error(rank: str) -> str:
        m = row_of(rank).marginal
        return f"not measured ({m.error if m is not None and m.error else 'not run'})"

    def digits_error(rank: str) -> str:
        d = row_of(rank).digits
        return f"not measured ({d.error if d is not None and d.error else 'not run'})"

    marginal = warm_text("marginal overhead", fig["marginal_ms_per_trial"], fig["marginal_met"], ".1f", " ms",
                         trivial_error)
    slope = ""
    if fig["marginal_trials"]:
        n1, n2 = fig["marginal_trials"]
        slope = f" ((wall({n2}) - wall({n1})) / {n2 - n1})"
    end_to_end = ", ".join(f"{rank} {_fmt(v, '.1f')}" for rank, v in fig["end_to_end_ms_per_trial"].items())
    first = warm_text("first trial", fig["first_trial_s"], fig["first_trial_met"], ".2f", " s", digits_error)
    if fig["cli_first_result_s"] is None:
        cli_text = _cli_cell(cli)
    else:
        checks["cold automl run"] = fig["cli_met"]
        low, high = fig["cli_first_result_range_s"]
        passed = sum(1 for r in cli if r.error is None)
        spread = f" (median of {passed}, [{low:.2f}, {high:.2f}])" if passed > 1 else ""
        cli_text = f"{fig['cli_first_result_s']:.2f} s{spread}, {_verdict(fig['cli_met'])}"
    efficiency = warm_text("efficiency", fig["efficiency"], fig["efficiency_met"], ".2f", "", digits_error)
    steady = ", ".join(f"{rank} {_fmt(v, '.2f')}" for rank, v in fig["steady_state_efficiency"].items())
    efficiency += f"; steady-state {steady}"
    if fig["mlp_trainer_efficiency"] is not None:
        efficiency += f"; the built-in `mlp` trainer, cold engine, {fig['mlp_trainer_efficiency']:.2f}"
    if checks:
        met = sum(1 for ok in checks.values() if ok)
        summary = (f"In this run automl meets {met} of the {len(checks)} measured figures: "
                   + ", ".join(f"{name} {_verdict(ok)}" for name, ok in checks.items()))
    else:
        summary = "automl was not measured in this run"
    return (f"**DESIGN.md §7 budgets** (a warm engine's 2nd and 3rd sweep; in brackets the cold engine's 1st, for "
            f"comparison). Marginal overhead at most {MARGINAL_BUDGET_MS:g} ms per trivial trial with MLflow logging "
            f"on{slope}: {marginal}; end to end (wall / trials, no budget): {end_to_end} ms. First trial within "
            f"{FIRST_TRIAL_BUDGET_S:g} s of the call on a warm engine: {first}. A cold `automl run` shows its first "
            f"trial result within {CLI_BUDGET_S:g} s of the command: {cli_text}. Parallel efficiency at least "
            f"{EFFICIENCY_BUDGET:.2f} on the digits sweep ({fig['digits_trials']} trials, with the wall time) on a "
            f"warm engine: {efficiency}. {summary}.")


def measure_logging_cost(repeats: int, n1: int, n2: int,
                          sweep: Callable[[Measurement, bool], None]) -> list[tuple[Marginal, Marginal]]:
    """``repeats`` pairs of trivial sweeps with ``tracking.trials`` on and off, interleaved (on first in even
    repeats, off first in odd ones) so that drift in the machine's speed falls on both sides alike."""
    pairs = []
    for r in range(repeats):
        runs: dict[bool, Marginal] = {}
        for logging_on in ((True, False) if r % 2 == 0 else (False, True)):
            runner = f"automl logging {'on' if logging_on else 'off'} #{r + 1}"

            def body(m: Measurement, on: bool = logging_on) -> None:
                sweep(m, on)

            runs[logging_on] = Marginal(measure(runner, "trivial", n1, body), measure(runner, "trivial", n2, body))
        pairs.append((runs[True], runs[False]))
    return pairs


def logging_cost(pairs: list[tuple[Marginal, Marginal]]) -> str:
    """What MLflow's child runs cost per trial: the median (and range) over the interleaved on/off pairs."""
    def fig(values: list[float]) -> str:
        return f"{statistics.median(values):+.1f} ms [{min(values):+.1f}, {max(values):+.1f}]"

    marginal = [(on.ms_per_trial, off.ms_per_trial) for on, off in pairs
                if on.ms_per_trial is not None and off.ms_per_trial is not None]
    end_to_end = [(on.n1.ms_per_trial, off.n1.ms_per_trial) for on, off in pairs
                  if on.n1.ms_per_trial is not None and off.n1.ms_per_trial is not None]
    if not marginal or not end_to_end:
        return "MLflow per-trial logging cost: not measured"
    n1, n2 = pairs[0][0].n1.trials, pairs[0][0].n2.trials
    return (f"MLflow per-trial logging cost (a child run per trial with its params, every report's metrics and its "
            f"state, written by automl's writer process off the sweep loop; trivial trials, logging on minus off, "
            f"median [min, max] of {len(marginal)} interleaved pairs): marginal "
            f"{fig([a - b for a, b in marginal])} per trial (on {statistics.median(a for a, _ in marginal):.1f}, "
            f"off {statistics.median(b for _, b in marginal):.1f} ms; slope between {n1} and {n2} trials); "
            f"end-to-end {fig([a - b for a, b in end_to_end])} per trial at {n1} trials (on "
            f"{statistics.median(a for a, _ in end_to_end):.1f}, off {statistics.median(b for _, b in end_to_end):.1f}"
            " ms; every sweep on a new engine, whose writer process starts and imports MLflow either way).")


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


# Imported before the first sweep, as one-time costs: Ray Tune (about 1 s) and the modules automl imports when a
# sweep runs; otherwise each runner's first sweep (the N1 one) would pay them, which would lower its slope.
# The engine's modules and the summary's plotting (matplotlib, Optuna's plots) included: a new engine's first sweep
# must not pay what this process imports once.
PREIMPORTS = ("ray.tune", "ray.tune.search.optuna", "automl.orchestrator", "automl.engine.driver",
              "automl.engine.pool", "automl.engine.core", "automl.engine.startup", "automl.engine.finish",
              "automl.engine.worker", "automl.engine.control", "automl.journal", "automl.samplers",
              "automl.schedulers", "automl.space", "automl.state", "automl.tracking", "automl.preflight",
              "automl.logfile", "automl.summary", "matplotlib.pyplot", "optuna.visualization.matplotlib")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"Ray Tune with default settings runs at most {QUICK_TUNE_DEFAULT_TRIVIAL_TRIALS} "
                             "trivial trials for its end-to-end figure instead of --trivial-trials (it needs "
                             "about 1 s per trial); its marginal figure always comes from "
                             f"{TUNE_DEFAULT_MARGINAL_TRIALS[0]} and {TUNE_DEFAULT_MARGINAL_TRIALS[1]} trials; and "
                             "the cold `automl run` runs once (see --cli-runs)")
    parser.add_argument("--trivial-trials", type=int, default=200,
                        help="N1: trials of the trivial sweep (end-to-end figure); the marginal figure also "
                             "runs N2 = 2 * N1 (default: %(default)s)")
    parser.add_argument("--digits-trials", type=int, default=20)
    parser.add_argument("--logging-repeats", type=int, default=3,
                        help="interleaved pairs of trivial sweeps (N1 and N2 trials) with MLflow trial logging on "
                             "and off, for the logging cost (default: %(default)s; 0 skips it)")
    parser.add_argument("--cli-runs", type=int, default=None,
                        help=f"cold `automl run {CLI_SPEC.parent.name}/{CLI_SPEC.name} --trials {CLI_TRIALS}` "
                             "processes, for the time to their first trial result line (default: 3, 1 with "
                             "--quick; 0 skips it)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the raw figures to PATH")
    args = parser.parse_args(argv)
    if args.logging_repeats < 0:
        parser.error("--logging-repeats must be at least 0")
    if args.cli_runs is None:
        args.cli_runs = 1 if args.quick else 3
    if args.cli_runs < 0:
        parser.error("--cli-runs must be at least 0")
    if args.trivial_trials < 1 or args.digits_trials < 1:
        parser.error("--trivial-trials and --digits-trials must be at least 1")
    n_trivial, n_digits = args.trivial_trials, args.digits_trials
    n1, n2 = n_trivial, 2 * n_trivial
    n_tune_default_trivial = min(n_trivial, QUICK_TUNE_DEFAULT_TRIVIAL_TRIALS) if args.quick else n_trivial

    _quiet()
    started = time.perf_counter()
    # One-time costs, kept out of every sweep's wall time: imports, Ray's start, the digits data's first load.
    import importlib

    import matplotlib
    import ray

    info = versions()
    objectives.digits_data()
    matplotlib.use("Agg")  # as automl's summary picks it when it imports pyplot first
    for module in PREIMPORTS:
        importlib.import_module(module)
    ray.init(address="local", num_cpus=CONCURRENCY, include_dashboard=False)
    print(f"ray.init and imports: {time.perf_counter() - started:.1f} s", file=sys.stderr)

    rows: list[Row] = []

    def run_row(name: str, runner: str, body: Callable[[Measurement], None], *, trivial: bool = True,
                n_end_to_end: int = n_trivial, marginal_sizes: tuple[int, int] = (n1, n2)) -> None:
        row = Row(name)
        if trivial:
            row.trivial, row.marginal = measure_trivial(runner, n_end_to_end, *marginal_sizes, body)
        row.digits = measure(runner, "digits", n_digits, body)
        rows.append(row)

    with _temp_dir("overhead-automl-") as workdir:
        store_init_s = init_store(workdir)

        def tune(reuse: bool) -> Callable[[Measurement], None]:
            return lambda m: tune_sweep(m, reuse_actors=reuse)

        def optuna_sweep(m: Measurement) -> None:
            (optuna_trivial if m.workload == "trivial" else optuna_digits)(m)

        run_row("optuna (in-process, n_jobs=2)", "optuna", optuna_sweep)
        cold, *warm_rows = engine_rows(workdir, n1, n2, n_digits)
        warm = dict(zip(WARM_SWEEPS, warm_rows, strict=True))
        rows += [cold, *warm_rows]
        run_row("automl, MLflow trial logging off", "automl (tracking.trials: false)",
                lambda m: automl_sweep(m, workdir=workdir, trial_logging=False))
        run_row("automl (trainer: mlp)", "automl (trainer: mlp)",
                lambda m: automl_sweep(m, workdir=workdir, trainer="mlp"), trivial=False)
        fresh_engine()  # the engine's idle workers hold Ray's CPUs, which Ray Tune's trials need
        run_row("ray tune, reuse_actors=True", "ray-tune reuse_actors", tune(True))
        run_row("ray tune, defaults", "ray-tune", tune(False), n_end_to_end=n_tune_default_trivial,
                marginal_sizes=TUNE_DEFAULT_MARGINAL_TRIALS)
        pairs = measure_logging_cost(
            args.logging_repeats, n1, n2,
            lambda m, on: automl_sweep(m, workdir=workdir, trial_logging=on))
        from automl import engine

        engine.shutdown()
    ray.shutdown()
    # Last, with this process's engine and Ray stopped: each `automl run` starts a Ray of its own.
    cli = measure_cli(args.cli_runs)

    command = "python benchmarks/overhead.py" + ("" if argv is None and len(sys.argv) < 2 else
                                                 " " + " ".join(sys.argv[1:] if argv is None else argv))
    by_name = {row.name: row for row in rows}
    print()
    mlp = by_name["automl (trainer: mlp)"].digits
    print(table(rows, n_trivial, n_digits))
    print()
    print(first_trial_table(cold, warm, cli))
    print()
    print(budgets(cold, warm, mlp, cli))
    print()
    if pairs:
        print(logging_cost(pairs))
        print()
    print(f"`{command}` on {machine()}; " + ", ".join(f"{k} {v}" for k, v in info.items())
          + f"; {CONCURRENCY} concurrent trials; trivial: N1 = {n1} trials (end-to-end: wall(N1) / N1) and "
          f"N2 = {n2} (marginal: (wall(N2) - wall(N1)) / (N2 - N1)), digits: {n_digits} trials of "
          f"{objectives.DIGITS_EPOCHS} epochs. Total {time.perf_counter() - started:.0f} s.")
    marginals = [(row.name, row.marginal) for row in rows if row.marginal is not None]
    for name, marginal in marginals:
        a, b = marginal.n1.trials, marginal.n2.trials
        if (a, b) == (n1, n2):
            continue
        print(f"{MARGINAL_MARK}: {name}: the marginal figure is (wall({b}) - wall({a})) / {b - a}, from sweeps "
              f"of {a} and {b} trials whatever --trivial-trials says (not N1 = {n1} and N2 = {n2}): Ray Tune with "
              "default settings needs 1 to 2 s per trial.")
    digits = [(row.name, row.digits) for row in rows if row.digits is not None]
    print("In-trial compute per digits trial (s): "
          + ", ".join(f"{name} {d.mean_compute_s:.2f}" for name, d in digits if d.mean_compute_s is not None)
          + ". Threads of one process (optuna) slow each other down, which lengthens their compute.")
    spans = [(name, d) for name, d in digits if d.startup_s is not None and d.teardown_s is not None]
    if spans:
        print("Digits start-up / tear-down (s), from the sweep call to the first trial's start / from the last "
              "trial's end to the call's return: "
              + ", ".join(f"{name} {d.startup_s:.2f} / {d.teardown_s:.2f}" for name, d in spans) + ".")
    if any(d.span_source == "driver" and d.steady_efficiency is not None for _, d in digits):
        print("*: the built-in trainer takes no timestamps; its trials' spans are automl's MLflow run start and "
              "end times (set by the driver at launch and after the end), which bracket the training.")
    last_warm = warm[WARM_SWEEPS[-1]].digits
    if last_warm is not None and last_warm.extra.get("worker_imports") is not None:
        print(f"Warm engine: each live worker's trainer imports after the {_ordinal(WARM_SWEEPS[-1])} digits sweep "
              f"(executor.imports()): {last_warm.extra['worker_imports']}.")
    if cli:
        cli_lines = [f"{_fmt(r.lines[0][0] if r.lines else None, '.2f')} / {_fmt(r.first_result_s, '.2f')} / "
                     f"{_fmt(r.total_s, '.1f')}" + (f" ({r.error})" if r.error else "") for r in cli]
        print(f"Cold `{' '.join(['automl', *cli_command()[len(AUTOML_CLI):]])}` (s from the command's start: first "
              "stdout line (the run's header) / first trial result line / exit): " + ", ".join(cli_lines) + ".")
    if n_tune_default_trivial != n_trivial:
        print(f"--quick: Ray Tune with default settings ran {n_tune_default_trivial} trivial trials for its "
              f"end-to-end figure, not {n_trivial}.")
    measurements = [m for row in rows for m in row.measurements()]
    if args.json:
        payload = {
            "command": command, "machine": machine(), "versions": info, "concurrency": CONCURRENCY,
            "store_init_s": store_init_s, "trivial_n1": n1, "trivial_n2": n2,
            "budgets": budget_figures(cold, warm, mlp, cli),
            "trivial_marginal": [row.as_json() for row in rows if row.trivial is not None],
            "results": [m.as_json() for m in measurements],
            "logging_pairs": [{"on": on.as_json(), "off": off.as_json()} for on, off in pairs],
            "cli_command": " ".join(["automl", *cli_command()[len(AUTOML_CLI):]]),
            "cli_runs": [asdict(r) for r in cli],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"raw figures: {args.json}")
    return 1 if any(m.error for m in measurements) or any(r.error for r in cli) else 0


if __name__ == "__main__":
    sys.exit(main())
