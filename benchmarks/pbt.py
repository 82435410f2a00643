"""Population-based training against random search, ASHA and Ray Tune's own PBT, at the same compute.

    python benchmarks/pbt.py [--seeds 3] [--population 8] [--epochs 8] [--interval 2] [--json PATH]

The problem, where a schedule matters: the built-in ``mlp`` trainer on ``sklearn:digits`` (stratified 20%
validation split), plain SGD (no momentum) for a fixed number of epochs (``--epochs``, default 8), one hidden
layer of 128 units, batch 32; the only searched parameter is the learning rate, ``lr`` in [1e-3, 3] (log). A high
rate learns fast and then rattles around the minimum (from about 2 it diverges), a low one is stable and slow: the
best *constant* rate (about 1 here) is a compromise a falling schedule may beat. The metric is ``val_loss``
(minimised): it moves where accuracy on digits has saturated.

Four methods, each with the same trainer, data and epochs per training, 2 trainings at a time on a local Ray of
2 CPUs (``ray.init(num_cpus=2)``, started once, not timed):

- ``automl pbt``: ``method: pbt``, population ``--population`` (8), ``interval`` ``--interval`` (2), quantile
  0.25, resample_probability 0.25, factors [0.8, 1.2], ``lr`` mutable: population x epochs epochs in all.
- ``automl random``: ``method: random``, ``--population`` trials with a constant rate: the same epochs in all.
- ``automl asha``: ``method: random`` with ``early_stopping: {method: asha, min_epochs: 1, reduction_factor: 3}``
  and 2 x ``--population`` trials: stopped trials free their compute for more configurations (its epochs trained
  are in the table).
- ``ray tune pbt``: ``ray.tune.Tuner`` with ``ray.tune.schedulers.PopulationBasedTraining(time_attr=
  "training_iteration", perturbation_interval=--interval, quantile_fraction=0.25, resample_probability=0.25,
  hyperparam_mutations={"lr": tune.loguniform(1e-3, 3)})``, ``num_samples=--population``, each trial the same
  ``MLPTrainer`` through a function trainable whose checkpoints (the trainer's own bytes) go through
  ``tune.report(..., checkpoint=)`` at every perturbation step; ``reuse_actors=True`` (Ray's advice for PBT:
  a trial restored from a checkpoint does not start a new process).

Per method and seed: the best validation loss (the best finished training's last ``val_loss``; for PBT the best
member's), its ``val_accuracy``, the epochs trained, the exploits (PBT: automl's from ``pbt_lineage.json``, Ray
Tune's the lines of its ``pbt_global.txt``), and the wall time of the whole method (automl's include MLflow
logging and the best model's export to the state folder; Ray Tune's its own result files). The table gives the
median over ``--seeds`` seeds (0, 1, 2). The order of the methods rotates with the seed.

A small untimed PBT sweep runs first (the engine's workers start and import torch). The machine is shared (2
cores, other work running): wall times are indicative only; the losses are not affected.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from overhead import machine  # the same machine line as the other benchmarks

HERE = Path(__file__).resolve().parent
METHODS = ("automl pbt", "automl random", "automl asha", "ray tune pbt")
FIXED = {"depth": 1, "width": 128, "optimizer": "sgd", "momentum": 0.0, "batch_size": 32}
LR = (1e-3, 3.0)
DATA = {"source": "sklearn:digits"}


@dataclass
class Run:
    method: str
    seed: int
    best_loss: float | None = None
    best_accuracy: float | None = None
    epochs: int = 0
    trainings: int = 0
    wall_s: float = 0.0
    error: str | None = None
    schedule: list[Any] = field(default_factory=list)  # PBT: the best member's lr over steps
    exploits: int | None = None  # PBT: exploit/explore steps taken


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def spec(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": f"bench-{method.replace(' ', '-')}", "trainer": "mlp", "data": DATA,
        "metric": {"name": "val_loss", "goal": "minimize"}, "seed": seed,
        "budget": {"trials": args.population, "max_concurrent": 2},
        "fixed": {**FIXED, "epochs": args.epochs},
        "parameters": {"lr": {"type": "float", "low": LR[0], "high": LR[1], "log": True}},
    }
    if method == "automl pbt":
        raw["method"] = "pbt"
        raw["pbt"] = {"population": args.population, "interval": args.interval, "quantile": 0.25,
                      "resample_probability": 0.25, "factors": [0.8, 1.2]}
        raw["parameters"]["lr"]["mutable"] = True
    else:
        raw["method"] = "random"
    if method == "automl asha":
        raw["budget"]["trials"] = 2 * args.population
        raw["early_stopping"] = {"method": "asha", "min_epochs": 1, "reduction_factor": 3}
    return raw


def run_automl(method: str, seed: int, args: argparse.Namespace) -> Run:
    from mlflow import MlflowClient

    from automl import Sweep
    from automl.tracking import make_client, resolve_tracking_uri

    run = Run(method, seed)
    with temp_dir("bench-pbt-") as workdir:
        make_client(resolve_tracking_uri(None, workdir)).search_experiments()  # the store: not timed
        start = time.perf_counter()
        result = Sweep.from_dict(spec(method, seed, args), workdir=workdir).run()
        run.wall_s = time.perf_counter() - start
        if result.best is not None:
            run.best_loss = result.best.value
            run.best_accuracy = result.best.metrics.get("val_accuracy")
        run.epochs = sum(t.epochs for t in result.trials)
        run.trainings = len(result.trials)
        if method == "automl pbt" and result.parent_run_id:
            client = MlflowClient(tracking_uri=resolve_tracking_uri(None, workdir))
            path = client.download_artifacts(result.parent_run_id, "pbt_lineage.json", str(workdir))
            lineage = json.loads(Path(path).read_text())
            run.schedule = [[step, values.get("lr")] for step, values in lineage["best_schedule"]]
            run.exploits = sum(len(m["exploits"]) for m in lineage["members"].values())
        result.wait_for_summary(timeout=60)
    return run


def run_ray_tune(seed: int, args: argparse.Namespace) -> Run:
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    import automl.engine
    from automl.data import prepare
    from automl.spec import DataSpec

    automl.engine.release_idle_workers()  # automl's warm workers hold the 2 CPUs Ray Tune's trials need
    run = Run("ray tune pbt", seed)
    data = prepare(DataSpec.model_validate(DATA), base_dir=Path.cwd(), seed=seed).trainer_data
    interval, epochs = args.interval, args.epochs

    def trainable(config: dict[str, Any], data: Any = None) -> None:
        from trainers.mlp import MLPTrainer

        checkpoint = tune.get_checkpoint()
        restored = None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                restored = Path(folder, "state.bin").read_bytes()

        class Report:  # the automl trainer's checkpoint contract over Ray Tune's report and checkpoints
            checkpoints = True

            def __init__(self) -> None:
                self.restored = restored

            def __call__(self, step: int, metrics: Any, checkpoint: Any = None) -> None:
                if checkpoint is not None and step % interval == 0:
                    with tempfile.TemporaryDirectory() as folder:
                        Path(folder, "state.bin").write_bytes(checkpoint())
                        tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(folder))
                else:
                    tune.report(dict(metrics))

        MLPTrainer().fit({**FIXED, "epochs": epochs, "lr": config["lr"]}, data, Report())

    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=interval, quantile_fraction=0.25,
        resample_probability=0.25, hyperparam_mutations={"lr": tune.loguniform(*LR)})
    with temp_dir("bench-ray-pbt-") as storage:
        start = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable, data=data), {"cpu": 1}),
            param_space={"lr": tune.loguniform(*LR), "seed": seed},
            tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=args.population, metric="val_loss",
                                        mode="min", max_concurrent_trials=2, reuse_actors=True,
                                        search_alg=tune.search.BasicVariantGenerator(random_state=seed)),
            run_config=tune.RunConfig(storage_path=str(storage), stop={"training_iteration": epochs}, verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=4)))
        results = tuner.fit()
        run.wall_s = time.perf_counter() - start
        best = results.get_best_result(metric="val_loss", mode="min", scope="last")
        run.best_loss = float(best.metrics["val_loss"])
        run.best_accuracy = float(best.metrics["val_accuracy"])
        run.trainings = len(results)
        run.epochs = sum(int(r.metrics.get("training_iteration", 0)) for r in results)
        # Ray Tune's PBT logs each exploit as a line of pbt_global.txt in the experiment's local folder.
        name = Path(results.experiment_path).name
        logs = list(storage.rglob("pbt_global.txt")) or list(
            Path("/tmp/ray").glob(f"session_*/artifacts/*/{name}/pbt_global.txt"))
        if logs:
            run.exploits = sum(len(p.read_text().splitlines()) for p in logs)
    return run


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def table(runs: list[Run]) -> str:
    lines = ["| method | best val_loss (median) | its val_accuracy | epochs trained | trainings | exploits | "
             "wall s (median) | per seed: val_loss |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in runs if r.method == method and r.error is None and r.best_loss is not None]
        if not mine:
            lines.append(f"| {method} | failed | | | | | | |")
            continue
        loss = median([r.best_loss for r in mine if r.best_loss is not None])
        acc = median([r.best_accuracy for r in mine if r.best_accuracy is not None])
        per_seed = ", ".join(f"{r.best_loss:.4f}" for r in sorted(mine, key=lambda r: r.seed) if r.best_loss)
        exploits = [float(r.exploits) for r in mine if r.exploits is not None]
        shown = f"{median(exploits):.0f}" if exploits else "-"
        lines.append(f"| {method} | {loss:.4f} | {acc:.4f} | {median([float(r.epochs) for r in mine]):.0f} | "
                     f"{median([float(r.trainings) for r in mine]):.0f} | {shown} | "
                     f"{median([r.wall_s for r in mine]):.1f} | {per_seed} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    runs: list[Run] = []
    total = time.perf_counter()
    # Untimed: the engine's first sweep starts its workers (torch imported) and MLflow's writer.
    warm = argparse.Namespace(**{**vars(args), "population": 2, "epochs": 2, "interval": 1})
    run_automl("automl pbt", 0, warm)
    for seed in range(args.seeds):
        order = METHODS[seed % len(METHODS):] + METHODS[:seed % len(METHODS)]
        for method in order:
            print(f"seed {seed}  {method:<14}", end=" ", flush=True, file=sys.stderr)
            try:
                run = run_ray_tune(seed, args) if method == "ray tune pbt" else run_automl(method, seed, args)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                run = Run(method, seed, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            runs.append(run)
            print(run.error or f"val_loss {run.best_loss:.4f}  acc {run.best_accuracy:.4f}  epochs {run.epochs}  "
                  f"wall {run.wall_s:.1f} s", file=sys.stderr, flush=True)
    import automl.engine

    automl.engine.shutdown()
    print(f"# PBT benchmark ({machine()}; {time.perf_counter() - total:.0f} s in all)\n")
    print(f"mlp on digits, SGD, {args.epochs} epochs, lr in [{LR[0]:g}, {LR[1]:g}] (log), population/trials "
          f"{args.population}, interval {args.interval}; medians over {args.seeds} seeds\n")
    print(table(runs))
    pbt = sorted((r for r in runs if r.method == "automl pbt" and r.schedule and r.best_loss is not None),
                 key=lambda r: r.best_loss or 0.0)
    if pbt:
        chosen = pbt[len(pbt) // 2]
        print(f"\nThe median seed's ({chosen.seed}) best member's learning rate, step by step (its lineage):\n")
        print(" -> ".join(f"step {s}: {lr:.3g}" for s, lr in chosen.schedule))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
