"""The ``automl`` command (Typer + Rich). Heavy imports happen inside commands, so ``--help`` is instant.

Every ``AutoMLError`` becomes one line on stderr and exit status 2; no traceback reaches the user.
"""

from __future__ import annotations

import os
import sys
import time
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from automl.errors import AutoMLError, TrainerError, UsageError

# When this command started (as near as Python lets us see): AutoML mode's --time counts from here, start-up included.
STARTED = time.time()

if TYPE_CHECKING:
    from collections.abc import Callable

    from automl.client import Client, RemoteSweep
    from automl.orchestrator import SweepResult, TrialRecord

app = typer.Typer(
    name="automl",
    help="Declarative hyperparameter search: Optuna proposes, Ray runs trials in parallel, MLflow records.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Off a terminal (CI logs, pipes) Rich would wrap at 80 columns and truncate the leaderboard.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)
F = TypeVar("F", bound="Callable[..., Any]")

StorageOpt = Annotated[
    str | None, typer.Option("--storage", help="Database for the search state, e.g. postgresql://user@host/db "
                             "(default: $AUTOML_STORAGE, else a journal file in .automl/).")
]
TrackingOpt = Annotated[
    str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                             "else sqlite:///mlflow.db here).")
]
# W&B sweeps, NNI search spaces and Katib Experiments (docs/imports.md) name no trainer and NNI no metric: these
# options supply them, and on an automl spec they replace its fields. Paths resolve like paths in the spec file.
TrainerOpt = Annotated[str | None, typer.Option(help="Trainer: a registered name (mlp) or module:function next to "
                                                     "the file; required for W&B, NNI and Katib files.")]
DataOpt = Annotated[str | None, typer.Option("--data", help="Data source (sklearn:<name>, .csv, .parquet; "
                                                            "relative to the file); sets data.source.")]
TargetOpt = Annotated[str | None, typer.Option(help="Column to predict; sets data.target.")]
MetricOpt = Annotated[str | None, typer.Option(help="Metric to optimise (goal from its name); required for NNI "
                                                    "files.")]
# The service's clients (submit, watch, cancel; status, set and resume with --server). The token is read from
# $AUTOML_TOKEN by default: a command line is visible to every user of the machine (`ps`).
ServerOpt = Annotated[str | None, typer.Option("--server", metavar="URL", help="The automl service (default: "
                                               "$AUTOML_SERVER, else http://127.0.0.1:8765).")]
RemoteServerOpt = Annotated[str | None, typer.Option("--server", metavar="URL", help="Ask the automl service at "
                                                     "URL instead of this directory's store.")]
ServiceTokenOpt = Annotated[str | None, typer.Option("--token", metavar="TOKEN", help="The service's token "
                                                     "(default: $AUTOML_TOKEN; prefer the variable: `ps` shows "
                                                     "every command's arguments to every user).")]


def _friendly(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AutoMLError as exc:
            from rich.markup import escape

            err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- run


@app.command()
@_friendly
def run(
    spec: Annotated[Path | None, typer.Argument(help="The spec file (YAML). Leave it out for AutoML mode: "
                                                     "--data FILE --target COLUMN.")] = None,
    trials: Annotated[int | None, typer.Option(help="Override budget.trials.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Override budget.max_concurrent.")] = None,
    method: Annotated[str | None, typer.Option(help="Override method (grid, random, bayesian, ...).")] = None,
    seed: Annotated[int | None, typer.Option(help="Override seed.")] = None,
    time_budget: Annotated[str | None, typer.Option("--time", help="Override budget.time (90s, 10m, 2h).")] = None,
    tracking_uri: TrackingOpt = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, "
                                                     "else a local Ray).")] = None,
    trainer: TrainerOpt = None,
    data_source: DataOpt = None,
    target: TargetOpt = None,
    metric: MetricOpt = None,
    storage: StorageOpt = None,
    print_spec: Annotated[bool, typer.Option("--print-spec", help="AutoML mode: print the spec it would run "
                                                                  "(save it, edit it, run it) and exit.")] = False,
    continue_: Annotated[bool, typer.Option("--continue", help="A new sweep of the spec's name, warm-started from "
                                                               "the latest one (its finished trials seed the "
                                                               "sampler; see warm_start). Not a resume.")] = False,
) -> None:
    """Run a sweep: live progress, then the leaderboard and the best trial. Also takes W&B, NNI and Katib files.

    Without a spec file, AutoML mode: `automl run --data FILE --target COL [--time 5m] [--metric NAME]` infers
    the task and searches model families (neural network and scikit-learn models) and their hyperparameters.
    """
    from automl.importers import import_file, option_overrides
    from automl.orchestrator import Sweep

    overrides = {"budget.trials": trials, "budget.max_concurrent": max_concurrent, "method": method,
                 "seed": seed, "budget.time": time_budget}
    if spec is None:
        _run_automl(data_source, target, time_budget=time_budget, metric=metric, seed=seed, trainer=trainer,
                    print_spec=print_spec, overrides=overrides, tracking_uri=tracking_uri, address=address,
                    storage=storage)
        return
    if print_spec:
        raise UsageError("--print-spec: prints the spec of AutoML mode; use it with --data and no spec file")
    imported = import_file(spec, trainer=trainer, data=data_source, target=target, metric=metric)
    if imported.format == "automl":
        overrides.update(option_overrides(trainer=trainer, data=data_source, target=target, metric=metric))
        sweep = Sweep.from_yaml(spec, overrides=overrides, tracking_uri=tracking_uri, address=address,
                                storage=storage)
    else:
        sweep = Sweep(imported.to_spec(overrides), base_dir=spec.resolve().parent, spec_text=imported.to_yaml(),
                      tracking_uri=tracking_uri, address=address, storage=storage, source=spec.name)
    if continue_:
        sweep = sweep.continuing()
    sweep.check()  # bad data or trainer: one line now, before the header and Ray (its notes come with the run's)
    total = sweep.planned_trials()
    from automl.samplers import describe

    picked = describe(sweep.spec.method, sweep.space, objectives=len(sweep.spec.objectives), trials=total,
                      concurrent=sweep.spec.budget.max_concurrent)
    console.print(f"[bold]{sweep.spec.name}[/bold]: {total} trials of [cyan]{sweep.spec.trainer}[/cyan], "
                  f"method {sweep.spec.method}, optimising {sweep.spec.metric_name} ({sweep.spec.direction})",
                  highlight=False)
    console.print(f"search: {picked}", highlight=False, markup=False)
    for note in imported.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    with _Progress(total, sweep.spec.metric_name, sweep.spec.direction) as progress:
        result = _interruptible(lambda: sweep.run(on_event=progress.on_event, on_note=progress.note))
    _print_result(result)


