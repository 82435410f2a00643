"""Early stopping's payoff: the same digits MLP sweep run to the end of every trial, and with ASHA.

    python benchmarks/early_stopping.py [--trials 40] [--epochs 20] [--repeats 1] [--json PATH]

The sweep: the built-in ``mlp`` trainer on ``sklearn:digits`` (the data section of
``search_spaces/digits_mlp.yaml``: a stratified 20% validation split), metric ``val_accuracy`` (maximize),
``method: bayesian`` (TPE, as the space has categoricals) over that file's ``parameters``, ``fixed: {epochs:
20}`` (``--epochs``), ``budget: {trials: 40, max_concurrent: 2}`` (``--trials``), ``resources: {cpu: 1}``,
``seed: 0``. It runs twice, each time through ``Sweep.from_dict(spec, workdir=<a temp dir of its own>).run()``
(MLflow logging on, the Optuna journal and state folder written as in any sweep):

- full: ``early_stopping: none``: every trial trains all its epochs;
- asha: ``early_stopping: {method: asha, min_epochs: 2, reduction_factor: 3}``: Optuna's
  ``SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)`` judges each trial at epochs 2, 6 and 18 (of
  20) and stops it unless it is in the top third of the trials that reached that rung (while fewer than three have,
  unless it is the best of them).

``ray.init(address="local", num_cpus=2, include_dashboard=False)`` runs once, at the start, and is not
counted in any sweep (nor are the imports and the creation of each workdir's empty MLflow store).
``--repeats R`` runs both sweeps with seeds 0, 1, ..., R-1 (a single seed is noisy: the seed sets the
validation split, the sampler and each trial's initialisation, and with two trials at a time the order in
which their results reach the sampler and the pruner varies from run to run); for each seed the two sweeps
share everything but ``early_stopping``, and they take turns going first (full first on even seeds).

Definitions, per sweep:

- best val_accuracy: ``SweepResult.best.value``, the best finished (COMPLETE) trial's last reported
  ``val_accuracy``: the accuracy of the model the sweep keeps. A stopped trial never counts as the best.
- compute: the sum over all trials (finished, stopped and failed) of ``TrialRecord.seconds``, the time
  inside the trainer (``report`` calls included, the worker's one-time torch warm-up excluded), in seconds.
  Two trials run at a time, so it is up to twice the wall time the trials took.
- epochs trained: the sum over all trials of ``TrialRecord.epochs`` (the last epoch each trial reported; a stop
  request takes effect at the trial's next ``report``, which records that epoch and then stops the trial).
- wall: ``time.perf_counter`` around ``Sweep.from_dict(...).run()``: the sweep's trial actors starting
  (and importing torch), every trial, MLflow logging and saving the best model.
- stopped early: trials that ended ``STOPPED`` (early stopping stopped them).

Comparisons, per seed: ASHA's best minus the full sweep's best, in percentage points (100 x the difference of
the accuracies; negative: ASHA found less), and ASHA's compute as a percentage of the full sweep's. With
several seeds the tables give the mean and the [min, max] over the seeds (the seeds where both sweeps ran; a
failed sweep is named in the table and the exit status is 1).

The target (the issue): ASHA within 0.5 percentage points of the full sweep's best val_accuracy (its best
at least the full sweep's best - 0.5 pp; better is fine) at no more than 40% of the full sweep's compute.
The verdict uses the means over the seeds (with one seed, that seed's figures) and says in how many seeds
both conditions held.

The full default run takes several minutes on two cores (the full sweep trains 40 x 20 epochs); run it on a
quiet machine, as timings on a busy one are noisy (compute too: two trials share two cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from overhead import machine, versions  # the same machine and version lines as the overhead benchmark

HERE = Path(__file__).resolve().parent
SPACE_FILE = HERE.parent / "search_spaces" / "digits_mlp.yaml"

CONCURRENCY = 2
DEFAULT_TRIALS = 40
DEFAULT_EPOCHS = 20
ASHA = {"method": "asha", "min_epochs": 2, "reduction_factor": 3}
VARIANTS = {"full": "none", "asha": ASHA}  # name -> the spec's early_stopping
TARGET_PP = 0.5  # ASHA's best at most this many percentage points below the full sweep's
TARGET_COMPUTE_PCT = 40.0  # ASHA's compute at most this percentage of the full sweep's


@dataclass
class Run:
    """One sweep: one variant, one seed."""

    variant: str  # full | asha
    seed: int
    trials: int  # planned
    epochs: int  # per trial, fixed
    best: float | None = None
    compute_s: float = 0.0
    epochs_reported: int = 0
    epochs_trained: int = 0
    wall_s: float = 0.0
    sweep_wall_s: float = 0.0  # SweepResult.wall_seconds: automl's own measure, inside run()
    stopped: int = 0
    states: dict[str, int] = field(default_factory=dict)
    store_init_s: float = 0.0
    error: str | None = None
    trial_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.best is not None


# --------------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def _temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_spec(variant: str, *, trials: int, epochs: int, seed: int) -> dict[str, Any]:
    import yaml

    base = yaml.safe_load(SPACE_FILE.read_text())
    return {
        # automl makes sweep ids unique; distinct names only read better in MLflow.
        "name": f"early-stopping-{variant}",
        "trainer": "mlp",
        "data": base["data"],
        "metric": {"name": "val_accuracy", "goal": "maximize"},
        "method": "bayesian",
        "budget": {"trials": trials, "max_concurrent": CONCURRENCY},
        "early_stopping": VARIANTS[variant],
        "resources": {"cpu": 1, "gpu": 0},
        "seed": seed,
        "fixed": {"epochs": epochs},
        "parameters": base["parameters"],
    }


def init_store(workdir: Path) -> float:
    """Create automl's empty MLflow store (SQLite schema migrations): a one-time cost, not a sweep's."""
    from automl.tracking import make_client, resolve_tracking_uri

    start = time.perf_counter()
    make_client(resolve_tracking_uri(None, workdir)).search_experiments()
    return time.perf_counter() - start


def run_sweep(variant: str, *, trials: int, epochs: int, seed: int) -> Run:
    from automl import Sweep

    run = Run(variant=variant, seed=seed, trials=trials, epochs=epochs)
    print(f"  seed {seed}  {variant:<5} {trials:>4} trials x {epochs} epochs ...", end="", flush=True,
          file=sys.stderr)
    with _temp_dir(f"early-stopping-{variant}-") as workdir:
        try:
            run.store_init_s = init_store(workdir)
            spec = make_spec(variant, trials=trials, epochs=epochs, seed=seed)
            start = time.perf_counter()
            result = Sweep.from_dict(spec, workdir=workdir).run()
            run.wall_s = time.perf_counter() - start
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc(file=sys.stderr)
            print(f" {run.error}", file=sys.stderr, flush=True)
            return run
    run.sweep_wall_s = result.wall_seconds
    run.best = result.best.value if result.best else None
    run.compute_s = sum(t.seconds for t in result.trials)
    run.epochs_reported = sum(t.epochs for t in result.trials)
    run.stopped = sum(1 for t in result.trials if t.state == "STOPPED")
    run.epochs_trained = run.epochs_reported  # a stopped trial reports the epoch it trained before stopping
    for t in result.trials:
        run.states[t.state] = run.states.get(t.state, 0) + 1
    run.trial_rows = [
        {"number": t.number, "state": t.state, "value": t.value, "epochs": t.epochs,
         "seconds": round(t.seconds, 4), "params": t.params, "error": t.error}
        for t in result.trials
    ]
    if len(result.trials) != trials:
        run.error = f"{len(result.trials)}/{trials} trials ran"
    elif run.best is None:
        run.error = "no trial finished"
    failed = run.states.get("FAILED", 0) + run.states.get("KILLED", 0)
    status = run.error or (f"best {run.best:.4f}, compute {run.compute_s:.1f} s, wall {run.wall_s:.1f} s, "
                           f"{run.stopped} stopped" + (f", {failed} failed" if failed else ""))
    print(f" {status}", file=sys.stderr, flush=True)
    return run


# --------------------------------------------------------------------------------------------- figures


@dataclass
class Comparison:
    """ASHA against the full sweep, one seed."""

    seed: int
    best_diff_pp: float  # ASHA's best - the full sweep's, in percentage points
    compute_pct: float  # ASHA's compute as a % of the full sweep's
    epochs_pct: float
    wall_pct: float

    @property
    def met(self) -> bool:
        return meets(self.best_diff_pp, self.compute_pct)


def meets(best_diff_pp: float, compute_pct: float) -> bool:
    return best_diff_pp >= -TARGET_PP and compute_pct <= TARGET_COMPUTE_PCT


def compare(full: Run, asha: Run) -> Comparison | None:
    if (full.error or asha.error or full.best is None or asha.best is None or full.compute_s <= 0
            or full.wall_s <= 0 or full.epochs_trained <= 0):
        return None
    return Comparison(
        seed=full.seed,
        best_diff_pp=100.0 * (asha.best - full.best),
        compute_pct=100.0 * asha.compute_s / full.compute_s,
        epochs_pct=100.0 * asha.epochs_trained / full.epochs_trained,
        wall_pct=100.0 * asha.wall_s / full.wall_s,
    )


def _stat(values: list[float], spec: str, suffix: str = "", range_spec: str | None = None) -> str:
    """One value as is; several as mean [min, max] (the range in ``range_spec``, default ``spec``)."""
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], range_spec or spec) + suffix
    rs = range_spec or spec
    return (f"{format(statistics.fmean(values), spec)}{suffix} "
            f"[{format(min(values), rs)}, {format(max(values), rs)}]")


def _signed(spec: str) -> str:
    return spec if spec.startswith("+") else "+" + spec


def table(runs: dict[str, list[Run]], comparisons: list[Comparison]) -> str:
    lines = [
        "| sweep | best val_accuracy | compute s | epochs trained | wall s | stopped early |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {"full": "full (early_stopping: none)",
              "asha": "asha (min_epochs 2, reduction_factor 3)"}
    paired = {c.seed for c in comparisons}  # seeds where both sweeps ran: the rows compare like with like
    for variant, label in labels.items():
        ok = [r for r in runs[variant] if r.ok and (r.seed in paired or not paired)]
        failed = [r for r in runs[variant] if not r.ok]
        if not ok:
            lines.append(f"| {label} | failed ({failed[0].error if failed else 'not run'}) | — | — | — | — |")
            continue
        trials = ok[0].trials
        cells = [
            label + (f" ({len(failed)} of {len(runs[variant])} sweeps failed)" if failed else ""),
            _stat([r.best for r in ok if r.best is not None], ".4f"),
            _stat([r.compute_s for r in ok], ".1f"),
            _stat([float(r.epochs_trained) for r in ok], ".0f"),
            _stat([r.wall_s for r in ok], ".1f"),
            _stat([float(r.stopped) for r in ok], ".1f", f" / {trials}", range_spec=".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if comparisons:
        cells = [
            "asha vs full",
            _stat([c.best_diff_pp for c in comparisons], _signed(".2f"), " pp"),
            _stat([c.compute_pct for c in comparisons], ".0f", "%"),
            _stat([c.epochs_pct for c in comparisons], ".0f", "%"),
            _stat([c.wall_pct for c in comparisons], ".0f", "%"),
            "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(runs: dict[str, list[Run]], comparisons: list[Comparison]) -> str:
    by_seed = {c.seed: c for c in comparisons}
    lines = ["| seed | full: best | asha: best | diff pp | full: compute s | asha: compute s | asha compute % "
             "| asha stopped | target |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for full, asha in zip(runs["full"], runs["asha"], strict=True):
        c = by_seed.get(full.seed)
        if c is None:
            lines.append(f"| {full.seed} | failed ({full.error or asha.error}) |  |  |  |  |  |  |  |")
            continue
        lines.append(f"| {full.seed} | {full.best:.4f} | {asha.best:.4f} | {c.best_diff_pp:+.2f} "
                     f"| {full.compute_s:.1f} | {asha.compute_s:.1f} | {c.compute_pct:.0f}% "
                     f"| {asha.stopped} / {asha.trials} | {'met' if c.met else 'missed'} |")
    return "\n".join(lines)


def verdict(comparisons: list[Comparison], repeats: int) -> tuple[str, bool | None]:
    target = (f"**Target (the issue).** ASHA within {TARGET_PP} percentage points of the full sweep's best "
              f"val_accuracy at no more than {TARGET_COMPUTE_PCT:.0f}% of its compute")
    if not comparisons:
        return f"{target}: not measured (a sweep failed).", None
    diff = statistics.fmean(c.best_diff_pp for c in comparisons)
    pct = statistics.fmean(c.compute_pct for c in comparisons)
    ok = meets(diff, pct)
    conditions = (f"best {diff:+.2f} pp ({'within' if diff >= -TARGET_PP else 'outside'} {TARGET_PP} pp), "
                  f"compute {pct:.0f}% ({'at most' if pct <= TARGET_COMPUTE_PCT else 'above'} "
                  f"{TARGET_COMPUTE_PCT:.0f}%)")
    if len(comparisons) == 1 and repeats == 1:
        return f"{target}: this run {'met' if ok else 'missed'} it: {conditions}.", ok
    met = sum(c.met for c in comparisons)
    n = len(comparisons)
    missing = repeats - n
    return (f"{target}: on the means over {n} seed{'s' if n > 1 else ''} this run {'met' if ok else 'missed'} "
            f"it: {conditions}; met in {met} of {n}"
            + (f" (with {missing} seed{'s' if missing > 1 else ''} left out: a sweep failed)" if missing else "")
            + "."), ok


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("ray", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=_positive, default=DEFAULT_TRIALS, help="trials per sweep (40)")
    parser.add_argument("--epochs", type=_positive, default=DEFAULT_EPOCHS, help="epochs per trial (20)")
    parser.add_argument("--repeats", type=_positive, default=1,
                        help="run both sweeps with seeds 0..R-1 and report mean [min, max] (1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the raw figures to PATH")
    args = parser.parse_args(argv)

    _quiet()
    started = time.perf_counter()
    import ray

    info = versions()
    ray.init(address="local", num_cpus=CONCURRENCY, include_dashboard=False)
    print(f"ray.init and imports: {time.perf_counter() - started:.1f} s", file=sys.stderr)

    runs: dict[str, list[Run]] = {"full": [], "asha": []}
    try:
        for seed in range(args.repeats):
            order = ["full", "asha"] if seed % 2 == 0 else ["asha", "full"]
            for variant in order:
                runs[variant].append(run_sweep(variant, trials=args.trials, epochs=args.epochs, seed=seed))
    finally:
        ray.shutdown()
    comparisons = [c for full, asha in zip(runs["full"], runs["asha"], strict=True)
                   if (c := compare(full, asha)) is not None]

    command = "python benchmarks/early_stopping.py" + (
        "" if argv is None and len(sys.argv) < 2 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    seeds = "seed 0" if args.repeats == 1 else f"seeds 0..{args.repeats - 1}, mean [min, max]"
    print()
    print(table(runs, comparisons))
    print()
    if args.repeats > 1:
        print(per_seed_table(runs, comparisons))
        print()
    text, met = verdict(comparisons, args.repeats)
    print(text)
    print()
    print(f"`{command}` on {machine()}; " + ", ".join(f"{k} {v}" for k, v in info.items())
          + f"; digits MLP, bayesian (TPE), {args.trials} trials of {args.epochs} epochs per sweep, "
          f"{CONCURRENCY} concurrent, {seeds}. Total {time.perf_counter() - started:.0f} s.")
    print("compute: sum of in-trial seconds over all trials; epochs trained: every trial's reported epochs (a "
          "stopped trial reports the epoch it trained before stopping); asha vs full: ASHA's best minus the full "
          "sweep's (percentage points), and ASHA's compute, epochs and wall as a % of the full sweep's.")
    bad = [r for rs in runs.values() for r in rs if r.ok and (r.states.get("FAILED") or r.states.get("KILLED"))]
    for r in bad:
        print(f"note: {r.variant} seed {r.seed}: {r.states} (see the JSON for the errors)")
    if args.json:
        payload = {
            "command": command, "machine": machine(), "versions": info, "concurrency": CONCURRENCY,
            "trials": args.trials, "epochs": args.epochs, "repeats": args.repeats,
            "early_stopping": VARIANTS,
            "target": {"best_diff_pp_at_least": -TARGET_PP, "compute_pct_at_most": TARGET_COMPUTE_PCT,
                       "met": met},
            "runs": [asdict(r) for rs in runs.values() for r in rs],
            "comparisons": [{**asdict(c), "met": c.met} for c in comparisons],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"raw figures: {args.json}")
    failed = [r for rs in runs.values() for r in rs if not r.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
