"""Warm starts: a new sweep's sampler begins with the finished trials of earlier sweeps (``warm_start:`` in the spec,
``automl run SPEC --continue``). The seeding trials are added to the new sweep's Optuna study as finished trials; they
are not run again and do not count against the budget.

Where the trials come from, for each entry of ``warm_start`` (first match wins):

1. a sweep id (``digits-mlp-20261130-101500``): that sweep's trials;
2. a sweep name (``digits-mlp``): the trials of every sweep of that name;
3. an MLflow experiment name: every finished run in it that has the metric (runs logged by hand or by another tool
   count too), except automl's own parent runs.

Which trials qualify, as SageMaker states the compatibility of its warm starts:

- the same metric and goal: a sweep that optimised another metric (or the other way) is refused, in one line;
- finished: automl's COMPLETE trials (stopped, failed and killed ones say nothing of the end of training), or for
  other runs, FINISHED with the metric logged;
- inside this sweep's space: every parameter a trial of this space would use (following ``when`` branches) is there
  and within its range or among its choices; parameters this space does not have are ignored;
- trained the same way: a parameter this sweep fixes (``fixed: {epochs: 20}``) had that value.

Trials that do not qualify are left out and counted in the run header's note. None qualifying is not an error: the
sweep starts cold and says so.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from automl.errors import AutoMLError

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from automl.orchestrator import Sweep

MAX_SEEDS = 10_000  # beyond this many trials a sampler learns nothing more, and TPE's cost grows with every trial


@dataclass
class Seeded:
    trials: int = 0
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Candidate:
    run_id: str
    params: dict[str, str]
    values: list[float]


def seed_study(study: optuna.Study, plan: Sweep, found: tuple[list[_Candidate], list[str]]) -> Seeded:
    """Add the qualifying earlier trials (``find_candidates``) to ``study`` before it asks for any trial; returns
    what was added."""
    import optuna

    spec = plan.spec
    candidates, sources = found
    seeded = Seeded(sources=sources)
    left_out: Counter[str] = Counter()
    seen: set[str] = set()
    for candidate in candidates:
        if seeded.trials >= MAX_SEEDS:
            left_out[f"more than {MAX_SEEDS}"] += 1
            continue
        if candidate.run_id in seen:
            continue
        seen.add(candidate.run_id)
        reason = _trained_differently(candidate.params, spec.fixed)
        if reason is None:
            try:
                params, distributions = plan.space.place(candidate.params)
            except ValueError as exc:
                reason = _reason(str(exc))
        if reason is not None:
            left_out[reason] += 1
            continue
        values = candidate.values
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions,
            values=values if len(values) > 1 else None, value=values[0] if len(values) == 1 else None,
            user_attrs={"automl": {"warm_start": candidate.run_id}},
        ))
        seeded.trials += 1
    where = ", ".join(sources)
    if seeded.trials:
        note = f"warm_start: {seeded.trials} earlier trial(s) from {where} seed the sampler"
    else:
        note = f"warm_start: no earlier trial from {where} qualifies; the sweep starts cold"
    if left_out:
        note += "; left out: " + ", ".join(f"{n} {why}" for why, n in left_out.most_common())
    seeded.notes.append(note)
    return seeded


def _reason(message: str) -> str:
    """A refusal of ``SearchSpace.place`` as a short reason to count: "outside the range of lr", "lacks momentum"."""
    if message.startswith("it has no "):
        return f"lacking {message.removeprefix('it has no ')}"
    name = message.removeprefix("its ").split("=")[0]
    if "outside" in message:
        return f"outside the range of {name}"
    return f"with another kind of {name}"


def _trained_differently(params: dict[str, str], fixed: dict[str, Any]) -> str | None:
    for name, value in fixed.items():
        if name in params and params[name] != str(value):
            return f"trained with another {name}"
    return None


def find_candidates(client: MlflowClient, plan: Sweep) -> tuple[list[_Candidate], list[str]]:
    """The finished trials of every ``warm_start`` entry, and the entries as found (sweep ids, experiment names)."""
    from automl.redact import mask_url
    from automl.tracking import TAG_ROLE, TAG_SWEEP, TAG_SWEEP_ID

    spec = plan.spec
    names = [m.name for m in spec.objectives]
    goals = [str(m.goal) for m in spec.objectives]
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: list[_Candidate] = []
    sources: list[str] = []
    for entry in spec.warm_start:
        quoted = entry.replace("'", "")
        parents: list[Any] = []
        for key in (TAG_SWEEP_ID, TAG_SWEEP):
            parents = client.search_runs(experiments, filter_string=f"tags.`{key}` = '{quoted}' and "
                                                                  f"tags.`{TAG_ROLE}` = 'sweep'",
                                         order_by=["attributes.start_time ASC"], max_results=1000)
            if parents:
                break
        if parents:
            for parent in parents:
                _check_objectives(parent, names, goals)
                sources.append(parent.data.tags.get(TAG_SWEEP_ID, parent.info.run_id))
                found += _children(client, parent, names)
            continue
        experiment = client.get_experiment_by_name(entry)
        if experiment is None:
            raise AutoMLError(f"warm_start: no sweep or MLflow experiment named '{entry}' in "
                              f"{mask_url(plan.tracking_uri)}; `automl status` lists the sweeps")
        sources.append(f"experiment {entry}")
        runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=50_000)
        for run in runs:
            if run.data.tags.get(TAG_ROLE) == "sweep":
                continue
            if run.data.tags.get("automl.state") not in (None, "COMPLETE"):
                continue
            candidate = _candidate(run, names)
            if candidate is not None:
                found.append(candidate)
    return found, sources


def _check_objectives(parent: Any, names: list[str], goals: list[str]) -> None:
    metric = parent.data.params.get("sweep.metric", "")
    goal = parent.data.params.get("sweep.goal", "")
    if metric.split(",") != names or goal.split(",") != goals:
        sweep = parent.data.tags.get("automl.sweep_id", parent.info.run_id)
        raise AutoMLError(f"warm_start: sweep {sweep} optimised {metric} ({goal}) and this sweep "
                          f"{','.join(names)} ({','.join(goals)}); a warm start needs the same metric and goal")


def _children(client: MlflowClient, parent: Any, names: list[str]) -> list[_Candidate]:
    from automl.tracking import PARENT_TAG

    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and "
                                            "tags.`automl.state` = 'COMPLETE'",
                              max_results=50_000, order_by=["attributes.start_time ASC"])
    return [c for c in (_candidate(run, names) for run in runs) if c is not None]


def _candidate(run: Any, names: list[str]) -> _Candidate | None:
    """A finished run with every metric the sweep optimises (its last value), or None."""
    values = [run.data.metrics.get(n) for n in names]
    if any(v is None for v in values):
        return None
    return _Candidate(run.info.run_id, dict(run.data.params), [float(v) for v in values])