def _interruptible(run: Callable[[], SweepResult]) -> SweepResult:
    """Ctrl-C or SIGTERM (a scheduler, `kill`) stops the sweep cleanly: running trials KILLED, the sweep
    resumable; exit status 130."""
    import signal
    import threading

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return run()
    except KeyboardInterrupt:
        err_console.print("stopped: running trials were KILLED; `automl resume` continues the sweep",
                          highlight=False)
        raise typer.Exit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_automl(data_source: str | None, target: str | None, *, time_budget: str | None, metric: str | None,
                seed: int | None, trainer: str | None, print_spec: bool, overrides: dict[str, Any],
                tracking_uri: str | None, address: str | None, storage: str | None) -> None:
    import yaml

    from automl.orchestrator import Sweep
    from automl.quick import automl_spec
    from automl.spec import spec_from_dict

    if data_source is None:
        raise UsageError("run: give a spec file, or --data FILE --target COLUMN for AutoML mode")
    if trainer is not None:
        raise UsageError("--trainer: AutoML mode searches every model; to tune one trainer, write a spec "
                         "(automl run --data ... --print-spec > spec.yaml, then edit it)")
    facts: dict[str, Any] = {}
    raw = automl_spec(data_source, target, time=time_budget, metric=metric, seed=seed or 0, base_dir=Path.cwd(),
                      facts=facts)
    text = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None)  # one line per parameter
    spec = spec_from_dict(raw, overrides={k: v for k, v in overrides.items() if v is not None})
    if print_spec:
        print(text, end="")
        return
    from automl.data import COLUMN_RULE
    from automl.quick import describe_validation

    budget = spec.budget.time
    sweep = Sweep(spec, base_dir=Path.cwd(), spec_text=text, tracking_uri=tracking_uri, address=address,
                  storage=storage, deadline=STARTED + budget if budget else None)
    models = raw["parameters"]["model"]["choices"]
    console.print(f"[bold]{spec.name}[/bold] (AutoML mode): {spec.data.task if spec.data else ''} on "
                  f"{data_source}, models {', '.join(models)}; optimising {spec.metric_name} "
                  f"({spec.direction}) for {budget:.0f}s, start-up and finishing included", highlight=False)
    for line in (describe_validation(spec, facts["rows"]), COLUMN_RULE,
                 "final model: the best trial refit on all rows, or a greedy ensemble of the best trials where it "
                 "beats the best single one on held-out folds"):
        console.print(line, highlight=False, markup=False)
    with _Progress(sweep.planned_trials(), spec.metric_name, spec.direction) as progress:
        result = _interruptible(lambda: sweep.run(on_event=progress.on_event, on_note=progress.note))
    _print_per_model(result)
    _print_result(result, params=False)  # each model's parameters are in the table above


def _print_per_model(result: SweepResult) -> None:
    from rich.table import Table

    from automl.quick import best_per_model, own_params

    table = Table(title=f"best trial per model: {result.sweep_id}")
    for col in ("model", "trial", result.metric, "trials", "seconds", "params"):
        table.add_column(col, justify="left" if col in ("model", "params") else "right")
    counts: dict[str, int] = {}
    for t in result.trials:
        model = str(t.params.get("model"))
        counts[model] = counts.get(model, 0) + 1
    for t in best_per_model(result):
        model = str(t.params.get("model"))
        params = ", ".join(f"{k}={_cell(v)}" for k, v in own_params(t).items())
        table.add_row(model, str(t.number), _cell(t.value), str(counts[model]), f"{t.seconds:.2f}", params)
    console.print(table)


class _Progress:
    """A live bar and table on a terminal; one line per finished trial otherwise (CI logs, pipes)."""

    def __init__(self, total: int, metric: str, goal: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.metric = metric
        self.goal = goal
        self.best: float | None = None
        self.live = console.is_terminal
        self.progress = Progress(TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[best]}"), console=console, transient=False,
                                 disable=not self.live)
        self.task = self.progress.add_task("trials", total=total, best="")
        self.start = time.perf_counter()

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def note(self, text: str) -> None:
        """A decision automl made about the spec or the data, shown before the trials (part of the run header)."""
        self.progress.console.print(f"note: {text}", highlight=False, markup=False)

    def on_event(self, kind: str, record: TrialRecord) -> None:
        if kind != "finished":
            return
        v = record.value
        if record.state == "COMPLETE" and v is not None and (
            self.best is None or (v > self.best if self.goal == "maximize" else v < self.best)
        ):
            self.best = v
        best = f"best {self.metric} {self.best:.4f}" if self.best is not None else ""
        self.progress.update(self.task, advance=1, best=best)
        value = f"{v:.4f}" if v is not None else "-"
        line = (f"trial {record.number:>3}  {record.state:<8} {self.metric}={value}  epochs={record.epochs:<3} "
                f"{record.seconds:6.2f}s")
        if record.error:
            line += f"  {record.error.splitlines()[0][:100]}"
        if self.live:
            self.progress.console.print(line, highlight=False)
        else:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {line}", flush=True)


def _print_result(result: SweepResult, *, params: bool = True) -> None:
    from rich.table import Table

    board = result.leaderboard(top=10)
    table = Table(title=f"leaderboard: {result.sweep_id} (top {len(board)} of {len(result.trials)})")
    hidden = {"run_id"}
    if not params:  # AutoML mode: the model's name only, not every model's parameter columns
        from automl.trainer import MODEL_PARAM_SEPARATOR

        hidden |= {c for c in board.columns if MODEL_PARAM_SEPARATOR in str(c)}
    for col in board.columns:
        if col not in hidden:
            table.add_column(str(col), justify="right" if col != "state" else "left")
    for _, row in board.iterrows():
        table.add_row(*[_cell(row[c]) for c in board.columns if c not in hidden])
    console.print(table)
    counts: dict[str, int] = {}
    for t in result.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    console.print("trials: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) +
                  f" in {result.wall_seconds:.1f}s", highlight=False)
    best = result.best
    if best is None:
        console.print("[yellow]no trial completed; nothing to export[/yellow]")
        return
    console.print(f"[bold green]best trial {best.number}[/bold green]: {result.metric} = {best.value:.4f}",
                  highlight=False)
    console.print(f"  params:    {best.params}", highlight=False)
    console.print(f"  run id:    {best.run_id}   (sweep run {result.parent_run_id})", highlight=False)
    console.print(f"  model URI: {best.model_uri}", highlight=False)
    console.print(f"  export:    automl export {result.name} --format mlflow --out best/", highlight=False)
    browse = "browse it with `automl ui`" if result.tracking_uri.startswith("sqlite:") else "open it in a browser"
    console.print(f"  MLflow:    {mask_url(result.tracking_uri)}  ({browse})", highlight=False)


def mask_url(url: str) -> str:
    from automl.redact import mask_url as mask

    return mask(url) or ""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"
    return "-" if value is None else str(value)


@app.command()
@_friendly
def resume(
    sweep: Annotated[str, typer.Argument(help="Sweep id, or the name of its latest unfinished sweep.")],
    tracking_uri: TrackingOpt = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, "
                                                     "else a local Ray).")] = None,
    storage: StorageOpt = None,
    server: RemoteServerOpt = None,
    token: ServiceTokenOpt = None,
) -> None:
    """Finish an interrupted sweep: completed trials are kept, none is run twice. With --server: a CANCELLED or
    FAILED sweep of the service continues its budget there."""
    if server is not None:
        _local_options_refused(tracking_uri=tracking_uri, address=address, storage=storage)
        from automl.client import RemoteSweep

        answer = RemoteSweep(_service(server, token), sweep).resume()
        console.print(f"{answer.get('id', sweep)}: {answer.get('state')}; `automl watch` follows it", highlight=False,
                      markup=False)
        return
    from automl.orchestrator import Sweep
    from automl.state import SweepLock, SweepState, find_unfinished, state_root

    state = find_unfinished(sweep)
    SweepLock(SweepState.folder(state_root(), state.sweep_id)).acquire(state.sweep_id).release()  # running? say so now
    console.print(f"resuming [bold]{state.sweep_id}[/bold]", highlight=False)
    total = int(state.spec.get("budget", {}).get("trials") or 0)
    metric = state.spec["metric"]
    first = metric[0] if isinstance(metric, list) else metric
    with _Progress(total, first["name"], first.get("goal") or "maximize") as progress:
        result = _interruptible(lambda: Sweep.resume(state.sweep_id, tracking_uri=tracking_uri, address=address,
                                                     storage=storage, on_event=progress.on_event,
                                                     on_note=progress.note))
    _print_result(result)


@app.command("set")
@_friendly
def set_(
    sweep: Annotated[str, typer.Argument(help="A running sweep's id, or the name of its latest running sweep.")],
    trials: Annotated[int | None, typer.Option(help="New budget.trials (at least the trials already done).")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="New budget.max_concurrent.")] = None,
    time_budget: Annotated[str | None, typer.Option("--time", help="New budget.time, from the sweep's start "
                                                                   "(90s, 10m, 2h).")] = None,
    server: RemoteServerOpt = None,
    token: ServiceTokenOpt = None,
) -> None:
    """Change a running sweep's budget or concurrency live (a sweep running in another terminal of this
    directory, or on the service with --server); prints the values in effect."""
    from automl.engine import control
    from automl.spec import parse_duration
    from automl.state import SweepState, find_running, state_root

    if trials is None and max_concurrent is None and time_budget is None:
        raise UsageError("set: give --trials, --max-concurrent or --time")
    budget: dict[str, Any] = {"trials": trials, "max_concurrent": max_concurrent}
    if time_budget is not None:
        try:
            budget["time"] = parse_duration(time_budget)
        except ValueError as exc:
            raise UsageError(f"--time {exc}") from None
    if server is not None:
        from automl.client import RemoteSweep

        remote = RemoteSweep(_service(server, token), sweep)
        _print_budget(remote.id, remote.update(trials=trials, max_concurrent=max_concurrent, time=time_budget))
        return
    state = find_running(sweep)
    effect = control.send(SweepState.folder(state_root(), state.sweep_id),
                          {k: v for k, v in budget.items() if v is not None})
    _print_budget(state.sweep_id, effect)


def _print_budget(sweep_id: str, effect: dict[str, Any]) -> None:
    time_left = effect.get("time")
    console.print(f"{sweep_id}: trials {effect.get('trials')}, max_concurrent {effect.get('max_concurrent')}, time "
                  f"{'-' if time_left is None else f'{time_left:g}s'}", highlight=False)


# --------------------------------------------------------------------------------------------- validate / schema


@app.command()
@_friendly
def validate(
    spec: Annotated[Path, typer.Argument(help="The spec file (YAML).")],
    sample: Annotated[int, typer.Option(help="Print N example configurations.", min=0)] = 0,
    trainer: TrainerOpt = None,
    data_source: DataOpt = None,
    target: TargetOpt = None,
    metric: MetricOpt = None,
) -> None:
    """Check a spec (or a W&B, NNI or Katib file); print it resolved, its grid size and example configurations."""
    import yaml

    from automl.errors import DataError
    from automl.importers import import_file, option_overrides
    from automl.orchestrator import DEFAULT_TRIALS
    from automl.preflight import check_inputs
    from automl.space import SearchSpace
    from automl.spec import FieldError, load_spec

    imported = import_file(spec, trainer=trainer, data=data_source, target=target, metric=metric)
    if imported.format == "automl":
        resolved = load_spec(spec, option_overrides(trainer=trainer, data=data_source, target=target, metric=metric))
    else:
        resolved = imported.to_spec()
    try:
        notes = check_inputs(resolved, spec.resolve().parent)  # reads headers and source text, runs nothing
    except (TrainerError, DataError) as exc:
        raise type(exc)(f"{spec.name}: {exc}") from None  # name the file, as spec errors do
    space = SearchSpace(resolved.parameters)
    data = resolved.model_dump(mode="json")
    try:
        grid: int | None = space.grid_size()
    except FieldError:
        grid = None
    if data["budget"]["trials"] is None:
        data["budget"]["trials"] = grid if resolved.method == "grid" else DEFAULT_TRIALS
    if resolved.method == "pbt":
        data["budget"]["trials"] = resolved.pbt.population
    else:
        data.pop("pbt", None)  # read only with method: pbt
    print(yaml.safe_dump(data, sort_keys=False).rstrip())
    print(f"# grid size: {grid}" if grid is not None else "# no grid: continuous parameters")
    from automl.samplers import describe

    print("# search: " + describe(resolved.method, space, objectives=len(resolved.objectives),
                                  trials=data["budget"]["trials"], concurrent=resolved.budget.max_concurrent))
    if sample:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=resolved.seed))
        if resolved.method == "pbt":
            from automl.space import mutable_paths

            pbt = resolved.pbt
            names = ", ".join(p.rsplit(".", 1)[-1] for p in mutable_paths(resolved.parameters))
            print(f"# pbt: {pbt.population} members; every {pbt.interval} steps the bottom {pbt.quantile:g} copy a "
                  f"top member and perturb {names} (x{' or x'.join(f'{f:g}' for f in pbt.factors)}, resampled "
                  f"with probability {pbt.resample_probability:g})")
        print(f"# {sample} example configurations (random, seed {resolved.seed}):")
        for _ in range(sample):
            trial = study.ask()
            print("- " + str({**space.suggest(trial), **resolved.fixed}))
            study.tell(trial, 0.0)
    for note in [*imported.notes, *notes]:
        print(f"# note: {note}")
    print(f"ok: {spec}" + (f" ({imported.format})" if imported.format != "automl" else ""), file=sys.stderr)


@app.command("import")
@_friendly
def import_(
    file: Annotated[Path, typer.Argument(help="A W&B sweep (YAML), an NNI search space (JSON) or a Katib "
                                              "Experiment (YAML).")],
    trainer: TrainerOpt = None,
    data_source: DataOpt = None,
    target: TargetOpt = None,
    metric: MetricOpt = None,
) -> None:
    """Print the automl spec equivalent to a W&B sweep, an NNI search space or a Katib Experiment."""
    from automl.importers import import_file

    imported = import_file(file, trainer=trainer, data=data_source, target=target, metric=metric)
    imported.to_spec()  # refuse now what `automl validate` would refuse once the output is saved
    print(imported.to_yaml().rstrip())


@app.command()
def schema() -> None:
    """Print the JSON Schema of spec files (for editor completion and checking)."""
    import json

    from automl.spec import Spec

    print(json.dumps(Spec.model_json_schema(), indent=2))


# --------------------------------------------------------------------------------------------- export / predict

TrustModuleOpt = Annotated[
    list[str] | None,
    typer.Option("--trust-module", metavar="NAME",
                 help="A module of your own trainer (with its submodules) that the model may load its class from, "
                      "besides registered trainers' packages; repeatable. Opening a model imports that module: "
                      "trust only code you wrote."),
]


@app.command()
@_friendly
def export(
    sweep: Annotated[str, typer.Argument(help="Sweep name or id, a runs:/ or models:/ URI, or an MLflow model "
                                              "directory (an mlflow export).")],
    out: Annotated[Path, typer.Option(help="Directory to write (must not exist or be empty).")],
    format: Annotated[str, typer.Option(help="mlflow (the pyfunc model), onnx or torchscript (the torch network; "
                                             "preprocessing and manifest travel with it).")] = "mlflow",
    tracking_uri: TrackingOpt = None,
    trust_module: TrustModuleOpt = None,
) -> None:
    """Write the best model of a sweep (or any automl model URI) to a directory; onnx and torchscript exports are
    checked against the MLflow model before they are written."""
    from automl.bundle import module_names
    from automl.export import export_model
    from automl.orchestrator import find_sweep
    from automl.tracking import TAG_BEST_URI, resolve_tracking_uri

    trusted = module_names(trust_module or [], "--trust-module")
    uri = resolve_tracking_uri(tracking_uri)
    if sweep.startswith(("runs:/", "models:/")) or Path(sweep, "MLmodel").is_file():
        model_uri = sweep
    else:
        found = find_sweep(sweep, uri)
        model_uri = found["tags"].get(TAG_BEST_URI, "")
        if not model_uri:
            raise AutoMLError(f"sweep '{sweep}' has no best model (no trial completed, or it is still running)")
    path = export_model(model_uri, out, format=format, tracking_uri=uri, trusted_modules=trusted)
    console.print(f"wrote {format} model {model_uri} to {path}", highlight=False)


@app.command()
@_friendly
def predict(
    model: Annotated[str, typer.Argument(help="An exported model directory (mlflow, onnx or torchscript), or a "
                                              "runs:/ or models:/ URI.")],
    data: Annotated[Path, typer.Argument(help="CSV of raw rows with the original columns.")],
    out: Annotated[Path | None, typer.Option(help="Write the rows with a prediction column here (CSV); "
                                                  "default: print the predictions.")] = None,
    tracking_uri: TrackingOpt = None,
    trust_module: TrustModuleOpt = None,
) -> None:
    """Predict on raw rows with an exported or registered model."""
    from automl.bundle import module_names
    from automl.data import load_frame
    from automl.export import predict as do_predict
    from automl.tracking import resolve_tracking_uri

    trusted = module_names(trust_module or [], "--trust-module")
    frame, _ = load_frame(str(data))
    is_uri = model.startswith(("runs:/", "models:/")) or "://" in model  # runs:/ and models:/ have one slash
    uri = resolve_tracking_uri(tracking_uri) if is_uri else None
    result = do_predict(model, frame, tracking_uri=uri, trusted_modules=trusted)
    if out is None:
        result[["prediction"]].to_csv(sys.stdout, index=False)
    else:
        result.to_csv(out, index=False)
        console.print(f"wrote {len(result)} predictions to {out}", highlight=False)


# --------------------------------------------------------------------------------------------- status / ui


@app.command()
@_friendly
def status(
    sweep: Annotated[str | None, typer.Argument(help="A sweep name or id: list its trials.")] = None,
    tracking_uri: TrackingOpt = None,
    server: RemoteServerOpt = None,
    token: ServiceTokenOpt = None,
) -> None:
    """List sweeps and their state, or one sweep's trials (of this directory's store, or of the service with
    --server)."""
    if server is not None:
        _local_options_refused(tracking_uri=tracking_uri)
        _remote_status(_service(server, token), sweep)
        return
    from rich.table import Table

    from automl import tracking
    from automl.orchestrator import find_sweep

    uri = tracking.resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        console.print(f"no sweeps yet ({uri})", highlight=False)
        return
    client = tracking.make_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if sweep is None:
        runs = client.search_runs(experiments, filter_string=f"tags.`{tracking.TAG_ROLE}` = 'sweep'",
                                  order_by=["attributes.start_time DESC"], max_results=200)
        table = Table(title=f"sweeps in {uri}")
        for col in ("sweep", "state", "trials", "metric", "best", "started"):
            table.add_column(col)
        for r in runs:
            metric = r.data.params.get("sweep.metric", "")
            best = r.data.metrics.get(metric)
            done = sum(int(v) for k, v in r.data.tags.items() if k.startswith("automl.trials."))
            table.add_row(r.data.tags.get(tracking.TAG_SWEEP_ID, r.info.run_name), r.info.status,
                          str(done or r.data.params.get("sweep.trials", "")), metric,
                          "-" if best is None else f"{best:.4f}",
                          time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)))
        console.print(table)
        return
    found = find_sweep(sweep, uri)
    runs = client.search_runs(experiments, filter_string=f"tags.`{tracking.PARENT_TAG}` = '{found['run_id']}'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    metric = found["params"].get("sweep.metric", "")
    table = Table(title=f"{found['tags'].get(tracking.TAG_SWEEP_ID)}: {found['status']}")
    for col in ("trial", "status", "state", metric, "epochs", "run id"):
        table.add_column(col)
    for r in sorted(runs, key=lambda r: int(r.data.tags.get(tracking.TAG_TRIAL, "0"))):
        value = r.data.metrics.get(metric)
        table.add_row(r.data.tags.get(tracking.TAG_TRIAL, "?"), r.info.status, r.data.tags.get("automl.state", ""),
                      "-" if value is None else f"{value:.4f}", r.data.tags.get("automl.epochs", ""), r.info.run_id)
    console.print(table)


@app.command()
@_friendly
def ui(
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; loopback unless you say otherwise.")] = "127.0.0.1",
    workers: Annotated[int, typer.Option(min=1, help="Server processes; one serves a single user.")] = 1,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Start the MLflow UI on this store (bound to 127.0.0.1)."""
    from automl.tracking import DEFAULT_ARTIFACTS, make_client, resolve_tracking_uri, sqlite_path, writer_environment

    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and (not db.exists() or db.stat().st_size == 0):
        make_client(uri)  # a new store is created under automl's lock, never beside a sweep creating it too
    # -P and PYTHONSAFEPATH (inherited by MLflow's web workers): the working directory is not on their import path,
    # so a ./mlflow.py next to the store is never imported. The store URI (it may hold a password) and the
    # artifact folder travel in the environment, not on a command line that `ps` shows.
    env = writer_environment(uri)
    env["MLFLOW_BACKEND_STORE_URI"] = env.pop("MLFLOW_TRACKING_URI")
    env.setdefault("MLFLOW_ARTIFACTS_DESTINATION", str(Path.cwd().resolve() / DEFAULT_ARTIFACTS))
    # uvicorn puts its --app-dir (default ".") first on sys.path itself: point it at MLflow's own install folder.
    import importlib.util
    import shlex

    spec = importlib.util.find_spec("mlflow")
    if spec is not None and spec.origin:
        app_dir = str(Path(spec.origin).resolve().parents[1])
        env["MLFLOW_UVICORN_OPTS"] = f"{env.get('MLFLOW_UVICORN_OPTS', '')} --app-dir {shlex.quote(app_dir)}".strip()
    cmd = [sys.executable, "-P", "-m", "mlflow", "ui", "--host", host, "--port", str(port), "--workers", str(workers)]
    console.print(f"MLflow UI on http://{host}:{port} for {mask_url(uri)} (Ctrl-C stops it)", highlight=False)
    os.execve(sys.executable, cmd, env)


# --------------------------------------------------------------------------------------------- the service


@app.command()
@_friendly
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind; loopback unless you say otherwise (then give TLS "
                                           "files, or a TLS proxy in front).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    data_root: Annotated[Path | None, typer.Option(help="The folder remote specs' data paths resolve in, and "
                                                        "nothing outside it (default: here).")] = None,
    trainers_dir: Annotated[Path | None, typer.Option(help="A folder of module:function trainers remote specs may "
                                                           "name (default: registered trainers only).")] = None,
    tracking_uri: TrackingOpt = None,
    storage: Annotated[str | None, typer.Option("--storage", help="A database (postgresql://...) for the search "
                                                "state and the service's records (default: $AUTOML_STORAGE, else files "
                                                "in .automl/)."
                                                )] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local "
                                                     "Ray).")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(help="A Host header to accept besides loopback names "
                                                                "(the name clients use); repeatable.")] = None,
    allowed_origin: Annotated[list[str] | None, typer.Option(help="An origin for CORS; repeatable (default: "
                                                                  "none).")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    max_running: Annotated[int | None, typer.Option(min=1, help="Sweeps running at once (default: the cluster's "
                                                                "CPUs); the rest wait QUEUED.")] = None,
    max_running_per_user: Annotated[int | None, typer.Option(min=1, help="Sweeps one user runs at once (default: "
                                                                         "--max-running).")] = None,
    max_upload_mb: Annotated[int, typer.Option(min=1, help="Largest dataset upload, in MiB.")] = 200,
    mlflow_ui: Annotated[str | None, typer.Option(help="Base URL of an MLflow UI on the tracking store, for the "
                                                       "links to each sweep's run (default: the tracking URI when "
                                                       "it is a server).")] = None,
) -> None:
    """The automl service: an authenticated HTTP API (/api/v1, OpenAPI at /docs) and a status page (/) in front of
    one warm engine. Tokens: `automl token create NAME --role admin|user|viewer`."""
    from automl.service import ServeOptions
    from automl.service import serve as run_service

    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise UsageError("--ssl-certfile and --ssl-keyfile go together")

    def say(text: str, err: bool = False) -> None:
        (err_console if err else console).print(text, highlight=False, markup=False, soft_wrap=True)

    run_service(ServeOptions(
        host=host, port=port, data_root=data_root, trainers_dir=trainers_dir, tracking_uri=tracking_uri,
        storage=storage, address=address, allowed_hosts=list(allowed_host or []),
        allowed_origins=list(allowed_origin or []), ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
        max_running=max_running, max_running_per_user=max_running_per_user, max_upload=max_upload_mb << 20,
        mlflow_ui=mlflow_ui,
    ), say=say)


token_app = typer.Typer(help="The service's tokens: create one (printed once; only its hash is kept), revoke one.",
                        no_args_is_help=True)
app.add_typer(token_app, name="token")

ServiceStorageOpt = Annotated[str | None, typer.Option("--storage", help="The service's database when it is not "
                                                       ".automl/service.db here (postgresql://...; default: "
                                                       "$AUTOML_STORAGE).")]


@token_app.command("create")
@_friendly
def token_create(
    name: Annotated[str, typer.Argument(help="Who the token is for (a user name; sweeps are owned by it).")],
    role: Annotated[str, typer.Option(help="admin (everything), user (own sweeps) or viewer (read all).")] = "user",
    storage: ServiceStorageOpt = None,
) -> None:
    """Create a token and print it once (the service keeps only its hash)."""
    from automl.service import open_store

    store = open_store(Path.cwd(), storage)
    token = store.create_token(name, role)
    print(token)
    err_console.print(f"token for {name} ({role}); it is shown once. Clients read it from AUTOML_TOKEN.",
                      highlight=False)


@token_app.command("revoke")
@_friendly
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    storage: ServiceStorageOpt = None,
) -> None:
    """Revoke a token: requests with it get 401 at once."""
    from automl.service import open_store

    open_store(Path.cwd(), storage).revoke_token(name)
    console.print(f"revoked {name}", highlight=False)


@token_app.command("list")
@_friendly
def token_list(storage: ServiceStorageOpt = None) -> None:
    """The tokens: name, role, when created, whether revoked (never the tokens themselves)."""
    from automl.service import open_store

    for row in open_store(Path.cwd(), storage).list_tokens():
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created"]))
        console.print(f"{row['name']}\t{row['role']}\t{created}\t{'revoked' if row['revoked'] else 'active'}",
                      highlight=False)


# --------------------------------------------------------------------------------------------- the service's clients


@app.command()
@_friendly
def submit(
    spec: Annotated[Path, typer.Argument(help="The spec file (YAML). Its data.source is a path under the service's "
                                              "--data-root, a dataset:<id>, or (--upload) a file next to the spec.")],
    trials: Annotated[int | None, typer.Option(help="Override budget.trials.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Override budget.max_concurrent.")] = None,
    time_budget: Annotated[str | None, typer.Option("--time", help="Override budget.time (90s, 10m, 2h).")] = None,
    method: Annotated[str | None, typer.Option(help="Override method (grid, random, bayesian, ...).")] = None,
    seed: Annotated[int | None, typer.Option(help="Override seed.")] = None,
    upload: Annotated[bool, typer.Option("--upload", help="Upload data.source (a CSV or Parquet file, relative to "
                                                          "the spec's folder) and submit the spec with the "
                                                          "dataset:<id> the service gives it.")] = False,
    watch_: Annotated[bool, typer.Option("--watch", help="Then follow it as `automl watch` does (exit status 1 "
                                                         "unless it FINISHED).")] = False,
    server: ServerOpt = None,
    token: ServiceTokenOpt = None,
) -> None:
    """Submit a sweep to the automl service; prints its id as the first line on stdout (for scripts)."""
    client = _service(server, token)
    overrides: dict[str, Any] = {"budget.trials": trials, "budget.max_concurrent": max_concurrent,
                                 "budget.time": time_budget, "method": method, "seed": seed}
    if upload:
        overrides["data.source"] = _upload_data(client, spec)
    handle = client.submit(spec, overrides)
    print(handle.id, flush=True)
    answer = handle.last_status or {}
    follow = f"automl watch {handle.id}" + (f" --server {mask_url(server)}" if server else "")
    err_console.print(f"submitted {answer.get('name', spec.name)} ({answer.get('state', '?')}); follow it with "
                      f"`{follow}`", highlight=False, markup=False, soft_wrap=True)
    if watch_:
        raise typer.Exit(_watch(handle))


@app.command()
@_friendly
def watch(
    sweep: Annotated[str, typer.Argument(help="The sweep's id (as `automl submit` printed it).")],
    server: ServerOpt = None,
    token: ServiceTokenOpt = None,
) -> None:
    """Follow a sweep on the automl service: live progress, then its leaderboard. Exit status 0 if it FINISHED, 1
    if it FAILED or was CANCELLED (Ctrl-C stops watching, not the sweep)."""
    raise typer.Exit(_watch(_service(server, token).sweep(sweep)))


@app.command()
@_friendly
def cancel(
    sweep: Annotated[str, typer.Argument(help="The sweep's id.")],
    server: ServerOpt = None,
    token: ServiceTokenOpt = None,
) -> None:
    """Cancel a sweep on the automl service: running trials are KILLED; `automl resume ID --server URL` continues
    it."""
    from automl.client import RemoteSweep

    answer = RemoteSweep(_service(server, token), sweep).cancel()
    console.print(f"{answer.get('id', sweep)}: {answer.get('state')}", highlight=False, markup=False)


def _service(server: str | None, token: str | None) -> Client:
    from automl.client import Client

    return Client(server, token)  # None: $AUTOML_SERVER (else loopback) and $AUTOML_TOKEN


def _local_options_refused(**options: str | None) -> None:
    given = [name for name, value in options.items() if value is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag}: with --server the service uses its own store and cluster; leave {flag} out")


def _upload_data(client: Client, spec: Path) -> str | None:
    """``--upload``: the spec's data file (relative to the spec's folder) sent to the service; its dataset source.
    A source that is no file here (sklearn:, dataset:, a path only the service has) is left as it is."""
    from automl.spec import parse_yaml, read_spec_text

    data = parse_yaml(read_spec_text(spec), spec.name).get("data")
    source = data.get("source") if isinstance(data, dict) else None
    file = spec.resolve().parent / source if isinstance(source, str) and ":" not in source.split("/")[0] else None
    if file is None or not file.is_file():
        err_console.print(f"note: --upload: data.source {source!r} is not a file next to {spec.name}; the spec goes "
                          f"as it is", highlight=False, markup=False, soft_wrap=True)
        return None
    dataset = client.upload(file)
    err_console.print(f"uploaded {source} as {dataset}", highlight=False, markup=False)
    return dataset


def _watch(handle: RemoteSweep) -> int:
    """Follow a remote sweep's events with `automl run`'s progress, then print its leaderboard; the exit status."""
    from rich.markup import escape

    from automl.client import FINAL_STATES

    sweep = handle.last_status or handle.status()
    metric, goal = _remote_metric(sweep), str(sweep.get("goal") or "maximize")
    total = int((sweep.get("budget") or {}).get("trials") or 0)
    console.print(f"[bold]{escape(str(sweep.get('name')))}[/bold] ({escape(handle.id)}): {total or 'no limit of'} "
                  f"trials, method {escape(str(sweep.get('method')))} (Optuna {escape(str(sweep.get('sampler')))}), "
                  f"optimising {escape(metric)} ({goal}); {sweep.get('state')}", highlight=False)
    started: dict[int, float] = {}
    steps: dict[int, Any] = {}
    with _Progress(total, metric, goal) as progress:
        try:
            for event in handle.events():
                data, number = event.data, event.data.get("number")
                if event.kind == "trial_started" and isinstance(number, int):
                    started[number] = time.monotonic()
                elif event.kind == "trial_reported" and isinstance(number, int):
                    steps[number] = data.get("step")
                elif event.kind == "trial_finished" and isinstance(number, int):
                    progress.on_event("finished", _remote_record(data, steps.get(number), started.get(number)))
                elif event.kind == "sweep_state" and data.get("state") not in FINAL_STATES:
                    progress.progress.console.print(f"{handle.id}: {data.get('state')}", highlight=False,
                                                    markup=False)
        except KeyboardInterrupt:
            err_console.print(f"stopped watching; the sweep goes on (`automl watch {handle.id}` follows it again)",
                              highlight=False, markup=False)
            raise typer.Exit(130) from None
    final = handle.wait()
    _print_remote_result(final, handle.trials())
    if final.get("state") == "FINISHED":
        return 0
    err_console.print(f"[red]{final.get('state')}:[/red] {escape(str(final.get('error') or 'no error recorded'))}",
                      highlight=False, soft_wrap=True)
    return 1


def _remote_record(data: dict[str, Any], step: Any, started: float | None) -> TrialRecord:
    """A ``trial_finished`` event as the record `_Progress` prints. Epochs and seconds come from the event where it
    has them, else from the trial's last ``trial_reported`` step and the time between its events here."""
    from automl.engine.records import TrialRecord, TrialState

    state: Any = str(data.get("state") or "?")
    if state in TrialState.__members__:
        state = TrialState(state)
    epochs = data.get("epochs", step)
    seconds = data.get("seconds")
    if not isinstance(seconds, int | float):
        seconds = 0.0 if started is None else time.monotonic() - started
    value = data.get("value")
    error = data.get("error")
    return TrialRecord(number=int(data["number"]), params=dict(data.get("params") or {}), state=state,
                       value=float(value) if isinstance(value, int | float) else None,
                       epochs=int(epochs) if isinstance(epochs, int | float) else 0, seconds=float(seconds),
                       error=error if isinstance(error, str) else None)


def _remote_metric(sweep: dict[str, Any]) -> str:
    metric = sweep.get("metric")
    if isinstance(metric, list):  # several objectives: the first names the table's value column
        metric = metric[0] if metric else None
    if isinstance(metric, dict):
        metric = metric.get("name")
    return str(metric or "value")


def _when(stamp: Any) -> str:
    """An ISO 8601 timestamp of the service (UTC) in this machine's local time, as `status` prints times."""
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(str(stamp))
    except ValueError:
        return "-"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _print_remote_result(sweep: dict[str, Any], trials: list[dict[str, Any]]) -> None:
    """The end of `automl watch`: `_print_result`'s leaderboard and best trial, from the service's answers."""
    from datetime import datetime

    from rich.markup import escape
    from rich.table import Table

    metric = _remote_metric(sweep)
    top = trials[:10]
    names = list(dict.fromkeys(str(k) for t in top for k in (t.get("params") or {})))
    table = Table(title=f"leaderboard: {sweep.get('id')} (top {len(top)} of {len(trials)})")
    for col in ("trial", "state", metric):
        table.add_column(col, justify="left" if col == "state" else "right")
    for name in names:  # a parameter named like a column above says it is one
        table.add_column(f"params.{name}" if name in ("trial", "state", metric) else name, justify="right")
    for t in top:
        params = t.get("params") or {}
        table.add_row(_cell(t.get("number")), _cell(t.get("state")), _cell(t.get("value")),
                      *[_cell(params.get(n)) for n in names])
    console.print(table)
    counts = sweep.get("trials") or {}
    line = "trials: " + (", ".join(f"{counts[k]} {k}" for k in ("complete", "stopped", "failed", "running")
                                   if counts.get(k)) or "none")
    try:
        wall = (datetime.fromisoformat(sweep["finished"]) - datetime.fromisoformat(sweep["started"])).total_seconds()
        line += f" in {wall:.1f}s"
    except (KeyError, TypeError, ValueError):
        pass  # never started, or still running
    console.print(line, highlight=False)
    best = sweep.get("best")
    if not best:
        console.print("[yellow]no trial completed; no best model[/yellow]")
        return
    value = best.get("value")
    console.print(f"[bold green]best trial {best.get('number')}[/bold green]: {escape(metric)} = "
                  f"{_cell(value) if not isinstance(value, float) else f'{value:.4f}'}", highlight=False)
    mlflow = sweep.get("mlflow") or {}
    console.print(f"  params:    {best.get('params')}", highlight=False, markup=False)
    console.print(f"  run id:    {best.get('run_id')}   (sweep run {mlflow.get('run_id')})", highlight=False)
    console.print(f"  model URI: {best.get('model_uri')}", highlight=False, markup=False)
    if mlflow.get("url"):
        console.print(f"  MLflow:    {mlflow['url']}", highlight=False, markup=False)


def _remote_status(client: Client, sweep_id: str | None) -> None:
    """`automl status --server`: the service's sweeps, or one sweep's trials (in trial order, as locally)."""
    from rich.table import Table

    from automl.client import RemoteSweep

    if sweep_id is None:
        table = Table(title=f"sweeps on {mask_url(client.url)}")
        for col in ("sweep", "owner", "state", "trials", "metric", "best", "created"):
            table.add_column(col)
        for s in client.sweeps():
            counts = s.get("trials") or {}
            done = sum(int(counts.get(k) or 0) for k in ("complete", "stopped", "failed"))
            planned = (s.get("budget") or {}).get("trials")
            best = (s.get("best") or {}).get("value")
            table.add_row(str(s.get("id")), str(s.get("owner") or "-"), str(s.get("state")),
                          f"{done}/{planned}" if planned else str(done), _remote_metric(s),
                          f"{best:.4f}" if isinstance(best, int | float) else "-", _when(s.get("created")))
        console.print(table)
        return
    handle = RemoteSweep(client, sweep_id)
    sweep, trials = handle.status(), handle.trials()
    metric = _remote_metric(sweep)
    table = Table(title=f"{sweep.get('id', sweep_id)}: {sweep.get('state')}")
    for col in ("trial", "state", metric, "params", "run id"):
        table.add_column(col)
    for t in sorted(trials, key=lambda t: t["number"] if isinstance(t.get("number"), int) else -1):
        value = t.get("value")
        params = ", ".join(f"{k}={_cell(v)}" for k, v in (t.get("params") or {}).items())
        table.add_row(_cell(t.get("number")), _cell(t.get("state")),
                      f"{value:.4f}" if isinstance(value, int | float) else "-", params, _cell(t.get("run_id")))
    console.print(table)
    if sweep.get("error"):
        console.print(f"error: {sweep['error']}", highlight=False, markup=False, soft_wrap=True)


def main() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    app()


if __name__ == "__main__":
    main()
